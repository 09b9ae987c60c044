"""Normalisation rules (design.md section 8): LayerNorm (any normalised shape, functional,
channels-first), GroupNorm, RMSNorm and ResMLP's addcmul affine take their statistics from the
total; each part is centred by its own mean, divided by the total's std, times gamma; beta is
split by the affine rule. LayerScale goes through ``Scale``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.convnext import LayerNorm2d
from torchvision.ops import StochasticDepth

import fastacd
from fastacd.engine import windowed

from conftest import assert_close_scaled

EPS = 1e-20  # the affine rule's constant
FAST_BACKENDS = [b for b in fastacd.available_backends() if b != "reference"]

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial gamma and beta for every norm (their default init is 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                for p in (m.weight, getattr(m, "bias", None)):
                    if p is not None:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p is m.weight else 0.0))
    return model


# --------------------------------------------------------------------------------------------
# Small models covering every rule and variant
# --------------------------------------------------------------------------------------------
class TokenLayerNorms(nn.Module):
    """nn.LayerNorm with affine, without, bias=False, over two dims, and F.layer_norm."""

    def __init__(self, t=5, d=8):
        super().__init__()
        self.fc = nn.Linear(6, d)
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=False)
        self.ln3 = nn.LayerNorm(d, bias=False, eps=1e-3)
        self.ln4 = nn.LayerNorm((t, d))
        self.w, self.b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.head = nn.Linear(t * d, 3)

    def forward(self, x):
        h = self.ln1(self.fc(x))
        h = self.ln2(F.gelu(h)) + h
        h = self.ln3(h)
        h = self.ln4(h)
        h = F.layer_norm(h, (h.shape[-1],), self.w, self.b, eps=1e-6)
        return self.head(h.flatten(1))


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block as timm / torchvision write it: depthwise conv, a channels-last
    LayerNorm through permute + F.layer_norm, MLP with GELU, LayerScale, drop path (eval),
    residual; a torchvision LayerNorm2d and a strided conv downsample, then the head."""

    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.stem_norm = LayerNorm2d(dim, eps=1e-6)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm_w, self.norm_b = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.drop_path = StochasticDepth(0.1, "row")
        self.down_norm = LayerNorm2d(dim)
        self.down = nn.Conv2d(dim, 2 * dim, 2, stride=2)
        self.head_norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, 4)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        h = self.dw(x).permute(0, 2, 3, 1)
        h = F.layer_norm(h, (h.shape[-1],), self.norm_w, self.norm_b, 1e-6)
        h = self.fc2(F.gelu(self.fc1(h)))
        h = (h * self.gamma).permute(0, 3, 1, 2)            # LayerScale: Scale
        x = x + self.drop_path(h)
        x = self.down(self.down_norm(x))
        return self.head(self.head_norm(x.mean((2, 3))))


class GroupNormCNN(nn.Module):
    """GroupNorm module (+ ReLU folded into it), F.group_norm, one group (PoolFormer's
    GroupNorm1), an affine-free GroupNorm, then a head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.g1 = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.w, self.b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.g3 = nn.GroupNorm(1, 8)
        self.g4 = nn.GroupNorm(4, 8, affine=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.g1(self.c1(x)))
        h = F.silu(F.group_norm(self.c2(h), 4, self.w, self.b, 1e-4))
        h = self.g3(h) + h
        h = self.g4(h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class RMSNormMLP(nn.Module):
    """nn.RMSNorm, F.rms_norm with the default eps and no weight, and over two dims."""

    def __init__(self, t=4, d=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, d), nn.Linear(d, d)
        self.n1 = nn.RMSNorm(d, eps=1e-6)
        self.n3 = nn.RMSNorm((t, d))
        self.head = nn.Linear(t * d, 3)

    def forward(self, x):
        h = F.silu(self.n1(self.fc1(x)))
        h = F.rms_norm(self.fc2(h), (h.shape[-1],))
        return self.head(self.n3(h).flatten(1))


class ResMLPBlock(nn.Module):
    """ResMLP (timm's ResBlock): the addcmul affine as 'norm', token mixing through transposes,
    LayerScale by ``*`` and by in-place ``mul_``; an addcmul with ``value`` written as a method."""

    def __init__(self, t=4, d=8):
        super().__init__()
        self.alpha1, self.beta1 = nn.Parameter(torch.randn(1, 1, d)), nn.Parameter(torch.randn(1, 1, d))
        self.alpha2, self.beta2 = nn.Parameter(torch.randn(1, 1, d)), nn.Parameter(torch.randn(1, 1, d))
        self.embed = nn.Linear(6, d)
        self.tokens = nn.Linear(t, t)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ls1, self.ls2 = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.rand(d) + 0.5)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.ls1 * self.tokens(torch.addcmul(self.beta1, self.alpha1, x).transpose(1, 2)).transpose(1, 2)
        h = self.fc2(F.gelu(self.fc1(self.beta2.addcmul(self.alpha2, x, value=0.5))))
        x = x + h.mul_(self.ls2)
        return self.head(x.mean(1))


CASES = {"layernorm": (TokenLayerNorms, (1, 5, 6)), "convnext_block": (ConvNeXtBlock, (1, 3, 16, 16)),
         "groupnorm": (GroupNormCNN, (1, 3, 8, 8)), "rmsnorm": (RMSNormMLP, (1, 4, 6)),
         "resmlp": (ResMLPBlock, (1, 4, 6))}
KINDS = {"layernorm": {"layernorm"}, "convnext_block": {"layernorm", "scale"}, "groupnorm": {"groupnorm"},
         "rmsnorm": {"rmsnorm"}, "resmlp": {"addcmul", "scale"}}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = CASES[name]
    return randomise_affine(factory()).eval().double(), torch.randn(shape, dtype=torch.float64)


def masks_for(shape, n=4, seed=1) -> torch.Tensor:
    """n random masks (over positions or tokens), then the full and the empty mask."""
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 4:
        m = (torch.rand(n, 1, *shape[2:], generator=g) > 0.5).double()
    else:
        m = (torch.rand(n, shape[1], 1, generator=g) > 0.5).double().expand(n, *shape[1:])
    return torch.cat([m, torch.ones(1, *m.shape[1:]), torch.zeros(1, *m.shape[1:])])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_reference_sums_and_batches(name, dtype):
    model, x = make(name)
    masks = masks_for(x.shape)

    def close(actual, expected):
        # the full mask too: its i = a - r is a rounding residue, which numerical zero keeps out
        # of the beta split (design.md 9; 3e-3 of the scale in float32 before it, 1e-7 now)
        assert_close_scaled(actual, expected, dtype)

    with torch.no_grad():
        ref_rel, ref_irrel = fastacd.reference.cd(model, x, masks)
        model, x, masks = model.to(dtype), x.to(dtype), masks.to(dtype)
        out = model(x)
        for backend in FAST_BACKENDS:
            dec = fastacd.Decomposer(model, backend=backend)
            assert KINDS[name] <= {s.kind for s in dec.graph.steps.values()}
            assert torch.equal(dec.forward(x), out)  # the total is the model's own computation
            res = dec.cd(x, masks)
            close(res.relevant, ref_rel.to(dtype))
            close(res.irrelevant, ref_irrel.to(dtype))
            assert_close_scaled(res.relevant + res.irrelevant, out.expand_as(res.relevant), dtype)
            one = torch.cat([dec.cd(x, m[None]).relevant for m in masks])
            close(res.relevant, one)
            # the empty mask: only beta's share eps / (2 eps + |zi|) reaches it, ~1e-20 of beta
            assert res.relevant[-1].abs().max() <= 1e-6 * out.abs().max()
    # the reference's own parts sum to the output too
    assert_close_scaled((ref_rel + ref_irrel).to(dtype), out.expand_as(res.relevant), dtype)


# --------------------------------------------------------------------------------------------
# Hand-computed: the formula of each rule on a one-layer model
# --------------------------------------------------------------------------------------------
def affine_split(zr, zi, beta):
    pr = (zr.abs() + EPS) / ((zr.abs() + EPS) + (zi.abs() + EPS))
    return zr + pr * beta


def test_layernorm_by_hand():
    torch.manual_seed(0)
    ln = randomise_affine(nn.LayerNorm(6, eps=1e-3)).eval().double()
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    mask = (torch.rand(2, 3, 6) > 0.5).double()
    r, i = mask * x, (1 - mask) * x
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-3)
    zr = (r - r.mean(-1, keepdim=True)) / std * ln.weight
    zi = (i - i.mean(-1, keepdim=True)) / std * ln.weight
    torch.testing.assert_close(zr + zi, ln(x).detach() - ln.bias.detach().expand(2, 3, 6))
    with torch.no_grad():
        for backend in fastacd.available_backends():
            res = fastacd.Decomposer(ln, backend=backend).cd_relevant_input(x, r)
            torch.testing.assert_close(res.relevant, affine_split(zr, zi, ln.bias).detach())


def test_channels_first_layernorm_by_hand():
    """torchvision's LayerNorm2d: normalised over the channels at each position."""
    torch.manual_seed(0)
    ln = randomise_affine(LayerNorm2d(4)).eval().double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    mask = (torch.rand(2, 1, 3, 3) > 0.5).double()
    r, i = mask * x, (1 - mask) * x
    std = torch.sqrt(x.var(1, unbiased=False, keepdim=True) + ln.eps)
    w, b = ln.weight.detach()[:, None, None], ln.bias.detach()[:, None, None]
    zr = (r - r.mean(1, keepdim=True)) / std * w
    zi = (i - i.mean(1, keepdim=True)) / std * w
    with torch.no_grad():
        dec = fastacd.Decomposer(nn.Sequential(ln).eval())  # (a model's root is traced through)
        assert [s.kind for s in dec.graph.steps.values()] == ["layernorm"]  # one node, not permutes
        torch.testing.assert_close(dec.cd(x, mask).relevant, affine_split(zr, zi, b))


def test_groupnorm_by_hand():
    torch.manual_seed(0)
    gn = randomise_affine(nn.GroupNorm(2, 4, eps=1e-2)).eval().double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    mask = (torch.rand(2, 1, 3, 3) > 0.5).double()
    r, i = mask * x, (1 - mask) * x

    def per_group(t, stat):  # a statistic of each group of 2 channels, broadcast back
        g = t.reshape(t.shape[0], 2, 2, 3, 3)
        return stat(g).expand_as(g).reshape(t.shape)
    std = torch.sqrt(per_group(x, lambda g: g.var((2, 3, 4), unbiased=False, keepdim=True)) + 1e-2)
    w, b = gn.weight.detach()[:, None, None], gn.bias.detach()[:, None, None]
    zr = (r - per_group(r, lambda g: g.mean((2, 3, 4), keepdim=True))) / std * w
    zi = (i - per_group(i, lambda g: g.mean((2, 3, 4), keepdim=True))) / std * w
    with torch.no_grad():
        for backend in fastacd.available_backends():
            res = fastacd.Decomposer(gn, backend=backend).cd(x, mask)
            torch.testing.assert_close(res.relevant, affine_split(zr, zi, b))


def test_rmsnorm_by_hand():
    torch.manual_seed(0)
    norm = randomise_affine(nn.RMSNorm(5, eps=1e-4)).eval().double()
    x = torch.randn(1, 2, 5, dtype=torch.float64)
    mask = (torch.rand(3, 2, 5) > 0.5).double()
    with torch.no_grad():
        rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-4)
        for backend in fastacd.available_backends():
            res = fastacd.Decomposer(norm, backend=backend).cd(x, mask)
            torch.testing.assert_close(res.relevant, mask * x / rms * norm.weight)  # no centring, no beta


def test_addcmul_affine_by_hand():
    class Affine(nn.Module):  # timm's ResMLP Affine
        def __init__(self):
            super().__init__()
            self.alpha, self.beta = nn.Parameter(torch.randn(1, 1, 5)), nn.Parameter(torch.randn(1, 1, 5))

        def forward(self, x):
            return torch.addcmul(self.beta, self.alpha, x)

    torch.manual_seed(0)
    model = Affine().eval().double()
    x = torch.randn(1, 3, 5, dtype=torch.float64)
    mask = (torch.rand(2, 3, 5) > 0.5).double()
    with torch.no_grad():
        zr, zi = model.alpha * mask * x, model.alpha * (1 - mask) * x
        for backend in fastacd.available_backends():
            res = fastacd.Decomposer(model, backend=backend).cd(x, mask)
            torch.testing.assert_close(res.relevant, affine_split(zr, zi, model.beta))


def test_layer_scale_by_hand():
    """LayerScale ``x * gamma`` and ``x.mul_(gamma)`` are a scale by a constant: r * gamma."""
    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.g1, self.g2 = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            h = x * self.g1
            return h + (x + 0).mul_(self.g2)

    torch.manual_seed(0)
    model = LayerScale().eval().double()
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    mask = (torch.rand(2, 3, 4) > 0.5).double()
    with torch.no_grad():
        dec = fastacd.Decomposer(model)
        assert [s.kind for s in dec.graph.steps.values()].count("scale") == 2
        torch.testing.assert_close(dec.cd(x, mask).relevant, mask * x * (model.g1 + model.g2))
        assert torch.equal(dec.forward(x), model(x))


def test_empty_mask_gets_half_of_beta_where_the_total_is_flat():
    """The affine rule's share of beta at zr = 0: eps / (2 eps + |zi|): ~1e-20 of beta where the
    total varies over the normalised dims, exactly half of beta where it is flat (zi = 0 too)."""
    torch.manual_seed(0)
    ln = randomise_affine(nn.LayerNorm(4)).eval().double()
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    x[0, 1] = 0.7  # a flat token: normalised to 0, its output is beta
    with torch.no_grad():
        for backend in fastacd.available_backends():
            res = fastacd.Decomposer(ln, backend=backend).cd(x, torch.zeros(1, 2, 4, dtype=torch.float64))
            zi = (x[0, 0] - x[0, 0].mean()) / torch.sqrt(x[0, 0].var(unbiased=False) + ln.eps) * ln.weight
            torch.testing.assert_close(res.relevant[0, 0], EPS / (2 * EPS + zi.abs()) * ln.bias, rtol=1e-12, atol=0)
            assert res.relevant[0, 0].abs().max() < 1e-15
            torch.testing.assert_close(res.relevant[0, 1], ln.bias / 2)
            torch.testing.assert_close(res.irrelevant[0, 1], ln.bias / 2)


# --------------------------------------------------------------------------------------------
# Windowed pass: LayerNorm2d and a per-channel addcmul are local given the total
# --------------------------------------------------------------------------------------------
class LocalNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.n1 = LayerNorm2d(6)
        self.alpha, self.beta = nn.Parameter(torch.randn(6, 1, 1)), nn.Parameter(torch.randn(6, 1, 1))
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.gn = nn.GroupNorm(2, 6)
        self.head = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        h = F.gelu(self.n1(self.c1(x)))
        h = torch.relu(torch.addcmul(self.beta, self.alpha, h))
        h = self.gn(self.c2(h))  # not local: a part's mean over a group reads every position
        return self.head(h.flatten(1))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_windowed_equals_full_through_local_norms(backend):
    torch.manual_seed(0)
    model = randomise_affine(LocalNormNet()).eval().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    dec = fastacd.Decomposer(model, backend=backend)
    deltas = torch.zeros(4, 1, 16, 16, dtype=torch.float64)
    deltas[0, :, :4, :4] = deltas[1, :, 12:, 10:] = deltas[2, :, 6:9, 5:8] = deltas[3, :, 0:2, 13:] = 1
    base = torch.zeros(16, 16, dtype=torch.float64)
    base[4:10, 4:10] = 1
    with torch.no_grad():
        values, _ = dec._total_pass(x)
        win0 = windowed.input_windows(torch.maximum(base, deltas), base.expand(1, 1, 16, 16))
        plans = windowed.plan(dec.graph, values, win0, max_fraction=1.0)[0]
        kinds = {dec.graph.steps[n].kind: p.win is not None for n, p in plans.items()}
        assert kinds["layernorm"] and kinds["addcmul"] and not kinds["groupnorm"]
        for b in (torch.zeros_like(base), base):
            full = dec.cd(x, torch.maximum(b, deltas))
            info = {}
            res = dec.cd_delta(x, b, deltas, max_cost_ratio=float("inf"), stats=info)
            assert info["windowed"]
            assert_close_scaled(res.relevant, full.relevant, torch.float64)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
def test_variants_without_an_exact_rule_are_refused():
    class InputWeight(nn.Module):
        def forward(self, x):
            return F.layer_norm(x, (4,), weight=x[0, 0])

    class TwoFactors(nn.Module):
        def forward(self, x):
            return torch.addcmul(torch.zeros(4), x, x * 2)

    class OntoInput(nn.Module):
        def forward(self, x):
            return torch.addcmul(x, torch.ones(4), torch.ones(4))

    for model, match in ((InputWeight(), "weight or bias depends on the input"),
                         (TwoFactors(), "two input-dependent factors"),
                         (OntoInput(), "addcmul onto an input-dependent tensor")):
        with pytest.raises(fastacd.UnsupportedOpError, match=match):
            fastacd.Decomposer(model.eval())


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------
def check_model(model: nn.Module, size: int, n: int = 3, f32: bool = True) -> None:
    """float64 engine = reference (tight), sums to the output, the total is the model's own
    output; float32 against the float64 reference."""
    model = model.eval().double()
    torch.manual_seed(1)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    masks = (torch.rand(n, 1, size, size) > 0.5).double()
    with torch.no_grad():
        out = model(x)
        ref_rel, _ = fastacd.reference.cd(model, x, masks)
        dec = fastacd.Decomposer(model)
        res = dec.cd(x, masks)
        assert torch.equal(dec.forward(x), out)
        assert_close_scaled(res.relevant, ref_rel, torch.float64)
        assert_close_scaled(res.relevant + res.irrelevant, out.expand_as(res.relevant), torch.float64)
        if f32:
            model = model.float()
            res32 = fastacd.Decomposer(model).cd(x.float(), masks.float())
            assert_close_scaled(res32.relevant, ref_rel.float(), torch.float32)


def test_torchvision_convnext_tiny():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10)
    dec = fastacd.Decomposer(model.eval())
    kinds = [s.kind for s in dec.graph.steps.values()]
    assert kinds.count("layernorm") == 18 + 4 + 1  # 18 blocks, the stem and 3 downsamplings, the head
    check_model(model, 32)


def timm_model(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    # timm zero-initialises heads and starts LayerScale / affine at 1e-4, 1 and 0: give every
    # such parameter a value so that each rule carries weight in the output
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("head") or any(k in n for k in ("ls", "gamma", "alpha", "beta", "layer_scale")):
                p.normal_(0, 0.2)
    return randomise_affine(model)


def test_timm_convnext_atto():
    check_model(timm_model("convnext_atto"), 32)


def test_timm_poolformer_groupnorm():
    model = timm_model("poolformer_s12")
    assert "groupnorm" in {s.kind for s in fastacd.Decomposer(model.eval()).graph.steps.values()}
    check_model(model, 32)


def test_timm_resmlp_addcmul():
    model = timm_model("resmlp_12_224", img_size=32).eval().double()
    assert "addcmul" in {s.kind for s in fastacd.Decomposer(model).graph.steps.values()}
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    masks = (torch.rand(3, 1, 32, 32) > 0.5).double()
    with torch.no_grad():
        out = model(x)
        ref_rel, _ = fastacd.reference.cd(model, x, masks)
        dec = fastacd.Decomposer(model)
        res = dec.cd(x, masks)
        assert_close_scaled(res.relevant, ref_rel, torch.float64)
        # Linear on token sequences adds its bias after the weights (rules/affine.py), not inside
        # the model's own addmm: the total differs from model(x) by rounding (3e-14 here)
        assert_close_scaled(dec.forward(x), out, torch.float64)
        assert_close_scaled(res.relevant + res.irrelevant, out.expand_as(res.relevant), torch.float64)


def test_cdep_penalty_through_norms_matches_the_reference():
    """CDEP's paired pass calls the rules with N images' totals and K*N relevant rows (no
    aux): the statistics are computed per image and repeated per mask. Values and gradients
    equal the reference backend's."""
    from fastacd.train.cdep import CDEPPenalty
    torch.manual_seed(0)
    model = randomise_affine(LocalNormNet()).eval().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    masks = (torch.rand(2, 3, 1, 16, 16) > 0.5).double()
    got = {}
    for backend in ("paired", "reference"):
        model.zero_grad()
        pen = CDEPPenalty(model, backend=backend)(x, masks)
        pen.backward()
        got[backend] = (pen.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(got["paired"][0], got["reference"][0])
    for a, b in zip(got["paired"][1], got["reference"][1]):
        torch.testing.assert_close(a, b)


def test_rms_norm_written_out_gives_the_rmsnorm_rule_numbers():
    """timm's own rms_norm (used where torch lacks F.rms_norm, and by its RmsNorm2d) is written
    out, ``x * rsqrt(mean(x^2) + eps) * w``: the normaliser is context, and the relevant part
    equals the rmsnorm rule's on nn.RMSNorm."""
    fast_norm = pytest.importorskip("timm.layers.fast_norm")

    class WrittenOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.w, self.fc2 = nn.Linear(6, 8), nn.Parameter(torch.randn(8)), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(fast_norm.rms_norm(self.fc1(x), (8,), self.w, 1e-6))

    torch.manual_seed(0)
    theirs = WrittenOut().eval().double()
    ours = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8, eps=1e-6), nn.Linear(8, 3)).eval().double()
    with torch.no_grad():
        for a, b in ((ours[0], theirs.fc1), (ours[2], theirs.fc2)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        ours[1].weight.copy_(theirs.w)
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    masks = masks_for(x.shape)
    with torch.no_grad():
        dec = fastacd.Decomposer(theirs)
        assert "rmsnorm" not in {s.kind for s in dec.graph.steps.values()}
        assert_close_scaled(dec.cd(x, masks).relevant, fastacd.Decomposer(ours).cd(x, masks).relevant,
                            torch.float64)

"""torch.nn layers outside the classification zoo that had no rule (transposed convolutions,
instance and local response norms, GLU, SyncBatchNorm, the shrink / threshold / RReLU /
LogSigmoid activations): each against an independent formulation the engine already
decomposes (the same map written with other layers), the reference, both captures, the
windowed pass and the CDEP penalty; and the variants that stay refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from conftest import assert_cdep_matches_reference, assert_close_scaled
from models import randomize_batchnorm

CAPTURES = ["fx", "export"]


def _x_and_masks(size=8, channels=3, masks=3):
    x = torch.randn(1, channels, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = (torch.rand(masks, 1, size, size, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    return x, m


def _around(mid: nn.Module, out_channels: int = 4, size: int = 8) -> nn.Module:
    """conv -> mid -> conv -> ReLU -> linear head, seeded: two calls give the same weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), mid, nn.Conv2d(out_channels, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    return net.eval().double()


def _cd(net, x, masks, capture="fx", **kw):
    with torch.no_grad():
        return fastacd.Decomposer(net, capture=capture, **kw).cd(x, masks)


def _same_cd(a: nn.Module, b: nn.Module, capture: str, rtol=1e-10):
    x, masks = _x_and_masks()
    ra, rb = _cd(a, x, masks, capture), _cd(b, x, masks, capture)
    torch.testing.assert_close(ra.relevant, rb.relevant, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(ra.irrelevant, rb.irrelevant, rtol=rtol, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(ra.relevant + ra.irrelevant, a(x).expand_as(ra.relevant), rtol=1e-12, atol=1e-12)
    ref = fastacd.reference.cd(a, x, masks)
    torch.testing.assert_close(ra.relevant, ref[0], rtol=1e-10, atol=1e-12)
    return ra


def _flipped_as_conv(t: nn.ConvTranspose2d) -> nn.Conv2d:
    """A stride-1 transposed convolution as the convolution it is: weights flipped, in and out
    channels swapped, padding k - 1 - p."""
    k, p = t.kernel_size[0], t.padding[0]
    conv = nn.Conv2d(t.in_channels, t.out_channels, k, padding=k - 1 - p).double().eval()
    with torch.no_grad():
        conv.weight.copy_(t.weight.flip(2, 3).transpose(0, 1))
        conv.bias.copy_(t.bias)
    return conv


@pytest.mark.parametrize("capture", CAPTURES)
def test_conv_transpose_is_the_flipped_convolution(capture):
    """ConvTranspose2d (stride 1) gives the CD of the same map written as a Conv2d."""
    transposed = _around(nn.ConvTranspose2d(4, 4, 3, padding=1))
    as_conv = _around(nn.Identity())
    as_conv[1] = _flipped_as_conv(transposed[1])
    _same_cd(transposed, as_conv, capture)


class _UpNet(nn.Module):
    """A decoder step: strided transposed convolutions with output_padding and output_size, the
    functional form, a 1-d one on the rows."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.up_sized = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
        self.w = nn.Parameter(torch.randn(2, 2, 2, 2) * 0.4)
        self.line = nn.ConvTranspose1d(2, 2, 3, stride=2)
        self.head = nn.Linear(2 * 163, 3)

    def forward(self, x):
        y = torch.relu(self.up(torch.relu(self.down(x))))
        y = self.up_sized(self.down2(y), output_size=x.shape[2:])  # (8, 8): output padding 1
        y = F.conv_transpose2d(torch.relu(y), self.w, stride=1, padding=0)  # (9, 9)
        y = self.line(y.flatten(2))  # (N, 2, 81) -> (N, 2, 163)
        return self.head(y.flatten(1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_strided_conv_transpose_against_the_reference(capture):
    torch.manual_seed(0)
    net = _UpNet().eval().double()
    x, masks = _x_and_masks()
    res = _cd(net, x, masks, capture)
    ref = fastacd.reference.cd(net, x, masks)
    torch.testing.assert_close(res.relevant, ref[0], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(res.relevant + res.irrelevant, net(x).expand(3, -1), rtol=1e-12, atol=1e-12)
    f32 = _cd(net.float(), x.float(), masks.float(), capture)
    assert_close_scaled(f32.relevant.double(), ref[0], torch.float32)


def _set_affine(norm: nn.Module, other: nn.Module):
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(norm, name, None) is not None:
                getattr(norm, name).copy_(torch.linspace(0.3, 1.7, 4) if name in ("weight", "running_var")
                                          else torch.linspace(-0.5, 0.4, 4))
                getattr(other, name).copy_(getattr(norm, name))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_is_a_group_norm_per_channel(capture, affine):
    inorm, gnorm = nn.InstanceNorm2d(4, affine=affine), nn.GroupNorm(4, 4, affine=affine)
    if affine:
        _set_affine(inorm, gnorm)
    _same_cd(_around(inorm), _around(gnorm), capture)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("norm", ["instance", "sync"])
def test_running_statistics_norms_are_batchnorms(capture, norm):
    """An instance norm with running statistics (eval) and an eval SyncBatchNorm normalise
    with fixed statistics: a BatchNorm2d's CD."""
    layer = nn.InstanceNorm2d(4, affine=True, track_running_stats=True) if norm == "instance" else nn.SyncBatchNorm(4)
    bn = nn.BatchNorm2d(4)
    _set_affine(layer, bn)
    _same_cd(_around(layer), _around(bn), capture)


class _ExplicitLRN(nn.Module):
    """F.local_response_norm's arithmetic written out: the denominator is context (computed
    from the total), as any normaliser dividing a decomposed value."""

    def __init__(self, size, alpha, beta, k):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x):
        div = F.avg_pool3d(F.pad((x * x).unsqueeze(1), (0, 0, 0, 0, self.size // 2, (self.size - 1) // 2)),
                           (self.size, 1, 1), stride=1).squeeze(1)
        return x / (div * self.alpha + self.k) ** self.beta


@pytest.mark.parametrize("capture", CAPTURES)
def test_local_response_norm_divides_by_the_totals_statistic(capture):
    lrn = _around(nn.LocalResponseNorm(3, alpha=0.5, beta=0.75, k=1.0))
    explicit = _around(_ExplicitLRN(3, 0.5, 0.75, 1.0))
    _same_cd(lrn, explicit, capture)


class _ExplicitGLU(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


@pytest.mark.parametrize("capture", CAPTURES)
def test_glu_gates_with_the_totals_sigmoid(capture):
    """GLU's gate is context, as a sigmoid gate written out with chunk and sigmoid is."""
    _same_cd(_around(nn.GLU(dim=1), out_channels=2), _around(_ExplicitGLU(), out_channels=2), capture)


def _activation_map(act: nn.Module | None) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten())
    if act is not None:
        net.insert(1, act)
    return net.eval().double()


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("act, f", [
    (nn.Hardshrink(0.3), lambda t: F.hardshrink(t, 0.3)),
    (nn.Softshrink(0.3), lambda t: F.softshrink(t, 0.3)),
    (nn.RReLU(0.1, 0.3), lambda t: F.leaky_relu(t, 0.2)),  # eval: the mean slope
    (nn.Threshold(-0.2, 0.0), lambda t: F.threshold(t, -0.2, 0.0)),  # f(0) = 0
    (nn.Threshold(0.1, 0.5), lambda t: F.threshold(t, 0.1, 0.5) - 0.5),  # f(0) = 0.5: offset
    (nn.LogSigmoid(), lambda t: F.logsigmoid(t) - F.logsigmoid(torch.zeros((), dtype=t.dtype))),
], ids=["hardshrink", "softshrink", "rrelu", "threshold", "threshold_offset", "logsigmoid"])
def test_activations_apply_to_the_relevant_part(capture, act, f):
    """At the activation's output the relevant part is f(r) - f(0), r the convolution's."""
    x, masks = _x_and_masks()
    conv = _cd(_activation_map(None), x, masks, capture).relevant
    res = _cd(_activation_map(act), x, masks, capture)
    torch.testing.assert_close(res.relevant, f(conv), rtol=1e-12, atol=1e-14)
    ref = fastacd.reference.cd(_activation_map(act), x, masks)
    torch.testing.assert_close(res.relevant, ref[0], rtol=1e-12, atol=1e-14)


class _AllNew(nn.Module):
    """Every new rule in one net, for the windowed pass and the CDEP penalty."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(3, alpha=0.3)
        self.glu = nn.GLU(1)
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.shrink = nn.Softshrink(0.05)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.gn = nn.InstanceNorm2d(4, affine=True)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.inorm(self.glu(self.lrn(self.c1(x))))
        x = F.max_pool2d(self.shrink(self.c2(x)), 2)
        x = F.hardshrink(F.rrelu(self.up(x), 0.1, 0.2), 0.01)
        # not straight into the global pool: a per-channel norm's pooled relevant part is 0
        return self.head(F.adaptive_avg_pool2d(self.c3(self.gn(x)), 1).flatten(1))


def test_windowed_pass_equals_full():
    from test_windowed import ALWAYS, box
    torch.manual_seed(0)
    model = randomize_batchnorm(_AllNew()).eval().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    dec = fastacd.Decomposer(model)
    deltas = torch.stack([box(16, 16, 0, 0, 3), box(16, 16, 12, 12, 4), box(16, 16, 8, 1, 2, 5)])[:, None].double()
    base = box(16, 16, 2, 2, 5).double()
    with torch.no_grad():
        full = dec.cd(x, torch.maximum(base, deltas))
        res = dec.cd_delta(x, base, deltas, **ALWAYS)
    assert_close_scaled(res.relevant, full.relevant, torch.float64)
    assert_close_scaled(full.relevant, fastacd.reference.cd(model, x, torch.maximum(base, deltas))[0], torch.float64)


def test_cdep_penalty_and_gradients_match_the_reference():
    torch.manual_seed(0)
    model = randomize_batchnorm(_AllNew()).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    masks = (torch.rand(2, 1, 8, 8) > 0.6).double().expand(2, 3, 8, 8)
    assert_cdep_matches_reference(model, x, masks)


class _Fn(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body  # a function, or a layer (a submodule, as the tracer needs)

    def forward(self, x):
        return self.body(x).flatten(1)


@pytest.mark.parametrize("body, message", [
    (lambda t: F.glu(t, 0), "batch dim"),
    (lambda t: F.rrelu(t, training=True), "random slope"),
    (nn.LPPool2d(2, 2), "LPPool2d"),
    (nn.Softmax2d(), "Softmax2d"),
    (nn.FractionalMaxPool2d(2, output_size=2), "FractionalMaxPool2d"),
], ids=["glu_batch", "rrelu_training", "lppool", "softmax2d", "fractional_max_pool"])
def test_refused_variants_are_named(body, message):
    net = _Fn(body).eval()
    with pytest.raises(fastacd.UnsupportedOpError, match=message):
        fastacd.Decomposer(net).cd(torch.randn(1, 3, 4, 4), torch.ones(1, 1, 4, 4))


def test_unbatched_instance_norm_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.InstanceNorm2d(3)

        def forward(self, x):
            return self.norm(x[0]).flatten()[None]

    with pytest.raises(fastacd.UnsupportedOpError, match="unbatched"):
        fastacd.Decomposer(Net().eval()).cd(torch.randn(1, 3, 4, 4), torch.ones(1, 1, 4, 4))


class _Body(nn.Module):
    """conv -> body -> linear head: the body written with tensor methods and operators."""

    def __init__(self, body, features=4 * 8 * 8):
        super().__init__()
        self.conv, self.body, self.fc = nn.Conv2d(3, 4, 3, padding=1), body, nn.Linear(features, 3)

    def forward(self, x):
        return self.fc(self.body(self.conv(x)).flatten(1))


def _body_net(body, features=4 * 8 * 8):
    torch.manual_seed(0)
    return _Body(body, features).eval().double()


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("body, same", [
    (lambda t: t ** 2, lambda t: t * t),
    (lambda t: t.square(), lambda t: t * t),
    (lambda t: torch.pow(t, 3), lambda t: t * t * t),
    (lambda t: t.clamp(-0.3, 0.2), lambda t: F.hardtanh(t, -0.3, 0.2)),
    (lambda t: torch.clamp(t, min=0), F.relu),
    (lambda t: t.clamp_max(0.2), lambda t: F.hardtanh(t, -1e30, 0.2)),
], ids=["pow", "square", "cube", "clamp", "clamp_min", "clamp_max"])
def test_powers_and_clamps_are_activations(capture, body, same):
    """``x ** 2`` and ``x.square()`` give the CD of ``x * x`` (the product rule: only relevant
    times relevant is relevant), clamps to a range holding 0 that of Hardtanh / ReLU (StarReLU's
    ``relu(x) ** 2``, clamps written as methods)."""
    x, masks = _x_and_masks()
    got = _cd(_body_net(body), x, masks, capture)
    torch.testing.assert_close(got.relevant, _cd(_body_net(same), x, masks, capture).relevant, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.relevant, fastacd.reference.cd(_body_net(body), x, masks)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("capture", CAPTURES)
def test_abs_applies_to_the_relevant_part(capture):
    x, masks = _x_and_masks()
    conv = _cd(_activation_map(None), x, masks, capture).relevant
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Fn(torch.abs)).eval().double()
    torch.testing.assert_close(_cd(net, x, masks, capture).relevant, conv.abs(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("body, message", [
    (lambda t: t ** 0.5, "integer p"),
    (lambda t: t.pow(-1), "integer p"),
    (lambda t: 2 ** t, "integer p"),
    (lambda t: t.clamp(min=0.1), "range without 0"),
    (lambda t: t.clamp(min=t.mean()), "tensors"),
    (lambda t: t.unfold(0, 1, 1), "batch dim"),
], ids=["sqrt", "reciprocal", "exp2", "clamp_eps", "clamp_tensor", "unfold_batch"])
def test_powers_and_clamps_refused_where_f0_is_not_0(body, message):
    with pytest.raises(fastacd.UnsupportedOpError, match=message):
        _cd(_body_net(body), *_x_and_masks())


class _PatchesAsBatch(nn.Module):
    """TNT's inner stream: the image's patches as rows of a batch, a convolution and a
    batchnorm over them, then back to one sample."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        n, c = x.shape[:2]
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(-1, c, 4, 4)
        y = torch.relu(self.bn(self.conv(patches)))  # (n * 4, 4, 4, 4)
        return self.fc(y.reshape(n, -1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_convolution_over_rows_of_one_sample(capture):
    """A convolution whose total has several rows of one sample crashed in the split kernel
    ("total_pre must have shape (1, C, *S)"); each mask's rows now fold into the channels, as
    the batchnorm's did. Against the reference in float64 and float32."""
    torch.manual_seed(0)
    net = randomize_batchnorm(_PatchesAsBatch()).eval().double()
    x, masks = _x_and_masks()
    ref = fastacd.reference.cd(net, x, masks)[0]
    torch.testing.assert_close(_cd(net, x, masks, capture).relevant, ref, rtol=1e-10, atol=1e-12)
    assert_close_scaled(_cd(net.float(), x.float(), masks.float(), capture).relevant.double(), ref, torch.float32)


@pytest.mark.parametrize("capture", CAPTURES)
def test_tensor_unfold_takes_windows_of_each_part(capture):
    """Non-overlapping ``unfold`` windows give the CD of the same split written with
    ``unflatten``; overlapping ones (HaloNet's halos) the reference's."""
    x, masks = _x_and_masks()
    tiles = _cd(_body_net(lambda t: t.unfold(3, 2, 2)), x, masks, capture).relevant
    torch.testing.assert_close(tiles, _cd(_body_net(lambda t: t.unflatten(3, (4, 2))), x, masks, capture).relevant,
                               rtol=1e-12, atol=1e-14)
    halo = _body_net(lambda t: t.unfold(2, 4, 2), features=4 * 3 * 8 * 4)
    torch.testing.assert_close(_cd(halo, x, masks, capture).relevant, fastacd.reference.cd(halo, x, masks)[0],
                               rtol=1e-10, atol=1e-12)


def test_expand_as_in_an_exported_graph():
    """``aten.expand`` / ``aten.expand_as`` (MobileViTv2's attention in a torch.export graph)."""
    net = _body_net(lambda t: t.mean(1, keepdim=True).expand_as(t) + t.sum(2, keepdim=True).expand(-1, -1, 8, -1))
    x, masks = _x_and_masks()
    torch.testing.assert_close(_cd(net, x, masks, "export").relevant, _cd(net, x, masks, "fx").relevant,
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_cd(net, x, masks, "export").relevant, fastacd.reference.cd(net, x, masks)[0],
                               rtol=1e-10, atol=1e-12)


class _Sequence(nn.Module):
    """A 1-d (N, C, L) body: conv1d -> layer -> conv1d, then tokens (N, L, C) -> layer2 -> head."""

    def __init__(self, layer: nn.Module, on_tokens: nn.Module, channels: int = 4, features: int = 4):
        super().__init__()
        self.c1, self.layer, self.c2 = nn.Conv1d(3, 4, 3, padding=1), layer, nn.Conv1d(channels, 4, 3, padding=1)
        self.tokens, self.fc = on_tokens, nn.Linear(8 * features, 3)

    def forward(self, x):
        y = self.c2(self.layer(self.c1(x.flatten(2)[..., :8])))
        return self.fc(self.tokens(y.transpose(1, 2)).flatten(1))


class _ExplicitGLULast(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return a * torch.sigmoid(b)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("layer, same, tokens, same_tokens, features", [
    (nn.InstanceNorm1d(4, affine=True), nn.GroupNorm(4, 4), nn.Identity(), nn.Identity(), 4),
    (nn.LocalResponseNorm(2, alpha=0.4), None, nn.Identity(), nn.Identity(), 4),
    (nn.Identity(), nn.Identity(), nn.GLU(-1), _ExplicitGLULast(), 2),
], ids=["instance_norm_1d", "lrn_1d", "glu_last_dim"])
def test_one_dimensional_forms(capture, layer, same, tokens, same_tokens, features):
    """The 1-d forms: InstanceNorm1d as GroupNorm per channel, LRN on (N, C, L) (against the
    reference), GLU over the last dim of tokens as its chunk / sigmoid form."""
    def net(a, b):
        torch.manual_seed(0)
        return _Sequence(a, b, features=features).eval().double()
    if isinstance(layer, nn.InstanceNorm1d):
        _set_affine(layer, same)
    x, masks = _x_and_masks()
    got = _cd(net(layer, tokens), x, masks, capture)
    torch.testing.assert_close(got.relevant, fastacd.reference.cd(net(layer, tokens), x, masks)[0],
                               rtol=1e-10, atol=1e-12)
    if same is not None:
        torch.testing.assert_close(got.relevant, _cd(net(same, same_tokens), x, masks, capture).relevant,
                                   rtol=1e-10, atol=1e-12)


# ---- in-place writes into slices, under torch.export ---------------------------------------
class _Written(nn.Module):
    """conv -> writes into slices of its output (a constant row, another branch's channels) ->
    a token attention whose logits get a bias written into a slice (MViTv2) -> head."""

    def __init__(self, explicit: bool = False):
        super().__init__()
        self.explicit = explicit
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.rel = nn.Parameter(torch.randn(63, 63) * 0.3)
        self.head = nn.Linear(64 * 4, 3)

    def forward(self, x):
        y, z = self.c1(x), self.c2(x)
        if self.explicit:
            keep = torch.ones(8, 1, device=x.device, dtype=x.dtype)
            keep[0] = 0
            y = torch.cat([z, (y * keep)[:, 2:]], 1)
        else:
            y[:, :, 0] = 0
            y[:, :2] = z
        t = y.flatten(2).transpose(1, 2)  # (1, 64, 4)
        attn = self.q(t) @ self.k(t).transpose(1, 2)
        if self.explicit:
            attn = attn + F.pad(self.rel, (1, 0, 1, 0))
        else:
            attn[:, 1:, 1:] = attn[:, 1:, 1:] + self.rel
        return self.head((attn.softmax(-1) @ self.v(t)).flatten(1))


def test_writes_into_slices_under_export():
    """An in-place write into a chain of slices (``aten.copy_`` / ``fill_`` on a view) is made
    out of place at capture (slice_scatter / select_scatter back into the tensor): CD equals that
    of the same net written out of place (a constant row: a product with a 0/1 constant; another
    branch's channels: a cat; the attention bias: context, added), and the reference's. It was
    refused ("modifies in place a tensor that shares memory with another value")."""
    torch.manual_seed(0)
    written = _Written().eval().double()
    explicit = _Written(explicit=True).eval().double()
    explicit.load_state_dict(written.state_dict())
    x, masks = _x_and_masks()
    with torch.no_grad():
        torch.testing.assert_close(written(x.clone()), explicit(x), rtol=1e-12, atol=1e-12)
    got = _cd(written, x, masks, "export")
    torch.testing.assert_close(got.relevant, _cd(explicit, x, masks, "export").relevant, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.relevant, fastacd.reference.cd(written, x, masks)[0], rtol=1e-10, atol=1e-12)
    assert_close_scaled(_cd(written.float(), x.float(), masks.float(), "export").relevant.double(), got.relevant,
                        torch.float32)


def test_in_place_op_on_a_slice_read_again_under_export():
    """``v = y[:, :1]; v.relu_(); y + v``: the later reader of v reads the new values, the
    reader of y the tensor with them written back, as the model computes (the reference too)."""
    class ViewThenInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            v = y[:, :1]
            v.relu_()
            return (y + v).flatten(1)

    class OutOfPlace(ViewThenInPlace):
        def forward(self, x):
            y = self.conv(x)
            v = torch.relu(y[:, :1])
            return (torch.cat([v, y[:, 1:]], 1) + v).flatten(1)

    torch.manual_seed(0)
    net = ViewThenInPlace().eval().double()
    plain = OutOfPlace().eval().double()
    plain.load_state_dict(net.state_dict())
    x, masks = _x_and_masks()
    got = _cd(net, x, masks, "export")
    torch.testing.assert_close(got.relevant, _cd(plain, x, masks, "export").relevant, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(got.relevant + got.irrelevant, net(x.clone()).expand_as(got.relevant))


def test_write_into_a_slice_of_a_buffer_is_refused():
    """A write into a slice of a buffer changes the model's state at every call: refused by
    name, not made out of place (CD would not see the change the model keeps)."""
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)
            self.register_buffer("seen", torch.zeros(1, 2, 8, 8))

        def forward(self, x):
            y = self.conv(x)
            self.seen[:, :1] = y[:, :1]
            return (y + self.seen).flatten(1)

    with pytest.raises(fastacd.UnsupportedOpError, match="buffer"):
        _cd(Cache().eval().double(), *_x_and_masks(), capture="export")


@pytest.mark.parametrize("capture", CAPTURES)
def test_flip_and_cumsum_along_non_batch_dims(capture):
    """``flip`` and ``cumsum`` along non-batch dims are linear, part by part: a flip equals the
    same permutation by indexing, a cumsum a product with a triangular constant; across
    the batch dim they are refused (the dims are read against the input, negative ones too)."""
    x, masks = _x_and_masks()
    rev = torch.arange(7, -1, -1)
    tri = torch.triu(torch.ones(8, 8, dtype=torch.float64))
    pairs = [(lambda t: t.flip(-1), lambda t: t[:, :, :, rev]),
             (lambda t: torch.flip(t, (2, 3)), lambda t: t[:, :, rev][:, :, :, rev]),
             (lambda t: t.cumsum(2), lambda t: (t.transpose(2, 3) @ tri).transpose(2, 3))]
    for body, same in pairs:
        got = _cd(_body_net(body), x, masks, capture).relevant
        torch.testing.assert_close(got, _cd(_body_net(same), x, masks, capture).relevant, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, fastacd.reference.cd(_body_net(body), x, masks)[0], rtol=1e-10, atol=1e-12)
    for body in (lambda t: t.flip(-4), lambda t: t.cumsum(0)):
        with pytest.raises(fastacd.UnsupportedOpError, match="batch dim"):
            _cd(_body_net(body), x, masks, capture)


_KEEP = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5
_FILL = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("body, same", [
    (lambda t: torch.where(_KEEP, t, 0.0), lambda t: t * _KEEP.double()),
    (lambda t: t.masked_fill(_KEEP, 0.0), lambda t: t * (~_KEEP).double()),
    (lambda t: torch.where(_KEEP, t, _FILL), lambda t: t * _KEEP.double() + _FILL * (~_KEEP).double()),
    (lambda t: torch.where(t > 0, t, 0.1 * t), lambda t: t * (t > 0) + 0.1 * t * (t <= 0)),
], ids=["where_constant", "masked_fill", "where_constant_branch", "where_from_the_input"])
def test_where_is_linear_in_its_branches(capture, body, same):
    """``torch.where`` / ``masked_fill`` with a constant condition, or one computed from the input
    (context, as a gate: ``t > 0``), give the CD of the same selection written as products with
    0/1 masks; a constant branch joins the irrelevant part, as a constant added does."""
    x, masks = _x_and_masks()
    got = _cd(_body_net(body), x, masks, capture)
    torch.testing.assert_close(got.relevant, _cd(_body_net(same), x, masks, capture).relevant, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.relevant, fastacd.reference.cd(_body_net(body), x, masks)[0], rtol=1e-10, atol=1e-12)

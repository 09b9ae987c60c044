"""The rule registry: rules as objects, rule sets per Decomposer, the docs table, a new kind
added without touching a pass; in-place ops decomposed as the model computes them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from fastacd.capture.nodes import call_with
from fastacd.rules import DEFAULT, PartWise, Rule, RuleSet

from conftest import assert_cdep_matches_reference, assert_close_scaled
from models import TokenMaxNet

DOCS = Path(__file__).resolve().parents[1] / "docs" / "engine.md"


def test_docs_rules_table_is_the_default_sets():
    assert DEFAULT.markdown() in DOCS.read_text()


def test_every_rule_has_a_kind_row_and_reference_form():
    for kind, rule in DEFAULT.items():
        assert rule.kind == kind and all(isinstance(c, str) for c in rule.row) and rule.row[0]
        if rule.value and not rule.context_only:  # rules that decompose define both forms
            assert type(rule).reference is not Rule.reference, kind
            assert type(rule).relevant is not Rule.relevant, kind


def test_rule_set_is_a_mapping_and_replace_derives_a_new_set():
    class Other(Rule):
        kind = "other"
    s = DEFAULT.replace(Other(), name="mine")
    assert "other" in s and "other" not in DEFAULT and len(s) == len(DEFAULT) + 1
    assert s.name == "mine" and isinstance(s["affine"], Rule)
    with pytest.raises(TypeError, match="RuleSet"):
        fastacd.Decomposer(nn.Linear(3, 2).eval(), rules={"affine": s["affine"]})


class Rot90(Rule):
    """A part-wise op fastacd's default set lacks (docs/engine.md, 'Adding a rule')."""
    kind = "rot90"
    functions = (torch.rot90,)
    methods = ("rot90",)
    row = ("`torch.rot90`", "`f(r)`", "`f(i)`")

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return call_with(step, value_of, {step.dep[0]: r}), call_with(step, value_of, {step.dep[0]: i})

    def relevant(self, step, rel, values, aux, ops, m):
        return call_with(step, values.__getitem__, {step.dep[0]: rel[step.dep[0]]})


class PartWiseRot90(PartWise):
    """The same rule from the part-wise defaults."""
    kind, functions, methods, row = Rot90.kind, Rot90.functions, Rot90.methods, Rot90.row


class Rot90Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(torch.flatten(torch.rot90(h, 1, dims=(2, 3)) + h.rot90(2, (2, 3)), 1))


@pytest.mark.parametrize("rule", [Rot90, PartWiseRot90])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_new_rule_kind_works_through_every_pass(dtype, rule):
    torch.manual_seed(0)
    model = Rot90Net().eval().to(dtype)
    x = torch.randn(1, 3, 8, 8, dtype=dtype)
    masks = (torch.rand(5, 1, 8, 8) > 0.5).to(dtype)
    with pytest.raises(fastacd.UnsupportedOpError, match="torch.rot90"):
        fastacd.Decomposer(model)  # the default set has no rule for it
    rules = DEFAULT.replace(rule())
    with torch.no_grad():
        ref_rel, ref_irrel = fastacd.reference.cd(model.double(), x.double(), masks.double(), rules=rules)
        model.to(dtype)
        for backend in fastacd.available_backends():
            res = fastacd.Decomposer(model, backend=backend, rules=rules).cd(x, masks)
            assert_close_scaled(res.relevant, ref_rel.to(dtype), dtype)
            assert_close_scaled(res.irrelevant, ref_irrel.to(dtype), dtype)
            assert_close_scaled(res.relevant + res.irrelevant, model(x).expand_as(res.relevant), dtype)
        # the windowed pass recomputes a node without locality in full: same numbers
        dec = fastacd.Decomposer(model, rules=rules)
        base = torch.zeros(8, 8, dtype=dtype)
        base[:4, :4] = 1
        delta = torch.zeros(2, 1, 8, 8, dtype=dtype)
        delta[0, :, 6:, 6:] = delta[1, :, 0, 7] = 1
        got = dec.cd_delta(x, base, delta, max_cost_ratio=float("inf"))
        assert_close_scaled(got.relevant, dec.cd(x, torch.maximum(base, delta)).relevant, dtype)


def test_rule_refusal_names_the_variant_and_a_later_rule_may_claim():
    class Ratio(nn.Module):
        def forward(self, x):
            y = x.flatten(1)
            return y / y  # (a denominator read nowhere else would be context: x / std)

    with pytest.raises(fastacd.UnsupportedOpError, match="product or quotient of two input-dependent"):
        fastacd.Decomposer(Ratio().eval())

    class Quotient(Rule):  # claims what Scale refuses (a test double: it has no forms)
        kind = "quotient"
        functions = (__import__("operator").truediv,)

    rules = DEFAULT.replace(Quotient())
    dec = fastacd.Decomposer(Ratio().eval(), rules=rules)
    (step,) = [s for s in dec.graph.steps.values() if s.kind == "quotient"]
    assert step.rule is rules["quotient"]


def test_module_subclass_with_its_own_forward_is_not_claimed_by_its_base_rule():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class Same(nn.Conv2d):  # same forward: the base's rule applies
        pass

    assert not DEFAULT.claims_module(ScaledConv(1, 1, 1))
    assert DEFAULT.claims_module(Same(1, 1, 1))
    net = nn.Sequential(ScaledConv(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).eval().double()
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    dec = fastacd.Decomposer(net)  # traced through: conv + scale
    assert {s.kind for s in dec.graph.steps.values()} >= {"affine", "scale"}
    torch.testing.assert_close(dec.forward(x), net(x))


def test_conv_subclass_with_its_own_conv_forward_is_traced():
    """A Conv2d subclass that keeps ``forward`` but overrides ``_conv_forward`` (weight
    standardisation here) computes another convolution: claimed by the Conv2d rule, its
    relevant part used the raw weight while its total used the standardised one (0.013 of a
    0.3 output off). Traced through, it gives the CD of the same net with the standardised
    weight written into a plain Conv2d."""
    class WSConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            w = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
            return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    torch.manual_seed(0)
    assert not DEFAULT.claims_module(WSConv(1, 1, 1))
    ws = nn.Sequential(WSConv(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval().double()
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval().double()
    plain.load_state_dict(ws.state_dict())
    with torch.no_grad():
        plain[0].weight -= plain[0].weight.mean(dim=(1, 2, 3), keepdim=True)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    masks = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    with torch.no_grad():
        got, want = fastacd.Decomposer(ws).cd(x, masks), fastacd.Decomposer(plain).cd(x, masks)
    torch.testing.assert_close(got.relevant, want.relevant, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- in-place ops
class InPlaceNet(nn.Module):
    """Every in-place form the issue lists; each statement's result is read only through the
    tensor it modified (a traced graph that ignored them would decompose another network)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 4).reshape(1, 4, 1, 1))

    def forward(self, x):
        h = self.conv1(x)
        h.relu_()
        y = self.conv2(h)
        y.add_(h)
        y.mul_(2)
        F.relu(y, inplace=True)
        y.sub_(self.shift)
        y.div_(3)
        self.act(y)
        y.clamp_(min=0)  # clamp has no rule: refused below; removed in the model that runs
        return self.fc(torch.flatten(y, 1))


class InPlaceNetNoClamp(InPlaceNet):
    def forward(self, x):
        h = self.conv1(x)
        h.relu_()
        y = self.conv2(h)
        y.add_(h)
        y.mul_(2)
        F.relu(y, inplace=True)
        y.sub_(self.shift)
        y.div_(3)
        self.act(y)
        torch.relu_(y)
        return self.fc(torch.flatten(y, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_methods_are_decomposed_as_the_model_computes_them(dtype):
    torch.manual_seed(0)
    model = InPlaceNetNoClamp().eval().to(dtype)
    x = torch.randn(1, 3, 6, 6, dtype=dtype)
    masks = (torch.rand(4, 1, 6, 6) > 0.5).to(dtype)
    with torch.no_grad():
        want = model(x.clone())
        dec = fastacd.Decomposer(model)
        torch.testing.assert_close(dec.forward(x), want)
        res = dec.cd(x, masks)
        ref_rel, _ = fastacd.reference.cd(model.double(), x.double(), masks.double())
    assert_close_scaled(res.relevant + res.irrelevant, want.expand_as(res.relevant), dtype)
    assert_close_scaled(res.relevant, ref_rel.to(dtype), dtype)
    kinds = [s.kind for s in dec.graph.steps.values()]
    assert kinds.count("activation") == 4 and "add" in kinds and kinds.count("scale") == 2


def test_an_in_place_op_without_a_rule_is_named():
    with pytest.raises(fastacd.UnsupportedOpError, match=r"method \.clamp_\(\)"):
        fastacd.Decomposer(InPlaceNet().eval())


def test_in_place_ops_that_cannot_be_made_out_of_place_are_refused_or_written_back():
    class SetItem(nn.Module):
        def forward(self, x):
            y = x * 2
            y[:, 0] = 0
            return y.flatten(1)

    class ViewThenInPlace(nn.Module):
        def forward(self, x):
            y = x * 2
            v = y[:, :1]
            v.relu_()  # modifies y too, which is read below
            return (y + v).flatten(1)

    class Param(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            self.w.add_(x.mean())
            return x.flatten(1) * self.w

    with pytest.raises(fastacd.UnsupportedOpError, match="item assignment"):
        fastacd.Decomposer(SetItem().eval(), capture="fx")  # torch.fx cannot trace it
    # capture="auto" falls back to torch.export, where the write into a slice is made out of
    # place (tests/test_torch_layers.py): the channel written with 0 has no relevant part
    with pytest.warns(UserWarning, match="torch.export"):
        dec = fastacd.Decomposer(SetItem().eval())
    x = torch.randn(1, 3, 4, 4)
    res = dec.cd(x, torch.ones(4, 4))
    want = (x * 2).index_fill(1, torch.tensor([0]), 0).flatten(1)
    torch.testing.assert_close(res.relevant, want)
    with pytest.raises(fastacd.UnsupportedOpError, match="shares memory"):
        fastacd.Decomposer(ViewThenInPlace().eval())  # torch.fx: in place on a view, read later
    with pytest.raises(fastacd.UnsupportedOpError, match="parameter or buffer 'w'"):
        fastacd.Decomposer(Param().eval())


def test_in_place_relu_read_by_a_later_add_sees_the_relu():
    """y = relu_(x) modifies x: a later x + y is relu(x) + relu(x)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            a = self.conv(x)
            b = self.relu(a)
            return (a + b).flatten(1)

    torch.manual_seed(0)
    net = Net().eval().double()
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    dec = fastacd.Decomposer(net)
    torch.testing.assert_close(dec.forward(x), net(x.clone()))
    torch.testing.assert_close(dec.forward(x), 2 * torch.relu(net.conv(x)).flatten(1))


# ------------------------------------------------------------------------- masks
def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).eval().double()


def test_masks_bool_int_and_soft_are_read_alike():
    model, x = _tiny(), torch.randn(1, 3, 6, 6, dtype=torch.float64)
    dec = fastacd.Decomposer(model)
    m = torch.rand(6, 6) > 0.5
    as_float = dec.cd(x, m.double()).relevant
    torch.testing.assert_close(dec.cd(x, m).relevant, as_float)
    torch.testing.assert_close(dec.cd(x, m.to(torch.uint8)).relevant, as_float)
    torch.testing.assert_close(dec.cd(x, m.long().numpy()).relevant, as_float)
    soft = dec.cd(x, torch.full((6, 6), 0.25, dtype=torch.float64))
    assert torch.isfinite(soft.relevant).all()


@pytest.mark.parametrize("bad, message", [
    ((torch.rand(6, 6) > 0.5).to(torch.uint8) * 255, "up to 255"),
    (torch.full((6, 6), 2.0), r"\[0, 1\].*from 2 to 2"),
    (-torch.ones(6, 6), r"\[0, 1\].*from -1"),
    (torch.full((6, 6), float("nan")), "NaN"),
    (torch.ones(3, 6, 6), "ambiguous"),
    (torch.ones(6, 5), "does not fit"),
    (torch.empty(2, 6, 6, device="meta"), "meta"),
])
def test_bad_masks_are_refused_saying_what_is_wrong(bad, message):
    model, x = _tiny(), torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        fastacd.Decomposer(model).cd(x, bad)
    with pytest.raises(ValueError, match=message):
        fastacd.reference.cd(model, x, bad)


def test_a_channel_stack_is_one_mask_in_the_drop_in_and_many_with_an_explicit_dim():
    model, x = _tiny(), torch.randn(1, 3, 6, 6, dtype=torch.float64)
    per_channel = (torch.rand(3, 6, 6) > 0.5).double()
    rel, _ = fastacd.cd(x, model, per_channel)  # the original's reading: one mask
    assert rel.shape == (1, 2)
    torch.testing.assert_close(rel, fastacd.Decomposer(model).cd(x, per_channel[None]).relevant)
    many = fastacd.Decomposer(model).cd(x, per_channel[:, None]).relevant
    assert many.shape == (3, 2)
    torch.testing.assert_close(fastacd.cd(x, model, per_channel[:, None])[0], many)


# ------------------------------------------------------------------------- split / chunk / unbind
class SplitNet(nn.Module):
    """A ShuffleNet-style block (chunk, process one half, cat, channel shuffle), a Res2Net-style
    split into unequal widths, and unbind along the channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(8 * 6 * 6 + 6 * 6, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        a, b = h.chunk(2, dim=1)
        h = torch.cat([a, self.branch(b)], 1)
        n = h.size(0)
        h = h.view(n, 2, 4, 6, 6).transpose(1, 2).reshape(n, 8, 6, 6)  # channel shuffle
        p, q = torch.split(h, [3, 5], dim=1)
        p = self.conv(p) + q[:, :3]
        c0, c1, c2 = torch.unbind(p, dim=1)
        return self.fc(torch.cat([torch.flatten(h, 1), torch.flatten(c0 + c1 - c2, 1)], 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_chunk_unbind(dtype):
    from models import randomize_batchnorm
    torch.manual_seed(0)
    model = randomize_batchnorm(SplitNet()).eval().to(dtype)
    x = torch.randn(1, 3, 6, 6, dtype=dtype)
    masks = torch.cat([(torch.rand(4, 1, 6, 6) > 0.5), torch.ones(1, 1, 6, 6)]).to(dtype)
    with torch.no_grad():
        ref_rel, ref_irrel = fastacd.reference.cd(model.double(), x.double(), masks.double())
        model.to(dtype)
        for backend in fastacd.available_backends():
            dec = fastacd.Decomposer(model, backend=backend)
            res = dec.cd(x, masks)
            assert_close_scaled(res.relevant, ref_rel.to(dtype), dtype)
            assert_close_scaled(res.irrelevant, ref_irrel.to(dtype), dtype)
            torch.testing.assert_close(dec.forward(x), model(x))
            one = torch.cat([dec.cd(x, mk).relevant for mk in masks])  # batched = one mask at a time
            assert_close_scaled(res.relevant, one, dtype)
    assert {"split"} <= {s.kind for s in dec.graph.steps.values()}


def test_shufflenet_v2_decomposes():
    from models import torchvision_model
    torch.manual_seed(0)
    model = torchvision_model("shufflenet_v2_x0_5").double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    masks = (torch.rand(3, 1, 64, 64) > 0.5).double()
    with torch.no_grad():
        res = fastacd.Decomposer(model).cd(x, masks)
        ref_rel, ref_irrel = fastacd.reference.cd(model, x, masks)
        logits = model(x)
    # like MobileNetV2 (tests/test_engine.py), its many batchnorms amplify the rounding of
    # i = a - r: within 1e-5 of the output scale in float64, not 1e-10
    scale = float(ref_rel.abs().max())
    torch.testing.assert_close(res.relevant, ref_rel, rtol=1e-5, atol=1e-5 * scale)
    assert_close_scaled(res.relevant + res.irrelevant, logits.expand_as(res.relevant), torch.float64)


# ------------------------------------------------------------------------- stack
class StackNet(nn.Module):
    """Two branches and a constant stacked along ``dim``, an SK-style weighted sum over the
    stack, a ReLU of the stack itself."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Conv2d(3, 4, 1)
        self.register_buffer("const", torch.randn(1, 4, 6, 6))
        shape = [1] * 5
        shape[dim] = 3
        self.register_buffer("w", torch.randn(shape))
        self.fc = nn.Linear(2 * 4 * 6 * 6, 3)

    def forward(self, x):
        s = torch.stack([self.a(x), self.b(x), self.const], self.dim)
        h = (s * self.w).sum(self.dim)
        return self.fc(torch.cat([torch.flatten(h, 1), torch.flatten(torch.relu(s).mean(self.dim), 1)], 1))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_stack(dim, capture):
    from models import randomize_batchnorm
    torch.manual_seed(0)
    model = randomize_batchnorm(StackNet(dim)).eval().double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    masks = torch.cat([(torch.rand(4, 1, 6, 6) > 0.5), torch.ones(1, 1, 6, 6)]).double()
    with torch.no_grad():
        ref = fastacd.Decomposer(model, capture=capture, backend="reference").cd(x, masks)
        for dtype in (torch.float64, torch.float32):
            model.to(dtype)
            dec = fastacd.Decomposer(model, capture=capture)
            res = dec.cd(x.to(dtype), masks.to(dtype))
            assert_close_scaled(res.relevant, ref.relevant.to(dtype), dtype)
            assert_close_scaled(res.irrelevant, ref.irrelevant.to(dtype), dtype)
            assert_close_scaled(res.relevant + res.irrelevant, model(x.to(dtype)).expand_as(res.relevant), dtype)
            one = torch.cat([dec.cd(x.to(dtype), mk).relevant for mk in masks.to(dtype)])
            assert_close_scaled(res.relevant, one, dtype)
    assert "stack" in {s.kind for s in dec.graph.steps.values()}


class StackHeads(nn.Module):
    """CrossViT's head: heads stacked along dim 0 and averaged, after a large map (the pass
    runs the head with more masks than the conv)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.heads = nn.ModuleList([nn.Linear(8 * 4 * 4, 3), nn.Linear(8 * 2 * 2, 3)])

    def forward(self, x):
        h = self.conv(x)
        a, b = F.avg_pool2d(h, 4).flatten(1), F.avg_pool2d(torch.relu(h), 8).flatten(1)
        return torch.stack([self.heads[0](a), self.heads[1](b)], 0).mean(0)


def test_chunked_pass_cuts_only_where_the_masks_are_in_dim_0():
    torch.manual_seed(0)
    model = StackHeads().eval().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    masks = (torch.rand(5, 1, 16, 16) > 0.5).double()
    dec = fastacd.Decomposer(model)
    with torch.no_grad():
        values, _ = dec._total_pass(x)
        largest = max(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))
        dec.memory_budget = largest * 6 * 2  # 2 masks a pass at the conv, more in the head
        assert all(values[src].shape[0] == 1 for _, src, _ in dec.pass_plan(values, x, 5)[1:])
        res, single = dec.cd(x, masks), dec.cd(x, masks, chunk_size=1)
        ref_rel, _ = fastacd.reference.cd(model, x, masks)
    assert_close_scaled(res.relevant, single.relevant, torch.float64)
    assert_close_scaled(res.relevant, ref_rel, torch.float64)


# ------------------------------------------------------------------------- the batch merged into dim 0
class MergedRows(nn.Module):
    """Tokens with the batch merged into dim 0: LeViT's BatchNorm1d and a Linear on (B * N, C),
    MobileViT's LayerNorm on patches (B * P, N, C)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.bn = nn.BatchNorm1d(8)
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8 * 16, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        b, n, c = t.shape
        t = torch.relu(self.bn(t.flatten(0, 1))).reshape(b, n, c)
        t = self.lin(t.reshape(b * n, c)).reshape(b, n, c)
        p = self.ln(t.reshape(b * 4, n // 4, c))  # 4 "patches"
        return self.fc(p.reshape(b, -1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_merged_into_dim_0(dtype):
    from models import randomize_batchnorm
    torch.manual_seed(0)
    model = randomize_batchnorm(MergedRows()).eval().double()
    with torch.no_grad():
        model.ln.bias.normal_()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    masks = torch.cat([(torch.rand(4, 1, 8, 8) > 0.5), torch.ones(1, 1, 8, 8)]).double()
    with torch.no_grad():
        ref_rel, ref_irrel = fastacd.reference.cd(model, x, masks)
        model.to(dtype)
        x, masks = x.to(dtype), masks.to(dtype)
        for backend in fastacd.available_backends():
            dec = fastacd.Decomposer(model, backend=backend)
            res = dec.cd(x, masks)
            assert_close_scaled(res.relevant, ref_rel.to(dtype), dtype)
            assert_close_scaled(res.irrelevant, ref_irrel.to(dtype), dtype)
            one = torch.cat([dec.cd(x, mk).relevant for mk in masks])
            assert_close_scaled(res.relevant, one, dtype)
    assert {"batchnorm", "affine", "layernorm"} <= {s.kind for s in dec.graph.steps.values()}


# ------------------------------------------------------------------------- a proxy left by another trace
class Cached(nn.Module):
    """timm's LeViT / EfficientFormer: a per-device cache keyed by ``str(x.device)`` (a proxy's
    name while traced), so an earlier torch.fx trace leaves its proxy there."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.fc(x) + self.cache[key]


def test_a_proxy_left_by_an_earlier_trace_is_dropped_or_named():
    import torch.fx as fx
    torch.manual_seed(0)
    model = Cached().eval()
    fx.Tracer().trace(model)  # leaves its proxy in model.cache
    x, masks = torch.randn(1, 4), torch.eye(4)
    with torch.no_grad():
        res = fastacd.Decomposer(model).cd(x, masks)
        assert_close_scaled(res.relevant + res.irrelevant, model(x).expand_as(res.relevant), torch.float32)
    assert not any(isinstance(v, fx.Proxy) for v in model.cache.values())  # none left behind either

    class Kept(Cached):
        def forward(self, x):
            if not hasattr(self, "kept"):
                self.kept = self.bias * 2  # a plain attribute: not dropped
            return self.fc(x) + self.kept
    kept = Kept().eval()
    fx.Tracer().trace(kept)
    with pytest.raises(fastacd.UnsupportedOpError, match="another torch.fx trace"):
        fastacd.Decomposer(kept)


# ------------------------------------------------------------------------- max-reduce, F.normalize, unfold/fold
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_max_reduce_normalize_unfold_fold(capture):
    torch.manual_seed(0)
    model = TokenMaxNet().eval().double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    masks = torch.cat([(torch.rand(4, 1, 8, 8) > 0.5), torch.ones(1, 1, 8, 8)]).double()
    with torch.no_grad():
        ref = fastacd.Decomposer(model, capture=capture, backend="reference").cd(x, masks)
        assert_close_scaled(ref.relevant + ref.irrelevant, model(x).expand_as(ref.relevant), torch.float64)
        for dtype in (torch.float64, torch.float32):
            model.to(dtype)
            for backend in fastacd.available_backends():
                dec = fastacd.Decomposer(model, capture=capture, backend=backend)
                res = dec.cd(x.to(dtype), masks.to(dtype))
                assert_close_scaled(res.relevant, ref.relevant.to(dtype), dtype)
                assert_close_scaled(res.irrelevant, ref.irrelevant.to(dtype), dtype)
                one = torch.cat([dec.cd(x.to(dtype), mk).relevant for mk in masks.to(dtype)])
                assert_close_scaled(res.relevant, one, dtype)
    kinds = {s.kind for s in dec.graph.steps.values()}
    assert {"max_reduce", "linear", "product"} <= kinds and ("normalize" in kinds) == (capture == "fx")


def test_max_reduce_and_normalize_by_hand():
    """Relevant parts written out: the masked input at the argmax of the true input; the
    masked input over the true input's norm; im2col of the masked input."""
    class Heads(nn.Module):
        def forward(self, x):
            t = x.flatten(2)  # (1, C, HW)
            return torch.cat([t.amax(-1), t.max(1)[0], F.normalize(t, dim=-1).flatten(1),
                              F.unfold(x, 2).flatten(1), x.amax((2, 3), keepdim=True).flatten(1),
                              t.max(dim=-1).values], 1)

    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    mask = (torch.rand(1, 1, 3, 3) > 0.5).double()
    r = (mask * x).flatten(2)
    t = x.flatten(2)
    at_spatial_max = r.gather(-1, t.argmax(-1, keepdim=True))[..., 0]  # amax(-1), the global max-pool, .values
    want = torch.cat([at_spatial_max,
                      r.gather(1, t.argmax(1, keepdim=True))[:, 0],
                      (r / t.norm(dim=-1, keepdim=True)).flatten(1),
                      F.unfold(mask * x, 2).flatten(1),
                      at_spatial_max,
                      at_spatial_max], 1)
    for capture in ("fx", "export"):
        for backend in ("reference", *fastacd.available_backends()):
            res = fastacd.Decomposer(Heads().eval(), backend=backend, capture=capture).cd(x, mask)
            torch.testing.assert_close(res.relevant, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(res.irrelevant, Heads()(x) - want, rtol=1e-12, atol=1e-12)


def test_max_reduce_in_the_cdep_penalty():
    torch.manual_seed(0)
    model = TokenMaxNet().double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    masks = (torch.rand(3, 1, 8, 8) > 0.6).double().expand(3, 3, 8, 8)
    assert_cdep_matches_reference(model, x, masks)


@pytest.mark.parametrize("body, message", [
    (lambda t: torch.max(t, 2 * t), "element-wise max of two tensors"),
    (lambda t: t.amax(0), "over the batch dim"),
    (lambda t: t.max(), "over every dim"),
    (lambda t: t.max(1)[0] + t.max(1)[1], "indices are read"),
])
def test_max_reduce_refusals_name_the_variant(body, message):
    class Net(nn.Module):
        def forward(self, x):
            return body(x.flatten(1))

    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(fastacd.UnsupportedOpError, match=message):
        fastacd.Decomposer(Net().eval()).cd(x, torch.ones(1, 1, 3, 3))


@pytest.mark.parametrize("size", [(4, 4), (2, 2)])
def test_adaptive_avg_pool_of_its_own_size_is_the_identity(size, monkeypatch):
    """An adaptive avg-pool to the map's own size (VGG16's head at 224 px) passes the relevant
    part through without calling the pool (torch's took 15 ms there); to another size it pools.
    Both equal the float64 reference."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(size),
                          nn.Flatten(), nn.Linear(4 * size[0] * size[1], 3)).eval().double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    masks = (torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    calls = []
    real = F.adaptive_avg_pool2d
    monkeypatch.setattr(F, "adaptive_avg_pool2d", lambda t, s: calls.append(t.shape[0]) or real(t, s))
    with torch.no_grad():
        fast = fastacd.Decomposer(model).cd(x, masks)
    ref = fastacd.Decomposer(model, backend="reference").cd(x, masks)
    torch.testing.assert_close(fast.relevant, ref.relevant, rtol=1e-10, atol=1e-12)
    assert (5 in calls) == (size != (4, 4))  # the pool ran on the 5 masks' relevant parts only when it pools


def _prelu_or_shuffle_net(mid: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), mid, nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval().double()


class _ExplicitShuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_prelu_and_channel_shuffle(capture):
    """PReLU (an activation with f(0) = 0, its slope read at each call) gives LeakyReLU's CD at
    the same slope, and per-channel slopes the reference's; ChannelShuffle gives the CD of the
    same permutation written as reshape / transpose. Both were refused ('no CD rule')."""
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    cd = lambda net: fastacd.Decomposer(net, capture=capture).cd(x, masks).relevant
    with torch.no_grad():
        prelu, leaky = _prelu_or_shuffle_net(nn.PReLU(init=0.25)), _prelu_or_shuffle_net(nn.LeakyReLU(0.25))
        torch.testing.assert_close(cd(prelu), cd(leaky), rtol=1e-12, atol=1e-14)
        per_channel = _prelu_or_shuffle_net(nn.PReLU(4))
        per_channel[1].weight.copy_(torch.tensor([0.1, -0.2, 0.5, 0.0]))
        torch.testing.assert_close(cd(per_channel), fastacd.reference.cd(per_channel, x, masks)[0],
                                   rtol=1e-10, atol=1e-12)
        shuffled, explicit = _prelu_or_shuffle_net(nn.ChannelShuffle(2)), _prelu_or_shuffle_net(_ExplicitShuffle())
        torch.testing.assert_close(cd(shuffled), cd(explicit), rtol=1e-12, atol=1e-14)

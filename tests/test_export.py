"""Capture through torch.export (issue 16 item 2, docs/engine.md "Capture"): models torch.fx
cannot trace (Python control flow on shapes) are captured as ATen graphs whose nodes the same
rules claim; an ATen op no rule claims is an error naming it and its place."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from fastacd.capture import UnsupportedOpError
from fastacd.capture.export import export_module
from fastacd.capture.nodes import TraceError

from conftest import assert_close_scaled
from models import ConcatNet, FunctionalNet, randomize_batchnorm, torchvision_model

pytestmark = pytest.mark.usefixtures("one_thread")


class ShapeFlow(nn.Module):
    """Control flow on the input's shape (as timm's mobilevit pads to its patch size), a Python
    int from a size, then tokens: LayerNorm, GELU, a residual, a sigmoid gate, a mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        if h.shape[-1] % 4 != 0:  # torch.fx: "symbolically traced variables cannot be used as inputs to control flow"
            h = F.pad(h, (0, 4 - h.shape[-1] % 4, 0, 4 - h.shape[-2] % 4))
        n = int(h.shape[2] * h.shape[3])
        t = h.flatten(2).transpose(1, 2)                         # (b, n, c)
        t = t + self.fc(F.gelu(self.ln(t)))
        t = t * torch.sigmoid(t.mean(1, keepdim=True))           # a gate: context from the total
        return self.head(t.sum(1) / n)


def shape_flow(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(ShapeFlow()).eval().to(dtype)


def quadrant_masks(h: int, w: int) -> torch.Tensor:
    masks = torch.zeros(4, h, w)
    masks[0, : h // 2, : w // 2] = 1
    masks[1, : h // 2, w // 2:] = 1
    masks[2, h // 2:, : w // 2] = 1
    masks[3, h // 2:, w // 2:] = 1
    return masks


def test_fx_cannot_trace_it_and_auto_falls_back_with_a_warning():
    model = shape_flow()
    with pytest.raises(TraceError, match="could not trace ShapeFlow with torch.fx"):
        fastacd.Decomposer(model, capture="fx")
    with pytest.warns(UserWarning, match="captures it with torch.export"):
        dec = fastacd.Decomposer(model)
    assert dec.capture == "export"
    with pytest.raises(RuntimeError, match="example_input"):
        dec.graph  # noqa: B018 - captured on the first input
    x = torch.randn(1, 3, 10, 10)
    res = dec.cd(x, quadrant_masks(10, 10))
    assert dec.graph.capture == "export"
    ops = {str(n.target) for n in dec.graph.nodes if n.op == "call_function"}
    assert {"aten.conv2d.default", "aten.batch_norm.default", "aten.layer_norm.default",
            "aten.pad.default", "aten.sigmoid.default"} <= ops
    kinds = {s.kind for s in dec.graph.steps.values()}
    assert {"affine", "batchnorm", "layernorm", "pad", "activation", "scale", "linear", "reshape", "add"} <= kinds
    with torch.no_grad():
        out = model(x)
    assert_close_scaled(res.relevant + res.irrelevant, out.expand_as(res.relevant), torch.float32)
    assert float(res.relevant.abs().max()) > 0


def test_export_capture_engine_equals_reference_and_batched_equals_one_mask():
    x64 = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    masks = quadrant_masks(10, 10).double()
    m64 = shape_flow(torch.float64)
    dec64 = fastacd.Decomposer(m64, capture="export", example_input=x64)
    ref = fastacd.Decomposer(m64, capture="export", backend="reference").cd(x64, masks)
    res64 = dec64.cd(x64, masks)
    assert_close_scaled(res64.relevant, ref.relevant, torch.float64)
    assert_close_scaled(res64.irrelevant, ref.irrelevant, torch.float64)
    with torch.no_grad():
        out64 = m64(x64)
    assert_close_scaled(res64.relevant + res64.irrelevant, out64.expand_as(res64.relevant), torch.float64)
    one = torch.cat([dec64.cd(x64, masks[k:k + 1]).relevant for k in range(4)])
    assert_close_scaled(res64.relevant, one, torch.float64)
    # float32 agrees with float64 within the float32 tolerance
    res32 = fastacd.Decomposer(shape_flow(), capture="export").cd(x64.float(), masks.float())
    assert_close_scaled(res32.relevant.double(), res64.relevant, torch.float32)
    # the masks split the input: relevant parts over the four quadrants differ
    assert float((res64.relevant[0] - res64.relevant[1]).abs().max()) > 1e-3


def test_export_graph_reads_the_models_parameters_and_recaptures_for_a_new_shape():
    model = shape_flow()
    dec = fastacd.Decomposer(model, capture="export")
    x = torch.randn(1, 3, 8, 8)
    dec.cd(x, quadrant_masks(8, 8))
    first = dec.graph
    with torch.no_grad():  # training after capture is reflected: get_attr reads the model's tensors
        model.head.bias.add_(1.0)
        out = dec.forward(x)
        torch.testing.assert_close(out, model(x))
    x2 = torch.randn(1, 3, 12, 12)  # export fixes every size but the batch: captured again
    res = dec.cd(x2, quadrant_masks(12, 12))
    assert dec.graph is not first
    with torch.no_grad():
        assert_close_scaled(res.relevant + res.irrelevant, model(x2).expand_as(res.relevant), torch.float32)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: torchvision_model("resnet18"), id="resnet18"),  # in-place relu_/add_ in ATen
    pytest.param(lambda: randomize_batchnorm(ConcatNet()).eval(), id="ConcatNet"),
    pytest.param(lambda: FunctionalNet().eval(), id="FunctionalNet"),  # size() + view, max-pool, dropout
])
def test_standard_cnn_gives_identical_results_through_fx_and_export(make):
    torch.manual_seed(1)
    model = make()
    x = torch.randn(1, 3, 16, 16)
    masks = quadrant_masks(16, 16)
    with torch.no_grad():
        fx_res = fastacd.Decomposer(model, capture="fx").cd(x, masks)
        ex = fastacd.Decomposer(model, capture="export")
        ex_res = ex.cd(x, masks)
    assert ex.graph.capture == "export"
    # the same rules on the same ops (F.conv2d and aten.conv2d are one kernel): equal numbers
    torch.testing.assert_close(ex_res.relevant, fx_res.relevant, rtol=1e-6, atol=1e-6 * float(fx_res.output.abs().max()))
    torch.testing.assert_close(ex_res.irrelevant, fx_res.irrelevant, rtol=1e-6,
                               atol=1e-6 * float(fx_res.output.abs().max()))
    fx_kinds = sorted(s.kind for s in fastacd.Decomposer(model, capture="fx").graph.steps.values())
    ex_kinds = sorted(s.kind for s in ex.graph.steps.values())
    assert {"affine", "activation"} <= set(ex_kinds) and set(ex_kinds) <= set(fx_kinds) | {"shape"}


def test_resnet18_export_steps_functionalise_in_place_ops():
    model = torchvision_model("resnet18")
    gm = export_module(model, torch.randn(1, 3, 16, 16))
    assert any(str(n.target) == "aten.relu_.default" for n in gm.graph.nodes)  # as export gives it
    dec = fastacd.Decomposer(model, capture="export", example_input=torch.randn(1, 3, 16, 16))
    targets = {str(n.target) for n in dec.graph.nodes if n.op == "call_function"}
    assert "aten.relu.default" in targets and "aten.add.Tensor" in targets
    assert not any(t.endswith(("relu_.default", "add_.Tensor")) for t in targets)
    assert dec.graph.steps[dec.graph.result_node].kind == "affine"


class SortsOnShape(nn.Module):
    """fx cannot trace it (control flow on a size); export can, and gives aten.sort: no rule."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if h.shape[1] > 2:
            h = torch.sort(h, dim=-1)[0]
        return self.fc(h.flatten(1))


def test_an_aten_op_no_rule_claims_is_an_error_naming_it_and_its_place():
    model = SortsOnShape().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = fastacd.Decomposer(model)
    with pytest.raises(UnsupportedOpError, match=r"no CD rule for ATen op aten\.sort\.default .*graph node 'sort'"):
        dec.cd(torch.randn(1, 3, 8, 8), quadrant_masks(8, 8))


def test_export_of_a_model_with_control_flow_on_values_is_refused_clearly():
    class OnValues(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    with pytest.raises(UnsupportedOpError, match="could not capture OnValues with torch.export either"):
        fastacd.Decomposer(OnValues().eval(), capture="export", example_input=torch.ones(1, 4))


def test_capture_argument_is_checked():
    with pytest.raises(ValueError, match="capture must be one of"):
        fastacd.Decomposer(nn.Linear(3, 2).eval(), capture="jit")
    assert fastacd.Decomposer(nn.Linear(3, 2).eval()).capture == "fx"


# ---- the Pad rule (new with the ATen ops; F.pad in torch.fx graphs too) --------------------
class Padded(nn.Module):
    def __init__(self, value, mode="constant"):
        super().__init__()
        self.value, self.mode = value, mode

    def forward(self, x):
        if self.mode == "constant":
            return F.pad(x, (1, 2), value=self.value).flatten(1)
        return F.pad(x, (1, 2), mode=self.mode).flatten(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_pad_fill_value_joins_the_irrelevant_part_by_hand(capture):
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    res = fastacd.Decomposer(Padded(1.5).eval(), capture=capture).cd(x, mask)
    # relevant: the masked input padded with zeros; irrelevant: the rest padded with the fill value
    torch.testing.assert_close(res.relevant, torch.tensor([[0.0, 1.0, 0.0, 0.0, 4.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(res.irrelevant, torch.tensor([[1.5, 0.0, -2.0, 3.0, 0.0, 1.5, 1.5]], dtype=torch.float64))
    ref = fastacd.Decomposer(Padded(1.5).eval(), capture=capture, backend="reference").cd(x, mask)
    torch.testing.assert_close(ref.relevant, res.relevant)
    torch.testing.assert_close(ref.irrelevant, res.irrelevant)


def test_constant_pad_module_fill_joins_the_irrelevant_part_by_hand():
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    res = fastacd.Decomposer(nn.Sequential(nn.ConstantPad1d((2, 1), -0.5)).eval()).cd(x, mask)
    torch.testing.assert_close(res.relevant, torch.tensor([[0.0, 0.0, 0.0, -2.0, 3.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(res.irrelevant, torch.tensor([[-0.5, -0.5, 1.0, 0.0, 0.0, 4.0, -0.5]],
                                                            dtype=torch.float64))


def test_pad_reflect_is_linear_by_hand():
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    res = fastacd.Decomposer(Padded(None, "reflect").eval()).cd(x, mask)
    torch.testing.assert_close(res.relevant, torch.tensor([[-2.0, 1.0, -2.0, 0.0, 0.0, 0.0, -2.0]], dtype=torch.float64))
    torch.testing.assert_close(res.irrelevant, torch.tensor([[0.0, 0.0, 0.0, 3.0, 4.0, 3.0, 0.0]], dtype=torch.float64))


def test_division_with_rounding_is_refused():
    class Floor(nn.Module):
        def forward(self, x):
            return torch.div(x, 2.0, rounding_mode="floor")

    with pytest.raises(UnsupportedOpError, match="division with rounding"):
        fastacd.Decomposer(Floor().eval())


def test_export_pad_batched_and_reference_on_a_copy():
    """A copy of the model (deepcopy, float64) captures and decomposes alike."""
    m64 = copy.deepcopy(shape_flow()).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    masks = quadrant_masks(6, 6).double()
    res = fastacd.Decomposer(m64, capture="export").cd(x, masks)
    ref = fastacd.Decomposer(m64, capture="export", backend="reference").cd(x, masks)
    assert_close_scaled(res.relevant, ref.relevant, torch.float64)


def test_reference_cd_captures_through_export_where_fx_cannot():
    m64 = shape_flow(torch.float64)
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    masks = quadrant_masks(10, 10).double()
    rel, irrel = fastacd.reference.cd(m64, x, masks)
    res = fastacd.Decomposer(m64, capture="export").cd(x, masks)
    assert_close_scaled(res.relevant, rel, torch.float64)
    assert_close_scaled(res.irrelevant, irrel, torch.float64)


def test_windowed_cd_delta_on_an_export_graph_equals_cd():
    model = torchvision_model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    dec = fastacd.Decomposer(model, capture="export", example_input=x)
    base = torch.zeros(32, 32)
    base[:8, :8] = 1
    deltas = torch.zeros(4, 32, 32)
    deltas[0, 8:12, 0:4] = 1
    deltas[1, 20:24, 20:24] = 1
    deltas[2, 0:4, 28:32] = 1
    deltas[3, 28:32, 0:4] = 1
    with torch.no_grad():
        stats = {}
        windowed = dec.cd_delta(x, base, deltas, stats=stats, max_cost_ratio=float("inf"))
        full = dec.cd(x, torch.clamp(base + deltas, max=1))
    assert stats["windowed"]  # the ATen convolutions and pools have a locality: windowed, not a fallback
    assert_close_scaled(windowed.relevant, full.relevant, torch.float32)


class TinyAttention(nn.Module):
    """Patch tokens, LayerNorm, q/k/v projections and F.scaled_dot_product_attention with a
    residual: the attention rule claims the ATen op torch.export records."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, d, 4, stride=4)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        b, n, d = t.shape
        q, k, v = self.qkv(self.ln(t)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.head((t + a).mean(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_export_attention_through_the_aten_sdpa_op_equals_fx(dtype):
    torch.manual_seed(2)
    model = TinyAttention().eval().to(dtype)
    x = torch.randn(1, 3, 16, 16, dtype=dtype)
    masks = quadrant_masks(16, 16).to(dtype)
    with torch.no_grad():
        fx_res = fastacd.Decomposer(model, capture="fx").cd(x, masks)
        ex = fastacd.Decomposer(model, capture="export")
        ex_res = ex.cd(x, masks)
    assert "sdpa" in {s.kind for s in ex.graph.steps.values()}
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = float(fx_res.output.abs().max())
    torch.testing.assert_close(ex_res.relevant, fx_res.relevant, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(ex_res.relevant + ex_res.irrelevant, ex_res.output.expand_as(ex_res.relevant),
                               rtol=tol, atol=tol * scale)



class _Float32Middle(nn.Module):
    """A float64 model that multiplies two of its features in float32 (as timm's EfficientViT
    runs its attention products in float32): torch.export records the casts as ``aten._to_copy``."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(12, 16), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x)).float()
        return self.c((h[:, :8] * h[:, 8:]).to(x.dtype))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_dtype_casts_keep_the_parts_adding_up(capture, monkeypatch):
    """The cast rule's irrelevant part is the cast total minus cast(r), the engine's ``a - r``:
    the reference (separate parts) then equals the engine to float64 rounding although the
    product runs in float32. Casting r and i apart (a linear map's form) rounds them apart,
    and the reference departs from the engine by float32 rounding."""
    torch.manual_seed(0)
    model = _Float32Middle().double().eval()
    x = torch.randn(1, 12, dtype=torch.float64)
    masks = (torch.rand(5, 12) > 0.5).double()
    with torch.no_grad():
        dec = fastacd.Decomposer(model, capture=capture)
        res = dec.cd(x, masks)
        assert [s.rule.kind for s in dec.graph.steps.values()].count("cast") == 2
        rel, irrel = fastacd.reference.cd_relevant_input(dec.graph, x, masks * x)
        assert_close_scaled(res.relevant, rel, torch.float64)
        assert_close_scaled(rel + irrel, model(x).expand_as(rel), torch.float64)
        monkeypatch.setattr(fastacd.rules.Cast, "reference", fastacd.rules.PartWise.reference)
        apart = fastacd.reference.cd_relevant_input(dec.graph, x, masks * x)[0]
    gap = float((apart - res.relevant).abs().max() / res.output.abs().max())
    assert 1e-10 < gap < 1e-5


def test_a_cast_to_another_tensors_type_is_refused():
    class ToTensor(nn.Module):
        def forward(self, x):
            return (x * 2).to(x)
    with pytest.raises(UnsupportedOpError, match=r"tensor\.dtype"):
        fastacd.Decomposer(ToTensor().eval())

"""The batched engine against the reference CD, on many architectures and dtypes."""
from __future__ import annotations

import contextlib
import copy
import importlib.util

import pytest
import torch
import torch.nn as nn

import fastacd
from fastacd.train.models import acd_mnist_cnn, digits_28

from conftest import assert_close_scaled
from models import MLP, ConcatNet, FunctionalNet, torchvision_model

FAST_BACKENDS = [b for b in fastacd.available_backends() if b != "reference"]


def tile_masks(h: int, w: int, n: int, seed: int = 0, tile: int = 8) -> torch.Tensor:
    """n random masks made of tiles (what ACD scores), plus the full and the empty mask."""
    g = torch.Generator().manual_seed(seed)
    grid = (torch.rand(n, 1, -(-h // tile), -(-w // tile), generator=g) > 0.6).float()
    masks = torch.nn.functional.interpolate(grid, scale_factor=tile)[:, 0, :h, :w]
    return torch.cat([masks, torch.ones(1, h, w), torch.zeros(1, h, w)])


ARCHS = {  # name: (model factory, input shape)
    "vgg11_bn": (lambda: torchvision_model("vgg11_bn"), (1, 3, 64, 64)),
    "vgg16": (lambda: torchvision_model("vgg16"), (1, 3, 64, 64)),
    "alexnet": (lambda: torchvision_model("alexnet"), (1, 3, 64, 64)),
    "resnet18": (lambda: torchvision_model("resnet18"), (1, 3, 64, 64)),
    "resnet50": (lambda: torchvision_model("resnet50"), (1, 3, 64, 64)),
    "densenet121": (lambda: torchvision_model("densenet121"), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision_model("mobilenet_v2"), (1, 3, 64, 64)),
    "functional": (lambda: FunctionalNet().eval(), (1, 3, 16, 16)),
    "concat": (lambda: ConcatNet().eval(), (1, 3, 12, 12)),
    "mnist_cnn": (lambda: acd_mnist_cnn(), (1, 1, 28, 28)),
}


def _case(name, dtype):
    torch.manual_seed(1)
    factory, shape = ARCHS[name]
    model = factory().to(dtype)
    x = torch.randn(shape).to(dtype)  # same values in float32 and float64
    masks = tile_masks(shape[2], shape[3], 3, tile=max(2, shape[2] // 8)).to(dtype)
    return model, x, masks


# Deriving i = a - r instead of propagating it changes rounding; through MobileNetV2's ~50
# batchnorms without eps (|s r| / (|s r| + |s i|)) that difference grows to ~1e-6 of the
# output in float64 (the reference itself is stable under re-batching: ~1e-15). Documented
# in docs/engine.md; every other architecture meets 1e-10.
# Random-init MobileNetV2 is ill-conditioned under the published rules: its float32
# reference is off from the float64 one by 75% of the output, so float32 is not compared.
FLOAT64_RTOL = {"mobilenet_v2": 1e-3}
ILL_CONDITIONED_IN_FLOAT32 = {"mobilenet_v2"}
# The full mask gives relevant = output only where no batchnorm meets 0/0 (its rule sends the
# shift to the irrelevant part there, in the reference too): nets without batchnorm.
FULL_MASK_EXACT = {"vgg16", "alexnet", "functional", "mnist_cnn"}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(ARCHS))
def test_engine_matches_reference(name, dtype, backend):
    model, x, masks = _case(name, dtype)
    if dtype == torch.float32 and name in ILL_CONDITIONED_IN_FLOAT32:
        # not compared: rounding alone moves these scores, as the library's own check says
        gap = fastacd.Decomposer(model, backend=backend).rounding_gap(x, masks[:-2, None])
        assert gap > 1e-2, f"rounding gap {gap:.1e}: no longer ill-conditioned, compare it"
        return
    tiles = masks[:-2]  # the random tile masks
    with torch.no_grad():
        # The oracle runs in float64 even for float32 (its own float32 arithmetic is off by
        # up to 1e-2 of the output on VGG16, the engine's by ~1e-6).
        ref_rel, ref_irrel = fastacd.reference.cd(model.double(), x.double(), tiles[:, None].double())
        ref_rel, ref_irrel = ref_rel.to(dtype), ref_irrel.to(dtype)
        model.to(dtype)
        dec = fastacd.Decomposer(model, backend=backend)
        res = dec.cd(x, masks)
        logits = dec.forward(x)  # the model's output without a trailing log_softmax
    assert res.relevant.shape == (len(masks), logits.shape[1])
    if dtype == torch.float64 and name in FLOAT64_RTOL:
        tol = dict(rtol=FLOAT64_RTOL[name], atol=FLOAT64_RTOL[name] * float(ref_rel.abs().max()))
        torch.testing.assert_close(res.relevant[:-2], ref_rel, **tol)
        torch.testing.assert_close(res.irrelevant[:-2], ref_irrel, **tol)
    else:
        assert_close_scaled(res.relevant[:-2], ref_rel, dtype)
        assert_close_scaled(res.irrelevant[:-2], ref_irrel, dtype)
    # relevant + irrelevant = the model's output, for the engine and the reference
    assert_close_scaled(res.relevant + res.irrelevant, logits.expand_as(res.relevant), dtype)
    assert_close_scaled(ref_rel + ref_irrel, logits.expand_as(ref_rel), dtype)
    if name in FULL_MASK_EXACT and dtype == torch.float64:  # full mask: everything relevant
        # The engine's irrelevant part of the full mask is a - r: rounding noise (the batch-M
        # conv rounds differently from the batch-1 one), not 0 as in the reference. Where a
        # pre-activation is itself at rounding level the bias split ratio is then not ~1, so
        # the full mask is exact only to ~1e-9 of the (tiny, random-init) logits' scale.
        scale = float(logits.abs().max())
        torch.testing.assert_close(res.relevant[-2], logits[0], rtol=1e-8, atol=1e-8 * scale)
        assert res.irrelevant[-2].abs().max() <= 1e-4 * scale
    # empty mask: everything irrelevant
    assert res.relevant[-1].abs().max() <= 1e-4 * logits.abs().max()


def test_reference_backend_equals_reference_module():
    model, x, masks = _case("resnet18", torch.float64)
    with torch.no_grad():
        res = fastacd.Decomposer(model, backend="reference").cd(x, masks[:2])
        rel, irrel = fastacd.reference.cd(model, x, masks[:2])
    torch.testing.assert_close(res.relevant, rel, rtol=0, atol=0)
    torch.testing.assert_close(res.irrelevant, irrel, rtol=0, atol=0)


@pytest.mark.slow
def test_vgg16_224_float32():
    torch.manual_seed(0)
    model = torchvision_model("vgg16", num_classes=1000)
    x = torch.randn(1, 3, 224, 224)
    masks = tile_masks(224, 224, 1, tile=14)[[0, 2]]  # one tile mask and the empty mask
    with torch.no_grad():
        res = fastacd.Decomposer(model).cd(x, masks)
        ref_rel, ref_irrel = fastacd.reference.cd(model.double(), x.double(), masks.double())
    assert_close_scaled(res.relevant, ref_rel.float(), torch.float32)
    assert_close_scaled(res.irrelevant, ref_irrel.float(), torch.float32)


def test_mlp_with_trailing_softmax_and_1d_masks():
    torch.manual_seed(0)
    model = MLP().eval().double()
    x = torch.randn(1, 12, dtype=torch.float64)
    masks = (torch.rand(5, 12) > 0.5).double()
    dec = fastacd.Decomposer(model, backend="torch")
    with torch.no_grad():
        res = dec.cd(x, masks)
        ref_rel, _ = fastacd.reference.cd(model, x, masks)
        logits = model.net[:-1](x)  # before the softmax
    assert_close_scaled(res.relevant, ref_rel, torch.float64)
    assert_close_scaled(res.relevant + res.irrelevant, logits.expand(5, -1), torch.float64)
    assert_close_scaled(dec.forward(x), logits, torch.float64)
    single = dec.cd(x, masks[0])  # (F,) is one mask
    assert_close_scaled(single.relevant, res.relevant[:1], torch.float64)


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "densenet121"])
def test_results_do_not_depend_on_chunk_size(name):
    model, x, masks = _case(name, torch.float64)
    dec = fastacd.Decomposer(model)
    with torch.no_grad():
        whole = dec.cd(x, masks)
        for chunk in (1, 2):
            part = dec.cd(x, masks, chunk_size=chunk)
            assert_close_scaled(part.relevant, whole.relevant, torch.float64)
        tiny_budget = fastacd.Decomposer(model, memory_budget=1).cd(x, masks)  # one mask a chunk
    assert_close_scaled(tiny_budget.relevant, whole.relevant, torch.float64)


@pytest.mark.skipif(not fastacd.ops.HAS_COMPILED, reason="compiled extension fastacd._C not built")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_buffer_reuse_across_chunks_changes_nothing(backend, monkeypatch):
    """The chunks of one call reuse each other's large blocks (fastacd.ops.reuse_cpu_buffers);
    the numbers are those of a run without reuse, and nothing stays cached after the call."""
    from fastacd import ops
    model, x, masks = _case("vgg16", torch.float64)
    dec = fastacd.Decomposer(model, backend=backend)
    with torch.no_grad():
        hits = ops.buffer_reuse_stats()["hits"]
        with_reuse = dec.cd(x, masks, chunk_size=1)
        assert ops.buffer_reuse_stats()["hits"] > hits  # later chunks got earlier chunks' blocks
        assert ops.buffer_reuse_stats()["open_scopes"] == 0
        assert ops.buffer_reuse_stats()["cached_bytes"] == 0
        monkeypatch.setattr(fastacd.engine.chunks, "reuse_buffers", lambda *a: contextlib.nullcontext(False))
        without = dec.cd(x, masks, chunk_size=1)
    torch.testing.assert_close(with_reuse.relevant, without.relevant, rtol=0, atol=0)
    torch.testing.assert_close(with_reuse.irrelevant, without.irrelevant, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "densenet121"])
def test_segmented_pass_equals_one_mask_a_pass(name):
    """With a budget that lets late layers run more masks per pass than early ones, the pass
    runs in segments (``pass_plan``); the numbers are those of one mask at a time."""
    model, x, masks = _case(name, torch.float64)
    masks = torch.cat([masks, masks.flip(1), masks.flip(2)])  # 15 masks
    dec = fastacd.Decomposer(model)
    with torch.no_grad():
        values, _ = dec._total_pass(x)
    largest = max(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))
    dec.memory_budget = largest * 6 * 2  # 2 masks a pass at the largest activation
    plan = dec.pass_plan(values, x, len(masks))
    chunks = [c for _, _, c in plan]
    assert len(plan) > 1 and chunks[0] == 2 and chunks[-1] <= len(masks)
    assert chunks == sorted(set(chunks))  # growing, one segment per chunk
    cuts = fastacd.engine.chunks.cut_points(dec.graph)
    assert all(cuts[start] is src for start, src, _ in plan[1:])
    with torch.no_grad():
        segmented = dec.cd(x, masks)
        single = dec.cd(x, masks, chunk_size=1)
    assert_close_scaled(segmented.relevant, single.relevant, torch.float64)
    assert_close_scaled(segmented.irrelevant, single.irrelevant, torch.float64)


def test_cut_points_and_even_passes():
    from fastacd.engine.chunks import balanced_chunk, cut_points, passes as _passes
    model, _, _ = _case("resnet18", torch.float32)
    g = fastacd.Decomposer(model).graph
    cuts = cut_points(g)
    names = {cuts[i].name for i in cuts}
    assert {"maxpool", "layer1_0_relu_1", "layer4_1_relu_1"} <= names  # between residual blocks
    pos = {n: i for i, n in enumerate(g.nodes)}
    inside = pos[next(n for n in g.nodes if n.name == "layer1_0_conv2")]
    assert inside not in cuts  # the block's input and its conv branch are both live there
    assert list(_passes(0, 64, 43)) == [(0, 32), (32, 64)]
    assert list(_passes(3, 10, 3)) == [(3, 6), (6, 8), (8, 10)]
    assert list(_passes(0, 0, 4)) == []
    assert balanced_chunk(64, 43) == 32 and balanced_chunk(7, 7) == 7 and balanced_chunk(5, 1) == 1


def test_chunk_size_follows_memory_budget():
    model, x, _ = _case("vgg11_bn", torch.float32)
    big = fastacd.Decomposer(model, memory_budget=1 << 30)
    small = fastacd.Decomposer(model, memory_budget=1 << 22)
    with torch.no_grad():
        values, _ = big._total_pass(x)
    largest = 64 * 64 * 64 * 4  # vgg11_bn's first conv output: 64 channels at 64x64, float32
    # a large budget: the CPU cache cap (32 MB of the largest activation per chunk) decides
    assert big.chunk_size(values, x) == min((1 << 30) // (largest * 6), (32 << 20) // largest) == 32
    # a small budget decides below the cap, down to one mask a chunk
    assert small.chunk_size(values, x) == max(1, (1 << 22) // (largest * 6)) == 1
    # largest activation 64 MB: the cap's floor of 2 masks, unless the budget allows fewer
    huge, act = torch.zeros(1, 3, 512, 512), {"a": torch.zeros(1, 64, 512, 512)}
    assert fastacd.Decomposer(model, memory_budget=1 << 34).chunk_size(act, huge) == 2
    assert fastacd.Decomposer(model, memory_budget=1 << 28).chunk_size(act, huge) == 1


def test_empty_mask_gives_everything_irrelevant():
    model, x, masks = _case("resnet18", torch.float64)
    with torch.no_grad():
        res = fastacd.Decomposer(model).cd(x, masks[-1])
        logits = model(x)
    assert_close_scaled(res.irrelevant[0], logits[0], torch.float64)
    assert res.relevant.abs().max() <= 1e-10 * logits.abs().max()


def test_drop_in_cd_matches_decomposer_and_accepts_original_arguments():
    model, x, masks = _case("mnist_cnn", torch.float32)
    mask = masks[0].numpy()
    with torch.no_grad():
        rel, irrel = fastacd.cd(x, model, mask, model_type="mnist", device="cpu")
        res = fastacd.Decomposer(model).cd(x, masks[0])
        rel_t, irrel_t = fastacd.cd(x, model, transform=lambda im: im * masks[0])
        rel_b, _ = fastacd.cd(x, model, masks)  # a batch of masks in one call
    torch.testing.assert_close(rel, res.relevant)
    torch.testing.assert_close(irrel, res.irrelevant)
    torch.testing.assert_close(rel_t, res.relevant)
    assert rel_b.shape == (len(masks), 10)
    torch.testing.assert_close(rel_b[:1], rel)


def test_drop_in_cd_sets_eval_like_the_original():
    model, x, masks = _case("vgg11_bn", torch.float32)
    model.train()
    with torch.no_grad():
        fastacd.cd(x, model, masks[0])
    assert not model.training


def test_mnist_cnn_with_published_weights(acd_mnist_weights):
    model = acd_mnist_cnn(acd_mnist_weights).double()
    images, labels = digits_28(torch.float64)
    x = images[:1]
    masks = tile_masks(28, 28, 4, tile=4).double()
    with torch.no_grad():
        res = fastacd.Decomposer(model).cd(x, masks)
        ref_rel, ref_irrel = fastacd.reference.cd(model, x, masks)
        log_probs = model(x)
    assert_close_scaled(res.relevant, ref_rel, torch.float64)
    assert_close_scaled(res.irrelevant, ref_irrel, torch.float64)
    # the logits CD decomposes are what the model's log_softmax normalises
    torch.testing.assert_close(torch.log_softmax(res.relevant[-2:-1], 1), log_probs)


def test_gradients_flow_through_the_engine():
    model, x, masks = _case("functional", torch.float64)
    res = fastacd.Decomposer(model).cd(x, masks[:2])
    res.relevant[:, 0].sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.skipif(importlib.util.find_spec("acd") is None, reason="original acd package not installed")
@pytest.mark.parametrize("name,model_type", [("vgg11_bn", None), ("alexnet", None),
                                             ("resnet18", "resnet18"), ("mnist_cnn", "mnist")])
def test_matches_original_acd_package(name, model_type):
    """Cross-check against the original package (float32 only: it builds float32 zeros)."""
    import acd
    model, x, masks = _case(name, torch.float32)
    if name == "mnist_cnn":
        from conftest import ACD_MNIST_WEIGHTS
        if ACD_MNIST_WEIGHTS.exists():
            model = acd_mnist_cnn(ACD_MNIST_WEIGHTS)
    mask = masks[0]
    with torch.no_grad():
        rel, irrel = acd.cd(x, model, mask.numpy(), model_type=model_type, device="cpu")
        # the published formula: the default's numerical zero differs from the original by
        # design (docs/engine.md, "Numerical zero", has the measured sizes)
        res = fastacd.Decomposer(model, zero_tol=0).cd(x, mask)
    assert_close_scaled(res.relevant, rel, torch.float32)
    assert_close_scaled(res.irrelevant, irrel, torch.float32)


def test_all_finite_checks_by_sum_then_by_element():
    from fastacd.capture.inputs import all_finite
    assert all_finite(torch.ones(3, 5))
    assert all_finite(torch.full((4,), 3e38))  # the sum overflows; every element is finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(2, 7, dtype=torch.float64)
        t[1, 3] = bad
        assert not all_finite(t)
    both = torch.tensor([float("inf"), -float("inf")])  # the sum is NaN
    assert not all_finite(both)


class _ViewKeepingNet(torch.nn.Module):
    """A conv output read by a view that stays live (flatten, read at the end) and, last, by
    a batchnorm; a residual add and ReLUs: the in-place rules must leave the view intact."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(2 * 4 * 8 * 8, 5)

    def forward(self, x):
        z = self.conv(x)
        kept = z.flatten(1)
        y = torch.relu(self.bn(z))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.cat([kept, y.flatten(1)], 1))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_in_place_rules_leave_live_views_alone(backend, monkeypatch):
    torch.manual_seed(3)
    model = _ViewKeepingNet().eval().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    masks = tile_masks(8, 8, 4, tile=2).double()
    with torch.no_grad():
        res = fastacd.Decomposer(model, backend=backend).cd(x, masks)
        ref_rel, ref_irrel = fastacd.reference.cd(model, x, masks)
        monkeypatch.setattr(fastacd.engine.batched, "in_place", lambda *a: None)
        plain = fastacd.Decomposer(model, backend=backend).cd(x, masks)
    assert_close_scaled(res.relevant, ref_rel, torch.float64)
    assert_close_scaled(res.irrelevant, ref_irrel, torch.float64)
    torch.testing.assert_close(res.relevant, plain.relevant, rtol=0, atol=0)


def test_in_place_rules_apply_on_resnet_blocks():
    """ResNet's batchnorms, residual additions and their ReLUs run in place (no new tensors)."""
    from fastacd.engine.batched import in_place as _in_place_rule
    model, x, masks = _case("resnet18", torch.float32)
    dec = fastacd.Decomposer(model)
    hits = []

    def spy(g, step, *args):
        out = _in_place_rule(g, step, *args)
        if out is not None:
            hits.append(step.kind)
        return out

    import unittest.mock
    with torch.no_grad(), unittest.mock.patch.object(fastacd.engine.batched, "in_place", spy):
        dec.cd(x, masks)
    # per block: bn1 (ReLU fused), bn2, the add, the ReLU after it; downsample batchnorms
    assert hits.count("add") == 8 and hits.count("activation") == 8
    assert hits.count("batchnorm") == 1 + 16 + 3


@pytest.mark.parametrize("rows", [1, 3, 4, 17])
def test_linear_layers_use_onednn_where_it_pays_and_give_the_same_numbers(rows, monkeypatch):
    """graph.linear_no_bias: oneDNN's linear for float32 CPU inference from 4 rows on, else
    F.linear; the two agree to float32 rounding, float64 and autograd always take F.linear."""
    import torch.nn.functional as F
    from fastacd.rules import affine as graph
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 257, generator=g, requires_grad=True)
    x = torch.randn(rows, 257, generator=g)
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out = graph.linear_no_bias(x, w)
    assert bool(calls) == (not graph._ONEDNN_LINEAR or rows < graph.ONEDNN_LINEAR_MIN_ROWS)
    torch.testing.assert_close(out, real(x, w), rtol=1e-5, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(graph.linear_no_bias(x.double(), w.double()), real(x.double(), w.double()))
    assert calls
    y = graph.linear_no_bias(x.requires_grad_(True), w)  # autograd on: differentiable F.linear
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(rows, -1), rtol=1e-5, atol=1e-4)


def test_linear_abs_in_blocks_equals_the_whole_abs(monkeypatch):
    """The magnitude pass's t @ |W|^T in row blocks (a whole |W| of VGG16's first Linear is a
    400 MB allocation): the same numbers as with |W| whole, for blocks that do not divide the
    rows; under autograd |W| whole, differentiable."""
    from fastacd.rules import affine
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 300, generator=g)
    t = torch.randn(5, 300, generator=g).abs()
    monkeypatch.setattr(affine, "ABS_BLOCK_BYTES", 300 * 4 * 64 + 7)  # 64 rows a block
    with torch.no_grad():
        assert torch.equal(affine.linear_abs(t, w), affine.linear_no_bias(t, w.abs()))
        assert torch.equal(affine.linear_abs(t[0], w), affine.linear_no_bias(t[0], w.abs()))
    wg = w.clone().requires_grad_(True)
    affine.linear_abs(t, wg).sum().backward()
    torch.testing.assert_close(wg.grad, torch.sign(w) * t.sum(0))


def _bias_chain(depth: int) -> torch.nn.Module:
    """Linear layers whose biases dwarf W x: every bias split shares a large bias by two small
    parts, so CD amplifies a rounding difference a few times per layer."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layer = torch.nn.Linear(16, 16)
        torch.nn.init.normal_(layer.weight, std=0.05)
        torch.nn.init.normal_(layer.bias)
        layers.append(layer)
    return torch.nn.Sequential(*layers).eval()


def test_rounding_gap_is_the_float32_float64_distance():
    model, x = _bias_chain(3), torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(4, 16, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    dec = fastacd.Decomposer(model)
    gap = dec.rounding_gap(x, masks)
    with torch.no_grad():
        rel32 = dec.cd(x, masks).relevant.double()
        res64 = fastacd.reference.cd(copy.deepcopy(model).double(), x.double(), masks.double())
    want = float((rel32 - res64[0]).abs().max() / (res64[0][0] + res64[1][0]).abs().max())
    assert 0 < gap < 1e-5
    assert gap == pytest.approx(want, rel=1e-3, abs=1e-12)  # the float64 engine = the reference to 1e-12


def test_rounding_gap_flags_a_model_where_rounding_decides():
    deep = _bias_chain(30)
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(4, 16, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    dec = fastacd.Decomposer(deep)
    assert dec.rounding_gap(x, masks) > 1e-2  # float32's 6e-8 grown ~2x a layer
    assert next(deep.parameters()).dtype == torch.float32  # the model is left as it was
    # in float64 the second opinion is the reference: far closer, but growing with depth too
    g10 = fastacd.Decomposer(_bias_chain(10).double()).rounding_gap(x.double(), masks)
    g30 = fastacd.Decomposer(deep.double()).rounding_gap(x.double(), masks)
    assert 0 <= g10 < 1e-12 and g10 < g30 < 1e-6


def test_converted_copy_is_a_converted_deepcopy():
    """rounding_gap's float64 model (and the text engine's): what
    ``copy.deepcopy(model).double()`` gives (values, dtypes, Parameter types and flags, tied
    weights still tied, integer buffers kept), the original untouched and sharing no storage."""
    from fastacd.engine.decomposer import converted_copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    model[4].weight = model[3].weight  # tied
    model[0].bias.requires_grad_(False)
    got, want = converted_copy(model, torch.float64), copy.deepcopy(model).double()
    assert got[4].weight is got[3].weight and got[3].weight is not model[3].weight
    assert not got[0].bias.requires_grad and got[0].weight.requires_grad
    assert all(isinstance(p, nn.Parameter) for p in got.parameters())
    assert got[1].num_batches_tracked.dtype == torch.long
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert next(model.parameters()).dtype == torch.float32
    ptrs = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not ptrs & {t.data_ptr() for t in [*got.parameters(), *got.buffers()]}


def test_forward_skips_the_magnitude_pass():
    """``Decomposer.forward`` needs no tolerances: it runs the total pass without the magnitude
    pass (|W| of every layer: VGG16's forward took 0.72 s instead of 0.26 s, once per hierarchy),
    and gives the model's output; ``cd`` still gets its tolerances."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    dec = fastacd.Decomposer(model)
    seen = []
    inner = dec.graph.total_pass

    def spy(x, zero_tol):
        seen.append(zero_tol)
        return inner(x, zero_tol)

    dec.graph.total_pass = spy
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(dec.forward(x), model(x))
        assert seen == [0]
        dec.cd(x, torch.ones(1, 1, 6, 6))
    assert seen[1] == dec.zero_tol > 0

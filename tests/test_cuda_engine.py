"""The engine on a GPU (``needs_cuda``, skipped without one; ``bench/gpu_check.py`` runs them):
CD of small CNNs on CUDA against the CPU in float64, the windowed pass on CUDA, ACD
hierarchies, gradients through the CUDA ops (CDEP), and autocast. float32 runs inside
``fastacd.ops.float32_precision()``: exact float32, no TF32."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastacd
from fastacd import ops

from conftest import assert_close_scaled
from models import ConcatNet, FunctionalNet, randomize_batchnorm, torchvision_model

pytestmark = pytest.mark.needs_cuda


class SmallVGG(nn.Module):
    """conv-ReLU pairs and 2x2 max-pools (VGG's pattern), a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x):
        return self.head(self.features(x))


def _models():
    torch.manual_seed(0)
    return {"small_vgg": SmallVGG().eval(), "functional": FunctionalNet().eval(),
            "concat_bn": randomize_batchnorm(ConcatNet()).eval(), "resnet18": torchvision_model("resnet18")}


MODELS = list(_models())


def _model(name, device, dtype):
    return copy.deepcopy(_models()[name]).to(device=device, dtype=dtype)


SIZES = {"functional": 16}  # its head expects 16x16 inputs; the others take 32x32


def _input_and_masks(seed=0, m=6, size=32):
    """An input and m random 8x8 tiles (not the full mask: with random-init batchnorms its
    irrelevant part is rounding noise that the splits amplify, tests/test_engine.py)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)
    masks = torch.zeros(m, size, size, dtype=torch.float64)
    for j in range(m):
        y, x0 = torch.randint(0, size - 7, (2,), generator=g).tolist()
        masks[j, y:y + 8, x0:x0 + 8] = 1
    return x, masks[:, None]  # (M, 1, H, W): unambiguous whatever M


def _cpu_reference(name, x, masks):
    with torch.no_grad():
        return fastacd.Decomposer(_model(name, "cpu", torch.float64)).cd(x, masks)


@pytest.mark.parametrize("backend", ["compiled", "torch"])
@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()  # the engine's inference path: in-place splits (bias_split_, bn_split_)
def test_cd_cuda_matches_cpu_float64(name, backend):
    if backend == "compiled" and not ops.HAS_COMPILED:
        pytest.skip("compiled extension fastacd._C not built")
    x, masks = _input_and_masks(size=SIZES.get(name, 32))
    ref = _cpu_reference(name, x, masks)
    dec = fastacd.Decomposer(_model(name, "cuda", torch.float64), backend=backend)
    got = dec.cd(x.cuda(), masks.cuda())
    assert got.relevant.is_cuda
    assert_close_scaled(got.relevant.cpu(), ref.relevant, torch.float64)
    assert_close_scaled(got.irrelevant.cpu(), ref.irrelevant, torch.float64)
    with ops.float32_precision():
        dec32 = fastacd.Decomposer(_model(name, "cuda", torch.float32), backend=backend)
        got32 = dec32.cd(x.float().cuda(), masks.float().cuda())
    assert_close_scaled(got32.relevant.double().cpu(), ref.relevant, torch.float32)
    assert_close_scaled((got32.relevant + got32.irrelevant).double().cpu(), ref.output.expand_as(ref.relevant),
                        torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["small_vgg", "resnet18"])
@torch.no_grad()
def test_windowed_cd_delta_cuda(name, dtype):
    """The windowed pass (base kept, candidates recomputed in their windows) on CUDA equals
    full CD of the same masks on CUDA, and the CPU's float64 result."""
    x, _ = _input_and_masks(1)
    base = torch.zeros(32, 32, dtype=torch.float64)
    base[:8, :8] = 1
    deltas = torch.zeros(4, 1, 32, 32, dtype=torch.float64)
    deltas[0, :, 24:, 24:] = deltas[1, :, 0:4, 12:16] = deltas[2, :, 12:16, 12:16] = deltas[3, :, 8:12, 0:4] = 1
    union = torch.maximum(base, deltas)
    ref = _cpu_reference(name, x, union)
    with ops.float32_precision():
        dec = fastacd.Decomposer(_model(name, "cuda", dtype))
        stats = {}
        got = dec.cd_delta(x.to("cuda", dtype), base.to("cuda", dtype), deltas.to("cuda", dtype),
                           max_cost_ratio=float("inf"), stats=stats)
        full = dec.cd(x.to("cuda", dtype), union.to("cuda", dtype))
    assert stats.get("windowed", True)
    assert_close_scaled(got.relevant, full.relevant, dtype)
    assert_close_scaled(got.relevant.double().cpu(), ref.relevant, dtype)


@pytest.mark.parametrize("name", ["small_vgg", "concat_bn"])
def test_hierarchy_cuda_matches_cpu(name):
    """An ACD hierarchy on CUDA in float64: the same blobs at every level as on the CPU."""
    x, _ = _input_and_masks(2)
    kw = dict(sweep_dim=4, percentile_include=80, num_iters=3)
    cpu = fastacd.hierarchy(_model(name, "cpu", torch.float64), x, **kw)
    gpu = fastacd.hierarchy(_model(name, "cuda", torch.float64), x.cuda(), **kw)
    assert gpu.label == cpu.label and gpu.num_levels == cpu.num_levels
    for a, b in zip(gpu.levels(), cpu.levels()):
        assert sorted(sorted(n.units) for n in a) == sorted(sorted(n.units) for n in b)
    scale = max(abs(s) for s in cpu.full_scores)
    for a, b in zip(gpu.nodes, cpu.nodes):
        assert abs(a.score - b.score) <= 1e-9 * scale


@pytest.mark.parametrize("name", ["small_vgg", "concat_bn", "functional"])
def test_cd_gradients_cuda(name):
    """CD is differentiable through the CUDA ops (CDEP trains through them): the parameters'
    gradients of a CD score on CUDA equal the CPU's in float64."""
    x, masks = _input_and_masks(3, m=3, size=SIZES.get(name, 32))
    grads = []
    for device in ("cpu", "cuda"):
        model = _model(name, device, torch.float64)
        res = fastacd.Decomposer(model).cd(x.to(device), masks.to(device))
        (res.relevant[:, 0].sum() + 0.5 * res.relevant[:, 1].sum()).backward()
        grads.append([p.grad.cpu() for p in model.parameters() if p.grad is not None])
    assert grads[0] and len(grads[0]) == len(grads[1])
    for a, b in zip(grads[1], grads[0]):
        assert_close_scaled(a, b, torch.float64)


@torch.no_grad()
def test_cd_under_autocast_cuda():
    """The engine inside torch.autocast (bfloat16 convolutions): the ops promote their float32
    parameters instead of failing, and the scores stay near float32 CD."""
    x, masks = _input_and_masks(4)
    with ops.float32_precision():
        dec = fastacd.Decomposer(_model("small_vgg", "cuda", torch.float32))
        exact = dec.cd(x.float().cuda(), masks.float().cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = dec.cd(x.float().cuda(), masks.float().cuda())
    scale = float(exact.output.abs().max())  # bfloat16 keeps ~3 digits of the logits
    assert float((low.relevant.float() - exact.relevant).abs().max()) <= 5e-2 * scale

"""Reduced precision and channels_last (docs/precision.md): ``Decomposer(precision=...)``,
``channels_last``, the split ops on channels_last maps, the hierarchy API and CLI flag.

bf16 tolerance: bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per product
input); a few layers of random-init nets accumulate to ~1e-2 of the output scale (measured:
VGG11 4e-3, ResNet18 8e-3 at 64 px), so these tests allow 3e-2 of the output scale: far
tighter than a wrong split or a missed bias (order 1), far looser than float32 (1e-4).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import fastacd
from fastacd import Decomposer, ops
from fastacd.ops import precision as prec
from fastacd.ops import torch_ops

from conftest import assert_close_scaled
from models import ConcatNet, FunctionalNet, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_TOL = 3e-2  # of the output scale (module docstring)
CL = torch.channels_last


def _masks(m, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(m, h, w, generator=g) > 0.5).float()


def _models():
    torch.manual_seed(0)
    return {
        "functional": (FunctionalNet().eval(), 16),
        "concat": (randomize_batchnorm(ConcatNet()).eval(), 16),
        "vgg11": (torchvision.models.vgg11(num_classes=10).eval(), 32),
        "resnet18": (randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval(), 32),
    }


MODELS = _models()


def _scale(t):
    return float(t.abs().max())


# ------------------------------------------------------------------------------- bf16

@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_close_to_float32(name):
    model, hw = MODELS[name]
    x = torch.randn(1, 3, hw, hw, generator=torch.Generator().manual_seed(1))
    masks = _masks(6, hw, hw)
    with torch.no_grad():
        ref = Decomposer(model).cd(x, masks)
        dec = Decomposer(model, precision="bf16")
        got = dec.cd(x, masks)
    assert dec.precision == "bf16"
    # the totals stay float32 and exact: the output is the float32 model's, bit for bit
    torch.testing.assert_close(got.output, ref.output, rtol=0, atol=0)
    assert got.relevant.dtype == got.irrelevant.dtype == torch.float32
    # relevant + irrelevant = the model's output (bookkeeping in float32)
    assert_close_scaled(got.relevant + got.irrelevant, ref.output.expand_as(got.relevant), torch.float32)
    gap = _scale(got.relevant - ref.relevant) / _scale(ref.output)
    assert 0 < gap < BF16_TOL, gap  # 0 would mean bf16 never ran


def test_bf16_hand_computed_linear():
    """One Linear with a bias: relevant = bf16(W) bf16(r) (float32 accumulation, the product
    rounded to bfloat16: the GEMM's output dtype) + the float32 bias split of the reference,
    computed here by hand."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).eval()
    x = torch.randn(1, 5)
    mask = torch.tensor([[1.0, 0, 1, 0, 1]])
    with torch.no_grad():
        got = Decomposer(lin, precision="bf16").cd(x, mask).relevant[0]
        r = (mask * x)[0]
        zr = (lin.weight.bfloat16().float() @ r.bfloat16().float()).bfloat16().float()
        pre = lin.weight @ x[0]  # the total: float32
        zi = pre - zr
        pr = (zr.abs() + 1e-20) / ((zr.abs() + 1e-20) + (zi.abs() + 1e-20))
        want = zr + pr * lin.bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_weight_mode_casts_and_caches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    mode = ops.WeightMode(torch.bfloat16, channels_last=True)
    with torch.no_grad():
        w1 = mode.weight(conv.weight)
        assert w1.dtype == torch.bfloat16 and w1.is_contiguous(memory_format=CL)
        assert mode.weight(conv.weight) is w1  # cached
        conv.weight.mul_(2)  # changed in place: cast again
        w2 = mode.weight(conv.weight)
        assert w2 is not w1
        torch.testing.assert_close(w2.float(), conv.weight.bfloat16().float())
        conv.weight.data = conv.weight.data * 3  # new data, no version bump: cast again
        w3 = mode.weight(conv.weight)
        assert w3 is not w2
        torch.testing.assert_close(w3.float(), conv.weight.bfloat16().float())
        x = torch.randn(2, 3, 8, 8)
        with ops.low_precision(mode):
            out = ops.weight_apply(nn.functional.conv2d, x, conv.weight)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
        # the windowed pass's crops come NCHW from window_gather and go back NCHW (same values)
        with ops.low_precision(mode):
            nchw = ops.weight_apply(nn.functional.conv2d, x, conv.weight, nchw_out=True)
        assert nchw.is_contiguous() and not nchw.is_contiguous(memory_format=CL)
        torch.testing.assert_close(nchw, out, rtol=0, atol=0)
        # outside the scope: exact float32
        assert ops.weight_apply(nn.functional.conv2d, x, conv.weight).dtype == torch.float32
        torch.testing.assert_close(ops.weight_apply(nn.functional.conv2d, x, conv.weight),
                                   nn.functional.conv2d(x, conv.weight), rtol=0, atol=0)
        # float64 activations are never lowered
        with ops.low_precision(mode):
            out64 = ops.weight_apply(nn.functional.conv2d, x.double(), conv.weight.double())
        assert out64.dtype == torch.float64
        # a Linear on (N, H, W, C) tokens (ConvNeXt's MLP) reads them as they lie: no
        # channels_last cast, which made the product a batched matmul through copies
        lin = nn.Linear(5, 6)
        tokens = torch.randn(2, 3, 4, 5)
        seen = []
        with ops.low_precision(mode):
            out = ops.weight_apply(lambda t, w: seen.append(t) or nn.functional.linear(t, w), tokens, lin.weight)
        assert seen[0].dtype == torch.bfloat16 and seen[0].is_contiguous()
        torch.testing.assert_close(out, nn.functional.linear(tokens, lin.weight), rtol=2e-2, atol=2e-2)


def test_bf16_totals_and_splits_float32(monkeypatch):
    """Every split op sees float32 operands under bf16 (the boundary: only weight
    applications are bfloat16)."""
    model, hw = MODELS["resnet18"]
    seen = []
    for name in ("bias_split", "bias_split_", "bn_split", "bn_split_", "maxpool_gather"):
        fn = getattr(ops, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            seen.append((_name, {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}))
            return _fn(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    x = torch.randn(1, 3, hw, hw)
    with torch.no_grad():
        Decomposer(model, precision="bf16").cd(x, _masks(4, hw, hw))
    assert {n for n, _ in seen} >= {"bn_split", "maxpool_gather"} or {n for n, _ in seen} >= {"bn_split_"}
    assert all(dtypes == {torch.float32} for _, dtypes in seen), seen


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_inference_mode(precision):
    """Under torch.inference_mode (inference tensors have no version counter, which the caches
    of weights and rows forms read): the numbers of a run outside it, for an input and a model
    made inside it too, and an in-place weight change inside it is seen (nothing stale kept)."""
    model, hw = MODELS["resnet18"]
    x = torch.randn(1, 3, hw, hw, generator=torch.Generator().manual_seed(3))
    masks = _masks(4, hw, hw)
    with torch.no_grad():
        want = Decomposer(model, precision=precision).cd(x, masks).relevant
    with torch.inference_mode():
        inner = torchvision.models.resnet18(num_classes=10).eval()  # inference-tensor parameters
        inner.load_state_dict(model.state_dict())
        xi = x.clone()
        for m in (model, inner):
            dec = Decomposer(m, precision=precision)
            torch.testing.assert_close(dec.cd(xi, masks).relevant, want, rtol=0, atol=0)
            assert dec.cd(xi, masks).relevant.is_inference()
        inner.fc.weight.mul_(2)
        got = dec.cd(xi, masks).relevant
        assert not torch.allclose(got, want)
        torch.testing.assert_close(got, Decomposer(inner, precision=precision).cd(xi, masks).relevant, rtol=0, atol=0)
        levels = fastacd.hierarchy(model, xi, label=3, sweep_dim=8, num_iters=2, precision=precision).levels()
    with torch.no_grad():
        assert levels == fastacd.hierarchy(model, x, label=3, sweep_dim=8, num_iters=2, precision=precision).levels()


def test_bf16_windowed_equals_full_bf16():
    """cd_delta in bf16 gives the numbers of cd in bf16 on the union masks."""
    model, hw = MODELS["vgg11"]
    x = torch.randn(1, 3, hw, hw, generator=torch.Generator().manual_seed(2))
    base = torch.zeros(hw, hw)
    base[:8, :8] = 1
    delta = torch.zeros(4, 1, hw, hw)
    for k, (i, j) in enumerate([(8, 0), (20, 20), (0, 24), (8, 8)]):
        delta[k, 0, i:i + 4, j:j + 4] = 1
    dec = Decomposer(model, precision="bf16")
    with torch.no_grad():
        got = dec.cd_delta(x, base, delta)
        full = dec.cd(x, torch.maximum(base, delta))
    assert_close_scaled(got.relevant, full.relevant, torch.float32)


def test_precision_validation():
    model, _ = MODELS["functional"]
    with pytest.raises(ValueError, match="precision must be one of"):
        Decomposer(model, precision="fp16")
    with pytest.raises(ValueError, match="reference"):
        Decomposer(model, backend="reference", precision="bf16")


def test_bf16_warns_without_fast_path(monkeypatch):
    model, hw = MODELS["functional"]
    monkeypatch.setattr(prec, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(prec, "_WARNED", set())
    x = torch.randn(1, 3, hw, hw)
    dec = Decomposer(model, precision="bf16")
    with pytest.warns(RuntimeWarning, match="neither AMX-BF16 nor AVX512-BF16"):
        dec.cd(x, _masks(2, hw, hw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec.cd(x, _masks(2, hw, hw))  # once


def test_fast_bf16_detection(monkeypatch):
    monkeypatch.setattr(prec, "_cpu_flags", lambda: {"amx_bf16", "avx512f"})
    assert prec.fast_bf16(torch.device("cpu"))[0]
    monkeypatch.setattr(prec, "_cpu_flags", lambda: {"avx512_bf16"})
    assert prec.fast_bf16(torch.device("cpu"))[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    fast, why = prec.fast_bf16(torch.device("cuda", 0))
    assert not fast and "7.5" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert prec.fast_bf16(torch.device("cuda", 0))[0]


# ------------------------------------------------------------------------------- tf32

def test_tf32_on_cpu_warns_and_is_exact(monkeypatch):
    model, hw = MODELS["concat"]
    monkeypatch.setattr(prec, "_WARNED", set())
    x = torch.randn(1, 3, hw, hw)
    masks = _masks(4, hw, hw)
    with torch.no_grad():
        ref = Decomposer(model).cd(x, masks)
        with pytest.warns(RuntimeWarning, match="no effect on cpu"):
            got = Decomposer(model, precision="tf32").cd(x, masks)
    torch.testing.assert_close(got.relevant, ref.relevant, rtol=0, atol=0)


def test_default_turns_tf32_off_inside_calls(monkeypatch):
    """Whatever the process set, the default precision runs exact float32 (checked through the
    flags an engine call sees); precision='tf32' turns TF32 on inside the call on CUDA."""
    model, hw = MODELS["functional"]
    seen = []
    real = fastacd.engine.decomposer.walk

    def spy(*args, **kwargs):
        seen.append((ops.tf32_enabled(), torch.get_float32_matmul_precision()))
        return real(*args, **kwargs)
    monkeypatch.setattr(fastacd.engine.decomposer, "walk", spy)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.no_grad():
            Decomposer(model).cd(torch.randn(1, 3, hw, hw), _masks(2, hw, hw))
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and all(tf32 == {"conv": False, "matmul": False} and mm == "highest" for tf32, mm in seen)


@pytest.mark.needs_cuda
def test_tf32_on_cuda_is_on_inside_calls(monkeypatch):
    model, hw = MODELS["functional"]
    model = model.cuda()
    seen = []
    real = fastacd.engine.decomposer.walk

    def spy(*args, **kwargs):
        seen.append(ops.tf32_enabled())
        return real(*args, **kwargs)
    monkeypatch.setattr(fastacd.engine.decomposer, "walk", spy)
    with torch.no_grad():
        Decomposer(model, precision="tf32").cd(torch.randn(1, 3, hw, hw, device="cuda"), _masks(2, hw, hw).cuda())
    model.cpu()
    assert seen and all(s == {"conv": True, "matmul": True} for s in seen)


# ------------------------------------------------------------------------------- channels_last

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last_equals_nchw(name, dtype):
    """The same numbers with the relevant maps in channels_last (float64: to rounding, the
    convolutions sum in another order)."""
    model, hw = MODELS[name]
    model = model.to(dtype)
    try:
        x = torch.randn(1, 3, hw, hw, dtype=dtype, generator=torch.Generator().manual_seed(3))
        masks = _masks(5, hw, hw).to(dtype)
        with torch.no_grad():
            ref = Decomposer(model, channels_last=False).cd(x, masks)
            dec = Decomposer(model, channels_last=True)
            got = dec.cd(x, masks)
        assert dec.channels_last
        assert_close_scaled(got.relevant, ref.relevant, dtype)
    finally:
        model.float()


def test_channels_last_auto_choice():
    assert Decomposer(MODELS["vgg11"][0], precision="bf16").channels_last
    assert not Decomposer(MODELS["vgg11"][0]).channels_last  # float32: measured slower
    lin = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    assert not Decomposer(lin, precision="bf16").channels_last  # no 2-d convolution


def _cl(t):
    return t.contiguous(memory_format=CL)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("total_layout", ["nchw", "cl"])
def test_split_ops_on_channels_last(relu, total_layout):
    """bias_split(_), bn_split(_) on channels_last maps: the NCHW numbers (float64 exact: the
    same formula per element), the output channels_last."""
    g = torch.Generator().manual_seed(0)
    m, c, h, w = 3, 5, 4, 6
    rel = torch.randn(m, c, h, w, generator=g, dtype=torch.float64)
    total = torch.randn(1, c, h, w, generator=g, dtype=torch.float64)
    v1, v2 = torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    t = _cl(total) if total_layout == "cl" else total
    for name, args in (("bias_split", (v1,)), ("bn_split", (v1, v2))):
        want = getattr(torch_ops, name)(rel, total, *args, relu)
        got = getattr(ops, name)(_cl(rel), t, *args, relu)
        assert got.is_contiguous(memory_format=CL)
        torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
        buf = _cl(rel)
        out = getattr(ops, name + "_")(buf, t, *args, relu)
        assert out is buf and buf.is_contiguous(memory_format=CL)
        torch.testing.assert_close(buf, want, rtol=1e-15, atol=1e-15)
    # the rows forms of the total, tol and vectors are kept per tensor: changed in place, made again
    tol = torch.rand(1, c, h, w, generator=g, dtype=torch.float64) * 0.3
    for step in range(2):
        if step:
            for v in (t, tol, v1):
                v.mul_(-0.5 if v is not tol else 2.0)
        want = torch_ops.bias_split(rel, t.contiguous(), v1, relu, tol)
        torch.testing.assert_close(ops.bias_split(_cl(rel), t, v1, relu, tol), want, rtol=1e-15, atol=1e-15)
    # a Parameter whose data is replaced by another dtype (what model.float() does) is made again
    p = torch.nn.Parameter(v1.clone(), requires_grad=False)
    with torch.no_grad():
        ops.bias_split(_cl(rel), t, p, relu)
        p.data = p.data.float()
        got = ops.bias_split(_cl(rel).float(), t.float(), p, relu)
    torch.testing.assert_close(got, torch_ops.bias_split(rel.float(), t.contiguous().float(), p, relu))


def test_split_ops_channels_last_grad():
    g = torch.Generator().manual_seed(1)
    rel = _cl(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    total = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda r, bb: ops.bias_split(r, total, bb), (rel, b))


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_maxpool_gather_channels_last(kernel, stride, padding):
    g = torch.Generator().manual_seed(2)
    total = torch.randn(1, 4, 9, 7, generator=g, dtype=torch.float64)
    rel = torch.randn(3, 4, 9, 7, generator=g, dtype=torch.float64)
    _, idx = torch.nn.functional.max_pool2d(total, kernel, stride, padding, return_indices=True)
    want = torch_ops.maxpool_gather(rel, idx)
    got = ops.maxpool_gather(_cl(rel), idx)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_window_gather_channels_last():
    """The windowed pass's gather takes channels_last maps (the kernel reads a channels_last
    base in place, a window through .contiguous()): the NCHW numbers."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 3, 10, 10, generator=g, dtype=torch.float64)
    win = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    woy, wox = torch.tensor([1, 5]), torch.tensor([2, 0])
    oy, ox = torch.tensor([0, 4]), torch.tensor([1, 2])
    want = torch_ops.window_gather(base, win, woy, wox, oy, ox, 6, 6)
    got = ops.window_gather(_cl(base), _cl(win), woy, wox, oy, ox, 6, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------- API, CLI

def test_hierarchy_and_agglomerate_accept_precision(monkeypatch):
    import fastacd.engine.windowed as windowed
    modes = []
    real = windowed._cd_groups

    def spy(*args, **kwargs):  # the scorer's windowed path runs in the Decomposer's precision
        modes.append(prec.current_low_precision())
        return real(*args, **kwargs)
    monkeypatch.setattr(windowed, "_cd_groups", spy)
    model, hw = MODELS["vgg11"]
    x = torch.randn(1, 3, hw, hw, generator=torch.Generator().manual_seed(5))
    h32 = fastacd.hierarchy(model, x, sweep_dim=8, num_iters=2)
    h16 = fastacd.hierarchy(model, x, sweep_dim=8, num_iters=2, precision="bf16")
    assert h16.params["precision"] == "bf16" and h32.params["precision"] == "float32"
    assert h16.num_levels >= 1
    im = x[0].permute(1, 2, 0).numpy()
    out = fastacd.agg_2d.agglomerate(model, None, 90, "cd", 8, im, 0, num_iters=2, im_torch=x, precision="bf16")
    ref = fastacd.agg_2d.agglomerate(model, None, 90, "cd", 8, im, 0, num_iters=2, im_torch=x)
    assert len(out["comps_list"]) >= 1
    # the tile scores (level 0) agree to the bf16 tolerance
    s16, s32 = np.asarray(out["scores_orig_raw"]), np.asarray(ref["scores_orig_raw"])
    assert np.abs(s16 - s32).max() <= BF16_TOL * np.abs(s32).max() * 10
    assert any(m is not None and m.dtype == torch.bfloat16 for m in modes)
    assert any(m is None for m in modes)  # the float32 runs


def test_cli_precision_flag(tmp_path):
    from fastacd.cli.main import build_parser
    from fastacd.cli.run import RunError, _check_args, run_settings
    parser = build_parser()
    args = parser.parse_args(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--arch", "resnet18",
                              "--precision", "bf16"])
    _check_args(args)
    assert args.precision == "bf16"
    args = parser.parse_args(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--arch", "resnet18", "--tf32"])
    _check_args(args)
    assert args.precision == "tf32"
    args = parser.parse_args(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--arch", "resnet18",
                              "--precision", "bf16", "--dtype", "float64"])
    with pytest.raises(RunError, match="float32"):
        _check_args(args)
    # bf16 scores alone decide: recorded (a folder of checked decisions refuses to resume without)
    base = ["run", str(tmp_path), "--out", str(tmp_path / "o"), "--arch", "resnet18"]
    args = parser.parse_args(base + ["--precision", "bf16", "--no-exact-decisions"])
    _check_args(args)
    assert args.exact_decisions is False
    assert run_settings(args, [])["exact_decisions"] is False
    args = parser.parse_args(base + ["--precision", "bf16"])
    _check_args(args)
    assert args.exact_decisions is True and "exact_decisions" not in run_settings(args, [])
    args = parser.parse_args(base + ["--no-exact-decisions"])
    with pytest.raises(RunError, match="--no-exact-decisions goes with --precision bf16"):
        _check_args(args)

"""The CUDA side of the compiled ops (issue 18): which GPUs get the compiled kernels (the
capability check, tested here with a mocked device), the float32 precision scope, and, on a
GPU (``needs_cuda``, skipped without one), the paths the op tests do not reach: the in-place
splits, grid-stride loops past 2^28 elements, M = 0 backward, non-default streams, a second
device, out-of-range indices, deterministic max-pool backward, autocast. Engine-level CUDA
tests: tests/test_cuda_engine.py. ``bench/gpu_check.py`` runs them all on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastacd import ops
from fastacd.ops import torch_ops as _torch_ops

from test_ops import (CUDA_DTYPES, _check_tol_above_every_part, _check_tol_zero_is_no_tol, channel_vec, close,
                      lstm_inputs, oracle_dtype, split_inputs, tol_like)

needs_compiled = pytest.mark.skipif(not ops.HAS_COMPILED, reason="compiled extension fastacd._C not built")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- capability check (CPU)

def test_parse_archs():
    assert ops._parse_archs("sm80_compute90_sm90") == [("sm", 80, ""), ("compute", 90, ""), ("sm", 90, "")]
    assert ops._parse_archs("sm90a_sm100f_compute120") == [("sm", 90, "a"), ("sm", 100, "f"), ("compute", 120, "")]
    assert ops._parse_archs("80_90ptx") == [("sm", 80, ""), ("sm", 90, ""), ("compute", 90, "")]  # older builds
    assert ops._parse_archs("none") == []


@pytest.mark.parametrize("tag,capability,fits", [
    ("sm80_compute90_sm90", (8, 0), True),    # A100: its machine code
    ("sm80_compute90_sm90", (8, 6), True),    # A10/RTX 30: 8.0's machine code runs on 8.x
    ("sm80_compute90_sm90", (8, 9), True),    # L4/L40
    ("sm80_compute90_sm90", (9, 0), True),    # H100/H200
    ("sm80_compute90_sm90", (10, 0), True),   # B200: 9.0's PTX, compiled by the driver
    ("sm80_compute90_sm90", (12, 0), True),   # RTX 50
    ("sm80_compute90_sm90", (7, 5), False),   # T4: nothing fits
    ("sm80_compute90_sm90", (7, 0), False),   # V100
    ("sm80_sm90", (10, 0), False),            # no PTX: Blackwell gets nothing (the old default)
    ("sm90a", (9, 0), True),
    ("sm90a", (10, 0), False),                # arch-specific code runs on that arch only
    ("sm100f", (10, 3), True),                # family code: the family
    ("sm100f", (12, 0), False),
    ("none", (9, 0), False),
])
def test_kernel_image_fits(tag, capability, fits):
    assert ops.kernel_image_fits(ops._parse_archs(tag), capability) is fits


@pytest.fixture
def mocked_gpu(monkeypatch):
    """A fake CUDA device 0 of a settable capability, with compiled CUDA kernels for 8.0 and
    9.0 (+ PTX), as the default build has; returns a setter for the capability."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(ops, "HAS_COMPILED", True)
    monkeypatch.setattr(ops, "_KERNEL_TYPES", ops._KERNEL_TYPES | {("cuda", torch.float32)})
    monkeypatch.setattr(ops, "_C", types.SimpleNamespace(cuda_archs="sm80_compute90_sm90", with_cuda=1))
    monkeypatch.setattr(ops, "_CUDA_FITS", {})
    monkeypatch.setattr(ops, "_device_capability", lambda index: capability["value"])
    monkeypatch.setattr(ops, "_device_name", lambda index: "Fake GPU")

    def set_capability(cap):
        capability["value"] = cap
        ops._CUDA_FITS.clear()
    return set_capability


def _fake_cuda_tensor(index=0):
    return types.SimpleNamespace(device=torch.device("cuda", index), dtype=torch.float32)


def test_capability_fallback_warns_once(mocked_gpu):
    """A GPU the build has no kernel image for: the wrappers take the pure-torch formula,
    with one warning naming the GPU and the rebuild."""
    mocked_gpu((7, 5))
    t = _fake_cuda_tensor()
    with pytest.warns(RuntimeWarning, match=r"no kernel image for Fake GPU \(compute capability 7\.5\).*"
                                            r"TORCH_CUDA_ARCH_LIST=\"7\.5\""):
        assert not ops._compiled(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not ops._compiled(t)
    assert ops._CUDA_FITS == {0: False}


def test_capability_fits_without_warning(mocked_gpu):
    for cap in ((9, 0), (8, 6), (10, 0)):
        mocked_gpu(cap)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ops._compiled(_fake_cuda_tensor())
    # other dtypes and devices are decided as before
    assert not ops._compiled(types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.int64))
    assert ops._compiled(torch.zeros(1)) == ((("cpu", torch.float32)) in ops._KERNEL_TYPES)


def test_capability_is_per_device(mocked_gpu, monkeypatch):
    monkeypatch.setattr(ops, "_device_capability", lambda index: (9, 0) if index == 0 else (7, 5))
    assert ops._compiled(_fake_cuda_tensor(0))
    with pytest.warns(RuntimeWarning, match="compute capability 7.5"):
        assert not ops._compiled(_fake_cuda_tensor(1))
    assert ops._CUDA_FITS == {0: True, 1: False}


def test_setup_arch_tag():
    """setup.py's default targets: 8.0 and 9.0 machine code plus 9.0's PTX (Blackwell)."""
    src = (ROOT / "setup.py").read_text()
    assert 'DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"' in src
    assert '"8.0;9.0+PTX"' in (ROOT / "CMakeLists.txt").read_text()


# --------------------------------------------------------------------------- float32 precision (CPU)

_PRECISION_SCRIPT = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("precision", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)

def state():
    d = {k: m._get(*k) for k in m._KEYS}
    d.update(f32mm=m._matmul_precision(), cudnn=m._legacy("cudnn"), cublas=m._legacy("matmul"))
    return d

def trial(setup):
    setup()
    before = state()
    with m.float32_precision():
        inside = state()
        assert m.tf32_enabled() == {"conv": False, "matmul": False}, m.tf32_enabled()
        assert m._effective("mkldnn", "matmul") == "ieee" and m._effective("mkldnn", "conv") == "ieee"
        assert inside["cudnn"] is False and inside["cublas"] is False  # legacy reads answer
        with m.float32_precision("tf32"):
            assert m.tf32_enabled() == {"conv": True, "matmul": True}
            assert m._legacy("cudnn") is True and m._legacy("matmul") is True
        assert state() == inside
    assert state() == before, (before, state())

assert m.tf32_enabled() == {"conv": True, "matmul": False}  # torch's defaults: cuDNN TF32 on
trial(lambda: None)
trial(lambda: torch.set_float32_matmul_precision("medium"))
def new_api():
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
trial(new_api)
def legacy_after_new():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = True
trial(legacy_after_new)
def global_tf32():
    torch.backends.fp32_precision = "tf32"
    torch.backends.cudnn.allow_tf32 = False
trial(global_tf32)
try:
    with m.float32_precision("bf16"):
        pass
except ValueError as e:
    assert "ieee" in str(e)
else:
    raise AssertionError("no error for an unknown mode")
print("ok")
"""


def test_float32_precision_scope_restores_every_setting():
    """float32_precision("ieee") switches TF32 off for cuDNN and cuBLAS (and reduced precision
    for oneDNN), "tf32" on, and every flag comes back, whichever of torch's two APIs the
    caller used (the legacy flags stay readable). In a fresh interpreter: the flags are global."""
    out = subprocess.run([sys.executable, "-c", _PRECISION_SCRIPT, str(ROOT / "fastacd" / "ops" / "precision.py")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_float32_precision_is_exported():
    import fastacd
    assert fastacd.ops.float32_precision is ops.precision.float32_precision
    assert set(ops.tf32_enabled()) == {"conv", "matmul"}


# --------------------------------------------------------------------------- on a GPU

cuda = pytest.mark.needs_cuda


def _same_result(a, b):
    return torch.equal(a.cpu(), b.cpu())


@needs_compiled
@cuda
def test_this_gpu_runs_the_compiled_kernels():
    """The device the check runs on has a kernel image (else every CUDA test below would test
    the fallback): build_info says so, and the capability check agrees."""
    assert ops._cuda_kernels_fit(torch.device("cuda"))
    info = ops.build_info()
    assert info["cuda_kernels"] and info["cuda_devices"] and info["cuda_devices"][0]["kernels_fit"]


@needs_compiled
@cuda
def test_capability_fallback_on_a_real_gpu(monkeypatch):
    """A capability the build does not fit (mocked on the real GPU): a warning, and the
    wrappers still give the formula's result."""
    monkeypatch.setattr(ops, "_CUDA_FITS", {})
    monkeypatch.setattr(ops, "_device_capability", lambda index: (7, 5))
    gen = torch.Generator().manual_seed(0)
    rel, total = split_inputs((3, 4, 5, 6), torch.float32, "cuda", gen, False)
    bias = channel_vec(4, torch.float32, "cuda", gen)
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        out = ops.bias_split(rel, total, bias, True)
    assert torch.equal(out, _torch_ops.bias_split(rel, total, bias, True))


@needs_compiled
@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (4, 6), (2, 3, 7), (0, 3, 4, 4)], ids=str)
def test_inplace_splits_cuda(dtype, shape):
    """bias_split_ / bn_split_ (the engine's CUDA hot path) write into their input and equal
    the functional ops; a non-contiguous input is refused."""
    gen = torch.Generator().manual_seed(1)
    rel, total = split_inputs(shape, dtype, "cuda", gen, False)
    bias = channel_vec(shape[1], dtype, "cuda", gen)
    scale, shift = channel_vec(shape[1], dtype, "cuda", gen, zeros=0.3), channel_vec(shape[1], dtype, "cuda", gen)
    od = oracle_dtype(dtype)
    for relu in (False, True):
        buf = rel.clone()
        got = torch.ops.fastacd.bias_split_(buf, total, bias, relu)
        assert got.data_ptr() == buf.data_ptr()
        assert torch.equal(buf, torch.ops.fastacd.bias_split(rel, total, bias, relu))
        close(buf, _torch_ops.bias_split(rel.to(od), total.to(od), bias.to(od), relu), dtype)
        buf = rel.clone()
        assert ops.bn_split_(buf, total, scale, shift, relu).data_ptr() == buf.data_ptr()
        assert torch.equal(buf, torch.ops.fastacd.bn_split(rel, total, scale, shift, relu))
        close(buf, _torch_ops.bn_split(rel.to(od), total.to(od), scale.to(od), shift.to(od), relu), dtype)
    if rel.dim() > 2 and rel.numel():
        with pytest.raises(RuntimeError, match="must be contiguous to be written in place"):
            torch.ops.fastacd.bias_split_(rel.transpose(1, 2), total.transpose(1, 2), channel_vec(
                rel.shape[2], dtype, "cuda", gen))


@needs_compiled
@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (4, 6), (2, 3, 7), (0, 3, 4, 4)], ids=str)
def test_splits_with_tol_cuda(dtype, shape):
    """The per-element tol on CUDA (the op tests check a random tol against the formula): tol = 0
    is no tol bit for bit in every form (forward, in place, backward); a tol above every part
    splits by squared magnitudes; the in-place forms equal the
    functional ones; float32 agrees with the CPU kernels."""
    for relu in (False, True):
        _check_tol_zero_is_no_tol("cuda", dtype, shape, relu)
        _check_tol_above_every_part("cuda", dtype, shape, relu)
    gen = torch.Generator().manual_seed(21)
    rel, total = split_inputs(shape, dtype, "cuda", gen, False)
    c = channel_vec(shape[1], dtype, "cuda", gen)
    tol = tol_like(total, gen)
    for relu in (False, True):
        assert torch.equal(torch.ops.fastacd.bias_split_(rel.clone(), total, c, relu, tol),
                           torch.ops.fastacd.bias_split(rel, total, c, relu, tol))
        assert torch.equal(ops.bn_split_(rel.clone(), total, c, c.flip(0), relu, tol),
                           ops.bn_split(rel, total, c, c.flip(0), relu, tol))
    if dtype == torch.float32:
        args = [t.cpu() for t in (rel, total, c)]
        close(ops.bias_split(rel, total, c, True, tol).cpu(), ops.bias_split(*args, True, tol.cpu()))
        close(ops.bn_split(rel, total, c, c, False, tol).cpu(), ops.bn_split(*args, c.cpu(), False, tol.cpu()))


@needs_compiled
@cuda
def test_tol_device_mismatch_cuda():
    rel, total = torch.zeros(2, 3, device="cuda"), torch.zeros(1, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected tol on cuda"):
        torch.ops.fastacd.bias_split(rel, total, torch.zeros(3, device="cuda"), False, torch.zeros(1, 3))
    with pytest.raises(RuntimeError, match=r"fastacd::bn_split_backward: expected tol on cuda"):
        torch.ops.fastacd.bn_split_backward(rel.expand(2, 3), rel, total, total[0], total[0], False,
                                            torch.zeros(1, 3))


@needs_compiled
@cuda
def test_inplace_opcheck_cuda():
    gen = torch.Generator().manual_seed(2)
    rel, total = split_inputs((2, 3, 4, 5), torch.float32, "cuda", gen, False, zeros=0)
    c = channel_vec(3, torch.float32, "cuda", gen)
    utils = ("test_schema", "test_faketensor")
    for tol in (None, tol_like(total, gen)):
        torch.library.opcheck(torch.ops.fastacd.bias_split_.default, (rel.clone(), total, c, True, tol),
                              test_utils=utils)
        torch.library.opcheck(torch.ops.fastacd.bn_split_.default, (rel.clone(), total, c, c.flip(0), True, tol),
                              test_utils=utils)


# ---- grid-stride loops past one pass: more than 2^28 = kMaxBlocks * kThreads elements

BIG = (1 << 28) + (1 << 24)  # 17 * 2^24 elements: the last 2^24 are each thread's second pass
S_BIG = 1 << 24


def _free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@needs_compiled
@cuda
def test_grid_stride_second_pass_splits():
    """bias_split, bn_split_ and maxpool_gather (and its backward) over 17 x 2^24 bfloat16
    elements: the last 2^24 are written by the loops' second pass (0.6 GB a tensor)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    rel = torch.randn(17, 1, S_BIG, device="cuda", dtype=torch.bfloat16, generator=g)
    total = torch.randn(1, 1, S_BIG, device="cuda", dtype=torch.bfloat16, generator=g)
    bias = torch.tensor([0.7], device="cuda", dtype=torch.bfloat16)
    out = ops.bias_split(rel, total, bias, True)
    for j in (0, 16):  # first pass and second pass
        close(out[j:j + 1], _torch_ops.bias_split(rel[j:j + 1].float(), total.float(), bias.float(), True),
              torch.bfloat16)
    del out
    last = rel[16:].clone()
    ops.bn_split_(rel, total, bias, bias, False)  # in place, second pass too
    close(rel[16:], _torch_ops.bn_split(last.float(), total.float(), bias.float(), bias.float(), False),
          torch.bfloat16)
    del last
    idx = torch.arange(S_BIG - 1, -1, -1, device="cuda").view(1, 1, S_BIG)  # a reversal
    got = ops.maxpool_gather(rel, idx)
    assert torch.equal(got[16], rel[16].flip(-1)) and torch.equal(got[0], rel[0].flip(-1))
    del got
    g_rel = torch.ops.fastacd.maxpool_gather_backward(rel, idx, [17, 1, S_BIG])  # rel as the gradient
    assert torch.equal(g_rel[16], rel[16].flip(-1))
    del g_rel, rel, total, idx
    _free()


@needs_compiled
@cuda
def test_grid_stride_second_pass_backward_and_gathers():
    """bias_split_backward with one (channel, position) per thread over 2^28 + 2^24 positions;
    window_gather and lstm_cd_cell over more than 2^28 outputs."""
    g = torch.Generator(device="cuda").manual_seed(4)
    n = BIG
    rel = torch.randn(1, 1, n, device="cuda", dtype=torch.bfloat16, generator=g)
    total = torch.randn(1, 1, n, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.rand(1, 1, n, device="cuda", generator=g).to(torch.bfloat16)  # > 0: the bias sum grows with n
    bias = torch.tensor([0.5], device="cuda", dtype=torch.bfloat16)
    g_rel, g_total, g_bias = torch.ops.fastacd.bias_split_backward(grad, rel, total, bias, False)
    tail = slice(n - 4096, n)
    r, t = rel[..., tail].float().requires_grad_(), total[..., tail].float().requires_grad_()
    b = bias.float().requires_grad_()
    gr, gt = torch.autograd.grad((_torch_ops.bias_split(r, t, b) * grad[..., tail].float()).sum(), (r, t))
    close(g_rel[..., tail], gr, torch.bfloat16)
    close(g_total[..., tail], gt, torch.bfloat16)
    # d out / d bias = the relevant share; summed in chunks in float32
    expect = 0.0
    for lo in range(0, n, 1 << 25):
        rr, tt = rel[..., lo:lo + (1 << 25)].float(), total[..., lo:lo + (1 << 25)].float()
        pr = rr.abs() + _torch_ops.EPS
        expect += float((pr / (pr + (tt - rr).abs() + _torch_ops.EPS) * grad[..., lo:lo + (1 << 25)].float()).sum())
    assert abs(float(g_bias) - expect) <= 1e-2 * expect  # without the second pass: 1/17 short
    del rel, total, grad, g_rel, g_total, r, t, gr, gt
    _free()
    base = torch.randn(1, 1, 4096, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    corner = torch.zeros(17, dtype=torch.int64, device="cuda")
    full = ops.window_gather(base, None, None, None, corner, corner, 4096, 4096)  # 17 x 2^24 outputs
    assert torch.equal(full[16, 0], base[0, 0]) and torch.equal(full[0, 0], base[0, 0])
    del full, base
    _free()
    m, h = (1 << 14) + 64, 1 << 14  # m * h > 2^28
    args = list(lstm_inputs(8, h, torch.bfloat16, "cuda", torch.Generator().manual_seed(5)))
    rel_gates = torch.randn(m, 4 * h, device="cuda", dtype=torch.bfloat16, generator=g)
    prev_rel_c = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, generator=g)
    in_phrase = (torch.rand(m, device="cuda", generator=g) > 0.5).to(torch.bfloat16)
    rel_c, rel_h = ops.lstm_cd_cell(rel_gates, args[1], args[2], args[3], prev_rel_c, args[5], in_phrase, False)
    for rows in (slice(0, 4), slice(m - 4, m)):
        ec, eh = _torch_ops.lstm_cd_cell(rel_gates[rows].float(), args[1].float(), args[2].float(),
                                         args[3].float(), prev_rel_c[rows].float(), args[5].float(),
                                         in_phrase[rows].float(), False)
        close(rel_c[rows], ec, torch.bfloat16)
        close(rel_h[rows], eh, torch.bfloat16)
    del rel_gates, prev_rel_c, rel_c, rel_h
    _free()


# ---- empty batches, streams, devices

@needs_compiled
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_m0_backward_cuda(dtype):
    """No masks: every op's backward gives empty / zero gradients of the right shapes, as on the CPU."""
    gen = torch.Generator().manual_seed(6)
    rel, total = split_inputs((0, 3, 4, 4), dtype, "cuda", gen, False, zeros=0)
    total = total.requires_grad_()
    c = channel_vec(3, dtype, "cuda", gen).requires_grad_()
    s = channel_vec(3, dtype, "cuda", gen).requires_grad_()
    r = rel.requires_grad_()
    (ops.bias_split(r, total, c, True).sum() + ops.bn_split(r, total, s, c, True).sum()).backward()
    assert r.grad.shape == (0, 3, 4, 4)
    for t in (total, c, s):
        assert t.grad is not None and not t.grad.any()
    tol = tol_like(total.detach(), gen)
    for t in (r, total, c, s):
        t.grad = None
    (ops.bias_split(r, total, c, True, tol).sum() + ops.bn_split(r, total, s, c, False, tol).sum()).backward()
    assert r.grad.shape == (0, 3, 4, 4)
    for t in (total, c, s):
        assert t.grad is not None and not t.grad.any()
    _, idx = F.max_pool2d(torch.randn(1, 3, 4, 4, device="cuda", dtype=dtype), 2, return_indices=True)
    r = torch.zeros(0, 3, 4, 4, device="cuda", dtype=dtype, requires_grad=True)
    ops.maxpool_gather(r, idx).sum().backward()
    assert r.grad.shape == (0, 3, 4, 4)
    args = [a.requires_grad_() if a.is_floating_point() else a
            for a in lstm_inputs(0, 5, dtype, "cuda", torch.Generator().manual_seed(7))]
    rc, rh = ops.lstm_cd_cell(*args, False)
    (rc.sum() + rh.sum()).backward()
    assert args[0].grad.shape == (0, 20) and not args[1].grad.any() and not args[2].grad.any()


def _stream_cases(device):
    gen = torch.Generator().manual_seed(8)
    rel, total = split_inputs((16, 32, 24, 24), torch.float32, device, gen, False)
    c = channel_vec(32, torch.float32, device, gen)
    _, idx = F.max_pool2d(total, 2, return_indices=True)
    oy = torch.arange(16, device=device) % 5
    return rel, total, c, idx, oy


def _stream_ops(rel, total, c, idx, oy):
    """Every op once on its inputs; the results as a list."""
    lstm = lstm_inputs(16, 8, torch.float32, rel.device, torch.Generator().manual_seed(9))
    return [ops.bias_split(rel, total, c, True), ops.bn_split_(rel.clone(), total, c, c, False),
            ops.maxpool_gather(rel, idx),
            torch.ops.fastacd.maxpool_gather_backward(ops.maxpool_gather(rel, idx), idx, list(rel.shape)),
            torch.ops.fastacd.bias_split_backward(rel, rel, total, c, True)[0],
            ops.window_gather(total, rel[:, :, :6, :6].contiguous(), oy, oy, oy - 2, oy, 9, 7),
            ops.window_gather(total, None, None, None, oy, oy, 5, 5, idx),
            *ops.lstm_cd_cell(*lstm, False)]


@needs_compiled
@cuda
def test_non_default_stream():
    """Ops launched on a side stream run there: the side stream's input is written after a
    long sleep on that stream, so a kernel on another stream would read it too early."""
    src = _stream_cases("cuda")
    expected = _stream_ops(*src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rel = torch.zeros_like(src[0])
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time on the side stream
        rel.copy_(src[0])
        got = _stream_ops(rel, *src[1:])
    side.synchronize()
    for a, b in zip(got, expected):
        assert _same_result(a, b)


@needs_compiled
@cuda
def test_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the launchers' device guard runs the kernels
    on cuda:1; tensors on two GPUs are refused with a clear message."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    src = _stream_cases("cpu")
    expected = _stream_ops(*[t.cuda(0) for t in src])
    with torch.cuda.device(0):
        got = _stream_ops(*[t.to("cuda:1") for t in src])
    for a, b in zip(got, expected):
        assert a.device == torch.device("cuda", 1)
        assert _same_result(a, b)
    with pytest.raises(RuntimeError, match="is on cuda:1 but rel_pre is on cuda:0"):
        torch.ops.fastacd.bias_split(src[0].cuda(0), src[1].cuda(0), src[2].to("cuda:1"))


# ---- host-side index checks, determinism, autocast, TF32

@needs_compiled
@cuda
def test_out_of_range_indices_raise_and_keep_the_context():
    """Out-of-range indices are a catchable error on CUDA as on the CPU (checked on the host,
    not by a device assert, which would lose the CUDA context); later CUDA work still runs."""
    rel = torch.randn(2, 3, 4, 4, device="cuda")
    bad = torch.full((1, 3, 2, 2), 16, device="cuda")
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 16\)"):
        ops.maxpool_gather(rel, bad)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 16\)"):
        torch.ops.fastacd.maxpool_gather_backward(torch.randn(2, 3, 2, 2, device="cuda"), bad - 17, [2, 3, 4, 4])
    base = torch.randn(1, 3, 4, 4, device="cuda")
    zero = torch.zeros(2, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 16\)"):
        ops.window_gather(base, None, None, None, zero, zero, 2, 2, bad)
    assert float(torch.ones(3, device="cuda").sum()) == 3.0  # the context is intact
    # the check is cached per tensor; an in-place change of the indices is seen
    _, idx = F.max_pool2d(torch.randn(1, 3, 4, 4, device="cuda"), 2, return_indices=True)
    ops.maxpool_gather(rel, idx)
    ops.maxpool_gather(rel, idx)
    idx[0, 0, 0, 0] = 99
    with pytest.raises(RuntimeError, match=r"found values in \[\d+, 99\]"):
        ops.maxpool_gather(rel, idx)
    torch.cuda.synchronize()


@needs_compiled
@cuda
@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "overlapping"])
def test_deterministic_maxpool_backward(overlap):
    """Under torch.use_deterministic_algorithms the backward neither raises nor varies: disjoint
    windows give each position one add (the atomics are deterministic then); overlapping ones
    take a deterministic path."""
    gen = torch.Generator().manual_seed(10)
    total = torch.randn(1, 8, 33, 33, generator=gen, dtype=torch.float64)
    kw = dict(kernel_size=3, stride=2, padding=1) if overlap else dict(kernel_size=2)
    _, idx = F.max_pool2d(total, return_indices=True, **kw)
    assert bool(_has_repeats(idx)) == overlap
    grad = torch.randn((64,) + tuple(idx.shape[1:]), generator=gen, dtype=torch.float64)
    expected = torch.ops.fastacd.maxpool_gather_backward(grad, idx, [64, 8, 33, 33])  # CPU
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for dtype in (torch.float32, torch.float64):
            runs = [torch.ops.fastacd.maxpool_gather_backward(grad.to("cuda", dtype), idx.cuda(), [64, 8, 33, 33])
                    for _ in range(3)]
            assert all(torch.equal(runs[0], r) for r in runs[1:])
            close(runs[0].cpu(), expected.to(dtype))
    finally:
        torch.use_deterministic_algorithms(was)


def _has_repeats(idx):
    rows = idx.reshape(idx.shape[1], -1).sort(dim=1).values
    return (rows[:, 1:] == rows[:, :-1]).any()


@needs_compiled
@cuda
def test_autocast_promotes_parameters():
    """Under torch.autocast a conv output is bfloat16 and its bias float32: the wrappers
    promote (as the formulas do) instead of failing on the dtype mismatch."""
    gen = torch.Generator().manual_seed(11)
    conv = torch.nn.Conv2d(4, 6, 3).cuda()
    x = torch.randn(5, 4, 10, 10, generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rel_pre = F.conv2d(x, conv.weight)
        total_pre = F.conv2d(x[:1] * 2, conv.weight)
        assert rel_pre.dtype == torch.bfloat16 and conv.bias.dtype == torch.float32
        out = ops.bias_split(rel_pre, total_pre, conv.bias.detach(), True)
        assert out.dtype == torch.float32
        close(out, _torch_ops.bias_split(rel_pre.float(), total_pre.float(), conv.bias.detach(), True))
        buf = rel_pre.clone()
        ops.bias_split_(buf, total_pre, conv.bias.detach(), True)  # in place: rel_pre's dtype
        close(buf, out, torch.bfloat16)
        scale, shift = torch.rand(6, device="cuda") + 0.5, torch.randn(6, device="cuda")
        close(ops.bn_split(rel_pre, total_pre, scale, shift), _torch_ops.bn_split(
            rel_pre.float(), total_pre.float(), scale, shift))


@cuda
def test_float32_precision_makes_cuda_convolutions_exact():
    """Inside float32_precision() a float32 convolution on the GPU matches float64 to float32
    rounding; with TF32 (torch's cuDNN default on Ampere and later) it need not."""
    gen = torch.Generator().manual_seed(12)
    x, w = torch.randn(8, 256, 28, 28, generator=gen), torch.randn(256, 256, 3, 3, generator=gen) / 48
    exact = F.conv2d(x.double(), w.double(), padding=1)
    with ops.float32_precision():
        err = (F.conv2d(x.cuda(), w.cuda(), padding=1).double().cpu() - exact).abs().max() / exact.abs().max()
        assert ops.tf32_enabled() == {"conv": False, "matmul": False}
    assert err < 1e-5, float(err)

"""window_gather, the windowed pass's gather (crops with the conv's zero padding, pastes,
max-pool gathers): its pure-torch formula against a plain per-candidate definition, and the
compiled CPU / CUDA kernels against the formula (bit-identical: it only moves values);
opcheck, the autograd fallback and the errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastacd import ops
from fastacd.ops import torch_ops as _torch_ops

from conftest import cpu_and_cuda

needs_compiled = pytest.mark.skipif(not ops.HAS_COMPILED, reason="compiled extension fastacd._C not built")


def definition(base, win, win_oy, win_ox, oy, ox, h, w, indices=None):
    """Candidate by candidate: build its full map (the base with its window pasted in), then
    read the h x w window (zero-padded beyond the map) or pool it at ``indices``."""
    c, hgt, wid = base.shape[1:]
    out = []
    for j in range(oy.shape[0]):
        full = base[0].clone()
        if win is not None:
            y, x = int(win_oy[j]), int(win_ox[j])
            full[:, y:y + win.shape[2], x:x + win.shape[3]] = win[j]
        if indices is None:
            pad = 32  # more than any crop reaches past the map here
            padded = F.pad(full, (pad, pad, pad, pad))
            y, x = int(oy[j]) + pad, int(ox[j]) + pad
            out.append(padded[:, y:y + h, x:x + w])
        else:
            flat = full.reshape(c, -1)
            ix = indices[0, :, int(oy[j]):int(oy[j]) + h, int(ox[j]):int(ox[j]) + w].reshape(c, -1)
            out.append(flat.gather(1, ix).reshape(c, h, w))
    return torch.stack(out) if out else base.new_zeros((0, c, h, w))


def random_case(gen, pool: bool, with_win: bool, dtype=torch.float64, m=None):
    """A random geometry: windows anywhere in the map, crops reaching past every border."""
    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))
    c, hgt, wid = ri(1, 4), ri(1, 9), ri(1, 9)
    m = ri(0, 4) if m is None else m
    base = torch.randn(1, c, hgt, wid, generator=gen, dtype=torch.float64).to(dtype)
    wh, ww = ri(0, hgt), ri(0, wid)
    win = torch.randn(m, c, wh, ww, generator=gen, dtype=torch.float64).to(dtype) if with_win else None
    win_oy = torch.randint(0, hgt - wh + 1, (m,), generator=gen) if with_win else None
    win_ox = torch.randint(0, wid - ww + 1, (m,), generator=gen) if with_win else None
    if not pool:
        h, w = ri(0, 12), ri(0, 12)
        oy, ox = torch.randint(-6, 10, (m,), generator=gen), torch.randint(-6, 10, (m,), generator=gen)
        return (base, win, win_oy, win_ox, oy, ox, h, w, None)
    ho, wo = max(hgt // 2, 1), max(wid // 2, 1)
    indices = torch.randint(0, hgt * wid, (1, c, ho, wo), generator=gen)
    h, w = ri(0, ho), ri(0, wo)
    oy, ox = torch.randint(0, ho - h + 1, (m,), generator=gen), torch.randint(0, wo - w + 1, (m,), generator=gen)
    return (base, win, win_oy, win_ox, oy, ox, h, w, indices)


@pytest.mark.parametrize("pool", [False, True], ids=["crop", "pool"])
@pytest.mark.parametrize("with_win", [True, False], ids=["win", "base_only"])
def test_torch_formula_is_the_definition(pool, with_win):
    gen = torch.Generator().manual_seed(3 + 2 * pool + with_win)
    for _ in range(150):
        case = random_case(gen, pool, with_win)
        assert torch.equal(_torch_ops.window_gather(*case), definition(*case))


def test_paste_and_max_pool_read_through_the_op():
    """A paste is a crop of the whole map at (0, 0); a max-pool gather over the whole pooled
    map equals pooling each candidate's full map at the total's argmax."""
    gen = torch.Generator().manual_seed(0)
    base, win = torch.randn(1, 3, 8, 8, generator=gen), torch.randn(2, 3, 3, 4, generator=gen)
    wy, wx, zero = torch.tensor([0, 5]), torch.tensor([4, 1]), torch.zeros(2, dtype=torch.int64)
    full = ops.window_gather(base, win, wy, wx, zero, zero, 8, 8)
    for j in range(2):
        expect = base[0].clone()
        expect[:, wy[j]:wy[j] + 3, wx[j]:wx[j] + 4] = win[j]
        assert torch.equal(full[j], expect)
    total = torch.randn(1, 3, 8, 8, generator=gen)
    _, idx = F.max_pool2d(total, 2, return_indices=True)
    pooled = ops.window_gather(base, win, wy, wx, zero[:2], zero[:2], 4, 4, idx)
    assert torch.equal(pooled, ops.maxpool_gather(full, idx))


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pool", [False, True], ids=["crop", "pool"])
@pytest.mark.parametrize("with_win", [True, False], ids=["win", "base_only"])
def test_compiled_cpu_equals_the_formula(dtype, pool, with_win):
    gen = torch.Generator().manual_seed(11 + 2 * pool + with_win)
    for _ in range(300):
        case = random_case(gen, pool, with_win, dtype)
        out = torch.ops.fastacd.window_gather.default(*case)
        assert out.shape == (case[4].shape[0], case[0].shape[1], case[6], case[7])
        assert torch.equal(out, _torch_ops.window_gather(*case))


@needs_compiled
def test_compiled_cpu_non_contiguous_and_multithreaded():
    """Strided inputs are made contiguous; a gather large enough for OpenMP splits rows."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 64, 20, 40, generator=gen)[..., ::2]
    win = torch.randn(9, 64, 14, 6, generator=gen).transpose(2, 3)  # (9, 64, 6, 14)
    wy, wx = torch.randint(0, 15, (9,), generator=gen), torch.randint(0, 7, (9,), generator=gen)
    oy, ox = torch.randint(-3, 18, (18,), generator=gen)[::2], torch.randint(-3, 18, (9,), generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = torch.ops.fastacd.window_gather.default(base, win, wy, wx, oy, ox, 12, 11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, definition(base, win, wy, wx, oy, ox, 12, 11))


@needs_compiled
@pytest.mark.parametrize("pool", [False, True], ids=["crop", "pool"])
@pytest.mark.parametrize("with_win", [True, False], ids=["win", "base_only"])
def test_compiled_cpu_reads_a_channels_last_base_in_place(pool, with_win):
    """The bf16 pass keeps its maps channels_last: the kernel reads them where they lie (the
    values equal the formula's) instead of copying the whole map for each gather."""
    gen = torch.Generator().manual_seed(23 + 2 * pool + with_win)
    checked = 0
    for _ in range(200):
        case = list(random_case(gen, pool, with_win, torch.float32))
        base = case[0]
        case[0] = base.to(memory_format=torch.channels_last)
        if base.shape[1] > 1 and base.shape[2] * base.shape[3] > 1:
            assert not case[0].is_contiguous()
            checked += 1
        assert torch.equal(torch.ops.fastacd.window_gather.default(*case),
                           _torch_ops.window_gather(base, *case[1:]))
    assert checked > 100
    # large enough to split rows over threads, and no copy of the base (a full-map copy_ would show)
    base = torch.randn(1, 64, 40, 40, generator=gen).to(memory_format=torch.channels_last)
    oy, ox = torch.randint(-3, 35, (9,), generator=gen), torch.randint(-3, 35, (9,), generator=gen)
    with torch.profiler.profile() as prof:
        out = torch.ops.fastacd.window_gather.default(base, None, None, None, oy, ox, 12, 11)
    assert not [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone")]
    assert torch.equal(out, definition(base.contiguous(), None, None, None, oy, ox, 12, 11))


@needs_compiled
@pytest.mark.parametrize("pool", [False, True], ids=["crop", "pool"])
@pytest.mark.parametrize("with_win", [True, False], ids=["win", "base_only"])
def test_opcheck(pool, with_win):
    gen = torch.Generator().manual_seed(2)
    case = random_case(gen, pool, with_win, m=3)
    torch.library.opcheck(torch.ops.fastacd.window_gather.default, case)


def test_autograd_goes_through_the_formula():
    """With autograd on and an input that requires grad, the differentiable formula runs."""
    gen = torch.Generator().manual_seed(4)
    base, win, wy, wx, oy, ox, h, w, _ = random_case(gen, False, True, m=3)
    base.requires_grad_(True)
    win = win.requires_grad_(True) if win.numel() else win
    out = ops.window_gather(base, win, wy, wx, oy, ox, h, w)
    assert out.requires_grad
    out.sum().backward()
    # every base value read outside every window counts once per read
    assert base.grad is not None and torch.isfinite(base.grad).all()
    torch.autograd.gradcheck(lambda b: ops.window_gather(b, win.detach(), wy, wx, oy, ox, h, w),
                             (base.detach().requires_grad_(True),))


def _args(**change):
    a = dict(base=torch.zeros(1, 3, 6, 6), win=torch.zeros(2, 3, 2, 2), win_oy=torch.zeros(2, dtype=torch.int64),
             win_ox=torch.zeros(2, dtype=torch.int64), oy=torch.zeros(2, dtype=torch.int64),
             ox=torch.zeros(2, dtype=torch.int64), h=3, w=3, indices=None)
    a.update(change)
    return a


_idx = torch.zeros(1, 3, 3, 3, dtype=torch.int64)


@needs_compiled
@pytest.mark.parametrize("change,match", [
    (dict(base=torch.zeros(2, 3, 6, 6)), r"base must be one map \(1, C, H, W\)"),
    (dict(base=torch.zeros(1, 3, 6, 6, dtype=torch.int32)), "base has dtype Int"),
    (dict(win=torch.zeros(2, 3, 2, 2, dtype=torch.float64)), "win has dtype Double but base has dtype Float"),
    (dict(oy=torch.zeros(2)), r"oy must be an int64 vector \(M,\)"),
    (dict(ox=torch.zeros(3, dtype=torch.int64)), r"ox must be an int64 vector \(M,\) with M = 2"),
    (dict(win=torch.zeros(2, 4, 2, 2)), r"win must be \(M, C, wh, ww\) with M = 2 and C = 3"),
    (dict(win_oy=None), "pass win, win_oy and win_ox together"),
    (dict(h=-1), "window size must be >= 0"),
    (dict(indices=_idx.int()), "indices must be int64"),
    (dict(indices=torch.zeros(1, 2, 3, 3, dtype=torch.int64)), r"\(1, C, Ho, Wo\) with C = 3"),
    (dict(indices=torch.full((1, 3, 3, 3), 36)), r"indices must lie in \[0, 36\)"),
    (dict(indices=_idx, oy=torch.tensor([0, 1])), r"oy must lie in \[0, 0\]"),
    (dict(indices=_idx, h=4), "does not fit the pooled map"),
])
def test_errors(change, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastacd.window_gather.default(**_args(**change))


@needs_compiled
def test_device_mismatch_error():
    with pytest.raises(RuntimeError, match="on meta but base is on cpu|expected oy on cpu"):
        torch.ops.fastacd.window_gather.default(**_args(oy=torch.zeros(2, dtype=torch.int64, device="meta")))


@needs_compiled
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pool", [False, True], ids=["crop", "pool"])
def test_cuda_equals_cpu(dtype, pool):
    gen = torch.Generator().manual_seed(21 + pool)
    for _ in range(100):
        case = random_case(gen, pool, True, torch.float32)
        case = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in case)
        cuda = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in case)
        expect = _torch_ops.window_gather(*tuple(
            t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in case)).to(dtype)
        assert torch.equal(torch.ops.fastacd.window_gather.default(*cuda).cpu(), expect)


@needs_compiled
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pool", [False, True], ids=["crop", "pool"])
def test_cuda_without_windows_equals_cpu(dtype, pool):
    """win = None (every candidate's map is the base: the first layer's crops), on CUDA."""
    gen = torch.Generator().manual_seed(31 + pool)
    for _ in range(100):
        case = random_case(gen, pool, False, torch.float32)
        case = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in case)
        assert case[1] is None
        cuda = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in case)
        expect = _torch_ops.window_gather(case[0].float(), *case[1:]).to(dtype)
        assert torch.equal(torch.ops.fastacd.window_gather.default(*cuda).cpu(), expect)
        assert torch.equal(ops.window_gather(*cuda).cpu(), expect)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_windowed_pass_uses_the_backend_op(device, monkeypatch):
    """The engine's compiled backend sends its gathers to torch.ops.fastacd.window_gather."""
    if not ops.HAS_COMPILED:
        pytest.skip("compiled extension fastacd._C not built")
    calls = []
    real = torch.ops.fastacd.window_gather.default

    def counting(*a):
        calls.append(a[0].shape)
        return real(*a)

    import fastacd
    monkeypatch.setattr(ops, "window_gather", lambda *a: counting(*a))
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 3)).double().eval().to(device)
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64, device=device)
    base = torch.zeros(16, 16, dtype=torch.float64, device=device)
    base[:4, :4] = 1
    deltas = torch.zeros(3, 16, 16, dtype=torch.float64, device=device)
    deltas[0, 12:, 12:] = deltas[1, 0:2, 8:10] = deltas[2, 6:8, 6:8] = 1
    dec = fastacd.Decomposer(net, backend="compiled")
    got = dec.cd_delta(x, base, deltas, max_cost_ratio=float("inf"))
    want = dec.cd(x, torch.maximum(base, deltas))
    assert calls, "the windowed pass did not call window_gather"
    torch.testing.assert_close(got.relevant, want.relevant, rtol=1e-10, atol=1e-12)

"""The compiled fused ops (torch.ops.fastacd.*) against their pure-torch formulas
(fastacd._torch_ops), plus opcheck, gradcheck, torch.compile, errors and the fallback.

Compiled-only tests skip when the extension is not built; CUDA tests are marked
needs_cuda (skipped without a GPU by conftest.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastacd import ops
from fastacd.ops import torch_ops as _torch_ops

from conftest import cpu_and_cuda

needs_compiled = pytest.mark.skipif(not ops.HAS_COMPILED, reason="compiled extension fastacd._C not built")

# rtol, atol (relative to the output's scale), per dtype (style.md item 7). Half types
# are compared with an oracle evaluated in float32 on the same (rounded) inputs.
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12),
       torch.float16: (1e-2, 2e-3), torch.bfloat16: (5e-2, 1e-2)}
CPU_DTYPES = [torch.float32, torch.float64]
CUDA_DTYPES = CPU_DTYPES + [torch.float16, torch.bfloat16]


def close(actual, expected, dtype=None):
    rtol, atol = TOL[dtype or expected.dtype]
    scale = max(float(expected.detach().abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol * scale)


def oracle_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def randn(*shape, dtype=torch.float64, device="cpu", gen=None, zeros=0.0, noncontig=False):
    """Random values with a fraction of exact zeros (the eps and 0/0 paths); non-contiguous
    on request (every other element of a wider tensor)."""
    full = list(shape)
    if noncontig:
        full[-1] = 2 * full[-1] if full else 1
    x = torch.randn(full, generator=gen, dtype=torch.float64)
    if zeros:
        x[torch.rand(full, generator=gen) < zeros] = 0
    x = x.to(dtype=dtype, device=device)
    return x[..., ::2] if noncontig and shape else x


# (M, C, *S) shapes: conv 2-d, 1-d and 3-d spatial, linear, C = 1, 1x1 spatial, empty.
SHAPES = [(3, 4, 5, 6), (2, 3, 7), (2, 2, 3, 4, 5), (4, 6), (3, 1), (2, 1, 1, 1), (1, 3, 2, 2),
          (0, 3, 4, 4), (0, 5), (3, 0, 4)]


def split_inputs(shape, dtype, device, gen, noncontig, zeros=0.2):
    rel = randn(*shape, dtype=dtype, device=device, gen=gen, zeros=zeros, noncontig=noncontig)
    total = randn(1, *shape[1:], dtype=dtype, device=device, gen=gen, zeros=zeros, noncontig=noncontig)
    if zeros and rel.numel() and total.numel():  # some positions where r = a (i = 0) and r = a = 0
        total.view(-1)[::5] = 0
        rel[..., ::3] = 0
    return rel, total


def channel_vec(c, dtype, device, gen, zeros=0.0):
    return randn(c, dtype=dtype, device=device, gen=gen, zeros=zeros)


def tol_like(total, gen, noncontig=False):
    """A per-element tolerance of total's shape (numerical zero, design.md section 9): random
    thresholds of about the parts' own size, so that some parts are below theirs and others
    not; a few exact 0s."""
    t = randn(*total.shape, dtype=total.dtype, device=total.device, gen=gen, zeros=0.1, noncontig=noncontig)
    return (0.5 * t).abs()


def _to(t, dtype):
    return None if t is None else t.to(dtype)


# --------------------------------------------------------------------------- forward vs oracle

def _check_bias_split(device, dtype, shape, relu, noncontig, with_tol=False):
    gen = torch.Generator().manual_seed(0)
    rel, total = split_inputs(shape, dtype, device, gen, noncontig)
    bias = channel_vec(shape[1], dtype, device, gen)
    tol = tol_like(total, gen, noncontig) if with_tol else None
    out = torch.ops.fastacd.bias_split(rel, total, bias, relu, tol)
    od = oracle_dtype(dtype)
    expected = _torch_ops.bias_split(rel.to(od), total.to(od), bias.to(od), relu, _to(tol, od))
    assert out.shape == rel.shape and out.dtype == dtype and out.device == rel.device
    close(out, expected, dtype)
    close(ops.bias_split(rel, total, bias, relu, tol), expected, dtype)


def _check_bn_split(device, dtype, shape, relu, noncontig, with_tol=False):
    gen = torch.Generator().manual_seed(1)
    rel, total = split_inputs(shape, dtype, device, gen, noncontig)
    scale = channel_vec(shape[1], dtype, device, gen, zeros=0.3)
    shift = channel_vec(shape[1], dtype, device, gen)
    tol = tol_like(total, gen, noncontig) if with_tol else None
    out = torch.ops.fastacd.bn_split(rel, total, scale, shift, relu, tol)
    od = oracle_dtype(dtype)
    expected = _torch_ops.bn_split(rel.to(od), total.to(od), scale.to(od), shift.to(od), relu, _to(tol, od))
    assert out.shape == rel.shape and out.dtype == dtype
    close(out, expected, dtype)
    close(ops.bn_split(rel, total, scale, shift, relu, tol), expected, dtype)


@needs_compiled
@pytest.mark.parametrize("with_tol", [False, True], ids=["notol", "tol"])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_bias_split_cpu(dtype, shape, relu, noncontig, with_tol):
    _check_bias_split("cpu", dtype, shape, relu, noncontig, with_tol)


@needs_compiled
@pytest.mark.parametrize("with_tol", [False, True], ids=["notol", "tol"])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_bn_split_cpu(dtype, shape, relu, noncontig, with_tol):
    _check_bn_split("cpu", dtype, shape, relu, noncontig, with_tol)


# --------------------------------------------------------------------------- tol (numerical zero)

def _split_calls(rel, total, bias, scale, relu, tol):
    """Every compiled split form on one input, with tol: the functional ops, the in-place ops
    and both backward ops (grad = a fixed random tensor)."""
    grad = torch.linspace(-1, 2, rel.numel(), dtype=rel.dtype, device=rel.device).reshape(rel.shape)
    return (torch.ops.fastacd.bias_split(rel, total, bias, relu, tol),
            torch.ops.fastacd.bias_split_(rel.clone(), total, bias, relu, tol),
            *torch.ops.fastacd.bias_split_backward(grad, rel, total, bias, relu, tol),
            torch.ops.fastacd.bn_split(rel, total, scale, bias, relu, tol),
            torch.ops.fastacd.bn_split_(rel.clone(), total, scale, bias, relu, tol),
            *torch.ops.fastacd.bn_split_backward(grad, rel, total, scale, bias, relu, tol))


def _check_tol_zero_is_no_tol(device, dtype, shape, relu):
    gen = torch.Generator().manual_seed(16)
    rel, total = split_inputs(shape, dtype, device, gen, False)
    bias, scale = channel_vec(shape[1], dtype, device, gen), channel_vec(shape[1], dtype, device, gen, zeros=0.3)
    without = _split_calls(rel, total, bias, scale, relu, None)
    with_zero = _split_calls(rel, total, bias, scale, relu, torch.zeros_like(total))
    for a, b in zip(without, with_zero):
        assert torch.equal(a, b)  # bit for bit (|x| < 0 never holds)


def test_torch_ops_promote_a_half_tol():
    """A float16 tol with float32 parts is promoted, not computed in half: there ``tiny``
    flushed to 0 and the ramp divided 0 by 0 (NaN gradients, seen as the oracle of the CUDA
    float16 backward test on the first H200 run)."""
    gen = torch.Generator().manual_seed(24)
    rel, total = split_inputs((3, 2, 4, 3), torch.float32, "cpu", gen, False)
    bias = channel_vec(2, torch.float32, "cpu", gen)
    tol = tol_like(total, gen).half()
    grads = []
    for tl in (tol, tol.float()):
        parts = [x.clone().requires_grad_() for x in (rel, total)]
        out = _torch_ops.bias_split(*parts, bias, False, tl)
        out.sum().backward()
        grads.append((out.detach(), *(p.grad for p in parts)))
    assert all(torch.isfinite(g).all() for g in grads[0])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # bn: values only (its pure-torch 0/0 has NaN gradients, test_bn_split_backward_zero_over_zero_is_finite)
    bn = [_torch_ops.bn_split(rel, total, bias, bias.flip(0), False, tl) for tl in (tol, tol.float())]
    assert torch.isfinite(bn[0]).all() and torch.equal(*bn)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_torch_ops_compute_half_types_in_float32(dtype):
    """The pure-torch splits and LSTM cell take half and bfloat16 as the kernels do: computed in
    float32, rounded once (in half the 16th powers of a split under a large tol were NaN)."""
    gen = torch.Generator().manual_seed(23)
    rel, total = split_inputs((3, 4, 5, 6), dtype, "cpu", gen, False)
    bias, scale = channel_vec(4, dtype, "cpu", gen), channel_vec(4, dtype, "cpu", gen, zeros=0.3)
    f = lambda *ts: [t.float() if t.dtype == dtype else t for t in ts]  # noqa: E731
    for tol in (None, torch.full_like(total, 1e4), tol_like(total, gen)):
        for relu in (False, True):
            got = _torch_ops.bias_split(rel, total, bias, relu, tol)
            want = _torch_ops.bias_split(*f(rel, total, bias), relu, None if tol is None else tol.float())
            assert got.dtype == dtype and torch.isfinite(got).all() and torch.equal(got, want.to(dtype))
            got = _torch_ops.bn_split(rel, total, scale, bias, relu, tol=tol)
            want = _torch_ops.bn_split(*f(rel, total, scale, bias), relu, tol=None if tol is None else tol.float())
            assert torch.isfinite(got).all() and torch.equal(got, want.to(dtype))
    lstm = lstm_inputs(3, 5, dtype, "cpu", torch.Generator().manual_seed(5))
    got = _torch_ops.lstm_cd_cell(*lstm, False)
    want = _torch_ops.lstm_cd_cell(*f(*lstm), False)
    assert all(g.dtype == dtype and torch.equal(g, w.to(dtype)) for g, w in zip(got, want))


@needs_compiled
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_tol_zero_is_no_tol(dtype, shape, relu):
    """tol = 0 gives the results without tol, bit for bit, in every form (forward, in place,
    backward), with exact zeros in the inputs (the eps and 0/0 paths)."""
    _check_tol_zero_is_no_tol("cpu", dtype, shape, relu)


def _check_tol_above_every_part(device, dtype, shape, relu):
    """A tol above every part: every split is one of two small parts, so the bias (bn: the
    shift) goes by 16th powers ``|zr|^16 / (|zr|^16 + |zi|^16)``: half to each part where both
    are 0 (bn: to neither, its 0/0); where the relevant part is exactly zero the irrelevant one
    keeps everything (the empty mask stays empty)."""
    gen = torch.Generator().manual_seed(17)
    rel, total = split_inputs(shape, dtype, device, gen, False)
    bias, scale = channel_vec(shape[1], dtype, device, gen), channel_vec(shape[1], dtype, device, gen, zeros=0.3)
    tol = torch.full_like(total, 1e4)
    view = (1, -1) + (1,) * (rel.dim() - 2)
    r64, t64 = rel.double(), total.double()
    b, s = bias.double().reshape(view), scale.double().reshape(view)
    act = (lambda x: x.clamp_min(0)) if relu else (lambda x: x)

    def share(zr, zi, tie):
        top = torch.maximum(zr.abs(), zi.abs())
        wr, wi = (zr.abs() / top) ** 16, (zi.abs() / top) ** 16
        return torch.where(top > 0, wr / (wr + wi), tie)

    want_bias = act(r64 + share(r64, t64 - r64, 0.5) * b).to(dtype)
    want_bn = act(s * r64 + share(s * r64, s * (t64 - r64), 0.0) * b).to(dtype)
    # half types: within one unit in the last place of the float64 result (the kernels' float32
    # arithmetic may round the other way)
    eps = torch.finfo(dtype).eps
    tight = dict(rtol=eps, atol=eps) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-6, atol=1e-6)
    for got in (torch.ops.fastacd.bias_split(rel, total, bias, relu, tol),
                torch.ops.fastacd.bias_split_(rel.clone(), total, bias, relu, tol),
                ops.bias_split(rel, total, bias, relu, tol), _torch_ops.bias_split(rel, total, bias, relu, tol)):
        torch.testing.assert_close(got, want_bias, **tight)
    for got in (torch.ops.fastacd.bn_split(rel, total, scale, bias, relu, tol),
                torch.ops.fastacd.bn_split_(rel.clone(), total, scale, bias, relu, tol),
                _torch_ops.bn_split(rel, total, scale, bias, relu, tol)):
        torch.testing.assert_close(got, want_bn, **tight)


@needs_compiled
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_tol_above_every_part(dtype, relu):
    _check_tol_above_every_part("cpu", dtype, (3, 4, 5, 6), relu)


def _split_by_hand(zr: float, zi: float, tol: float, eps: float = 1e-20):
    """The numerical-zero weights (docs/engine.md), transcribed for scalars: each part's
    magnitude t times its ramp (0 below tol/2, 1 above tol, linear between), plus what the
    larger part's ramp leaves of |zr| + |zi|, shared by 16th powers."""
    ar, ai = abs(zr), abs(zi)

    def ramp(t):
        return min(max(2 * t / tol - 1, 0.0), 1.0)
    top = max(ar, ai)
    share = ar ** 16 / (ar ** 16 + ai ** 16) if top > 0 else 0.0
    rest = (1 - ramp(top)) * (ar + ai)
    return ar * ramp(ar) + rest * share + eps, ai * ramp(ai) + rest * (1 - share) + eps


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_tol_split_is_continuous(device):
    """Hand-computed, a = 3, s = 1, bias / shift 6, two masks: r = 1 (i = 2) and r = 2 (i = 1),
    against the scalar transcription for thresholds around the parts' sizes; the formula, the
    wrapper and every compiled form agree; crossing a threshold moves the result by rounding
    only (a hard threshold jumped there), and a tol far above both parts splits by squares."""
    d = dict(dtype=torch.float64, device=device)
    rel, total = torch.tensor([[[1.0]], [[2.0]]], **d), torch.full((1, 1, 1), 3.0, **d)
    one, b = torch.ones(1, **d), torch.tensor([6.0], **d)

    def up(x):  # one ulp above x
        return torch.nextafter(torch.tensor(x, dtype=torch.float64), torch.tensor(9.0, dtype=torch.float64)).item()

    fns = [_torch_ops.bias_split, ops.bias_split]
    bn_fns = [_torch_ops.bn_split, ops.bn_split]
    if ops.HAS_COMPILED:
        fns += [torch.ops.fastacd.bias_split, lambda r, *a: torch.ops.fastacd.bias_split_(r.clone(), *a)]
        bn_fns += [torch.ops.fastacd.bn_split, lambda r, *a: torch.ops.fastacd.bn_split_(r.clone(), *a)]
    for x in (1e-3, 1.0, up(1.0), 1.5, 2.0, up(2.0), 3.0, 4.0, 1e3):
        tol = torch.full((1, 1, 1), x, **d)
        bias_want, bn_want = [], []
        for r in (1.0, 2.0):
            wr, wi = _split_by_hand(r, 3.0 - r, x)
            bias_want.append(r + wr / (wr + wi) * 6)
            wr, wi = _split_by_hand(r, 3.0 - r, x, eps=0.0)
            bn_want.append(r + wr / (wr + wi) * 6)
        for fn in fns:
            assert fn(rel, total, b, False, tol).flatten().tolist() == pytest.approx(bias_want, rel=1e-13)
        for fn in bn_fns:
            assert fn(rel, total, one, b, False, tol).flatten().tolist() == pytest.approx(bn_want, rel=1e-13)
    for x in (1.0, 2.0, 4.0):  # no jump at a threshold (tol, tol / 2)
        at, above = (_torch_ops.bias_split(rel, total, b, False, torch.full((1, 1, 1), t, **d)) for t in (x, up(x)))
        torch.testing.assert_close(at, above, rtol=1e-14, atol=0)
    # r = 2, i = 1: tol 1.5 ramps i to weight 1 * (2 / 1.5 - 1); tol 2 leaves i at tol/2 (weight
    # 0: the bias whole to r, a residue's fate); tol 1e3 splits both by 16th powers
    assert _torch_ops.bias_split(rel, total, b, False, torch.full((1, 1, 1), 1.5, **d))[1].item() == \
        pytest.approx(2.0 + 6.0 * 2.0 / (2.0 + 1.0 / 3.0), rel=1e-14)
    assert _torch_ops.bias_split(rel, total, b, False, torch.full((1, 1, 1), 2.0, **d))[1].item() == \
        pytest.approx(8.0, rel=1e-15)
    assert _torch_ops.bias_split(rel, total, b, False, torch.full((1, 1, 1), 1e3, **d))[1].item() == \
        pytest.approx(2.0 + 6.0 * 2.0 ** 16 / (2.0 ** 16 + 1), rel=1e-13)


@needs_compiled
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_tol_broadcasts_in_the_wrappers(dtype):
    """fastacd.ops expands a tol that broadcasts to the total's shape (one per channel, one for
    all) and casts it to the total's dtype; the compiled ops take exactly the total's shape."""
    gen = torch.Generator().manual_seed(18)
    for shape, tol_shape in (((3, 4, 5, 6), (1, 4, 1, 1)), ((3, 4, 5, 6), ()), ((5, 7), (1, 1)), ((5, 7), (7,)),
                             ((2, 3, 4), (1, 1, 4))):
        rel, total = split_inputs(shape, dtype, "cpu", gen, False)
        c = channel_vec(shape[1], dtype, "cpu", gen)
        tol = 0.5 * torch.rand(tol_shape, generator=gen, dtype=torch.float64)
        full = tol.to(dtype).expand(total.shape).contiguous()
        assert torch.equal(ops.bias_split(rel, total, c, True, tol), torch.ops.fastacd.bias_split(rel, total, c,
                                                                                                  True, full))
        assert torch.equal(ops.bn_split(rel, total, c, c, False, tol), torch.ops.fastacd.bn_split(rel, total, c, c,
                                                                                                  False, full))
        assert torch.equal(ops.bias_split_(rel.clone(), total, c, False, tol),
                           torch.ops.fastacd.bias_split(rel, total, c, False, full))
        assert torch.equal(ops.bn_split_(rel.clone(), total, c, c, True, tol),
                           torch.ops.fastacd.bn_split(rel, total, c, c, True, full))
        if tol.dim():
            with pytest.raises(RuntimeError, match="tol must have the shape of total_pre"):
                torch.ops.fastacd.bias_split(rel, total, c, True, tol.to(dtype))
    with pytest.raises(RuntimeError):  # not broadcastable: torch's own error
        ops.bias_split(rel, total, c, True, torch.zeros(1, 2, 1))


@needs_compiled
def test_tol_gets_no_gradient():
    """tol is a threshold (from the total pass, under no_grad in practice): None for it, and
    gradients for the other inputs."""
    gen = torch.Generator().manual_seed(19)
    rel, total = split_inputs((3, 2, 4), torch.float64, "cpu", gen, False, zeros=0)
    c = channel_vec(2, torch.float64, "cpu", gen)
    for fn in (lambda r, t, tol: ops.bias_split(r, t, c, True, tol), lambda r, t, tol: ops.bn_split(r, t, c, c, True,
                                                                                                   tol)):
        r, t = rel.clone().requires_grad_(), total.clone().requires_grad_()
        tol = tol_like(total, gen).requires_grad_()
        fn(r, t, tol).sum().backward()
        assert tol.grad is None and r.grad is not None and t.grad is not None


def test_bias_split_eps_and_bn_zero_rules():
    """Analytic values: r = a = 0 gives q = 1/2 (eps) in the bias split, q = 0 (0/0) in bn."""
    z = torch.zeros(1, 1, 1, dtype=torch.float64)
    b = torch.tensor([3.0], dtype=torch.float64)
    assert ops.bias_split(z, z, b).item() == 1.5
    assert ops.bn_split(z, z, torch.tensor([2.0], dtype=torch.float64), b).item() == 0.0
    # all of a is relevant: the whole bias / shift goes to the relevant part
    a = torch.full((1, 1, 1), -2.0, dtype=torch.float64)
    assert ops.bias_split(a, a, b).item() == pytest.approx(1.0, abs=1e-15)
    assert ops.bn_split(a, a, torch.tensor([2.0], dtype=torch.float64), b, True).item() == 0.0


POOLS = [  # (spatial shape, pool function, kwargs)
    ((8, 8), F.max_pool2d, dict(kernel_size=2)),
    ((7, 9), F.max_pool2d, dict(kernel_size=3, stride=2, padding=1)),  # overlapping windows
    ((5, 5), F.max_pool2d, dict(kernel_size=2, ceil_mode=True)),
    ((11,), F.max_pool1d, dict(kernel_size=3, stride=2)),
    ((4, 6, 6), F.max_pool3d, dict(kernel_size=2)),
    ((3, 3), F.max_pool2d, dict(kernel_size=3)),  # 1x1 output
]


def pool_inputs(spatial, pool, kwargs, m, c, dtype, device, gen, noncontig=False):
    total = randn(1, c, *spatial, dtype=dtype, device=device, gen=gen)
    _, idx = pool(total, return_indices=True, **kwargs)
    rel = randn(m, c, *spatial, dtype=dtype, device=device, gen=gen, noncontig=noncontig)
    if noncontig:
        idx = idx.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    return rel, idx


def _check_maxpool(device, dtype, spatial, pool, kwargs, m, c, noncontig):
    gen = torch.Generator().manual_seed(2)
    rel, idx = pool_inputs(spatial, pool, kwargs, m, c, dtype, device, gen, noncontig)
    out = torch.ops.fastacd.maxpool_gather(rel, idx)
    # (the pure-torch formula's reshape(m, c, -1) cannot size an empty batch)
    expected = _torch_ops.maxpool_gather(rel, idx) if m else rel.new_empty((0, c) + idx.shape[2:])
    assert out.shape == (m, c) + idx.shape[2:]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # a gather: exact
    torch.testing.assert_close(ops.maxpool_gather(rel, idx), expected, rtol=0, atol=0)


@needs_compiled
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("m,c", [(3, 4), (1, 1), (0, 2)], ids=str)
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: f"{p[1].__name__}{p[0]}{sorted(p[2].items())}")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_maxpool_gather_cpu(dtype, pool, m, c, noncontig):
    _check_maxpool("cpu", dtype, *pool, m, c, noncontig)


def test_maxpool_gather_matches_pooling_the_total():
    """With rel = total, gathering at the argmax is max-pooling itself."""
    gen = torch.Generator().manual_seed(3)
    total = randn(1, 3, 9, 9, gen=gen)
    pooled, idx = F.max_pool2d(total, 3, stride=2, return_indices=True)
    torch.testing.assert_close(ops.maxpool_gather(total.expand(4, -1, -1, -1), idx), pooled.expand(4, -1, -1, -1))


def lstm_inputs(m, h, dtype, device, gen, noncontig=False, phrase_dtype=None):
    rel_gates = randn(m, 3, 4 * h, dtype=dtype, device=device, gen=gen)[:, 1] if noncontig else \
        randn(m, 4 * h, dtype=dtype, device=device, gen=gen)
    total_gates = randn(1, 4 * h, dtype=dtype, device=device, gen=gen)
    bias = randn(4 * h, dtype=dtype, device=device, gen=gen)
    out_gate = torch.sigmoid(randn(1, h, dtype=dtype, device=device, gen=gen))
    prev_rel_c = randn(m, h, dtype=dtype, device=device, gen=gen, noncontig=noncontig)
    prev_total_c = randn(1, h, dtype=dtype, device=device, gen=gen)
    in_phrase = (torch.rand(m, generator=gen) > 0.5).to(device=device, dtype=phrase_dtype or dtype)
    return rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase


def _check_lstm(device, dtype, m, h, first_step, noncontig, phrase_dtype=None):
    gen = torch.Generator().manual_seed(4)
    args = lstm_inputs(m, h, dtype, device, gen, noncontig, phrase_dtype)
    rel_c, rel_h = torch.ops.fastacd.lstm_cd_cell(*args, first_step)
    od = oracle_dtype(dtype)
    if h:
        exp_c, exp_h = _torch_ops.lstm_cd_cell(*[a.to(od) for a in args], first_step)
    else:  # (the pure-torch formula's split cannot handle H = 0)
        exp_c = exp_h = torch.empty(m, 0, dtype=od, device=device)
    assert rel_c.shape == rel_h.shape == (m, h) and rel_c.dtype == dtype
    close(rel_c, exp_c, dtype)
    close(rel_h, exp_h, dtype)
    got_c, got_h = ops.lstm_cd_cell(*args, first_step)
    close(got_c, exp_c, dtype)
    close(got_h, exp_h, dtype)


@needs_compiled
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("first_step", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("m,h", [(5, 7), (1, 1), (0, 3), (3, 0), (64, 33)], ids=str)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_lstm_cd_cell_cpu(dtype, m, h, first_step, noncontig):
    _check_lstm("cpu", dtype, m, h, first_step, noncontig)


@needs_compiled
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e-6, 30.0, 1000.0])
def test_lstm_cd_cell_saturated_and_tiny_gates(dtype, scale):
    """The CPU kernels' own exp/tanh (kernels/fast_math_cpu.h) at tiny arguments and where
    sigmoid / tanh saturate or exp overflows."""
    gen = torch.Generator().manual_seed(14)
    args = list(lstm_inputs(6, 9, dtype, "cpu", gen))
    for k in (0, 1, 2, 4, 5):
        args[k] = args[k] * scale
    for first_step in (True, False):
        got = torch.ops.fastacd.lstm_cd_cell(*args, first_step)
        for a, b in zip(got, _torch_ops.lstm_cd_cell(*args, first_step)):
            close(a, b, dtype)


@needs_compiled
@pytest.mark.parametrize("phrase_dtype", [torch.bool, torch.int64, torch.float32])
def test_lstm_cd_cell_phrase_mask_dtypes(phrase_dtype):
    _check_lstm("cpu", torch.float64, 4, 5, False, False, phrase_dtype)


def test_lstm_relevant_plus_irrelevant_is_the_true_state():
    """Full phrase from the start: the relevant state is the whole LSTM state."""
    gen = torch.Generator().manual_seed(5)
    h = 6
    x_gates = randn(1, 4 * h, gen=gen)
    bias = randn(4 * h, gen=gen)
    o = torch.sigmoid(x_gates[:, 3 * h:] + bias[3 * h:])
    c, hid = ops.lstm_cd_cell(x_gates, x_gates, bias, o, torch.zeros(1, h, dtype=torch.float64),
                              torch.zeros(1, h, dtype=torch.float64), torch.ones(1, dtype=torch.float64), True)
    i, _, g, _ = (x_gates + bias).split(h, dim=1)
    true_c = torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(c, true_c)
    torch.testing.assert_close(hid, o * torch.tanh(true_c))


# --------------------------------------------------------------------------- gradients

def _grad_cases(device="cpu", dtype=torch.float64):
    """(name, wrapper, inputs needing grad, extra args) at generic points (no zeros, no
    ties): there the pure-torch oracle's autograd is well defined."""
    gen = torch.Generator().manual_seed(6)
    rel, total = split_inputs((3, 2, 4, 3), dtype, device, gen, False, zeros=0)
    lin_rel, lin_total = split_inputs((4, 5), dtype, device, gen, False, zeros=0)
    c2 = channel_vec(2, dtype, device, gen)
    c5 = channel_vec(5, dtype, device, gen)
    s2 = channel_vec(2, dtype, device, gen)
    prel, idx = pool_inputs((5, 6), F.max_pool2d, dict(kernel_size=3, stride=2, padding=1), 3, 2, dtype, device, gen)
    lstm = lstm_inputs(3, 4, dtype, device, gen)
    # thresholds above some parts (one or both) and not others, none within gradcheck's
    # step of a part (there the weight's derivative jumps)
    tol, lin_tol = tol_like(total, gen), tol_like(lin_total, gen)
    return [
        ("bias_split", ops.bias_split, _torch_ops.bias_split, (rel, total, c2), (False,)),
        ("bias_split_relu", ops.bias_split, _torch_ops.bias_split, (rel, total, c2), (True,)),
        ("bias_split_linear", ops.bias_split, _torch_ops.bias_split, (lin_rel, lin_total, c5), (True,)),
        ("bn_split", ops.bn_split, _torch_ops.bn_split, (rel, total, s2, c2), (False,)),
        ("bn_split_relu", ops.bn_split, _torch_ops.bn_split, (rel, total, s2, c2), (True,)),
        ("bias_split_tol", ops.bias_split, _torch_ops.bias_split, (rel, total, c2), (False, tol)),
        ("bias_split_relu_tol", ops.bias_split, _torch_ops.bias_split, (rel, total, c2), (True, tol)),
        ("bias_split_linear_tol", ops.bias_split, _torch_ops.bias_split, (lin_rel, lin_total, c5),
         (True, lin_tol)),
        ("bn_split_tol", ops.bn_split, _torch_ops.bn_split, (rel, total, s2, c2), (False, tol)),
        ("bn_split_relu_tol", ops.bn_split, _torch_ops.bn_split, (rel, total, s2, c2), (True, tol)),
        ("bn_split_linear_tol", ops.bn_split, _torch_ops.bn_split, (lin_rel, lin_total, c5, c5.flip(0)),
         (False, lin_tol)),
        ("maxpool_gather", lambda r: ops.maxpool_gather(r, idx), lambda r: _torch_ops.maxpool_gather(r, idx),
         (prel,), ()),
        ("lstm_first", ops.lstm_cd_cell, _torch_ops.lstm_cd_cell, lstm, (True,)),
        ("lstm_later", ops.lstm_cd_cell, _torch_ops.lstm_cd_cell, lstm, (False,)),
    ]


GRAD_CASES = [c[0] for c in _grad_cases()]


def _case(name, device="cpu", dtype=torch.float64):
    return next(c for c in _grad_cases(device, dtype) if c[0] == name)


@needs_compiled
@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradcheck(name):
    _, fn, _, inputs, extra = _case(name)
    inputs = tuple(x.detach().requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs, *extra), inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _check_backward_vs_oracle(name, device, dtype):
    _, fn, ref, inputs, extra = _case(name, device, dtype)
    od = oracle_dtype(dtype)
    mine = tuple(x.detach().requires_grad_() for x in inputs)
    theirs = tuple(x.detach().to(od).requires_grad_() for x in inputs)
    out, exp = fn(*mine, *extra), ref(*theirs, *extra)
    out, exp = (out, exp) if isinstance(out, tuple) else ((out,), (exp,))
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(e.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=od) for e in exp]
    g_mine = torch.autograd.grad(sum((o.to(od) * w).sum() for o, w in zip(out, weights)), mine)
    g_theirs = torch.autograd.grad(sum((e * w).sum() for e, w in zip(exp, weights)), theirs, allow_unused=True)
    for a, b, x in zip(g_mine, g_theirs, theirs):
        close(a, torch.zeros_like(x) if b is None else b, dtype)  # unused input (prev state at t=0): 0


@needs_compiled
@pytest.mark.parametrize("name", GRAD_CASES)
def test_backward_matches_oracle_autograd(name):
    _check_backward_vs_oracle(name, "cpu", torch.float64)


@needs_compiled
def test_bn_split_backward_zero_over_zero_is_finite():
    """Where |s r| + |s i| = 0 the ratio is the constant 0: finite gradients (the pure-torch
    formula's torch.where gives NaN there)."""
    z = torch.zeros(2, 1, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    shift = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    ops.bn_split(z, torch.zeros(1, 1, 3, dtype=torch.float64), scale, shift).sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, 2.0))  # d(s r)/dr = s
    assert shift.grad.item() == 0.0 and scale.grad.item() == 0.0


@needs_compiled
def test_maxpool_backward_accumulates_overlaps():
    """Two windows picking the same position send both gradients there."""
    rel = torch.arange(6.0, dtype=torch.float64).view(1, 1, 6).requires_grad_()
    idx = torch.tensor([[[5, 5, 1]]])
    ops.maxpool_gather(rel, idx).backward(torch.tensor([[[1.0, 2.0, 4.0]]], dtype=torch.float64))
    torch.testing.assert_close(rel.grad, torch.tensor([[[0, 4.0, 0, 0, 0, 3.0]]], dtype=torch.float64))


# --------------------------------------------------------------------------- opcheck, compile

def _opcheck_cases():
    gen = torch.Generator().manual_seed(8)
    rel, total = split_inputs((2, 3, 4, 5), torch.float64, "cpu", gen, False, zeros=0)
    c = channel_vec(3, torch.float64, "cpu", gen)
    prel, idx = pool_inputs((6, 6), F.max_pool2d, dict(kernel_size=2), 2, 3, torch.float64, "cpu", gen)
    lstm = lstm_inputs(3, 4, torch.float64, "cpu", gen)
    tol = tol_like(total, gen)
    return {
        "bias_split": ("bias_split", (rel, total, c, True)),
        "bias_split_linear": ("bias_split", (rel[:, :, 0, 0], total[:, :, 0, 0], c, False)),
        "bn_split": ("bn_split", (rel, total, c, c.flip(0), True)),
        "bias_split_tol": ("bias_split", (rel, total, c, True, tol)),
        "bias_split_linear_tol": ("bias_split", (rel[:, :, 0, 0], total[:, :, 0, 0], c, False, tol[:, :, 0, 0])),
        "bn_split_tol": ("bn_split", (rel, total, c, c.flip(0), False, tol)),
        "maxpool_gather": ("maxpool_gather", (prel, idx)),
        "lstm_cd_cell": ("lstm_cd_cell", (*lstm, False)),
    }


@needs_compiled
@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    args = tuple(a.detach().requires_grad_(a.is_floating_point() and i < 4) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))  # (tol, argument 5 or 6, is a threshold: no grad)
    torch.library.opcheck(getattr(torch.ops.fastacd, op).default, args)


@needs_compiled
def test_backward_ops_opcheck():
    gen = torch.Generator().manual_seed(9)
    rel, total = split_inputs((2, 3, 4), torch.float64, "cpu", gen, False, zeros=0)
    c = channel_vec(3, torch.float64, "cpu", gen)
    _, idx = F.max_pool1d(total, 2, return_indices=True)
    lstm = lstm_inputs(2, 3, torch.float64, "cpu", gen)
    g = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    tol = tol_like(total, gen)
    checks = [
        (torch.ops.fastacd.bias_split_backward.default, (torch.randn_like(rel), rel, total, c, True)),
        (torch.ops.fastacd.bn_split_backward.default, (torch.randn_like(rel), rel, total, c, c, False)),
        (torch.ops.fastacd.bias_split_backward.default, (torch.randn_like(rel), rel, total, c, True, tol)),
        (torch.ops.fastacd.bn_split_backward.default, (torch.randn_like(rel), rel, total, c, c, False, tol)),
        (torch.ops.fastacd.maxpool_gather_backward.default, (torch.randn(2, 3, 2, dtype=torch.float64), idx,
                                                              [2, 3, 4])),
        (torch.ops.fastacd.lstm_cd_cell_backward.default, (g, g.flip(0), *lstm, False)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@needs_compiled
def test_torch_compile_fullgraph():
    """One small graph through all four ops, forward and backward, compiles without graph
    breaks (fake kernels, autograd registration) and matches eager. aot_eager keeps it to
    about a second on two cores; test_torch_compile_inductor covers code generation."""
    gen = torch.Generator().manual_seed(10)
    rel, total = split_inputs((2, 3, 4, 4), torch.float64, "cpu", gen, False, zeros=0)
    c = channel_vec(3, torch.float64, "cpu", gen)
    _, idx = F.max_pool2d(total, 2, return_indices=True)
    lstm = lstm_inputs(2, 6, torch.float64, "cpu", gen)

    def f(rel, total, c, idx, lstm):
        x = ops.bias_split(rel, total, c, True)
        x = ops.bn_split(x, total, c, c, True)
        x = ops.maxpool_gather(x, idx)
        rc, rh = ops.lstm_cd_cell(lstm[0] + x.sum(), *lstm[1:], False)
        return x, rc, rh

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        r = rel.detach().requires_grad_()
        outs = fn(r, total, c, idx, lstm)
        (grad,) = torch.autograd.grad(sum(o.sum() for o in outs), r)
        results.append((*outs, grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@needs_compiled
def test_torch_compile_fullgraph_tol():
    """The split ops with tol (a tensor argument of their own, no gradient) under
    torch.compile(fullgraph=True): forward and backward as in eager."""
    gen = torch.Generator().manual_seed(20)
    rel, total = split_inputs((2, 3, 4, 4), torch.float64, "cpu", gen, False, zeros=0)
    c = channel_vec(3, torch.float64, "cpu", gen)
    tol = tol_like(total, gen)
    lin_rel, lin_total = split_inputs((2, 5), torch.float64, "cpu", gen, False, zeros=0)
    c5 = channel_vec(5, torch.float64, "cpu", gen)

    def f(rel, total, c, tol, lin_rel):
        x = ops.bias_split(rel, total, c, True, tol)
        x = ops.bn_split(x, total, c, c.flip(0), False, tol)
        y = ops.bias_split(lin_rel + x.sum(), lin_total, c5, False, 0.5 * lin_total.abs())
        return x, y

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        r, lr = rel.detach().requires_grad_(), lin_rel.detach().requires_grad_()
        outs = fn(r, total, c, tol, lr)
        results.append((*outs, *torch.autograd.grad(sum(o.sum() for o in outs), (r, lr))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@needs_compiled
@pytest.mark.slow
def test_torch_compile_inductor():
    """The default backend (inductor) around one op: ~20 s on two cores, so one small case."""
    gen = torch.Generator().manual_seed(13)
    rel, total = split_inputs((2, 3, 5), torch.float64, "cpu", gen, False, zeros=0)
    c = channel_vec(3, torch.float64, "cpu", gen)

    def f(rel, total, c):
        return ops.bias_split(rel * 2, total, c, True) + 1

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(rel, total, c), f(rel, total, c))


# --------------------------------------------------------------------------- errors

@needs_compiled
@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(2, 3, 4), torch.zeros(1, 3, 5), torch.zeros(3)),
     r"total_pre must have shape \(1, C, \*S\)"),
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(3)),
     r"total_pre must have shape \(1, C, \*S\)"),
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(2, 3, 4), torch.zeros(1, 3, 4), torch.zeros(4)),
     r"bias must have shape \(C,\) = \(3,\)"),
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(3), torch.zeros(1, 3), torch.zeros(3)),
     r"rel_pre must be \(M, C, \*S\)"),
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(2, 3), torch.zeros(1, 3, dtype=torch.float64),
                                          torch.zeros(3)), r"total_pre has dtype Double but rel_pre has dtype Float"),
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(1, 3,
                                          dtype=torch.float16), torch.zeros(3, dtype=torch.float16)),
     r"rel_pre has dtype Half; supported on cpu: float32, float64"),
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64),
                                          torch.zeros(3, dtype=torch.int64)), r"rel_pre has dtype Long"),
    (lambda: torch.ops.fastacd.bn_split(torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(3), torch.zeros(2)),
     r"shift must have shape \(C,\) = \(3,\)"),
    # tol: total's shape, dtype and device, in every split form
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(2, 3, 4), torch.zeros(1, 3, 4), torch.zeros(3), False,
                                          torch.zeros(2, 3, 4)),
     r"fastacd::bias_split: tol must have the shape of total_pre \[1, 3, 4\] \(one threshold per element\), "
     r"got \[2, 3, 4\]"),
    (lambda: torch.ops.fastacd.bias_split(torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(3), False,
                                          torch.zeros(1, 3, dtype=torch.float64)),
     r"tol has dtype Double but rel_pre has dtype Float"),
    (lambda: torch.ops.fastacd.bias_split_(torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(3), False,
                                           torch.zeros(3)), r"fastacd::bias_split_: tol must have the shape of total_pre"),
    (lambda: torch.ops.fastacd.bias_split_backward(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, 3),
                                                   torch.zeros(3), False, torch.zeros(1, 1)),
     r"fastacd::bias_split_backward: tol must have the shape of total_pre \[1, 3\]"),
    (lambda: torch.ops.fastacd.bn_split(torch.zeros(2, 3, 2), torch.zeros(1, 3, 2), torch.zeros(3), torch.zeros(3),
                                        True, torch.zeros(1, 3, 2, dtype=torch.int32)),
     r"tol has dtype Int; supported on cpu: float32, float64"),
    (lambda: torch.ops.fastacd.bn_split_(torch.zeros(2, 3, 2), torch.zeros(1, 3, 2), torch.zeros(3), torch.zeros(3),
                                         True, torch.zeros(1, 3, 1)),
     r"fastacd::bn_split_: tol must have the shape of total \[1, 3, 2\]"),
    (lambda: torch.ops.fastacd.bn_split_backward(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, 3),
                                                 torch.zeros(3), torch.zeros(3), False,
                                                 torch.zeros(1, 3, dtype=torch.float64)),
     r"fastacd::bn_split_backward: tol has dtype Double but rel has dtype Float"),
    (lambda: torch.ops.fastacd.maxpool_gather(torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 2, 2, dtype=torch.int32)),
     r"indices must be int64"),
    (lambda: torch.ops.fastacd.maxpool_gather(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 2, 2, dtype=torch.int64)),
     r"indices must have shape \(1, C, \*So\) with C = 3"),
    (lambda: torch.ops.fastacd.maxpool_gather(torch.zeros(2, 3, 4, 4), torch.full((1, 3, 2, 2), 16)),
     r"indices must lie in \[0, 16\)"),
    (lambda: torch.ops.fastacd.maxpool_gather(torch.zeros(2, 3, 4, 4), torch.full((1, 3, 2, 2), -1)),
     r"indices must lie in \[0, 16\)"),
    (lambda: torch.ops.fastacd.maxpool_gather_backward(torch.zeros(2, 3, 2, 2), torch.full((1, 3, 2, 2), 16),
                                                       [2, 3, 4, 4]),
     r"indices must lie in \[0, 16\) \(flat positions into the spatial dims of rel\), found values in \[16, 16\]"),
    (lambda: torch.ops.fastacd.lstm_cd_cell(torch.zeros(2, 12), torch.zeros(1, 12), torch.zeros(12),
                                            torch.zeros(1, 3), torch.zeros(2, 4), torch.zeros(1, 3), torch.zeros(2),
                                            False), r"rel_gates must have shape \(M, 4H\) = \[2, 16\]"),
    (lambda: torch.ops.fastacd.lstm_cd_cell(torch.zeros(2, 12), torch.zeros(1, 12), torch.zeros(12),
                                            torch.zeros(1, 3), torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(3),
                                            False), r"in_phrase must have shape \(M,\)"),
    (lambda: torch.ops.fastacd.lstm_cd_cell(torch.zeros(2, 12), torch.zeros(1, 12, dtype=torch.float64),
                                            torch.zeros(12), torch.zeros(1, 3), torch.zeros(2, 3), torch.zeros(1, 3),
                                            torch.zeros(2), False), r"total_gates has dtype Double"),
], ids=lambda x: "" if callable(x) else x[:40])
def test_bad_input_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@needs_compiled
def test_device_mismatch_error():
    """Tensors on two devices: a clear error (here cpu + meta, which dispatches to the
    fake kernel; the CUDA launchers check the same, see test_cuda_device_mismatch)."""
    with pytest.raises(RuntimeError, match=r"bias is on meta but rel_pre is on cpu"):
        torch.ops.fastacd.bias_split(torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(3, device="meta"))
    with pytest.raises(RuntimeError, match=r"tol is on meta but rel is on cpu"):
        torch.ops.fastacd.bn_split(torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(3), torch.zeros(3), False,
                                   torch.zeros(1, 3, device="meta"))


# --------------------------------------------------------------------------- dtype promotion

@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "formula"])
def test_mixed_dtypes_are_promoted(compiled, monkeypatch):
    """Parameters in another dtype than the activations (float32 biases with bfloat16 conv
    outputs under torch.autocast on CUDA; here float32 with float64) are promoted as the
    pure-torch formulas promote them, on the compiled path and the fallback alike."""
    if compiled and not ops.HAS_COMPILED:
        pytest.skip("compiled extension fastacd._C not built")
    if not compiled:
        monkeypatch.setattr(ops, "HAS_COMPILED", False)
    gen = torch.Generator().manual_seed(15)
    rel, total = split_inputs((3, 4, 5, 6), torch.float64, "cpu", gen, False)
    c32, s32 = channel_vec(4, torch.float32, "cpu", gen), channel_vec(4, torch.float32, "cpu", gen)
    for args in ((rel, total, c32), (rel.float(), total.float(), c32.double()), (rel.float(), total, c32)):
        out = ops.bias_split(*args, True)
        assert out.dtype == torch.float64
        close(out, _torch_ops.bias_split(*(a.double() for a in args), True))
    out = ops.bn_split(rel, total.float(), s32, c32, True)
    assert out.dtype == torch.float64
    close(out, _torch_ops.bn_split(rel, total.float().double(), s32.double(), c32.double(), True))
    # in place: written in the buffer's dtype
    buf = rel.float()
    assert ops.bias_split_(buf, total, c32.double(), True) is buf
    close(buf, _torch_ops.bias_split(rel.float(), total.float(), c32, True))
    buf = rel.float()
    ops.bn_split_(buf, total, s32.double(), c32, False)
    close(buf, _torch_ops.bn_split(rel.float(), total.float(), s32, c32, False))
    # tol takes the total's dtype and promotes nothing (it is only compared with)
    tol = tol_like(total, gen)
    out = ops.bias_split(rel.float(), total.float(), c32, True, tol)
    assert out.dtype == torch.float32
    close(out, _torch_ops.bias_split(rel.float(), total.float(), c32, True, tol.float()))
    out = ops.bn_split(rel, total, s32, c32, False, tol.float())
    assert out.dtype == torch.float64
    close(out, _torch_ops.bn_split(rel, total, s32.double(), c32.double(), False, tol.float().double()))
    buf = rel.float()
    ops.bn_split_(buf, total, s32, c32, True, tol)
    close(buf, _torch_ops.bn_split(rel.float(), total.float(), s32, c32, True, tol.float()))
    lstm = list(lstm_inputs(3, 4, torch.float64, "cpu", gen))
    lstm[1], lstm[2] = lstm[1].float(), lstm[2].float()  # total_gates, bias in float32
    got = ops.lstm_cd_cell(*lstm, False)
    want = _torch_ops.lstm_cd_cell(*(a.double() for a in lstm), False)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        close(a, b)
    base, win = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randn(3, 2, 2, 2, generator=gen)
    corner = torch.tensor([0, 2, 4])
    got = ops.window_gather(base, win, corner, corner, corner - 1, corner, 4, 4)
    assert got.dtype == torch.float64
    assert torch.equal(got, _torch_ops.window_gather(base, win.double(), corner, corner, corner - 1, corner, 4, 4))


# --------------------------------------------------------------------------- fallback, build info

def test_fallback_when_not_compiled(monkeypatch):
    """Without the extension the wrappers are the pure-torch formulas."""
    monkeypatch.setattr(ops, "HAS_COMPILED", False)
    gen = torch.Generator().manual_seed(11)
    rel, total = split_inputs((2, 3, 4), torch.float64, "cpu", gen, False)
    c = channel_vec(3, torch.float64, "cpu", gen)
    assert torch.equal(ops.bias_split(rel, total, c, True), _torch_ops.bias_split(rel, total, c, True))
    assert torch.equal(ops.bn_split(rel, total, c, c), _torch_ops.bn_split(rel, total, c, c))
    tol = tol_like(total, gen)
    assert torch.equal(ops.bias_split(rel, total, c, True, tol), _torch_ops.bias_split(rel, total, c, True, tol))
    assert torch.equal(ops.bn_split(rel, total, c, c, False, tol), _torch_ops.bn_split(rel, total, c, c, False, tol))
    assert torch.equal(ops.bias_split_(rel.clone(), total, c, True, tol[0, 0]),  # broadcast here too
                       _torch_ops.bias_split(rel, total, c, True, tol[0, 0].expand_as(total)))
    _, idx = F.max_pool1d(total, 2, return_indices=True)
    assert torch.equal(ops.maxpool_gather(rel, idx), _torch_ops.maxpool_gather(rel, idx))
    lstm = lstm_inputs(2, 3, torch.float64, "cpu", gen)
    for a, b in zip(ops.lstm_cd_cell(*lstm, False), _torch_ops.lstm_cd_cell(*lstm, False)):
        assert torch.equal(a, b)


def test_unsupported_dtype_falls_back_to_torch():
    """CPU bfloat16 has no compiled kernel: the wrapper uses the pure-torch formula."""
    gen = torch.Generator().manual_seed(12)
    rel, total = split_inputs((2, 3, 4), torch.bfloat16, "cpu", gen, False)
    c = channel_vec(3, torch.bfloat16, "cpu", gen)
    assert torch.equal(ops.bias_split(rel, total, c), _torch_ops.bias_split(rel, total, c))


def test_build_info():
    info = ops.build_info()
    assert info["compiled"] == ops.HAS_COMPILED
    assert info["torch"] == torch.__version__
    if ops.HAS_COMPILED:
        assert set(info["ops"]) == {"bias_split", "bias_split_window_", "bn_split", "maxpool_gather", "window_gather",
                                    "lstm_cd_cell", "winograd_conv3x3", "transpose_cast"}
        assert all("CPU" in keys for keys in info["ops"].values())
        # CPU only: Winograd (cuDNN picks its own algorithms), the split at the windows (on
        # CUDA the wrapper crops first) and the transposing cast (torch's copy on CUDA); every
        # other op has a CUDA kernel
        cpu_only = {"winograd_conv3x3", "bias_split_window_", "transpose_cast"}
        assert all(info["ops"][op] == ["CPU"] for op in cpu_only)
        assert info["cuda_kernels"] == all("CUDA" in keys for op, keys in info["ops"].items() if op not in cpu_only)
    else:
        assert info["import_error"]


# --------------------------------------------------------------------------- CUDA

@needs_compiled
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (4, 6), (2, 2, 3, 4, 5), (0, 3, 4, 4)], ids=str)
def test_split_ops_cuda(dtype, shape):
    for relu in (False, True):
        for with_tol in (False, True):
            _check_bias_split("cuda", dtype, shape, relu, noncontig=True, with_tol=with_tol)
            _check_bn_split("cuda", dtype, shape, relu, noncontig=False, with_tol=with_tol)


@needs_compiled
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: f"{p[1].__name__}{p[0]}")
def test_maxpool_gather_cuda(dtype, pool):
    _check_maxpool("cuda", dtype, *pool, 3, 4, noncontig=True)


@needs_compiled
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("first_step", [True, False])
def test_lstm_cd_cell_cuda(dtype, first_step):
    _check_lstm("cuda", dtype, 64, 33, first_step, noncontig=True)


@needs_compiled
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("name", GRAD_CASES)
def test_backward_cuda(name, dtype):
    _check_backward_vs_oracle(name, "cuda", dtype)


@needs_compiled
@pytest.mark.needs_cuda
def test_cuda_device_mismatch():
    with pytest.raises(RuntimeError, match=r"expected bias on cuda"):
        torch.ops.fastacd.bias_split(torch.zeros(2, 3, device="cuda"), torch.zeros(1, 3, device="cuda"),
                                     torch.zeros(3))


@needs_compiled
@pytest.mark.needs_cuda
def test_opcheck_cuda():
    for op, args in _opcheck_cases().values():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(torch.ops.fastacd, op).default, args)


# --------------------------------------------------------------------------- in-place bias split
@needs_compiled
@pytest.mark.parametrize("with_tol", [False, True], ids=["notol", "tol"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (5, 7), (2, 3, 4)])
@pytest.mark.parametrize("relu", [False, True])
def test_bias_split_inplace_equals_functional(shape, dtype, relu, with_tol):
    g = torch.Generator().manual_seed(3)
    rel = torch.randn(shape, generator=g, dtype=dtype)
    total = torch.randn((1,) + shape[1:], generator=g, dtype=dtype)
    bias = torch.randn(shape[1], generator=g, dtype=dtype)
    tol = tol_like(total, g) if with_tol else None
    want = _torch_ops.bias_split(rel, total, bias, relu, tol)
    buf = rel.clone()
    got = torch.ops.fastacd.bias_split_(buf, total, bias, relu, tol)
    assert got.data_ptr() == buf.data_ptr()  # written in place
    torch.testing.assert_close(buf, want)
    torch.testing.assert_close(buf, ops.bias_split(rel, total, bias, relu, tol), rtol=0, atol=0)
    torch.testing.assert_close(ops.bias_split_(rel.clone(), total, bias, relu, tol), want)
    torch.testing.assert_close(_torch_ops.bias_split_(rel.clone(), total, bias, relu, tol), want)


@needs_compiled
def test_bias_split_inplace_opcheck_and_errors():
    rel, total, bias = torch.randn(3, 4, 5), torch.randn(1, 4, 5), torch.randn(4)
    for tol in (None, total.abs()):
        torch.library.opcheck(torch.ops.fastacd.bias_split_.default, (rel.clone(), total, bias, True, tol),
                              test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match=r"rel_pre must be contiguous to be written in place"):
        torch.ops.fastacd.bias_split_(rel.transpose(1, 2), total.transpose(1, 2), torch.randn(5))
    with pytest.raises(RuntimeError, match=r"bias must have shape \(C,\) = \(4,\)"):
        torch.ops.fastacd.bias_split_(rel, total, torch.randn(3))


@needs_compiled
@pytest.mark.parametrize("with_tol", [False, True], ids=["notol", "tol"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (5, 7), (2, 3, 4), (0, 3, 2)])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_split_inplace_equals_functional(shape, dtype, relu, with_tol):
    g = torch.Generator().manual_seed(4)
    rel, total = split_inputs(shape, dtype, "cpu", g, False)  # with exact zeros: the 0/0 rule
    scale, shift = channel_vec(shape[1], dtype, "cpu", g), channel_vec(shape[1], dtype, "cpu", g)
    tol = tol_like(total, g) if with_tol else None
    want = _torch_ops.bn_split(rel, total, scale, shift, relu, tol)
    buf = rel.clone()
    got = torch.ops.fastacd.bn_split_(buf, total, scale, shift, relu, tol)
    assert got.data_ptr() == buf.data_ptr()  # written in place
    close(buf, want)
    torch.testing.assert_close(buf, ops.bn_split(rel, total, scale, shift, relu, tol), rtol=0, atol=0)
    close(ops.bn_split_(rel.clone(), total, scale, shift, relu, tol), want)
    torch.testing.assert_close(_torch_ops.bn_split_(rel.clone(), total, scale, shift, relu, tol), want)


@needs_compiled
def test_bn_split_inplace_opcheck_and_errors():
    rel, total, c = torch.randn(3, 4, 5), torch.randn(1, 4, 5), torch.randn(4)
    for tol in (None, total.abs()):
        torch.library.opcheck(torch.ops.fastacd.bn_split_.default, (rel.clone(), total, c, c.flip(0), True, tol),
                              test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match=r"rel must be contiguous to be written in place; use fastacd::bn_split"):
        torch.ops.fastacd.bn_split_(rel.transpose(1, 2), total.transpose(1, 2), torch.randn(5), torch.randn(5))
    with pytest.raises(RuntimeError, match=r"shift must have shape \(C,\) = \(4,\)"):
        torch.ops.fastacd.bn_split_(rel, total, c, torch.randn(3))


def test_engine_never_overwrites_a_shared_relevant_part():
    """A user rule whose weights return their input (a view): the engine must not write the
    split into it (that would change the relevant part the next nodes read)."""
    from fastacd.rules.affine import own_buffer as _own_buffer
    r = torch.randn(2, 5)
    assert not _own_buffer(r[:, :], r)
    assert not _own_buffer(r.t(), r.clone())  # not contiguous
    assert _own_buffer(r.clone(), r)


# --------------------------------------------------------------------------- CPU buffer reuse

@needs_compiled
def test_reuse_cpu_buffers_hands_a_freed_block_back():
    big = 1 << 20  # 4 MiB of float32
    before = ops.buffer_reuse_stats()
    with ops.reuse_cpu_buffers(1 << 30) as on:
        assert on
        a = torch.empty(big)
        ptr = a.data_ptr()
        a.fill_(1.5)
        del a
        assert ops.buffer_reuse_stats()["cached_bytes"] >= big * 4
        b = torch.empty(big)  # the same size: the same block
        assert b.data_ptr() == ptr and b[0] == 1.5
        c = torch.empty(big + 1)  # the block is taken: a fresh one
        assert c.data_ptr() != ptr
        del b
        e = torch.empty(big // 2 + 1)  # a smaller request takes a cached block up to twice its size
        assert e.data_ptr() == ptr
        del e
        f = torch.empty(big // 2 - 1024)  # but not one more than twice its size
        assert f.data_ptr() != ptr
        b = torch.empty(big)
        small = torch.empty(1000)  # below 1 MiB: torch's allocator as usual
        del small
        stats = ops.buffer_reuse_stats()
        assert stats["open_scopes"] == 1 and stats["hits"] == before["hits"] + 3
    after = ops.buffer_reuse_stats()
    assert after["open_scopes"] == 0 and after["cached_bytes"] == 0 and after["cached_blocks"] == 0
    del b, c, f  # allocated in the scope, freed after it: released, not cached
    assert ops.buffer_reuse_stats()["cached_bytes"] == 0
    d = torch.empty(big)  # outside a scope nothing is reused
    assert ops.buffer_reuse_stats()["hits"] == after["hits"]
    del d


@needs_compiled
def test_reuse_cpu_buffers_nesting_cap_and_errors():
    big = 1 << 19  # 2 MiB of float32
    with ops.reuse_cpu_buffers(3 << 20):  # holds at most one such block
        with ops.reuse_cpu_buffers(0):   # the largest cap of the open scopes applies
            x, y = torch.empty(big), torch.empty(big)
            del x, y
            assert ops.buffer_reuse_stats()["cached_blocks"] == 1
        assert ops.buffer_reuse_stats()["cached_blocks"] == 1  # an inner exit keeps the cache
        with pytest.raises(ValueError):
            with ops.reuse_cpu_buffers(1 << 30):
                raise ValueError("inside")
        assert ops.buffer_reuse_stats()["open_scopes"] == 1
        # oneDNN allocates through raw_allocate / raw_deallocate inside a scope
        conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        x = torch.randn(4, 8, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert ops.buffer_reuse_stats()["open_scopes"] == 0
    assert ops.buffer_reuse_stats()["cached_bytes"] == 0


def test_reuse_cpu_buffers_without_the_extension(monkeypatch):
    monkeypatch.setattr(ops, "HAS_COMPILED", False)
    with ops.reuse_cpu_buffers(1 << 30) as on:
        assert not on
    assert ops.buffer_reuse_stats()["open_scopes"] == 0

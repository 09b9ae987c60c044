"""bias_split_window_, the windowed pass's bias split reading the total (and tol) at each
candidate's window in place: the pure-torch formula against the split of explicit crops, the
compiled CPU kernel and the no-kernel path against the formula, opcheck, errors, and the
windowed pass through it against full propagation."""
from __future__ import annotations

import pytest
import torch

import fastacd
from fastacd import ops
from fastacd.engine import windowed
from fastacd.ops import torch_ops as _torch_ops

needs_compiled = pytest.mark.skipif(not ops.HAS_COMPILED, reason="compiled extension fastacd._C not built")


def case(seed: int, dtype=torch.float64, m=5, c=3, hw=(9, 11), win=(4, 6), with_tol=True):
    g = torch.Generator().manual_seed(seed)
    (H, W), (h, w) = hw, win
    total = torch.randn(1, c, H, W, generator=g, dtype=torch.float64).to(dtype)
    rel = torch.randn(m, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    # parts of either sign and size, some within the tolerance of zero
    tol = (torch.rand(1, c, H, W, generator=g, dtype=torch.float64) * 0.5).to(dtype) if with_tol else None
    oy = torch.randint(0, H - h + 1, (m,), generator=g)
    ox = torch.randint(0, W - w + 1, (m,), generator=g)
    return rel, total, bias, oy, ox, tol


def by_crops(rel, total, bias, oy, ox, relu, tol):
    """Candidate by candidate: bias_split of its window values against plain slices."""
    h, w = rel.shape[2:]
    out = []
    for j in range(rel.shape[0]):
        y, x = int(oy[j]), int(ox[j])
        t = total[:, :, y:y + h, x:x + w]
        tl = None if tol is None else tol[:, :, y:y + h, x:x + w]
        out.append(_torch_ops.bias_split(rel[j:j + 1], t, bias, relu, tl))
    return torch.cat(out)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_tol", [False, True])
def test_formula_is_the_split_of_the_crops(relu, with_tol):
    rel, total, bias, oy, ox, tol = case(0, with_tol=with_tol)
    want = by_crops(rel, total, bias, oy, ox, relu, tol)
    got = _torch_ops.bias_split_window_(rel.clone(), total, bias, oy, ox, relu, tol)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_tol", [False, True])
@pytest.mark.parametrize("geometry", [((9, 11), (4, 6), 5), ((28, 28), (13, 13), 16), ((5, 5), (5, 5), 1),
                                      ((7, 8), (1, 1), 3), ((6, 6), (0, 3), 2), ((6, 6), (2, 2), 0)], ids=str)
def test_compiled_equals_the_formula(dtype, relu, with_tol, geometry):
    """Windows of the whole map, one pixel, empty, and 13 wide (one vector's tail); every
    candidate a corner of its own."""
    hw, win, m = geometry
    rel, total, bias, oy, ox, tol = case(1, dtype, m=m, c=4, hw=hw, win=win, with_tol=with_tol)
    want = _torch_ops.bias_split_window_(rel.clone(), total, bias, oy, ox, relu, tol)
    out = rel.clone()
    got = torch.ops.fastacd.bias_split_window_.default(out, total, bias, oy, ox, relu, tol)
    assert got.data_ptr() == out.data_ptr()  # in place
    exact = dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-14 if exact else 1e-6, atol=1e-14 if exact else 1e-6)


@needs_compiled
def test_wrapper_without_the_kernel_crops_first(monkeypatch):
    """Where no kernel runs (CUDA, or the compiled path switched off) the wrapper crops the
    total and splits: the same numbers."""
    rel, total, bias, oy, ox, tol = case(2, torch.float32)
    want = ops.bias_split_window_(rel.clone(), total, bias, oy, ox, True, tol)
    monkeypatch.setattr(ops, "_has_kernel", lambda op, key: False)
    got = ops.bias_split_window_(rel.clone(), total, bias, oy, ox, True, tol)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(ops, "HAS_COMPILED", False)
    torch.testing.assert_close(ops.bias_split_window_(rel.clone(), total, bias, oy, ox, True, tol), want,
                               rtol=1e-6, atol=1e-6)


@needs_compiled
def test_opcheck():
    rel, total, bias, oy, ox, tol = case(3)
    torch.library.opcheck(torch.ops.fastacd.bias_split_window_.default, (rel, total, bias, oy, ox, True, tol),
                          test_utils=("test_schema", "test_faketensor"))


@needs_compiled
@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(oy=a["oy"] + 100), r"oy must lie in \[0, 5\]"),
    (lambda a: a.update(ox=-a["ox"] - 1), r"ox must lie in \[0, 5\]"),
    (lambda a: a.update(oy=a["oy"][:2]), "one corner per candidate"),
    (lambda a: a.update(total=a["total"][:, :2]), "same C"),
    (lambda a: a.update(rel=a["rel"].transpose(2, 3)), "contiguous"),
    (lambda a: a.update(tol=a["tol"][:, :, :3]), "tol must have the shape"),
    (lambda a: a.update(bias=a["bias"][:1]), "bias must have shape"),
])
def test_errors(change, match):
    rel, total, bias, oy, ox, tol = case(4, m=5, c=3, hw=(9, 11), win=(4, 6))
    args = dict(rel=rel, total=total, bias=bias, oy=oy, ox=ox, tol=tol)
    change(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastacd.bias_split_window_.default(args["rel"], args["total"], args["bias"], args["oy"], args["ox"],
                                                     False, args["tol"])


def test_windowed_pass_splits_at_the_windows(monkeypatch):
    """A VGG-like net's windowed CD (the convolutions' splits through bias_split_window_)
    equals full propagation; the op is called once per windowed convolution with bias."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4)).eval().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    base = torch.zeros(1, 16, 16, dtype=torch.float64)
    base[:, 2:6, 3:7] = 1
    deltas = torch.zeros(6, 16, 16, dtype=torch.float64)
    for j in range(6):
        deltas[j, 8 + j % 3 * 2:10 + j % 3 * 2, 2 * j:2 * j + 3] = 1
    calls = []
    real = windowed._PerMaskOps.bias_split
    monkeypatch.setattr(windowed._PerMaskOps, "bias_split", lambda self, rel, total, *a, **k: calls.append(
        isinstance(total, windowed.AtWindows)) or real(self, rel, total, *a, **k))
    dec = fastacd.Decomposer(model)
    with torch.no_grad():
        got = dec.cd_delta(x, base, deltas, max_cost_ratio=float("inf")).relevant
        want = dec.cd(x, torch.maximum(base, deltas)).relevant
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert calls and all(calls)

"""transpose_cast: float32 NCHW -> bfloat16 channels_last and back in one pass on the CPU,
bit for bit torch's ``x.to(dtype, memory_format=...)`` (edges of the tiles, rounding ties,
NaN, infinities, subnormals), opcheck, errors, and bf16 CD through it equal to CD through
torch's copy."""
from __future__ import annotations

import pytest
import torch

import fastacd
from fastacd import ops
from fastacd.ops import precision as prec

needs_compiled = pytest.mark.skipif(not ops.HAS_COMPILED, reason="compiled extension fastacd._C not built")
kernel = torch.ops.fastacd.transpose_cast.default if ops.HAS_COMPILED else None

SHAPES = [(1, 16, 16, 16), (2, 3, 5, 7), (3, 17, 9, 11), (16, 512, 13, 13), (1, 64, 30, 30), (2, 40, 1, 1),
          (1, 1, 20, 20), (0, 4, 5, 5)]


def values(shape, seed=0) -> torch.Tensor:
    """Random float32 values with the cases rounding must get right sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 4, shape, generator=g)
    flat = x.view(-1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39,
                            3.3895314e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8)])
    # halfway between two bfloat16s (ties to even, both ways) and just beside them
    ties = (torch.randint(0, 1 << 15, (8,), generator=g, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    near = torch.cat([ties.view(torch.int32) + 1, ties.view(torch.int32) - 1]).view(torch.float32)
    extra = torch.cat([special, ties, near])[:flat.numel()]
    flat[torch.randperm(flat.numel(), generator=g)[:extra.numel()]] = extra
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal values, NaN where NaN (any NaN payload), and the same layout."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    nan = b.isnan()
    assert torch.equal(a.isnan(), nan)
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    assert torch.equal(a.contiguous().view(bits)[~nan.contiguous()], b.contiguous().view(bits)[~nan.contiguous()])


@needs_compiled
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_to_channels_last_bfloat16_is_torchs_cast(shape):
    x = values(shape)
    same_bits(kernel(x, torch.bfloat16, True), x.to(torch.bfloat16, memory_format=torch.channels_last))


@needs_compiled
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_to_nchw_float32_is_torchs_cast(shape):
    x = values(shape).to(torch.bfloat16, memory_format=torch.channels_last)
    same_bits(kernel(x, torch.float32, False), x.to(torch.float32, memory_format=torch.contiguous_format))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [True, False])
def test_wrapper_equals_torch_for_every_input(dtype, channels_last):
    """Any dtype pair, layout and size: the kernel where it applies, torch's copy elsewhere."""
    fmt_out = torch.channels_last if channels_last else torch.contiguous_format
    for shape, fmt in [((2, 24, 14, 14), torch.contiguous_format), ((2, 24, 14, 14), torch.channels_last),
                       ((1, 3, 4, 4), torch.contiguous_format)]:
        for to in (torch.float32, torch.bfloat16, torch.float64):
            x = values(shape).contiguous(memory_format=fmt).to(dtype)
            same_bits(ops.transpose_cast(x, to, channels_last), x.to(to, memory_format=fmt_out))


@needs_compiled
def test_opcheck():
    x = torch.randn(2, 20, 6, 7)  # no NaN: opcheck compares with assert_close
    torch.library.opcheck(kernel, (x, torch.bfloat16, True))
    torch.library.opcheck(kernel, (x.to(torch.bfloat16, memory_format=torch.channels_last), torch.float32, False))


@needs_compiled
@pytest.mark.parametrize("args, match", [
    (lambda: (torch.zeros(2, 3, 4), torch.bfloat16, True), "4-d map"),
    (lambda: (torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.bfloat16, True), "NCHW-contiguous"),
    (lambda: (torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16), torch.float32, False), "channels_last-contiguous"),
    (lambda: (torch.zeros(2, 3, 4, 5, dtype=torch.float64), torch.bfloat16, True), "float32 to bfloat16"),
    (lambda: (torch.zeros(2, 3, 4, 5), torch.float32, True), "float32 to bfloat16"),
], ids=["3d", "layout_in", "layout_back", "float64", "same_dtype"])
def test_errors(args, match):
    with pytest.raises(RuntimeError, match=match):
        kernel(*args())


@needs_compiled
def test_bf16_cd_through_the_kernel_equals_cd_through_torchs_copy(monkeypatch):
    """The engine's bf16 weight applications cast with it (both ways, in the windowed pass;
    inference only: with autograd on torch's copy runs): the same bits as torch's copy give the
    same CD, full and windowed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(24, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 5)).eval()
    x = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(6, 1, 32, 32)
    for j in range(6):
        masks[j, :, 4 * j:4 * j + 8, 3:15] = 1
    base = torch.zeros(1, 32, 32)
    base[:, 20:28, 20:28] = 1
    calls = []
    real = kernel

    def spy(*args):
        calls.append(args[1:])
        return real(*args)

    @torch.no_grad()
    def run():
        dec = fastacd.Decomposer(model, precision="bf16")
        with pytest.warns(RuntimeWarning) if not ops.fast_bf16(torch.device("cpu"))[0] else _nothing():
            full = dec.cd(x, masks).relevant
            stats = {}
            delta = dec.cd_delta(x, base, masks.squeeze(1).bool(), max_cost_ratio=float("inf"), stats=stats).relevant
        assert stats["windowed"]
        return full, delta

    monkeypatch.setattr(torch.ops.fastacd.transpose_cast, "default", spy)
    with_kernel = run()
    assert {c for c in calls} >= {(torch.bfloat16, True), (torch.float32, False)}
    monkeypatch.setattr(prec, "_TRANSPOSE_CAST_MIN", 1 << 62)
    calls.clear()
    with_torch = run()
    assert not calls
    for a, b in zip(with_kernel, with_torch):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

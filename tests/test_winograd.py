"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions (``fastacd.ops.conv2d``, ``torch.ops.fastacd.winograd_conv3x3``)
against ``F.conv2d``: float64 to 1e-12 of the scale (the algorithm is exact arithmetic up to
rounding), float32 within a few times the direct convolution's rounding; when the engine
chooses it, and CD through it against the float64 reference."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from fastacd import ops

from conftest import assert_close_scaled

needs_compiled = pytest.mark.skipif(not ops.HAS_COMPILED, reason="the compiled extension is not built")
pytestmark = [needs_compiled, pytest.mark.usefixtures("one_thread")]

winograd = torch.ops.fastacd.winograd_conv3x3.default if ops.HAS_COMPILED else None


@pytest.mark.parametrize("shape,pad", [((2, 5, 7, 6), (1, 1)), ((2, 5, 8, 9), (0, 0)), ((1, 3, 3, 3), (0, 0)),
                                       ((3, 4, 4, 5), (2, 1)), ((1, 2, 1, 1), (1, 1)), ((2, 7, 10, 3), (0, 1)),
                                       ((2, 70, 13, 9), (1, 0)), ((1, 3, 6, 6), (0, 0))])
@pytest.mark.parametrize("tile", [2, 4])
def test_op_equals_conv2d_float64(shape, pad, tile):
    """Every output tile (whole, cut by the border, one pixel) and channel blocks past 64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(6, shape[1], 3, 3, generator=g, dtype=torch.float64)
    got = winograd(x, ops.winograd_weight(w, tile), *pad)
    want = F.conv2d(x, w, padding=pad)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-13 * want.abs().max()


@pytest.mark.parametrize("tile,limit", [(2, 4), (4, 24)])
def test_op_float32_rounding_and_layouts(tile, limit):
    """float32: within 4x (F(2x2)) and 24x (F(4x4), measured 8-20x: docs/kernels.md) the direct
    convolution's error against float64; a channels_last or non-contiguous input gives the
    same numbers."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 128, 13, 11, generator=g)
    w = torch.randn(128, 128, 3, 3, generator=g) / 34
    u = ops.winograd_weight(w, tile)
    want = F.conv2d(x.double(), w.double(), padding=1)
    got = winograd(x, u, 1, 1)
    direct = F.conv2d(x, w, padding=1)
    assert (got.double() - want).abs().max() <= limit * (direct.double() - want).abs().max()
    torch.testing.assert_close(winograd(x.contiguous(memory_format=torch.channels_last), u, 1, 1), got, rtol=0, atol=0)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(winograd(xt, u, 1, 1), got, rtol=0, atol=0)


def test_f4_points_keep_the_rounding_low():
    """F(4x4)'s points 0, 1, -1, 2, -1/2 round about 3x less than the usual 0, 1, -1, 2, -2
    (a float32 simulation of those: 1.2e-5 of the scale here); regressing to them fails."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 512, 14, 14, generator=g)
    w = torch.randn(512, 512, 3, 3, generator=g) / (9 * 512) ** 0.5
    want = F.conv2d(x.double(), w.double())
    err = (winograd(x, ops.winograd_weight(w, 4), 0, 0).double() - want).abs().max() / want.abs().max()
    assert err < 7e-6


def test_winograd_weight_rejects_other_tiles():
    with pytest.raises(ValueError, match="tile must be 2 or 4"):
        ops.winograd_weight(torch.randn(2, 2, 3, 3), 3)


def test_tile_choice():
    """F(4x4) from WINOGRAD_F4_MIN_TILES tiles on and where it needs fewer products than F(2x2)."""
    assert ops.winograd_tile(1, 28, 28) == 4        # 49 tiles of 4x4
    assert ops.winograd_tile(16, 13, 13) == 4       # 256 tiles, 9216 products vs 12544
    assert ops.winograd_tile(1, 12, 12) == 2        # 9 tiles: its weights cost more than it saves
    assert ops.winograd_tile(16, 6, 6) == 2         # 64 tiles, but 2304 products either way
    assert ops.winograd_tile(16, 5, 5) == 2
    assert ops.conv3x3_tile(1, 512, 28, 28) == 4 and ops.conv3x3_tile(1, 512, 12, 12) == 2
    assert ops.conv3x3_tile(4, 128, 24, 24) == 4                         # F(4x4) alone from 128 channels
    assert ops.conv3x3_tile(1, 128, 12, 12) == 0                         # not F(2x2) there
    assert ops.conv3x3_tile(1, 128, 112, 112) == 4                       # 12544 outputs
    assert ops.conv3x3_tile(8, 128, 56, 56) == 0                         # 25088: past the caches
    assert ops.conv3x3_tile(64, 64, 20, 20) == 0


def test_op_rejects_bad_input():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="transformed weights"):
        winograd(x, torch.randn(16, 3, 2), 0, 0)
    with pytest.raises(RuntimeError, match="16 or 36"):
        winograd(x, torch.randn(25, 4, 2), 0, 0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        winograd(x, torch.randn(16, 4, 2, dtype=torch.float64), 0, 0)
    with pytest.raises(RuntimeError, match="smaller than the 3x3 kernel"):
        winograd(torch.randn(1, 4, 2, 5), torch.randn(16, 4, 2), 0, 0)
    with pytest.raises(RuntimeError, match="padding must be >= 0"):
        winograd(x, torch.randn(16, 4, 2), -1, 0)


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    for tile in (2, 4):
        u = ops.winograd_weight(torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64), tile)
        torch.library.opcheck(winograd, (x, u, 1, 0), test_utils=("test_schema", "test_faketensor"))


@contextlib.contextmanager
def winograd_calls():
    """The input shapes of every ``winograd_conv3x3`` call made inside."""
    calls = []
    real = torch.ops.fastacd.winograd_conv3x3

    class Spy:
        default = staticmethod(lambda *a: calls.append(tuple(a[0].shape)) or real.default(*a))

    torch.ops.fastacd.winograd_conv3x3 = Spy
    try:
        yield calls
    finally:
        torch.ops.fastacd.winograd_conv3x3 = real


def _uses_winograd(t, weight, **kw) -> bool:
    with winograd_calls() as calls:
        out = ops.conv2d(t, weight, **kw)
    torch.testing.assert_close(out, F.conv2d(t.double(), weight.double(), None, **kw).to(out.dtype),
                               rtol=1e-4, atol=1e-4 * float(out.detach().abs().max()))
    return bool(calls)


def test_conv2d_chooses_winograd_only_where_it_applies():
    c = ops.WINOGRAD_MIN_CHANNELS
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
    x = torch.randn(2, c, 9, 8)
    with torch.no_grad():
        assert _uses_winograd(x, conv.weight, padding=1)
        assert not _uses_winograd(x, conv.weight, stride=2, padding=1)                   # strided
        assert not _uses_winograd(x[:, :c // 2], conv.weight[:, :c // 2].clone().requires_grad_(False))  # few channels
        assert not _uses_winograd(x, conv.weight.detach().clone())                       # not a parameter
        assert not _uses_winograd(x.double(), nn.Parameter(conv.weight.double()))        # float64: direct
        with ops.direct_convolutions():
            assert not _uses_winograd(x, conv.weight, padding=1)
        assert _uses_winograd(x, conv.weight, padding=1)                                 # scope restored
    # under autograd (CDEP training): direct, so gradients flow
    assert not _uses_winograd(x.requires_grad_(), conv.weight, padding=1)


def test_f4_alone_from_128_channels_on_small_maps():
    """Between WINOGRAD_F4_MIN_CHANNELS and WINOGRAD_MIN_CHANNELS only F(4x4) runs, up to
    WINOGRAD_F4_MAX_OUTPUTS outputs per channel (F(2x2) and large batches lose to oneDNN there)."""
    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False)
    narrow = nn.Conv2d(64, 128, 3, bias=False)
    with torch.no_grad():
        assert _uses_winograd(torch.randn(4, 128, 24, 24), conv.weight, padding=1)      # 144 tiles of 4x4
        assert not _uses_winograd(torch.randn(1, 128, 12, 12), conv.weight, padding=1)  # 9 tiles: F(2x2)
        assert _uses_winograd(torch.randn(1, 128, 64, 64), conv.weight, padding=1)      # 4096 outputs
        assert not _uses_winograd(torch.randn(5, 128, 60, 60), conv.weight, padding=1)  # 18000 outputs
        assert not _uses_winograd(torch.randn(16, 64, 13, 13), narrow.weight)           # 64 channels


def test_transformed_weights_follow_in_place_changes():
    c = ops.WINOGRAD_MIN_CHANNELS
    conv = nn.Conv2d(c, c, 3, bias=False)
    x = torch.randn(1, c, 6, 6)
    with torch.no_grad():
        before = ops.conv2d(x, conv.weight)
        conv.weight.mul_(2)
        after = ops.conv2d(x, conv.weight)
        conv.weight.data = conv.weight.data * 3  # new data, not an in-place change
        swapped = ops.conv2d(x, conv.weight)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped, 6 * before, rtol=1e-5, atol=1e-5)


class WideVGG(nn.Module):
    """3x3 convolutions wide enough for Winograd, with a max-pool, and a linear head."""

    def __init__(self, c=ops.WINOGRAD_MIN_CHANNELS):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(c * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("channels", [ops.WINOGRAD_F4_MIN_CHANNELS, ops.WINOGRAD_MIN_CHANNELS])
def test_engine_with_winograd_against_reference(channels):
    """float32 CD (full and windowed) with Winograd convolutions against the float64 reference,
    and against the same engine with direct convolutions; 128 channels: F(4x4) alone."""
    torch.manual_seed(0)
    model = WideVGG(channels).eval()
    x = torch.randn(1, 3, 16, 16)
    masks = torch.zeros(5, 1, 16, 16)
    for i in range(5):
        masks[i, :, 3 * i:3 * i + 4, 2 * i:2 * i + 5] = 1
    ref = fastacd.Decomposer(model.double(), backend="reference").cd(x.double(), masks.double())
    model.float()
    dec = fastacd.Decomposer(model)
    with torch.no_grad():
        fast = dec.cd(x, masks)
        delta = dec.cd_delta(x, masks[0], masks[1:], max_cost_ratio=float("inf"))
        with ops.direct_convolutions():
            direct = dec.cd(x, masks)
    assert_close_scaled(fast.relevant.double(), ref.relevant, torch.float32)
    assert_close_scaled(delta.relevant.double(), fastacd.Decomposer(model.double(), backend="reference").cd(
        x.double(), torch.maximum(masks[0], masks[1:]).double()).relevant, torch.float32)
    assert_close_scaled(fast.relevant, direct.relevant, torch.float32)
    assert not torch.equal(fast.relevant, direct.relevant)  # the Winograd path did run


def test_totals_are_the_models_own_activations():
    """The total pass never runs Winograd: its rounding moved VGG16's max-pool argmaxes (the
    rules gather at them) and CD scores by 7e-4 of their value with F(4x4). The relevant pass
    still uses Winograd."""
    torch.manual_seed(0)
    model = WideVGG().eval()
    x = torch.randn(2, 3, 16, 16)
    dec = fastacd.Decomposer(model)
    with winograd_calls() as calls, torch.no_grad():
        values, _ = dec._total_pass(x)
        assert not calls
        dec.cd(x[:1], torch.ones(1, 1, 16, 16))
    assert calls
    with torch.no_grad():
        torch.testing.assert_close(values[dec.graph.result_node], model(x), rtol=1e-5, atol=1e-6)

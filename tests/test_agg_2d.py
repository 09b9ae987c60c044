"""fastacd.agg_2d (batched, cached) against fastacd.reference.agg_2d (one mask at a time).

float64 throughout: the components of every level must be identical and every score equal
to the reference's within float64 rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastacd import agg_2d, tiling_2d
from fastacd.train.models import acd_mnist_cnn, digits_28
from fastacd.reference import agg_2d as ref_agg

from models import torchvision_model

RTOL, ATOL = 1e-9, 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")


KEYS = ("scores_list", "im_thresh_list", "comps_list", "comp_scores_raw_list",
        "comp_scores_raw_combined_list", "scores_orig_raw", "num_before_final")


def assert_same_lists(fast: dict, ref: dict):
    assert set(fast) == set(KEYS) == set(ref)
    assert fast["num_before_final"] == ref["num_before_final"]
    for name in ("comps_list", "im_thresh_list"):
        assert len(fast[name]) == len(ref[name]), name
        for i, (a, b) in enumerate(zip(fast[name], ref[name])):
            assert a.shape == b.shape and np.array_equal(a, b), f"{name}[{i}] differs"
    for name in ("scores_list", "comp_scores_raw_combined_list"):
        assert len(fast[name]) == len(ref[name]), name
        for a, b in zip(fast[name], ref[name]):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True)
    np.testing.assert_allclose(fast["scores_orig_raw"], ref["scores_orig_raw"], rtol=RTOL, atol=ATOL)
    assert len(fast["comp_scores_raw_list"]) == len(ref["comp_scores_raw_list"])
    # level 0 holds the whole image's CD (mask of ones). The reference propagates an
    # irrelevant part that is exactly 0; the engine's a - r is 0 only up to rounding, which
    # the bias / batchnorm split rules amplify (~1e-6 on ResNet18). Compared loosely.
    np.testing.assert_allclose(fast["comp_scores_raw_list"][0][0], ref["comp_scores_raw_list"][0][0],
                               rtol=1e-4, atol=1e-5)
    for a, b in zip(fast["comp_scores_raw_list"][1:], ref["comp_scores_raw_list"][1:]):
        assert list(a) == list(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL)


def make_pred_ims(channels_last: bool, batched: bool):
    """A user's ``pred_ims``: numpy image(s) -> model logits, as in the original notebooks."""
    def pred_ims(model, ims):
        t = torch.from_numpy(np.asarray(ims, dtype=np.float64))
        if not batched:
            t = t[None]
        t = t.permute(0, 3, 1, 2) if channels_last else t[:, None]
        with torch.no_grad():
            return model(t.to(next(model.parameters()).dtype)).numpy()
    if batched:
        pred_ims.batched = True
    return pred_ims


def run_both(model, x, im_orig, method, sweep_dim, lab, pct=90, num_iters=3, pred_ims=None,
             backend="auto"):
    stats = {}
    fast = agg_2d.agglomerate(model, pred_ims, pct, method, sweep_dim, im_orig, lab, num_iters=num_iters,
                              im_torch=x, device="cpu", backend=backend, stats=stats)
    unbatched = None
    if pred_ims is not None and getattr(pred_ims, "batched", False):
        unbatched = make_pred_ims(im_orig.ndim == 3, batched=False)
    ref = ref_agg.agglomerate(model, unbatched or pred_ims, pct, method, sweep_dim, im_orig, lab,
                              num_iters=num_iters, im_torch=x, device="cpu")
    assert_same_lists(fast, ref)
    assert stats["scored"] <= stats["requested"]
    return fast, stats


# ---- the ACD MNIST CNN on scikit-learn digits ----------------------------------------------
@pytest.fixture(scope="module")
def mnist(acd_mnist_weights_module):
    model = acd_mnist_cnn(acd_mnist_weights_module).double()
    xs, _ = digits_28(torch.float64)
    return model, xs


@pytest.fixture(scope="module")
def acd_mnist_weights_module():
    from conftest import ACD_MNIST_WEIGHTS
    if not ACD_MNIST_WEIGHTS.exists():
        pytest.skip(f"{ACD_MNIST_WEIGHTS} not present (shared data of the original work)")
    return ACD_MNIST_WEIGHTS


@pytest.mark.parametrize("method,batched", [("cd", False), ("occlusion", False), ("build_up", True)])
def test_mnist_cnn_digits(mnist, method, batched):
    model, xs = mnist
    # a little noise: blank digit backgrounds give exact max-pool ties, which the batched
    # engine (argmax of the true activation) and the reference (argmax of r + i) may break
    # differently; test_mnist_exact_digits covers the noiseless image
    g = torch.Generator().manual_seed(1)
    x = xs[7:8] + 1e-3 * torch.randn(1, 1, 28, 28, generator=g, dtype=torch.float64)
    lab = int(model(x).argmax())
    pred = None if method == "cd" else make_pred_ims(False, batched)
    fast, stats = run_both(model, x, x[0, 0].numpy(), method, 4, lab, pred_ims=pred)
    assert fast["comps_list"][0].shape == (28, 28)          # the original's padding level
    assert fast["comps_list"][1].shape == (7, 7)            # later levels: the grid
    assert np.unique(fast["comps_list"][-1]).size <= 2      # merged down to one blob


def test_mnist_exact_digits_reference_engine(mnist):
    """The noiseless digit through the caching/batching path with the reference engine."""
    model, xs = mnist
    x = xs[3:4]
    run_both(model, x, x[0, 0].numpy(), "cd", 4, int(model(x).argmax()), backend="reference")


# ---- random-init nets at 64x64 --------------------------------------------------------------
def small_vgg():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10)).eval().double()


@pytest.fixture(scope="module")
def image64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)
    return x, x[0].permute(1, 2, 0).numpy().copy()


@pytest.mark.parametrize("method", ["cd", "occlusion", "build_up"])
def test_small_vgg(image64, method):
    x, im = image64
    model = small_vgg()
    lab = int(model(x).argmax())
    pred = None if method == "cd" else make_pred_ims(True, batched=True)
    fast, stats = run_both(model, x, im, method, 8, lab, pct=85, pred_ims=pred)
    assert stats["scored"] < stats["requested"]  # the cache did its job
    assert fast["comps_list"][0].shape == im.shape


@pytest.fixture(scope="module")
def resnet():
    return torchvision_model("resnet18").double()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cd", "occlusion", "build_up"])
def test_resnet18(resnet, image64, method):
    x, im = image64
    lab = int(resnet(x).argmax())
    pred = None if method == "cd" else make_pred_ims(True, batched=method == "build_up")
    run_both(resnet, x, im, method, 16, lab, pct=80, num_iters=2, pred_ims=pred)


def test_input_space_occlusion_without_pred_ims(image64):
    """No pred_ims: occlusion / build-up act on im_torch directly, batched."""
    x, im = image64
    model = small_vgg()
    lab = int(model(x).argmax())
    for method in ("occlusion", "build_up"):
        run_both(model, x, im, method, 8, lab, pct=85, num_iters=2)


# ---- more than 10 components -----------------------------------------------------------------
def test_more_than_ten_components():
    """25 isolated bright spots: the original's correspondence step ran out of numbers here."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[4].weight[0].abs_()
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(1, 1, 28, 28, generator=g, dtype=torch.float64)
    for r in range(0, 14, 3):
        for c in range(0, 14, 3):
            x[0, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 3.0
    fast, _ = run_both(model, x, x[0, 0].numpy(), "cd", 2, 0, pct=87, num_iters=3)
    assert max(int(c.max()) for c in fast["comps_list"]) > 10


# ---- helpers ------------------------------------------------------------------------------
def test_establish_correspondence_semantics():
    old = np.array([[1, 0, 2, 0, 3]])
    # new comp A holds old 1 and 2 (merged: keeps 1), B is new, C holds old 3
    new = np.array([[1, 1, 1, 0, 3], [0, 0, 0, 0, 0], [2, 0, 4, 0, 0]])
    old3 = np.vstack([old, np.zeros((2, 5), int)])
    out = agg_2d.establish_correspondence(old3, new)
    assert out[0, 0] == out[0, 2] == 1 and out[0, 4] == 3
    # free numbers are 2, 4, ...; the last new component takes the smallest, as in the original
    assert out[2, 2] == 2 and out[2, 0] == 4


def test_establish_correspondence_many():
    seg1 = np.zeros((1, 60), int)
    seg1[0, ::4] = np.arange(1, 16)
    seg2 = np.zeros((1, 60), int)
    seg2[0, ::4] = np.arange(1, 16)
    seg2[0, 2::4] = np.arange(16, 31)
    out = agg_2d.establish_correspondence(seg1, seg2)
    assert np.array_equal(out[0, ::4], np.arange(1, 16))
    assert sorted(out[0, 2::4]) == list(range(16, 31))


def test_threshold_and_smooth():
    s = np.arange(16, dtype=float).reshape(4, 4)
    assert agg_2d.threshold_scores(s, 90, "cd").sum() == 2
    s[:2] = np.nan  # half picked: the percentile drops by 15
    assert agg_2d.threshold_scores(s, 90, "cd").sum() == np.sum(s[2:] >= np.nanpercentile(s, 75))
    old = np.zeros((3, 3), bool)
    old[0, 1] = old[1, 0] = old[1, 2] = True
    out = agg_2d.smooth_im_thresh(old, np.zeros((3, 3), bool))
    assert out[1, 1] and not out[0, 0]
    with pytest.raises(ValueError, match="NaN"):
        agg_2d.threshold_scores(np.full((2, 2), np.nan), 50)


def test_tiles_match_the_original_layout():
    im = np.arange(7 * 5, dtype=float).reshape(7, 5) + 1
    tiles = tiling_2d.gen_tiles(im, method="occlusion", sweep_dim=3)
    assert tiles.shape == (6, 7, 5)
    assert (tiles[5][6:, 3:] == 0).all() and (tiles[5][:6] == im[:6]).all()
    comp = np.zeros((3, 2), bool)
    comp[1, 0] = True
    binary = tiling_2d.gen_tile_from_comp(im, comp, 3, "cd")
    ims, idxs = tiling_2d.gen_tiles_around_baseline(im, binary, method="build_up", sweep_dim=3)
    assert idxs == [(0, 0), (1, 1), (2, 0)]
    assert (ims[1][3:6, :] == im[3:6, :]).all() and ims[1][:3].sum() == 0
    a = tiling_2d.gen_tile_from_comp(im, comp, 3, "occlusion")
    b = tiling_2d.gen_tile_from_comp(im, ~comp, 3, "occlusion")
    assert (tiling_2d.combine_tiles(a, b, "occlusion", im_orig=im) == 0).all()
    assert (tiling_2d.combine_tiles(a, b, "occlusion") == 0).all()


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(lab_num=10), "lab_num"),
    (dict(lab_num=-1), "lab_num"),
    (dict(lab_num=True), "lab_num"),  # a bool is an int: read as class 1 otherwise
    (dict(sweep_dim=40), "larger than the image"),
    (dict(sweep_dim=0), "sweep_dim"),
    (dict(percentile_include=101), "percentile_include"),
    (dict(percentile_include=-5), "percentile_include"),
    (dict(method="gradient"), "method"),
])
def test_bad_input(kwargs, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)).eval()
    x = torch.randn(1, 1, 28, 28)
    args = dict(percentile_include=90, method="cd", sweep_dim=4, lab_num=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        agg_2d.agglomerate(model, None, args["percentile_include"], args["method"], args["sweep_dim"],
                           x[0, 0].numpy(), args["lab_num"], num_iters=1, im_torch=x)


@pytest.mark.parametrize("method", ["occlusion", "build_up"])
def test_bad_pred_ims_output_is_named(method):
    """pred_ims returning (C,) was read as one class ("lab_num must be in 0..0"), NaN scores as
    "everything is already selected"; both now say what pred_ims returned."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 14 * 14, 3)).eval()
    im = np.random.default_rng(0).standard_normal((16, 16))
    run = lambda pred, **kw: agg_2d.agglomerate(model, pred, 90, method, 4, im, 1, num_iters=1, **kw)
    with pytest.raises(ValueError, match=r"pred_ims must return \(1, num_classes\) .* got shape \(3,\)"):
        run(lambda m, x: np.zeros(3))
    with pytest.raises(ValueError, match=r"batched pred_ims must return \(N, num_classes\)"):
        run(lambda m, xs: np.zeros(3), pred_ims_batched=True)
    with pytest.raises(ValueError, match="NaN or Inf.*from pred_ims"):
        run(lambda m, x: np.full((1, 3), np.nan))
    assert len(run(lambda m, x: np.asarray([[0.0, float(x.sum()), 1.0]]))["comps_list"]) > 1


def test_zero_tol_reaches_the_scores():
    """``zero_tol`` goes to the engine: 0 scores the tiles with the published formula (the
    original's numbers), the default with numerical zero; on AlexNet they differ."""
    import fastacd
    torch.manual_seed(0)
    model = torchvision_model("alexnet").eval()
    x = torch.randn(1, 3, 64, 64)
    im = x[0].permute(1, 2, 0).numpy()
    tiles = torch.as_tensor(np.stack(tiling_2d.gen_tiles(im[..., 0], fill=0, method="cd", sweep_dim=16)))
    scores = {}
    for tol in (0.0, fastacd.rules.ZERO_TOL):
        lists = agg_2d.agglomerate(model, None, 90, "cd", 16, im, 0, num_iters=1, im_torch=x, zero_tol=tol)
        with torch.no_grad():
            want = fastacd.reference.cd(model, x, tiles[:, None].float(), zero_tol=tol)[0]
        np.testing.assert_allclose(lists["scores_orig_raw"], want.numpy(), rtol=1e-4, atol=1e-6)
        scores[tol] = lists["scores_orig_raw"]
        h = fastacd.hierarchy(model, x, 0, sweep_dim=16, num_iters=1, percentile_include=90, zero_tol=tol)
        assert h.params["zero_tol"] == tol
    assert np.abs(scores[0.0] - scores[fastacd.rules.ZERO_TOL]).max() > 1e-3 * np.abs(scores[0.0]).max()

"""fastacd.hierarchy: the tree agrees with the drop-in lists, JSON round-trips, plots render."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastacd import agg_2d
from fastacd.image.hierarchy import Hierarchy, hierarchy


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net_and_image():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 5), nn.LogSoftmax(dim=1)).double().eval()
    g = torch.Generator().manual_seed(0)
    # a smooth image, so that superpixels have something to follow
    small = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    return model, torch.nn.functional.interpolate(small, size=32, mode="bilinear")


def test_tree_matches_dropin_lists(net_and_image):
    model, x = net_and_image
    h = hierarchy(model, x, sweep_dim=4, percentile_include=85, num_iters=3)
    lists = agg_2d.agglomerate(model, None, 85, "cd", 4, x[0].permute(1, 2, 0).numpy(), h.label,
                               num_iters=3, im_torch=x)
    assert h.label == int(model(x).argmax())
    levels = h.levels()
    assert len(levels) == h.num_levels == len(lists["comps_list"]) - 1
    for level, comps, raw in zip(levels, lists["comps_list"][1:], lists["comp_scores_raw_list"][1:]):
        assert sorted(n.component for n in level) == sorted(int(k) for k in raw)
        for node in level:
            assert np.array_equal(h.unit_mask(node), comps == node.component)
            assert node.score == pytest.approx(float(raw[node.component][h.label]), rel=1e-12)
    # children are the blobs of the level below inside the node; every level partitions its blobs
    for lower, upper in zip(levels, levels[1:]):
        for node in upper:
            kids = [h.node(c) for c in node.children]
            assert all(set(k.units) <= set(node.units) for k in kids)
    assert len(h.roots()) == 1
    assert h.stats["scored"] <= h.stats["requested"]


def test_json_round_trip_and_plot(net_and_image):
    model, x = net_and_image
    h = hierarchy(model, x, sweep_dim=4, percentile_include=85, num_iters=2)
    s = h.to_json()
    h2 = Hierarchy.from_json(s)
    assert h2.to_json() == s
    assert [n.units for n in h2.nodes] == [n.units for n in h.nodes]
    assert np.array_equal(h2.mask(h2.nodes[-1]), h.mask(h.nodes[-1]))
    fig = h2.plot()
    assert len(fig.axes) == h.num_levels
    fig.canvas.draw()


@pytest.mark.parametrize("base", ["slic", "felzenszwalb"])
def test_superpixel_bases(net_and_image, base):
    model, x = net_and_image
    h = hierarchy(model, x, base=base, percentile_include=80, num_iters=2,
                  segment_kwargs={"n_segments": 24} if base == "slic" else None)
    assert h.segments.shape == (32, 32)
    leaf_units = {u for n in h.levels()[0] for u in n.units}
    assert leaf_units <= set(range(int(h.segments.max()) + 1))
    # every node's mask is a union of whole segments
    for n in h.nodes:
        m = h.mask(n)
        assert np.array_equal(np.unique(h.segments[m]), np.sort(n.units))
    h2 = Hierarchy.from_json(h.to_json())
    assert len(h2.plot().axes) == h.num_levels


def test_superpixel_scores_are_cd_of_the_union(net_and_image):
    """A node's score is the CD of its pixel mask, checked with the reference CD."""
    from fastacd.reference import cd as reference_cd
    model, x = net_and_image
    h = hierarchy(model, x, base="slic", percentile_include=80, num_iters=2, segment_kwargs={"n_segments": 16})
    for node in h.levels()[0][:2] + h.roots():
        rel, _ = reference_cd(model, x, torch.from_numpy(h.mask(node)).double())
        np.testing.assert_allclose(node.class_scores, rel[0].detach().numpy(), rtol=1e-9, atol=1e-10)


def test_corrected_adds_the_last_selection(net_and_image):
    model, x = net_and_image
    faithful = hierarchy(model, x, sweep_dim=4, percentile_include=85, num_iters=2)
    fixed = hierarchy(model, x, sweep_dim=4, percentile_include=85, num_iters=2, corrected=True)
    assert fixed.num_grow_levels == faithful.num_grow_levels + 1
    # the extra level's blobs cover the final selection, a superset of the earlier blobs
    last_grow = fixed.levels()[fixed.num_grow_levels - 1]
    covered = set().union(*(n.units for n in last_grow))
    assert covered >= set().union(*(n.units for n in faithful.levels()[faithful.num_grow_levels - 1]))


def test_occlusion_and_build_up(net_and_image):
    model, x = net_and_image
    for method in ("occlusion", "build_up"):
        h = hierarchy(model, x, sweep_dim=8, percentile_include=80, num_iters=2, method=method)
        assert h.method == method and len(h.roots()) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(label=7), r"label must be a class index in 0\.\.4"),
    (dict(sweep_dim=64), "larger than the image"),
    (dict(percentile_include=150), "percentile_include"),
    (dict(base="quadtree"), "base"),
])
def test_bad_input(net_and_image, kwargs, match):
    model, x = net_and_image
    with pytest.raises(ValueError, match=match):
        hierarchy(model, x, **{"sweep_dim": 8, **kwargs})


def test_logits_module_drops_the_trailing_softmax(net_and_image):
    """occlusion / build-up without pred_ims score logits, batched: the model minus its log-softmax."""
    from fastacd.api import decomposer_for
    model, x = net_and_image
    batch = torch.cat([x, 2 * x, -x])
    logits = agg_2d.logits_module(decomposer_for(model).graph)(batch)
    with torch.no_grad():
        expected = model[:-1](batch)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_hierarchy_does_not_keep_the_model_alive():
    """``hierarchy`` caches a Decomposer per model (``fastacd.api.decomposer_for``); the cache
    must not keep the model alive once the caller drops it (it did: the cached Decomposer
    held the model, the key of its own weak dictionary). A Decomposer from the cache still
    works while the model lives, and says so when it is gone."""
    import gc
    import weakref

    from fastacd.api import decomposer_for
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    ref = weakref.ref(model)
    h = hierarchy(model, torch.randn(1, 3, 8, 8), sweep_dim=2, num_iters=1)
    assert h.num_levels >= 1
    dec = decomposer_for(model)
    assert dec.model is model and dec.forward(torch.randn(1, 3, 8, 8)).shape == (1, 3)
    del model, h
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError, match="model has been freed"):
        dec.model

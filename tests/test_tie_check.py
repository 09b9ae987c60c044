"""Decisions in float32 for a bf16 ACD run (``agg_2d.TieCheck``): with scores that are exact
plus an error, the hierarchy equals the exact one; with the error alone it does not."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastacd import agg_2d
from fastacd.api import _DECOMPOSERS
from fastacd.image.agg_2d import Scorer, TieCheck, TileUnits, run_iterations, run_merges

GRID = 8


class FakeScorer:
    """Rows (1, 2) for unit masks: class 1 scores a mask by tile weights plus a pair bonus for
    neighbouring tiles (an interaction, so merges matter), optionally plus a fixed
    pseudo-random error per mask (what bf16 adds), and an ``exact`` twin without it."""

    def __init__(self, weights, noise=0.0, exact=None):
        self.weights, self.noise, self.exact = weights, noise, exact
        self.ties = None  # what agg_2d.TieCheck.of keeps on a scorer
        self.scored = 0
        self.asked: list = []

    def value(self, m) -> float:
        m = np.asarray(m, dtype=bool)
        pairs = (m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum()
        v = float((self.weights * m).sum() + 0.01 * pairs)
        if self.noise:
            seed = int.from_bytes(np.packbits(m).tobytes()[:8].ljust(8, b"\0"), "little") % (2 ** 32)
            v += self.noise * np.random.default_rng(seed).standard_normal()
        return v

    def __call__(self, cands):
        rows = []
        for c in cands:
            m = np.ones((GRID, GRID), bool) if isinstance(c, str) else c
            rows.append([0.0, self.value(m)])
            self.asked.append(c)
        self.scored += len(cands)
        return np.asarray(rows)


def hierarchy(scorer):
    units = TileUnits((GRID * 2, GRID * 2), 2)
    lists = run_iterations(units, scorer, 90, "cd", 1, 3, (GRID * 2, GRID * 2))
    return run_merges(lists, scorer, 1)["comps_list"]


def test_noisy_scores_with_exact_decisions_give_the_exact_hierarchy():
    rng = np.random.default_rng(0)
    # many near ties: weights spaced far below the error
    weights = 1.0 + 1e-3 * rng.standard_normal((GRID, GRID))
    exact = hierarchy(FakeScorer(weights))
    alone = hierarchy(FakeScorer(weights, noise=3e-3))
    checked = FakeScorer(weights, noise=3e-3, exact=FakeScorer(weights))
    with_ties = hierarchy(checked)
    assert not all(np.array_equal(a, b) for a, b in zip(exact, alone)) or len(exact) != len(alone)
    assert len(with_ties) == len(exact)
    for a, b in zip(exact, with_ties):
        np.testing.assert_array_equal(a, b)
    assert checked.exact.scored > 0


class ExactOf:
    """A scorer holder whose float32 scorer gives ``values[i]`` for the one-hot mask of unit i."""

    def __init__(self, values):
        self.exact = lambda masks: np.asarray([[0.0, values[int(np.flatnonzero(m)[0])]] for m in masks])


def test_threshold_checks_only_values_near_it():
    exact_vals = np.arange(20, dtype=np.float64)  # 0..19, clear gaps of 1
    noisy = exact_vals + np.where(np.arange(20) % 2, 0.05, -0.05)

    ties = TieCheck(ExactOf(exact_vals), 1)
    singles = [np.eye(1, 20, i, dtype=bool)[0] for i in range(20)]
    ties.sources = {i: [(singles[i], ())] for i in range(20)}
    scores, sel = ties.threshold(noisy.copy(), 90)
    np.testing.assert_array_equal(sel, exact_vals >= np.percentile(exact_vals, 90))
    assert ties.err == pytest.approx(0.05)
    # the threshold is 17.1: the NEAREST below it (14..17) and the two above (18, 19); nothing
    # else lies within 3 x 0.05 of it
    assert sorted(ties.known) == list(range(17 - TieCheck.NEAREST + 1, 20))
    assert np.all(scores[sorted(ties.known)] == exact_vals[sorted(ties.known)])


class ExactAndRows(ExactOf):
    """ExactOf with the bf16 rows a Scorer keeps (``cache``): unit i's row has largest |value|
    ``scales[i]``."""

    def __init__(self, values, scales):
        super().__init__(values)
        self.cache = {Scorer.key(np.eye(1, len(values), i, dtype=bool)[0]): np.array([0.0, scales[i]])
                      for i in range(len(values))}


def test_margins_follow_each_values_scale():
    """bf16's error grows with the outputs' size (a blob's ~10x a tile's on VGG16): each value's
    margin is the error ratio seen times its own scale, so one large error on a large value does
    not send every small value near the threshold to float32. The selection is float32's."""
    exact_vals = np.arange(20, dtype=np.float64)
    noisy = exact_vals + np.where(np.arange(20) % 2, 0.01, -0.01)
    noisy[19] += 5.0                                   # a large value, 5% of its scale off
    scales = np.ones(20)
    scales[19] = 100.0
    singles = [np.eye(1, 20, i, dtype=bool)[0] for i in range(20)]
    for holder, checked in ((ExactAndRows(exact_vals, scales), range(14, 20)), (ExactOf(exact_vals), range(3, 20))):
        ties = TieCheck(holder, 1)
        ties.sources = {i: [(singles[i], ())] for i in range(20)}
        scores, sel = ties.threshold(noisy.copy(), 90)
        np.testing.assert_array_equal(sel, exact_vals >= np.percentile(exact_vals, 90))
        # the seed (the NEAREST on each side of 17.1) sees the 5.01 error: ratio 0.05 gives the
        # unit-scale values a margin of 0.15, nothing near; one error for all (no rows): 15, down to 3
        assert sorted(ties.known) == list(checked)
        assert ties.err == pytest.approx(5.01)
    assert TieCheck(ExactAndRows(exact_vals, scales), 1)._scales([[(singles[19], (singles[3],))]]) == [100.0]


def test_best_pair_by_exact_scores():
    values = np.array([1.0, 2.0, 2.004, 1.999, 0.5])     # noisy: index 2 looks best
    truth = np.array([1.0, 2.003, 2.0, 1.998, 0.5])      # exact: index 1 is
    masks = [np.eye(1, 5, i, dtype=bool)[0] for i in range(5)]

    ties = TieCheck(ExactOf(truth), 1)
    assert ties.best(values, [[(m, ())] for m in masks]) == (1, True)


def test_agglomerate_bf16_decisions_match_float32_on_a_cnn():
    """A small random CNN: bf16 with exact decisions gives float32's hierarchy; the float32
    scorer ran (some candidates, not all)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 16 * 16, 5)).eval()
    x = torch.randn(1, 3, 32, 32)
    im = x[0].permute(1, 2, 0).numpy()
    lab = int(model(x).argmax())
    kw = dict(num_iters=4, im_torch=x)
    f32 = agg_2d.agglomerate(model, None, 90, "cd", 4, im, lab, **kw)
    stats = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a CPU without fast bf16 warns once
        b16 = agg_2d.agglomerate(model, None, 90, "cd", 4, im, lab, precision="bf16", stats=stats, **kw)
    assert 0 < stats["scored_exact"] < stats["scored"]
    # the float32 checks reuse the float32 run's Decomposer ("auto" is the backend it resolves to)
    assert sorted(k[1] for k in _DECOMPOSERS[model][1]) == ["bf16", "float32"]
    assert len(b16["comps_list"]) == len(f32["comps_list"])
    for a, b in zip(f32["comps_list"], b16["comps_list"]):
        np.testing.assert_array_equal(a, b)
    stats = {}
    agg_2d.agglomerate(model, None, 90, "cd", 4, im, lab, precision="bf16", exact_decisions=False, stats=stats, **kw)
    assert stats["scored_exact"] == 0
    # float32 runs never build the second scorer
    stats = {}
    agg_2d.agglomerate(model, None, 90, "cd", 4, im, lab, stats=stats, **kw)
    assert stats["scored_exact"] == 0



def test_exact_decisions_for_bf16_everywhere_and_tf32_on_a_gpu():
    """Which runs get a float32 Decomposer for their near ties: bf16 on any device, TF32 only on
    a GPU (on the CPU "tf32" is float32 already; on an H200 TF32 alone kept 1 of 19 levels of
    a VGG16 hierarchy, docs/gpu_check.md), never float32, occlusion or exact_decisions=False."""
    from fastacd.api import decomposer_for
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)).eval()
    cpu = torch.zeros(1, 3, 6, 6)
    gpu = type("OnCuda", (), {"device": torch.device("cuda")})()  # only the device is read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf32 / bf16 without the hardware warn once
        dec = {p: decomposer_for(model, precision=p) for p in ("float32", "bf16", "tf32")}
    exact = decomposer_for(model, precision="float32")
    assert agg_2d.exact_decomposer(dec["bf16"], "cd", True, cpu) is exact
    assert agg_2d.exact_decomposer(dec["bf16"], "cd", True, gpu) is exact
    assert agg_2d.exact_decomposer(dec["tf32"], "cd", True, gpu) is exact
    assert agg_2d.exact_decomposer(dec["tf32"], "cd", True, cpu) is None
    assert agg_2d.exact_decomposer(dec["float32"], "cd", True, gpu) is None
    assert agg_2d.exact_decomposer(dec["bf16"], "cd", False, cpu) is None
    assert agg_2d.exact_decomposer(dec["bf16"], "occlusion", True, cpu) is None
    assert agg_2d.exact_decomposer(None, "cd", True, None) is None

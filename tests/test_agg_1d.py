"""1-D agglomeration: the fast (batched, cached) agg_1d against the one-phrase reference,
the original's helper semantics (threshold, tiles, collapse_tree), and a trained toy model."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastacd import agg_1d, tiling_1d
from fastacd import text as ft
from fastacd.reference import text as rt
from fastacd.text.sentiment_toy import NEG, POS, toy_model

KEYS = ("scores_list", "mask_list", "comps_list", "comp_scores_list", "score_orig")


class TextModel(nn.Module):
    def __init__(self, vocab=60, embed=8, hidden=12, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden_dim = hidden
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden)
        self.hidden_to_label = nn.Linear(hidden, 2)
        with torch.no_grad():
            self.hidden_to_label.weight.mul_(10)  # spread the word scores

    def forward(self, batch):
        out, _ = self.lstm(self.embed(getattr(batch, "text", batch)))
        return self.hidden_to_label(out[-1])


def assert_same_hierarchy(fast, ref, rel=1e-10):
    """Identical masks and components; scores equal to ``rel`` of their scale."""
    assert set(fast) == set(KEYS) == set(ref)
    for key in ("mask_list", "comps_list"):
        assert len(fast[key]) == len(ref[key]), key
        for a, b in zip(fast[key], ref[key]):
            assert np.array_equal(a, b), key
    scale = max(np.nanmax(np.abs(s)) if not np.isnan(s).all() else 0 for s in ref["scores_list"])
    assert len(fast["scores_list"]) == len(ref["scores_list"])
    for a, b in zip(fast["scores_list"], ref["scores_list"]):
        assert np.array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a, b, rtol=rel, atol=rel * scale)
    assert len(fast["comp_scores_list"]) == len(ref["comp_scores_list"])
    for a, b in zip(fast["comp_scores_list"], ref["comp_scores_list"]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=rel, atol=rel * scale)
    np.testing.assert_allclose(fast["score_orig"], ref["score_orig"], rtol=rel, atol=rel * scale)


# ------------------------------------------------------------------ fast == reference


@pytest.mark.parametrize("seed,T,percentile,subtract,absolute,label", [
    (0, 15, 50, True, True, 0), (1, 12, 70, True, True, 1), (2, 9, 40, False, True, 1),
    (3, 15, 60, True, False, 0), (4, 1, 50, True, True, 0), (5, 2, 50, True, True, 1)])
def test_fast_cd_agglomeration_equals_reference(seed, T, percentile, subtract, absolute, label):
    model = TextModel(seed=seed).double().eval()
    gen = torch.Generator().manual_seed(seed)
    batch = ft.Batch(torch.randint(1, 60, (T,), generator=gen))
    kw = dict(num_iters=5, subtract=subtract, absolute=absolute)
    fast = agg_1d.agglomerate(model, batch, percentile, "cd", 1, label, **kw)
    ref = rt.agglomerate_1d(model, batch, percentile, "cd", 1, label, **kw)
    assert_same_hierarchy(fast, ref)
    # collapse_tree on identical inputs gives identical levels
    cf, cr = agg_1d.collapse_tree(fast), agg_1d.collapse_tree(ref)
    assert len(cf["comps_list"]) == len(cr["comps_list"])
    for a, b in zip(cf["comps_list"], cr["comps_list"]):
        assert np.array_equal(a, b)


def test_fast_cd_agglomeration_float32_model_and_token_zero():
    # float32 weights (CD computed in float64, as the original); token id 0 inside the
    # sentence (the original read phrases from non-zero ids and would mis-read it)
    model = TextModel(seed=7).eval()
    batch = ft.Batch(torch.tensor([5, 0, 12, 33, 0, 7, 41, 2, 0, 19]))
    fast = agg_1d.agglomerate(model, batch, 50, "cd", 1, 1, num_iters=8)
    ref = rt.agglomerate_1d(model, batch, 50, "cd", 1, 1, num_iters=8)
    assert_same_hierarchy(fast, ref)


@pytest.mark.parametrize("method", ["occlusion", "build_up"])
def test_fast_model_agglomeration_equals_reference(method):
    model = TextModel(seed=8).double().eval()
    batch = ft.Batch(torch.randint(1, 60, (12,), generator=torch.Generator().manual_seed(8)))
    fast = agg_1d.agglomerate(model, batch, 50, method, 1, 0)
    ref = rt.agglomerate_1d(model, batch, 50, method, 1, 0)
    assert_same_hierarchy(fast, ref)


def test_each_step_is_one_call_and_no_phrase_is_scored_twice(monkeypatch):
    model = TextModel(seed=9).double().eval()
    batch = ft.Batch(torch.randint(1, 60, (15,), generator=torch.Generator().manual_seed(9)))
    seen, calls = [], []
    orig = ft.TextDecomposer.cd

    def spy(self, sent, phrases=None, masks=None):
        calls.append(len(phrases))
        seen.extend(phrases)
        return orig(self, sent, phrases=phrases, masks=masks)

    monkeypatch.setattr(ft.TextDecomposer, "cd", spy)
    lists = agg_1d.agglomerate(model, batch, 50, "cd", 1, 0, num_iters=5)
    steps = len(lists["mask_list"]) - 1
    assert len(calls) <= 1 + steps            # first sweep, then at most one call per step
    assert len(seen) == len(set(seen))        # de-duplicated and cached
    assert calls[0] == 16                     # whole sentence + 15 words in one call


@pytest.mark.parametrize("T", [7, 12, 14])
def test_all_phrases_up_front_and_per_level_calls_agree(monkeypatch, T):
    # short sentences get every phrase scored in the first call; the hierarchy is the same
    model = TextModel(seed=T).double().eval()
    batch = ft.Batch(torch.randint(1, 60, (T,), generator=torch.Generator().manual_seed(T)))
    calls = []
    orig = ft.TextDecomposer.cd

    def spy(self, sent, phrases=None, masks=None):
        calls.append(len(phrases))
        return orig(self, sent, phrases=phrases, masks=masks)

    monkeypatch.setattr(ft.TextDecomposer, "cd", spy)
    monkeypatch.setattr(agg_1d, "ALL_PHRASES_MAX_TOKENS", 0)
    per_level = agg_1d.agglomerate(model, batch, 50, "cd", 1, 0)
    n_per_level = len(calls)
    monkeypatch.setattr(agg_1d, "ALL_PHRASES_MAX_TOKENS", T)
    up_front = agg_1d.agglomerate(model, batch, 50, "cd", 1, 0)
    assert n_per_level > 1 and calls[n_per_level:] == [T * (T + 1) // 2]
    assert_same_hierarchy(up_front, per_level, rel=1e-12)
    assert_same_hierarchy(up_front, rt.agglomerate_1d(model, batch, 50, "cd", 1, 0))


def test_batch_is_not_modified():
    model = TextModel(seed=10).double().eval()
    text = torch.randint(1, 60, (8, 1))
    batch = ft.Batch(text.clone())
    for method in ("cd", "occlusion", "build_up"):
        agg_1d.agglomerate(model, batch, 50, method, 1, 0)
        assert torch.equal(batch.text, text)


def test_bad_arguments():
    model = TextModel().double().eval()
    batch = ft.Batch([1, 2, 3])
    with pytest.raises(ValueError, match="method"):
        agg_1d.agglomerate(model, batch, 50, "gradient", 1, 0)
    with pytest.raises(ValueError, match="sweep_dim=1"):
        agg_1d.agglomerate(model, batch, 50, "cd", 2, 0)
    with pytest.raises(ValueError, match="empty"):
        agg_1d.agglomerate(model, ft.Batch(torch.zeros(0, dtype=torch.long)), 50, "cd", 1, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        agg_1d.agglomerate(model, ft.Batch([1, 99]), 50, "cd", 1, 0)


# ------------------------------------------------------------------ the original's helpers


def test_threshold_scores_rules():
    s = np.arange(10, dtype=float)
    np.testing.assert_array_equal(agg_1d.threshold_scores(s, 80, False), s >= np.percentile(s, 80))
    # absolute value picks the largest magnitudes
    np.testing.assert_array_equal(agg_1d.threshold_scores(np.array([-9., 1, 2, 3, 4, 5, 6]), 90,
                                                          True), [True] + [False] * 6)
    # five or fewer left: fixed percentiles (59, 49, 59, 49, 0), NaN = already picked
    for left, pct in [(5, 59), (4, 49), (3, 59), (2, 49), (1, 0)]:
        v = np.full(8, np.nan)
        v[:left] = np.arange(1.0, left + 1)
        np.testing.assert_array_equal(agg_1d.threshold_scores(v, 99, False),
                                      v >= np.nanpercentile(v, pct))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all picked: no pick and no NaN warning
        assert not agg_1d.threshold_scores(np.full(4, np.nan), 50, True).any()


def test_tiles():
    text = np.array([[4], [7], [9], [2]])
    np.testing.assert_array_equal(tiling_1d.gen_tiles(text, method="cd"), np.diag([4, 7, 9, 2]))
    np.testing.assert_array_equal(tiling_1d.gen_tiles(text, method="occlusion", sweep_dim=2),
                                  [[0, 0, 9, 2], [4, 0, 0, 2], [4, 7, 0, 0]])
    np.testing.assert_array_equal(tiling_1d.gen_tiles(text, method="build_up", sweep_dim=2),
                                  [[4, 7, 0, 0], [0, 7, 9, 0], [0, 0, 9, 2]])
    comp = np.array([False, True, True, False])
    np.testing.assert_array_equal(tiling_1d.gen_tile_from_comp(text, comp, "cd"),
                                  [[0], [7], [9], [0]])
    tiles, lr = tiling_1d.gen_tiles_around_baseline(text, comp, "build_up")
    assert lr == [0, 3]
    np.testing.assert_array_equal(tiles[:, :, 0], [[4, 7, 9, 0], [0, 7, 9, 2]])
    tiles, lr = tiling_1d.gen_tiles_around_baseline(text, np.array([True, False, False, False]),
                                                    "occlusion")
    assert lr == [0, 1]
    np.testing.assert_array_equal(tiles, [[0, 7, 9, 2], [0, 0, 9, 2]])
    assert tiling_1d.tiles_to_cd(ft.Batch(torch.tensor([[0, 3], [5, 0], [6, 4], [0, 0]]))) == \
        ([1, 0], [2, 2])
    with pytest.raises(ValueError, match="method"):
        tiling_1d.gen_tiles(text, method="grad")
    with pytest.raises(ValueError, match="no non-zero"):
        tiling_1d.tiles_to_cd(ft.Batch(torch.zeros(3, 1, dtype=torch.long)))


def test_collapse_tree_hand_built():
    # words 0..5; step 1 picks {1, 2} and {4}; step 2 grows {1, 2} to {1, 2, 3} and keeps {4};
    # step 3 joins everything from 1 to 4 into one
    lists = {"comps_list": [np.zeros(6, dtype=int), np.array([0, 1, 1, 0, 2, 0]),
                            np.array([0, 1, 1, 1, 2, 0]), np.array([0, 1, 1, 1, 1, 0])],
             "comp_scores_list": [{0: 9.0}, {1: 1.0, 2: 2.0}, {1: 3.0, 2: 2.0}, {1: 4.0}]}
    out = agg_1d.collapse_tree(lists)
    assert out is lists  # in place, as the original
    # {1,2} grew out of background 0 (level of comp 0 at the previous step: 0) -> level 0 with
    # a new number (max of arange(6) + 1 = 6); {1,2,3} matches {0, 1} -> level max(0, 0)+1 = 1;
    # {1,2,3,4} matches {1, 2} at step 2 -> levels (1, 0) -> level 2
    np.testing.assert_array_equal(out["comps_list"][0], [0, 6, 6, 3, 4, 5])
    np.testing.assert_array_equal(out["comps_list"][1], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["comps_list"][2], [0, 1, 1, 1, 1, 0])
    assert len(out["comps_list"]) == 3  # the all-zero last level is dropped
    assert out["comp_scores_list"][0] == {0: 0, 6: 1.0}
    assert out["comp_scores_list"][1] == {0: 0, 1: 3.0}
    assert out["comp_scores_list"][2] == {0: 0, 1: 4.0}


def test_collapse_tree_after_zero_iterations_does_not_crash():
    # agglomerate(num_iters=0) leaves one level; the original then indexed past the end
    model = TextModel(seed=12).double().eval()
    lists = agg_1d.agglomerate(model, ft.Batch([3, 4, 5]), 50, "cd", 1, 0, num_iters=0)
    assert len(lists["comps_list"]) == 1
    out = agg_1d.collapse_tree(lists)
    assert len(out["comps_list"]) == 1
    np.testing.assert_array_equal(out["comps_list"][0], [0, 1, 2])


def test_get_scores_1d_drop_in():
    model = TextModel(seed=11).double().eval()
    text = torch.randint(1, 60, (6, 1), generator=torch.Generator().manual_seed(11))
    tiles = torch.from_numpy(tiling_1d.gen_tiles(text.numpy(), method="cd")).T.contiguous()
    got = agg_1d.get_scores_1d(ft.Batch(tiles), model, "cd", 1, False, None, text.numpy(),
                               subtract=True)
    exp = [(lambda r: r[1] - r[0])(rt.cd_text(ft.Batch(text), model, i, i)) for i in range(6)]
    np.testing.assert_allclose(got, exp, rtol=1e-10, atol=1e-12)
    whole = agg_1d.get_scores_1d(ft.Batch(text), model, "cd", 0, True, None, text.numpy())
    np.testing.assert_allclose(whole, [rt.cd_text(ft.Batch(text), model, 0, 5)[0]], rtol=1e-10)


# ------------------------------------------------------------------ the trained toy model


def test_toy_acd_finds_not_good_as_one_negative_unit():
    model, vocab = toy_model()
    batch = vocab.batch("the movie was not good")
    fast = agg_1d.agglomerate(model, batch, 50, "cd", 1, POS)
    ref = rt.agglomerate_1d(model, batch, 50, "cd", 1, POS)
    assert_same_hierarchy(fast, ref)
    words = np.array(vocab.decode(batch.text[:, 0]))
    first = fast["comps_list"][1]
    assert first.max() == 1 and list(words[first == 1]) == ["not", "good"]
    assert fast["comp_scores_list"][1][1] < 0            # the unit is negative ...
    assert fast["scores_list"][0][4] > 0                 # ... while "good" alone is positive
    assert fast["score_orig"] < 0 and NEG == 0

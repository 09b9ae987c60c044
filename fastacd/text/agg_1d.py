"""Agglomerative CD over a sentence (drop-in for ``acd.agg_1d``).

``agglomerate`` builds the hierarchy the way the original does (score every word, keep
the top percentile, grow each selected phrase by one word left or right, repeat) and
returns the same dict. What is faster: every candidate of one step (each component, and
each component plus its left / right neighbour) is scored in one call (one batched LSTM
recurrence for ``cd``, one model call for ``occlusion`` / ``build_up``), and a phrase is
never scored twice (a component that did not grow keeps its cached score).

``collapse_tree`` and ``threshold_scores`` are the original's, with its crashes fixed.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from . import tiling_1d
from ..capture.phrases import Batch, tokens_of
from .dropin import cd_text_phrases
from .lstm import TextDecomposer

METHODS = ("cd", "occlusion", "build_up")


def threshold_scores(scores, percentile_include, absolute):
    """Boolean mask of the scores at or above ``percentile_include`` (NaN = already picked).

    With 5 or fewer scores left the percentile is fixed (59, 49, 59, 49, 0 for 5..1 left)
    so that the last words are picked in small groups, as in the original.
    """
    scores = np.asarray(scores)
    if absolute:
        scores = np.absolute(scores)
    fast = (scores.ndim == 1 and scores.dtype == np.float64 and scores.size <= 256
            and isinstance(percentile_include, (int, float, np.integer, np.floating)))
    if fast:
        left = sorted(v for v in scores.tolist() if v == v)     # NaN != NaN
        num_left = len(left)
    else:
        num_left = scores.size - np.sum(np.isnan(scores))
    if num_left == 0:  # the original gets NaN from nanpercentile (and a warning): no pick
        return np.zeros(scores.shape, dtype=bool)
    if num_left <= 5:
        percentile_include = {5: 59, 4: 49, 3: 59, 2: 49, 1: 0}[int(num_left)]
    if fast:
        thresh = _percentile_of_sorted(left, percentile_include)
    else:
        thresh = np.nanpercentile(scores, percentile_include)
    return scores >= thresh


def _percentile_of_sorted(vals: list, percentile) -> float:
    """``np.nanpercentile`` (method "linear") of the sorted non-NaN float64 values ``vals``
    (a list): the same arithmetic as NumPy's ``_quantile`` / ``_lerp`` on Python floats
    (IEEE doubles, as NumPy's float64 scalars), without its generic machinery: about 20x
    faster on a sentence's scores, and the agglomeration calls it at every step."""
    n = len(vals)
    vi = (n - 1) * (float(percentile) / 100)          # virtual index of the linear method
    if vi >= n - 1:
        return vals[-1]
    prev = math.floor(vi)
    gamma = vi - prev
    a, b = vals[prev], vals[prev + 1]
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1 - gamma)
    return a + diff * gamma


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True of a 1-D mask, left to right, as inclusive (first, last) pairs."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), (edges[1::2] - 1).tolist()))


def _label_1d(mask: np.ndarray) -> np.ndarray:
    """``skimage.measure.label(mask, background=0, connectivity=1)`` of a 1-D boolean mask:
    runs of True numbered 1, 2, ... from the left (int32, as skimage returns)."""
    m = np.asarray(mask, dtype=bool)
    starts = m.copy()
    starts[1:] &= ~m[:-1]
    return (np.cumsum(starts, dtype=np.int32) * m).astype(np.int32)


def _check_args(method, sweep_dim, label, num_classes=None):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if sweep_dim != 1:
        raise ValueError("1-D agglomeration supports sweep_dim=1 only (the original indexes "
                         "words by tile and fails for other values)")
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"label={label} is not a class index of the model's {num_classes} "
                         "outputs")


def _select(scores, label, subtract):
    # the score of the class, minus the score of the other class of a binary task
    if subtract:
        return scores[:, label] - scores[:, int(1 - label)]
    return scores[:, label]


# sentences of up to this many tokens get all their phrases scored in the first engine
# call (see _CDScorer)
ALL_PHRASES_MAX_TOKENS = 12


class _CDScorer:
    """CD scores of phrases of one sentence, cached, many phrases per engine call.

    For a sentence of at most ``ALL_PHRASES_MAX_TOKENS`` tokens the first call scores every
    phrase (T (T + 1) / 2 of them, one batched recurrence with shared prefixes): cheaper
    than the sequence of small calls the agglomeration makes otherwise, whose cost is
    mostly per recurrence step, not per phrase. The scores are the same either way.
    """

    def __init__(self, model, batch):
        self.dec = TextDecomposer.from_model(model, dtype=torch.float64)
        with torch.no_grad():
            self.sent = self.dec.prepare(batch, keep_states=True)
        self.cache: dict[tuple[int, int], np.ndarray] = {}
        self.calls = 0
        T = self.sent.length
        self.extra = ([(s, e) for s in range(T) for e in range(s, T)]
                      if T <= ALL_PHRASES_MAX_TOKENS else [])

    def __call__(self, spans) -> np.ndarray:
        missing = list(dict.fromkeys(s for s in spans if s not in self.cache))
        if missing and self.extra:
            missing = list(dict.fromkeys(missing + self.extra))
            self.extra = []
        if missing:
            with torch.no_grad():
                rel = self.dec.cd(self.sent, phrases=missing).relevant.cpu().numpy()
            self.cache.update(zip(missing, rel))
            self.calls += 1
        return np.array([self.cache[s] for s in spans])


class _ModelScorer:
    """The model's outputs on tiles of one sentence, cached, many tiles per model call."""

    def __init__(self, model, batch, method, device):
        self.model, self.batch, self.method = model, batch, method
        self.text = tokens_of(batch).cpu().numpy()
        self.device = device
        self.cache: dict[bytes, np.ndarray] = {}
        self.calls = 0

    def _run(self, cols):
        b = copy.copy(self.batch)  # the caller's batch is never modified
        b.text = torch.as_tensor(np.stack(cols, axis=1), dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.model(b).detach().cpu().numpy()

    def original(self):
        return self._run([self.text])

    def __call__(self, tile_masks) -> np.ndarray:
        keys = [np.packbits(m).tobytes() for m in tile_masks]
        todo = {}
        for k, m in zip(keys, tile_masks):
            if k not in self.cache and k not in todo:
                todo[k] = (np.where(m, 0, self.text) if self.method == "occlusion"
                           else np.where(m, self.text, 0))
        if todo:
            out = self._run(list(todo.values()))
            self.cache.update(zip(todo.keys(), out))
            self.calls += 1
        return np.array([self.cache[k] for k in keys])


def agglomerate(model, batch, percentile_include, method, sweep_dim, label, num_iters=5,
                subtract=True, absolute=True, device=None):
    """Hierarchical interpretation of one sentence (drop-in for ``acd.agg_1d.agglomerate``).

    model: for ``cd``, a text model fastacd can decompose (``.embed``, ``.lstm``,
        ``.hidden_to_label`` as in the original, or see ``TextDecomposer.from_model``); for
        ``occlusion`` / ``build_up``, any model called as ``model(batch)`` on a batch whose
        ``.text`` is (seq_len, N) token ids (0 = blank word), returning (N, num_classes).
    batch: ``.text`` (seq_len, 1) token ids; it is not modified (the original overwrote it).
    label: the class explained; with ``subtract`` the score is class ``label`` minus class
        ``1 - label`` (binary tasks, as the original).
    device: where tiles are put for the model (default: ``batch.text``'s device).

    Returns the original's dict: ``scores_list``, ``mask_list``, ``comps_list``,
    ``comp_scores_list``, ``score_orig``.
    """
    _check_args(method, sweep_dim, label)
    L = tokens_of(batch).shape[0]
    if method == "cd":
        scorer = _CDScorer(model, batch)
        # the whole sentence and every word in one call
        first = scorer([(0, L - 1)] + [(i, i) for i in range(L)])
        score_orig = _select(first[:1], label, subtract)[0]
        scores = _select(first[1:], label, subtract)
        score_phrases = lambda spans: _select(scorer(spans), label, subtract)  # noqa: E731
    else:
        dev = device if device is not None else batch.text.device
        scorer = _ModelScorer(model, batch, method, dev)
        score_orig = _select(scorer.original(), label, subtract)[0]

        def score_tiles(tiles):
            out = scorer(tiles)
            if method == "occlusion":
                out = score_orig - out
            return _select(out, label, subtract)

        eye = np.eye(L, dtype=bool)
        scores = score_tiles(list(eye))

    mask = threshold_scores(scores, percentile_include, absolute=absolute)
    scores_list, mask_list, comps_list = [np.copy(scores)], [mask], []
    comp_scores_list = [{0: score_orig}]
    positions = np.arange(L)
    for _ in range(num_iters):
        comps = _label_1d(mask_list[-1])
        # every candidate of this step: each component (a run of picked words, numbered
        # from the left as the labeling does), and it grown left and right
        cands = [(num, lo, hi, max(0, lo - sweep_dim), min(L - 1, hi + sweep_dim))
                 for num, (lo, hi) in enumerate(_runs(mask_list[-1]), start=1)]
        if method == "cd":
            spans = []
            for num, lo, hi, left, right in cands:
                spans += [(lo, hi), (min(lo, left), hi), (lo, max(hi, right))]
            vals = score_phrases(spans)
        else:
            tiles = []
            for num, lo, hi, left, right in cands:
                comp = comps == num
                tiles += [comp, comp | (positions == left), comp | (positions == right)]
            vals = score_tiles(tiles) if tiles else np.zeros(0)
        comp_scores = {}
        for k, (num, lo, hi, left, right) in enumerate(cands):
            s_comp, s_left, s_right = vals[3 * k:3 * k + 3]
            comp_scores[num] = np.copy(s_comp)
            scores[left] = s_left - s_comp
            scores[right] = s_right - s_comp
        scores[mask_list[-1]] = np.nan
        mask = threshold_scores(scores, percentile_include, absolute=absolute)
        scores_list.append(np.copy(scores))
        mask_list.append(mask_list[-1] + mask)
        comps_list.append(comps)
        comp_scores_list.append(comp_scores)
        if np.sum(mask) == 0:
            break
    comps_list = [np.zeros(L, dtype=int)] + comps_list
    return {"scores_list": scores_list, "mask_list": mask_list, "comps_list": comps_list,
            "comp_scores_list": comp_scores_list, "score_orig": score_orig}


def collapse_tree(lists):
    """Levels of the hierarchy from ``agglomerate``'s output (the original's rule).

    Updates ``lists`` in place (``comps_list``, ``comp_scores_list``) and returns it, as the
    original does. A component of one word stays on level 0; a component that grew from one
    earlier component keeps that one's level; one that joined several goes one level above
    the highest of them.
    """
    num_iters = len(lists["comps_list"])
    num_words = len(lists["comps_list"][0])
    comps_list = [np.zeros(num_words, dtype=int) for _ in range(num_iters)]
    comp_scores_list = [{0: 0} for _ in range(num_iters)]
    comp_levels_list = [{0: 0} for _ in range(num_iters)]
    comps_list[0] = np.arange(num_words)
    comp_levels_list[0] = {i: 0 for i in range(num_words)}
    for i in range(1, num_iters):
        comps = lists["comps_list"][i]
        comps_old = lists["comps_list"][i - 1]
        comp_scores = lists["comp_scores_list"][i]
        for comp_num in range(1, np.max(comps) + 1):
            comp = comps == comp_num
            if np.sum(comp) == 1:
                comp_levels_list[i][comp_num] = 0
                continue
            matches = np.unique(comps_old[comp])
            if matches.size == 1:
                level = comp_levels_list[i - 1][matches[0]]
            else:
                level = np.max([comp_levels_list[i - 1][m] for m in matches]) + 1
            comp_levels_list[i][comp_num] = level
            new_comp_num = int(np.max(comps_list[level]) + 1)
            comps_list[level][comp] = new_comp_num
            comp_scores_list[level][new_comp_num] = comp_scores[comp_num]
    # keep the levels that hold a component (the original ran past the end when all did)
    kept = 0
    while kept < len(comps_list) and np.sum(comps_list[kept] > 0):
        kept += 1
    lists["comps_list"] = comps_list[:kept]
    lists["comp_scores_list"] = comp_scores_list[:kept]
    return lists


def get_scores_1d(batch, model, method, label, only_one, score_orig, text_orig, subtract=False,
                  device=None):
    """Drop-in for ``acd.score_funcs.get_scores_1d``: scores of the tiles in ``batch.text``
    ((seq_len, N) token ids; phrases for ``cd`` read from the non-zero ids as the
    original), or of the whole sentence ``text_orig`` when ``only_one``. All CD phrases go
    through one batched call; ``batch`` is not modified.
    """
    if method == "cd":
        if only_one:
            text = tokens_of(batch)
            rel, _ = cd_text_phrases(Batch(text), model, [(0, text.shape[0] - 1)])
        else:
            starts, stops = tiling_1d.tiles_to_cd(batch)
            rel, _ = cd_text_phrases(Batch(torch.as_tensor(np.asarray(text_orig).reshape(-1))),
                                     model, list(zip(starts, stops)))
        scores = rel
    else:
        with torch.no_grad():
            scores = model(batch).detach().cpu().numpy()
        if method == "occlusion" and not only_one:
            scores = score_orig - scores
    return _select(scores, label, subtract)


__all__ = ["agglomerate", "collapse_tree", "threshold_scores", "get_scores_1d"]

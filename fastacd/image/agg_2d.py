"""Agglomerative CD for images: the original ``acd.agg_2d`` on the batched engine.

``agglomerate`` takes the original package's arguments and returns the same dict of lists
(design.md section 3; docs/hierarchies.md lists every deliberate difference). The fast path
differs from the published algorithm only in how the scores are obtained:

* every candidate of one iteration (each component, all components together, each
  component plus each neighbouring tile) is gathered first, duplicates dropped, and the rest
  scored in one engine call (``Decomposer.cd`` for ``cd``, a batched forward pass for
  ``occlusion`` / ``build_up``);
* a per-run cache keyed by the candidate's tile set means no mask is ever scored twice:
  components that did not change between iterations, and in the merge phase every pair
  whose members were not merged in the last round, are read from the cache.

The algorithm itself is written once over "units" (square tiles here; superpixels in
``fastacd.hierarchy``), so the drop-in and the modern API share it.
"""
from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch
from skimage import measure
from tqdm.auto import tqdm

from ..api import decomposer_for
from ..engine.windowed import cd_groups
from ..rules import ZERO_TOL
from . import tiling_2d as tiling
from .steps import (batched, check_args, establish_correspondence, is_batched,  # noqa: F401
                    logits_module, prepare_model_input, refine_scores, selected, smooth_im_thresh,
                    threshold_scores, threshold_value)

_CHUNK = 256  # candidates per engine call: bounds the (M, C, H, W) relevant inputs held at once


# ------------------------------------------------------------------------------------------
# Units: the pieces a hierarchy is made of
# ------------------------------------------------------------------------------------------
class TileUnits:
    """Square tiles of ``sweep_dim`` pixels; state arrays have the grid's shape.

    Components use 8-connectivity (``connectivity=2``) and neighbours are the 4 edge-sharing
    tiles, as in the original.
    """

    def __init__(self, image_hw, sweep_dim: int, connectivity: int = 2):
        self.hw = (int(image_hw[0]), int(image_hw[1]))
        self.sweep_dim = int(sweep_dim)
        self.shape = tiling.grid_shape(self.hw, self.sweep_dim)
        self.connectivity = connectivity

    def singles(self):
        for idx in np.ndindex(*self.shape):
            m = np.zeros(self.shape, dtype=bool)
            m[idx] = True
            yield m

    def label(self, sel):
        return np.copy(measure.label(sel, background=0, connectivity=self.connectivity))

    def neighbours(self, mask):
        return tiling.neighbour_tiles(mask)

    def smooth(self, old, new):
        return smooth_im_thresh(old, new)

    def pixels(self, mask) -> np.ndarray:
        return tiling.upsample(mask, self.sweep_dim, self.hw)


class SegmentUnits:
    """Superpixels given as an (H, W) label image with labels 0..n-1; state arrays are (n,).

    Neighbours are segments sharing a pixel edge; components are connected through the same
    adjacency; smoothing adds a segment with at least 3 selected neighbours (the tile rule).
    """

    def __init__(self, segments: np.ndarray):
        seg = np.asarray(segments)
        _, seg = np.unique(seg, return_inverse=True)
        self.segments = seg.reshape(np.asarray(segments).shape).astype(np.int64)
        self.hw = self.segments.shape
        n = int(self.segments.max()) + 1
        self.shape = (n,)
        adj = np.zeros((n, n), dtype=bool)
        for a, b in ((self.segments[1:], self.segments[:-1]),
                     (self.segments[:, 1:], self.segments[:, :-1])):
            diff = a != b
            adj[a[diff], b[diff]] = True
            adj[b[diff], a[diff]] = True
        self.adj = adj

    def singles(self):
        for i in range(self.shape[0]):
            m = np.zeros(self.shape, dtype=bool)
            m[i] = True
            yield m

    def label(self, sel):
        labels = np.zeros(self.shape, dtype=np.int64)
        k = 0
        for start in np.flatnonzero(sel):
            if labels[start]:
                continue
            k += 1
            labels[start] = k
            stack = [start]
            while stack:
                u = stack.pop()
                for v in np.flatnonzero(self.adj[u] & sel & (labels == 0)):
                    labels[v] = k
                    stack.append(v)
        return labels

    def neighbours(self, mask):
        near = self.adj[mask].any(0) & ~mask
        return [(int(i),) for i in np.flatnonzero(near)]

    def smooth(self, old, new):
        im = np.logical_or(old, new)
        count = self.adj[:, im].sum(1)
        return im | (~im & (count >= 3))

    def pixels(self, mask) -> np.ndarray:
        return np.asarray(mask)[self.segments]


# ------------------------------------------------------------------------------------------
# Scoring with a per-run cache
# ------------------------------------------------------------------------------------------
class OcclusionSum:
    """The original's "all components combined" image for occlusion: the SUM of the images
    with each component occluded (a quirk kept in the drop-in)."""

    def __init__(self, masks):
        self.masks = tuple(masks)

    def key(self):
        return ("occlusion_sum",) + tuple(m.tobytes() for m in self.masks)


FULL = "full"  # candidate: the unmodified input (score = the model's output, never negated)


def _numpy_rows(out) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    return np.asarray(out)


class Scorer:
    """Scores of candidates (unit masks) for one image, each candidate scored at most once.

    ``requested`` counts candidates asked for (what the one-mask-at-a-time reference scores),
    ``scored`` the distinct ones actually sent to the model, ``calls`` the engine calls,
    ``windowed`` how many of the scored went through windowed propagation (``cd`` only).

    For ``cd`` (with ``windowed=True``, the default) a candidate that extends an earlier or
    simultaneous candidate (its "base": a component for component-plus-tile, the empty mask
    for a single tile, one member for a merge-phase union) is scored with
    ``Decomposer.cd_delta``: the base propagated once per group, each candidate only inside
    the receptive field of what it adds (docs/engine.md, "Windowed propagation"). The
    numbers are those of ``Decomposer.cd``.
    """

    def __init__(self, units, method, model, *, dec=None, x=None, im_orig=None, pred_ims=None,
                 pred_ims_batched=False, progress=False, windowed=True, exact_dec=None):
        self.units, self.method, self.model = units, method, model
        # float32 scores for the candidates a reduced-precision run's decisions hinge on (TieCheck)
        self.exact = None if exact_dec is None else Scorer(units, method, model, dec=exact_dec, x=x,
                                                           windowed=windowed)
        self.ties = None  # TieCheck.of
        self.dec, self.x, self.im_orig, self.pred_ims = dec, x, im_orig, pred_ims
        self.pred_ims_batched = pred_ims_batched
        self.cache: dict = {}
        self.requested = self.scored = self.calls = self.windowed = 0
        self.progress = progress
        self.use_windowed = windowed
        self._known: list[np.ndarray] = []  # unit masks scored so far (possible bases)
        self._totals: dict = {}              # the image's total pass, reused by every call
        self._logits = None

    @staticmethod
    def key(cand):
        if isinstance(cand, str):
            return (cand,)
        if isinstance(cand, OcclusionSum):
            return cand.key()
        return (cand.tobytes(),)

    def __call__(self, cands) -> np.ndarray:
        keys = [self.key(c) for c in cands]
        self.requested += len(cands)
        todo = {}
        for k, c in zip(keys, cands):
            if k not in self.cache and k not in todo:
                todo[k] = c
        if todo:
            self.scored += len(todo)
            rows = self._score(list(todo.values()))
            for k, row in zip(todo, rows):
                self.cache[k] = row
        return np.stack([self.cache[k] for k in keys])

    # ---- the model calls ----------------------------------------------------------------
    def _score(self, cands) -> np.ndarray:
        if self.method == "cd" and self.use_windowed and self.x is not None and self.x.dim() == 4:
            return self._score_cd_grouped(cands)
        out = []
        bar = tqdm(total=len(cands), disable=not self.progress, leave=False, desc="scoring")
        for s in range(0, len(cands), _CHUNK):
            chunk = cands[s:s + _CHUNK]
            self.calls += 1
            out.append(self._score_cd(chunk) if self.method == "cd" else self._score_images(chunk))
            bar.update(len(chunk))
        bar.close()
        return np.concatenate(out)

    def _bases(self, masks: list[np.ndarray]) -> list[int | None]:
        """For each mask, the index (into known + masks) of its base: among its strict subsets
        in the masks scored so far and those scored now, the one sharing the most units with
        this call's masks (its size times the number of masks it is a subset of), so that a
        component is the base of all its component-plus-tile candidates and the merged blob
        the base of all its merge-phase pairs; ties go to the larger. None: no strict subset
        (the empty base)."""
        known = self._known + masks
        kmat = np.stack([k.reshape(-1) for k in known]).astype(np.float32)
        cmat = np.stack([m.reshape(-1) for m in masks]).astype(np.float32)
        outside = kmat @ (1.0 - cmat).T                      # (known, masks): units of k not in m
        kcount, ccount = kmat.sum(1), cmat.sum(1)
        ok = (outside == 0) & (kcount[:, None] < ccount[None, :]) & (kcount[:, None] > 0)
        shared = ok.sum(1) * kcount
        rank = shared.astype(np.float64) * (kmat.shape[1] + 1) + kcount
        best = np.where(ok, rank[:, None], -1).argmax(0)
        return [int(b) if ok[b, j] else None for j, b in enumerate(best)]

    def _score_cd_grouped(self, cands) -> np.ndarray:
        """Score candidates in one engine call (one total pass), grouped by base.

        A candidate's base is its largest strict subset among the masks scored before or now
        (a component for component-plus-tile, one member for a merge union; none for a single
        tile: the empty mask). Per base, its candidates go through windowed propagation in
        buckets of similar delta size (one common window per bucket), where the cost model
        in ``fastacd.windowed.cd_groups`` says it pays off (it keeps bases across calls and
        derives a new base from a kept one nearby, so even a lone candidate may window); the
        rest, and the whole image, are scored by one batched full pass. A base that is itself
        a candidate is read from its base's maps.
        """
        arrays = [(i, c) for i, c in enumerate(cands) if not isinstance(c, str)]
        rows: list = [None] * len(cands)
        by_base: dict = {}
        first = len(self._known)
        if arrays:
            masks = [np.asarray(c, dtype=bool) for _, c in arrays]
            known = self._known + masks
            for (i, c), b in zip(arrays, self._bases(masks)):
                delta = c & ~known[b] if b is not None else c
                by_base.setdefault(b, []).append((i, delta))
            self._known += masks
        # a base that is one of these candidates: its row comes from its own base pass
        as_base = {b: arrays[b - first][0] for b, members in by_base.items()
                   if b is not None and b >= first}
        hw, dev, dt = self.units.hw, self.x.device, self.x.dtype
        to_t = lambda a: torch.from_numpy(np.asarray(a)).to(device=dev, dtype=dt)
        jobs, slots, plain, windowed_bases = [], [], [], set()
        for b, members in by_base.items():
            members = [(i, d) for i, d in members if i not in as_base.values()]
            if not members:
                continue
            windowed_bases.add(b)
            buckets: dict = {}
            for i, d in members:
                ys, xs = np.nonzero(self.units.pixels(d))
                size = (int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)) if ys.size else (1, 1)
                buckets.setdefault(tuple(int(np.ceil(np.log2(v))) for v in size), []).append((i, d))
            base_t = to_t(self.units.pixels(known[b]) if b is not None else np.zeros(hw, bool))
            # the largest bucket first: it pays the base pass, the others share it
            ordered = sorted(buckets.values(), key=len, reverse=True)
            for k, part in enumerate(p[s:s + 2 * _CHUNK] for p in ordered
                                     for s in range(0, len(p), 2 * _CHUNK)):
                want = k == 0 and b in as_base
                jobs.append((base_t, to_t(np.stack([self.units.pixels(d) for _, d in part])), want))
                slots.append((as_base[b] if want else None, [i for i, _ in part]))
        plain += [i for b, i in as_base.items() if b not in windowed_bases]
        plain += [i for i, c in enumerate(cands) if isinstance(c, str)]
        if plain:
            ones = np.ones(hw, dtype=bool)
            jobs.append((None, to_t(np.stack([ones if isinstance(cands[i], str) else self.units.pixels(cands[i])
                                              for i in plain])), False))
            slots.append((None, plain))
        info = [{} for _ in jobs]
        with torch.no_grad():
            results, _ = cd_groups(self.dec, self.x, jobs, stats=info, trusted=True, totals=self._totals)
        self.calls += 1
        for (base_i, idx), (base_rel, rel), st in zip(slots, results, info):
            if base_i is not None:
                rows[base_i] = _numpy_rows(base_rel)[0]
            for i, row in zip(idx, _numpy_rows(rel)):
                rows[i] = row
            if st.get("windowed"):
                self.windowed += len(idx)
        return np.stack(rows)

    def _score_cd(self, cands) -> np.ndarray:
        hw = self.units.hw
        masks = np.stack([np.ones(hw, dtype=bool) if isinstance(c, str) else self.units.pixels(c)
                          for c in cands])
        masks = torch.from_numpy(masks).to(device=self.x.device, dtype=self.x.dtype)
        with torch.no_grad():
            return _numpy_rows(self.dec.cd(self.x, masks).relevant)

    def _image(self, cand):
        """The numpy image the original hands to ``pred_ims`` for a candidate."""
        im = self.im_orig
        if isinstance(cand, str):
            return im
        if isinstance(cand, OcclusionSum):
            total = np.zeros(im.shape)
            for m in cand.masks:
                total += tiling.tile_image(im, self.units.pixels(m), "occlusion")
            return total
        return tiling.tile_image(im, self.units.pixels(cand), self.method)

    def _input(self, cand) -> torch.Tensor:
        """The model input for a candidate when no ``pred_ims`` is given: ``im_torch`` times a
        keep-mask (the region kept for build_up, zeroed for occlusion)."""
        x = self.x
        if isinstance(cand, str):
            return x[0]
        if isinstance(cand, OcclusionSum):
            keep = sum(1.0 - self.units.pixels(m) for m in cand.masks)
        elif self.method == "build_up":
            keep = self.units.pixels(cand).astype(np.float64)
        else:
            keep = 1.0 - self.units.pixels(cand)
        return x[0] * torch.from_numpy(np.asarray(keep)).to(x)

    def _score_images(self, cands) -> np.ndarray:
        if self.pred_ims is None:
            if self._logits is None:
                self._logits = logits_module(self.dec.graph)
            with torch.no_grad():
                rows = _numpy_rows(self._logits(torch.stack([self._input(c) for c in cands])))
        elif self.pred_ims_batched:
            rows = _numpy_rows(self.pred_ims(self.model, np.stack([self._image(c) for c in cands])))
            if rows.ndim != 2 or rows.shape[0] != len(cands):
                raise ValueError(f"a batched pred_ims must return (N, num_classes) scores for N images; "
                                 f"got shape {rows.shape} for {len(cands)}")
        else:
            outs = [_numpy_rows(self.pred_ims(self.model, self._image(c))) for c in cands]
            bad = next((o.shape for o in outs if o.ndim != 2 or o.shape[0] != 1), None)
            if bad is not None:
                raise ValueError(f"pred_ims must return (1, num_classes) scores for one image, got shape {bad}")
            rows = np.stack([o[0] for o in outs])
        rows = rows.reshape(len(cands), -1)
        if not np.isfinite(rows).all():
            raise ValueError("the model's scores of the occluded / built-up images contain NaN or Inf"
                             + (" (from pred_ims)" if self.pred_ims is not None else ""))
        if self.method == "occlusion":  # occlusion scores are negated, the full image's never
            sign = np.array([1 if isinstance(c, str) else -1 for c in cands]).reshape(-1, 1)
            rows = np.where(sign > 0, rows, -1 * rows)
        return rows


# ------------------------------------------------------------------------------------------
# Decisions in float32 for a reduced-precision run
# ------------------------------------------------------------------------------------------
class TieCheck:
    """Makes a bf16 run's decisions with float32 scores (docs/precision.md, "Hierarchies").

    Every candidate is scored in bf16; a decision (which units reach the percentile threshold,
    which pair merges) reads float32 scores for the values it hinges on. A value's bf16 error
    grows with the size of its candidates' outputs (the activations rounded to bf16), so it is
    estimated as ``ratio`` times its scale: the largest |bf16 output| over the rows of its
    candidate and bases, ``ratio`` the largest |bf16 - float32| / scale of a value checked so far
    (scale 1 where a scorer keeps no rows: one error for all). The values the threshold or the
    best value comes from are checked, and every value within ``MARGIN`` times its estimate of
    it, repeated until none is left; until ``SEED`` values have been checked in the run, also
    the ``NEAREST`` values on each side of the threshold (below the best), which give the first
    estimate. An unchecked value then lies further from a float32 threshold (or best) than
    MARGIN times its estimate, so a decision differs from float32's only where a bf16 error
    exceeds that margin. Each float32 score costs a windowed float32 pass (and its base's), so
    the seed is kept small.
    """

    NEAREST = 4
    SEED = 8
    MARGIN = 3.0

    def __init__(self, scorer, lab: int):
        self.exact, self.lab = scorer.exact, lab
        self.rows = getattr(scorer, "cache", None)  # the bf16 rows, by Scorer.key
        self.err = 0.0        # the largest |bf16 - float32| of a checked value
        self.ratio = 0.0      # the largest |bf16 - float32| / scale of a checked value
        self.checked = 0      # values checked
        self.sources: dict = {}   # flat unit index -> its value's (candidate, bases) pairs (see _values)
        self.known: set = set()   # flat unit indices whose tracked value is float32's

    @classmethod
    def of(cls, scorer, lab: int) -> "TieCheck | None":
        """The scorer's TieCheck for class ``lab`` (one per run: its error estimate carries
        from the iterations to the merges), or None without a float32 scorer."""
        if scorer.exact is None:
            return None
        if scorer.ties is None or scorer.ties.lab != lab:
            scorer.ties = cls(scorer, lab)
        return scorer.ties

    def _values(self, items) -> np.ndarray:
        """float32 values of items, each a list of (candidate, bases) pairs: the largest over its
        pairs of ``score(candidate) - max(score(base) for base in bases)`` (class ``lab``; no
        bases: the candidate's score)."""
        masks = [m for pairs in items for cand, bases in pairs for m in (cand, *bases)]
        rows = iter(self.exact(masks)[:, self.lab].astype(np.float64))
        out = []
        for pairs in items:
            vals = []
            for _, bases in pairs:
                v = next(rows)
                base = [next(rows) for _ in bases]
                vals.append(v - max(base) if base else v)
            out.append(max(vals))
        return np.asarray(out)

    def _scales(self, items) -> np.ndarray:
        """Each item's scale: the largest |bf16 output| over its masks' rows; a mask without a
        row takes the largest scale found (the wider margin), all 1 without rows."""
        out = []
        for pairs in items:
            rows = [None if self.rows is None else self.rows.get(Scorer.key(m))
                    for cand, bases in pairs for m in (cand, *bases)]
            found = [float(np.max(np.abs(r))) for r in rows if r is not None]
            out.append(max(found) if found and len(found) == len(rows) else np.nan)
        out = np.asarray(out, dtype=np.float64)
        out = np.where(np.isnan(out), 1.0 if np.isnan(out).all() else np.nanmax(out), out)
        return np.maximum(out, np.finfo(np.float64).tiny)  # an all-zero row: no 0 / 0 in the ratio

    def _close(self, values, target, unknown, scales, above_only=False) -> np.ndarray:
        """Indices among ``unknown`` to check: the values ``target`` comes from (the nearest at
        or below it and at or above it), those within the margin of it and, before the SEED,
        the NEAREST on each side (``above_only``: the NEAREST largest)."""
        finite = np.flatnonzero(~np.isnan(values))
        dist = np.abs(values[finite] - target)
        pick = set(finite[dist <= self.MARGIN * self.ratio * scales[finite]].tolist())
        for side in (values[finite] <= target, values[finite] >= target):
            if side.any():
                pick.add(int(finite[side][np.argmin(dist[side])]))
        if self.checked < self.SEED and above_only:  # no error estimate yet: the nearest give one
            pick |= set(finite[np.argsort(-values[finite], kind="stable")[:self.NEAREST]].tolist())
        elif self.checked < self.SEED:
            for side in (finite[values[finite] >= target], finite[values[finite] < target]):
                pick |= set(side[np.argsort(np.abs(values[side] - target), kind="stable")[:self.NEAREST]].tolist())
        return np.array(sorted(i for i in pick if unknown[i]), dtype=np.int64)

    def _check(self, values: np.ndarray, idx: np.ndarray, items, scales: np.ndarray) -> None:
        new = self._values(items)
        gap = np.abs(new - values[idx])
        self.err = max(self.err, float(np.max(gap)))
        self.ratio = max(self.ratio, float(np.max(gap / scales[idx])))
        self.checked += len(idx)
        values[idx] = new

    def threshold(self, scores: np.ndarray, percentile_include):
        """(scores with the values near the threshold made float32's, the selection)."""
        flat = np.array(scores, dtype=np.float64).reshape(-1)
        finite = ~np.isnan(flat)
        scales = np.ones(flat.size)
        scales[finite] = self._scales([self.sources[i] for i in np.flatnonzero(finite)])
        while True:
            thresh = threshold_value(flat, percentile_include)
            unknown = np.array([i not in self.known for i in range(flat.size)])
            idx = self._close(flat, thresh, unknown, scales)
            if idx.size == 0:
                return flat.reshape(np.shape(scores)).astype(np.asarray(scores).dtype), \
                    selected(flat, thresh).reshape(np.shape(scores))
            self._check(flat, idx, [self.sources[i] for i in idx], scales)
            self.known.update(idx.tolist())

    def best(self, values: np.ndarray, items) -> tuple[int, bool]:
        """(the index of the largest value after checking those close to it, whether its value
        is float32's); ``items[i]``: the (candidate, bases) pairs of value i (see ``_values``).
        A largest value that no other comes within the margin of is taken as it is."""
        values = np.array(values, dtype=np.float64)
        scales = self._scales(items)
        unknown = np.ones(values.size, dtype=bool)
        while True:
            top = int(np.nanargmax(values))
            reach = self.MARGIN * self.ratio * np.maximum(scales, scales[top] if unknown[top] else 0.0)
            rivals = np.flatnonzero(values >= values[top] - reach)
            if self.checked >= self.SEED and rivals.size == 1:
                return top, not unknown[top]
            idx = self._close(values, values[top], unknown, scales, above_only=True)
            if idx.size == 0:
                return top, not unknown[top]
            self._check(values, idx, [items[i] for i in idx], scales)
            unknown[idx] = False


# ------------------------------------------------------------------------------------------
# The algorithm, once, over units
# ------------------------------------------------------------------------------------------
def _flat(units, t) -> int:
    """The flat index of a unit (a tile's grid index tuple, a segment's (i,))."""
    return int(np.ravel_multi_index(tuple(np.atleast_1d(t)), units.shape))


def _check_label(scores_raw, lab_num):
    n = scores_raw.shape[1]
    if isinstance(lab_num, bool) or not (isinstance(lab_num, (int, np.integer)) and 0 <= lab_num < n):
        raise ValueError(f"lab_num must be a class index in 0..{n - 1} (the model has {n} outputs), "
                         f"got {lab_num!r}")


def run_iterations(units, scorer, percentile_include, method, lab_num, num_iters,
                   image_shape, corrected=False, progress=False) -> dict:
    """Tile scores, then ``num_iters`` rounds of grow-and-select (design.md section 3)."""
    singles = list(units.singles())
    scores_orig_raw = scorer(singles)
    _check_label(scores_orig_raw, lab_num)
    scores_track = np.copy(refine_scores(scores_orig_raw, lab_num)).reshape(units.shape)
    ties = TieCheck.of(scorer, lab_num)

    def select(scores):
        if ties is None:
            return scores, threshold_scores(scores, percentile_include, method)
        return ties.threshold(scores, percentile_include)

    if ties is not None:
        ties.sources = {i: [(m, ())] for i, m in enumerate(singles)}
    scores_track, im_thresh = select(scores_track)
    scores_list, im_thresh_list, comps_list = [np.copy(scores_track)], [im_thresh], []
    comp_scores_raw_list = [{0: scorer([FULL])[0]}]
    combined_list = []

    def components(step):
        comps = units.label(im_thresh_list[-1])
        if step > 0:
            comps = establish_correspondence(comps_list[-1], comps)
        nums = np.unique(comps)
        return comps, nums[nums > 0]

    for step in tqdm(range(num_iters), disable=not progress, desc="ACD iterations"):
        # everything selected: nothing left to grow (the original crashed here for sweep_dim > 1)
        if np.all(im_thresh_list[-1]):
            break
        comps, nums = components(step)
        masks = {k: comps == k for k in nums}
        combined = (OcclusionSum(masks.values()) if method == "occlusion" and not corrected
                    else comps > 0)
        around = {k: units.neighbours(masks[k]) for k in nums}
        cands = []
        for k in nums:
            cands += [masks[k], combined]
            for t in around[k]:
                m = masks[k].copy()
                m[t] = True
                cands.append(m)
        rows = scorer(cands)

        comp_scores_raw_dict, gains, pos = {}, {}, 0
        for k in nums:
            comp_row, combined_row = rows[pos], rows[pos + 1]
            score_comp = np.copy(comp_row[lab_num])
            comp_scores_raw_dict[k] = np.copy(comp_row)
            for i, t in enumerate(around[k]):
                gain = np.max(rows[pos + 2 + i][lab_num] - score_comp)
                # the original keeps the last component's gain; corrected keeps the best one
                pair = (cands[pos + 2 + i], (masks[k],))
                if corrected and t in gains:
                    gain = max(gain, gains[t])
                    pair_list = ties.sources[_flat(units, t)] + [pair] if ties is not None else None
                else:
                    pair_list = [pair]
                gains[t] = gain
                scores_track[t] = gain
                if ties is not None:
                    ties.sources[_flat(units, t)] = pair_list
                    ties.known.discard(_flat(units, t))
            pos += 2 + len(around[k])
        scores_track[im_thresh_list[-1]] = np.nan
        scores_track, im_thresh = select(scores_track)
        scores_list.append(np.copy(scores_track))
        im_thresh_list.append(units.smooth(im_thresh_list[-1], im_thresh))
        comps_list.append(comps)
        comp_scores_raw_list.append(comp_scores_raw_dict)
        combined_list.append(np.copy(combined_row))

    if corrected:
        # the last selection becomes components too (the original drops it)
        comps, nums = components(len(comps_list))
        rows = scorer([comps == k for k in nums] + [comps > 0])
        comps_list.append(comps)
        comp_scores_raw_list.append({k: np.copy(r) for k, r in zip(nums, rows[:-1])})
        combined_list.append(np.copy(rows[-1]))
        scores_list.append(np.copy(scores_list[-1]))
        im_thresh_list.append(im_thresh_list[-1])

    comps_list = [np.zeros(image_shape)] + comps_list
    return {"scores_list": scores_list,
            "im_thresh_list": im_thresh_list,
            "comps_list": comps_list,
            "comp_scores_raw_list": comp_scores_raw_list,
            "comp_scores_raw_combined_list": combined_list,
            "scores_orig_raw": scores_orig_raw,
            "num_before_final": len(im_thresh_list)}


def run_merges(lists, scorer, lab_num, progress=False) -> dict:
    """Merge the pair whose union gains most over its better part until one component is left.

    Pair unions come from the scorer's cache unless one of the pair was just merged. With a
    float32 scorer beside a bf16 one (``scorer.exact``), the pair is chosen by float32 scores
    of the pairs close to the best (``TieCheck``).
    """
    ties = TieCheck.of(scorer, lab_num)
    bar = tqdm(disable=not progress, desc="ACD merges")
    while np.unique(lists["comps_list"][-1]).size > 2:
        comps = np.copy(lists["comps_list"][-1])
        raw = deepcopy(lists["comp_scores_raw_list"][-1])
        nums = [k for k in np.unique(comps) if k > 0]
        masks = {k: comps == k for k in nums}
        pairs = [(a, b) for a in nums for b in nums if a < b]
        unions = [masks[a] | masks[b] for a, b in pairs]
        rows = scorer(unions)
        diffs = [np.copy(row[lab_num]) - max(raw[a][lab_num], raw[b][lab_num]) for (a, b), row in zip(pairs, rows)]
        best, best_pair, best_row = -np.inf, None, None
        for pair, row, diff in zip(pairs, rows, diffs):
            if diff > best:
                best, best_pair, best_row = diff, pair, np.copy(row)
        if best_pair is None:
            raise FloatingPointError("every pair's merge score is NaN; check the model's output")
        if ties is not None:  # the pair by float32 scores among those close to the best
            i, exact = ties.best(np.asarray(diffs, dtype=np.float64),
                                 [[(u, (masks[a], masks[b]))] for u, (a, b) in zip(unions, pairs)])
            best_pair, best_row = pairs[i], np.copy(scorer.exact([unions[i]])[0] if exact else rows[i])
        a, b = best_pair
        comps[comps == b] = a
        raw[a] = best_row
        raw.pop(b)
        lists["comps_list"].append(comps)
        lists["comp_scores_raw_list"].append(raw)
        lists["scores_list"].append(lists["scores_list"][-1])
        lists["im_thresh_list"].append(lists["im_thresh_list"][-1])
        lists["comp_scores_raw_combined_list"].append(lists["comp_scores_raw_combined_list"][-1])
        bar.update(1)
    bar.close()
    return lists


# ------------------------------------------------------------------------------------------
# The drop-in
# ------------------------------------------------------------------------------------------
def reduced_precision(dec, x: torch.Tensor | None) -> bool:
    """Whether ``dec`` scores in reduced precision: bf16, and TF32 on a GPU (on the CPU it is
    float32 already)."""
    return dec is not None and (dec.precision == "bf16" or (
        dec.precision == "tf32" and x is not None and x.device.type == "cuda"))


def exact_decomposer(dec, method: str, exact_decisions: bool, x: torch.Tensor | None):
    """The float32 Decomposer that decides a reduced-precision run's near ties
    (``reduced_precision``); None: no such run."""
    if not reduced_precision(dec, x) or method != "cd" or not exact_decisions:
        return None
    return decomposer_for(dec.model, dec.backend, "float32", dec.zero_tol)


def agglomerate(model, pred_ims, percentile_include, method, sweep_dim, im_orig, lab_num,
                num_iters=5, im_torch=None, model_type="mnist", device=None, *,
                backend="auto", pred_ims_batched=None, progress=False, stats=None, windowed=True,
                precision="float32", zero_tol=ZERO_TOL, exact_decisions=True):
    """Agglomerative CD of one image (drop-in for ``acd.agg_2d.agglomerate``).

    Params
    ------
    model: torch model (put in eval mode)
    pred_ims: ``pred_ims(model, im)`` -> (1, num_classes) scores for one numpy image (H, W) or
        (H, W, 3), as in the original; used by ``occlusion`` and ``build_up``. A batched one,
        (N, H, W[, 3]) -> (N, num_classes), is used when ``pred_ims_batched=True`` or when it
        has the attribute ``batched = True`` (``fastacd.agg_2d.batched`` sets it). With
        ``pred_ims=None`` the model is run on ``im_torch`` with the region zeroed / kept.
    percentile_include: 0..100, tiles at or above this percentile are selected
    method: 'cd', 'occlusion' or 'build_up'
    sweep_dim: tile side in pixels
    im_orig: the image as numpy, (H, W) or (H, W, 3)
    lab_num: class index to explain
    im_torch: the model input (1, C, H, W) (needed for 'cd')
    model_type: accepted for compatibility; every model goes through the traced engine
    device: None = the model's device
    backend: engine backend ('auto', 'torch', 'compiled', 'reference')
    precision: 'float32' (exact, default), 'bf16' (weight applications in bfloat16; the
        totals, splits and every comparison float32) or 'tf32' (CUDA): ``Decomposer``, docs/precision.md
    exact_decisions: with precision='bf16' (or 'tf32' on a GPU), the candidates a decision
        hinges on (close to the threshold, close to the best merge) are scored again in float32
        and the decision made with those scores (``TieCheck``; docs/precision.md "Hierarchies");
        False: the reduced precision alone
    zero_tol: numerical zero (``Decomposer``, docs/engine.md); 0 = the published split formula,
        the original package's numbers and hierarchies
    progress: tqdm bars (off by default)
    stats: optional dict, filled with candidates requested / scored, engine calls and the
        candidates scored with windowed propagation
    windowed: score ``cd`` candidates that extend another mask with ``Decomposer.cd_delta``
        (same numbers; docs/engine.md "Windowed propagation"); False: every mask in full

    Returns the original's dict: scores_list, im_thresh_list, comps_list,
    comp_scores_raw_list, comp_scores_raw_combined_list, scores_orig_raw, num_before_final.
    """
    del model_type
    im_orig = np.asarray(im_orig)
    if im_orig.ndim not in (2, 3):
        raise ValueError(f"im_orig must be (H, W) or (H, W, 3), got shape {im_orig.shape}")
    check_args(method, percentile_include, sweep_dim, im_orig.shape[:2], num_iters)
    if method == "cd" and im_torch is None:
        raise ValueError("method='cd' needs im_torch, the model input (1, C, H, W) for im_orig")
    if method != "cd" and pred_ims is None and im_torch is None:
        raise ValueError(f"method={method!r} needs pred_ims(model, im) or im_torch")
    model, x = prepare_model_input(model, im_torch, device, im_orig.shape[:2])
    model.eval()
    dec = decomposer_for(model, backend, precision, zero_tol) if x is not None else None
    units = TileUnits(im_orig.shape[:2], sweep_dim)
    scorer = Scorer(units, method, model, dec=dec, x=x, im_orig=im_orig, pred_ims=pred_ims,
                    pred_ims_batched=is_batched(pred_ims, pred_ims_batched), progress=progress,
                    windowed=windowed, exact_dec=exact_decomposer(dec, method, exact_decisions, x))
    lists = run_iterations(units, scorer, percentile_include, method, lab_num, num_iters,
                           im_orig.shape, progress=progress)
    lists = run_merges(lists, scorer, lab_num, progress=progress)
    if stats is not None:
        stats.update(requested=scorer.requested, scored=scorer.scored, calls=scorer.calls,
                     windowed=scorer.windowed, scored_exact=scorer.exact.scored if scorer.exact else 0)
    return lists


def agglomerate_final(lists, model, pred_ims, percentile_include, method, sweep_dim, im_orig,
                      lab_num, num_iters=5, im_torch=None, model_type="mnist", device=None, *,
                      backend="auto", pred_ims_batched=None, precision="float32", zero_tol=ZERO_TOL,
                      exact_decisions=True):
    """The merge phase alone on a dict from ``agglomerate`` (drop-in)."""
    im_orig = np.asarray(im_orig)
    model, x = prepare_model_input(model, im_torch, device, im_orig.shape[:2])
    model.eval()
    dec = decomposer_for(model, backend, precision, zero_tol) if x is not None else None
    units = TileUnits(im_orig.shape[:2], sweep_dim)
    scorer = Scorer(units, method, model, dec=dec, x=x, im_orig=im_orig, pred_ims=pred_ims,
                    pred_ims_batched=is_batched(pred_ims, pred_ims_batched),
                    exact_dec=exact_decomposer(dec, method, exact_decisions, x))
    return run_merges(lists, scorer, lab_num)

"""Windowed (incremental) relevant propagation for masks that differ from a base mask.

Almost every mask ACD scores is a component plus one tile. A candidate ``base | delta`` has
the base's relevant maps everywhere except inside the windows ``fastacd.engine.windows``
plans. Here:

* the base is propagated once with the ordinary batched pass (every node's map kept);
* the windowed pass computes, for each candidate, only the window of each node: a conv reads
  an input crop with its halo taken from the candidate's full-resolution map (base outside
  the candidate's previous window, the recomputed window inside) and the conv's zero padding
  only beyond the true image border, then applies its weights without padding; a max-pool
  gathers at the total's argmax; every other rule runs as in the full pass on the window,
  with the total cropped to the same window;
* a node that is not windowed gets the candidates' full maps assembled once and the ordinary
  rules run on them.

The numbers equal full propagation (outside the window nothing changes) up to the rounding of
a different convolution algorithm on the crop. ``cd_delta`` falls back to the ordinary pass
when the estimated cost (multiply-adds of the windowed convs plus one base pass) is not
below ``MAX_COST_RATIO`` of full propagation. ``cd_groups`` scores many (base, deltas)
groups for one image with one total pass (optionally reused across calls), one base pass per
base, and the linear head after the last windowed node once for all groups.
docs/engine.md "Windowed propagation".
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.fx as fx

from ..capture.inputs import check_masks
from ..ops import tensor_state
from . import chunks
from .batched import apply_rule
from .windows import WINDOW_MAX_FRACTION, Window, diff_boxes, input_windows, on_device, plan

# Use windowing only when (base pass + M windowed candidates) is estimated below this fraction
# of M full passes (multiply-adds of the affine layers).
MAX_COST_RATIO = 0.8


# --------------------------------------------------------------------------------------------
# Gathers: crops of a candidate's full-resolution map
# --------------------------------------------------------------------------------------------
def gather_crop(ops, base: torch.Tensor, win_t: torch.Tensor | None, win: Window | None,
                crop: Window) -> torch.Tensor:
    """(m, C, crop.h, crop.w): each candidate's map cropped at ``crop`` (which may reach
    outside the map: zeros there, the conv's padding). The candidate's map is ``base``
    (1, C, H, W) outside its window and ``win_t`` (m, C, h, w) inside ``win`` (``win_t``
    None: the base alone). ``ops``: the engine backend's ops (``window_gather``)."""
    if win_t is None:
        return ops.window_gather(base, None, None, None, crop.oy, crop.ox, crop.h, crop.w)
    return ops.window_gather(base, win_t, win.oy, win.ox, crop.oy, crop.ox, crop.h, crop.w)


def gather_pool(ops, base: torch.Tensor, win_t: torch.Tensor, win: Window, indices: torch.Tensor,
                out_win: Window) -> torch.Tensor:
    """Windowed max-pool rule: each candidate's map (base outside ``win``, ``win_t`` inside)
    gathered at the total's argmax ``indices`` (1, C, Ho, Wo) over the output window."""
    return ops.window_gather(base, win_t, win.oy, win.ox, out_win.oy, out_win.ox, out_win.h, out_win.w,
                             indices)


class AtWindows(NamedTuple):
    """A total (1, C, H, W) as read at each candidate's window ``win``: what a convolution's
    ``crop_aux`` gets in place of (m, C, h, w) crops of its pre-activation and tolerance; the
    bias split reads them in place (``bias_split_window_``)."""
    full: torch.Tensor
    win: Window

    @property
    def shape(self) -> tuple:
        return (self.win.oy.shape[0], self.full.shape[1], self.win.h, self.win.w)


class _PerMaskOps:
    """The engine's fused ops with a per-mask total ((m, C, ...) crops, not one shared (1, C, ...)):
    masks are folded into channels, (1, m*C, ...), so the compiled kernels apply unchanged; a
    total ``AtWindows`` is read at the windows in place."""

    def __init__(self, ops):
        self.ops = ops

    @staticmethod
    def _fold(t: torch.Tensor) -> torch.Tensor:
        return t.reshape((1, t.shape[0] * t.shape[1]) + tuple(t.shape[2:]))

    def _fold_tol(self, tol):
        return None if tol is None else self._fold(tol)

    def bias_split(self, rel, total, bias, relu=False, tol=None, _op="bias_split"):
        if isinstance(total, AtWindows):
            rel = rel if _op == "bias_split_" else rel.clone(memory_format=torch.contiguous_format)
            return self.ops.bias_split_window_(rel, total.full, bias, total.win.oy, total.win.ox, relu,
                                               None if tol is None else tol.full)
        split = getattr(self.ops, _op)
        if total.shape[0] == 1:
            return split(rel, total, bias, relu, tol)
        m = rel.shape[0]
        return split(self._fold(rel), self._fold(total), bias.repeat(m), relu,
                     self._fold_tol(tol)).reshape(rel.shape)

    def bias_split_(self, rel, total, bias, relu=False, tol=None):
        """In place into ``rel`` (folding a contiguous tensor is a view of it)."""
        return self.bias_split(rel, total, bias, relu, tol, _op="bias_split_")

    def bn_split(self, rel, total, scale, shift, relu=False, tol=None):
        if total.shape[0] == 1:
            return self.ops.bn_split(rel, total, scale, shift, relu, tol)
        m = rel.shape[0]
        return self.ops.bn_split(self._fold(rel), self._fold(total), scale.repeat(m), shift.repeat(m),
                                 relu, self._fold_tol(tol)).reshape(rel.shape)

    def maxpool_gather(self, rel, indices):
        return self.ops.maxpool_gather(rel, indices)


class _Crops:
    """``values`` with every dependent node cropped at one window (lazily, cached)."""

    def __init__(self, ops, values: dict, dependent: set, win: Window):
        self.ops, self.values, self.dependent, self.win, self.cache = ops, values, dependent, win, {}

    def __getitem__(self, n):
        if n not in self.dependent:
            return self.values[n]
        if n not in self.cache:
            self.cache[n] = gather_crop(self.ops, self.values[n], None, None, self.win)
        return self.cache[n]


# --------------------------------------------------------------------------------------------
# The windowed relevant pass
# --------------------------------------------------------------------------------------------
def paste(ops, base: torch.Tensor, win_t: torch.Tensor, win: Window) -> torch.Tensor:
    """(m, C, H, W): the candidates' full maps, ``base`` (1, C, H, W) with each candidate's
    window values ``win_t`` (m, C, h, w) written over its window (node windows lie inside)."""
    if win_t.shape[0] == 1 and win_t.device.type == "cpu":
        # one candidate (a derived base): a copy in the base's own layout; window_gather's NCHW
        # output read a channels_last (bf16) base value by value, strided
        y, x = int(win.oy[0]), int(win.ox[0])
        out = base.clone()
        out[:, :, y:y + win_t.shape[2], x:x + win_t.shape[3]] = win_t
        return out
    zero = torch.zeros_like(win.oy)
    return ops.window_gather(base, win_t, win.oy, win.ox, zero, zero, base.shape[2], base.shape[3])


def windowed_pass(dec, plans: dict, base_rel: dict, values: dict, aux: dict, r0_win: torch.Tensor,
                  win0: Window, s: int, e: int, cut: tuple | None = None,
                  keep: dict | None = None, stop: int | None = None):
    """Relevant output for candidates s:e of a plan; ``r0_win`` (m, C, h, w): their input windows.

    ``cut = (index, node)``: stop before node ``index`` of the graph and return the full maps
    of ``node``, the only value later nodes read (the head runs once for many groups).
    ``keep`` (one candidate, a dict holding its full input): fill it with the candidate's full
    map of every node before ``stop`` and return it (a base derived from another base)."""
    g, m = dec.graph, e - s
    dev = r0_win.device
    ops = _PerMaskOps(dec._ops)
    # the plan's windows (CPU) for candidates s:e, on the device; compared on the CPU
    planned = [win0] + [w for p in plans.values() for w in (p.win, p.crop) if w is not None]
    moved = {id(w): d for w, d in zip(planned, on_device(planned, s, e, dev))}
    wins: dict = {g.input_node: moved[id(win0)]}        # node -> window (None: full map)
    cpu_wins: dict = {g.input_node: win0}
    rel: dict = {g.input_node: r0_win}                   # node -> window values (or full map)
    fulls: dict = keep if keep is not None else {}       # windowed node -> its full maps, once built

    def full(d):
        """The candidates' full maps of node d (assembled from base + window once)."""
        if wins.get(d) is None:
            return rel[d]
        if d not in fulls:
            fulls[d] = paste(dec._ops, base_rel[d], rel[d], wins[d])
        return fulls[d]

    def on(d, planned_win: Window):
        """Node d's candidates' values over the planned window (re-gathered if d's differs)."""
        if cpu_wins[d] is planned_win or cpu_wins[d].part(s, e, "cpu").same(planned_win.part(s, e, "cpu")):
            return rel[d]
        return gather_crop(dec._ops, base_rel[d], rel[d], wins[d], moved[id(planned_win)])

    for index, node in enumerate(g.nodes):
        if cut is not None and index == cut[0]:
            return full(cut[1])
        if stop is not None and index == stop:
            return keep
        step = g.steps.get(node)
        if step is None:
            continue
        p = plans[node]
        if p.win is None:
            out = apply_rule(step, {d: full(d) for d in step.dep}, values, aux.get(node), dec._ops, m)
            win = None
        else:
            win = moved[id(p.win)]
            want = (m, values[node].shape[1], win.h, win.w)
            d0 = step.dep[0]
            if p.crop is not None:  # a convolution on the input crop, without its padding
                x_crop = gather_crop(dec._ops, base_rel[d0], rel[d0], wins[d0], moved[id(p.crop)])
                entry = step.rule.crop_aux(step, aux[node], p.sliding, lambda t: AtWindows(t, win))
                out = apply_rule(step, {d0: x_crop}, values, entry, ops, m, want)
            elif p.sliding is not None:  # a max-pool: gathered at the total's argmax (its aux)
                out = gather_pool(dec._ops, base_rel[d0], rel[d0], wins[d0], aux[node], win)
            else:
                crops = _Crops(dec._ops, values, g.dependent, win)
                entry = step.rule.crop_aux(step, aux.get(node), None,
                                           lambda t: gather_crop(dec._ops, t, None, None, win))
                out = apply_rule(step, {d: on(d, p.win) for d in step.dep}, crops, entry, ops, m, want)
        rel[node], wins[node], cpu_wins[node] = out, win, p.win
        if keep is not None:
            # a rule that passes its input through (a ReLU fused into its producer) shares its map
            same = [d for d in step.dep if rel.get(d) is out and wins.get(d) is not None]
            keep[node] = full(same[0]) if same else full(node)
        for d in step.dep:  # free what no later step reads
            if g.last_use.get(d, -1) <= index and d is not g.result_node:
                rel.pop(d, None)
                if keep is None:
                    fulls.pop(d, None)
    return keep if keep is not None else full(g.result_node)


# --------------------------------------------------------------------------------------------
# Bases: one base's maps, kept across the groups and calls that share it
# --------------------------------------------------------------------------------------------
# A base whose mask differs from a kept base's inside a window costing at most this fraction
# of a full pass (multiply-adds) is derived from it by a windowed pass instead of propagated
# in full: the new component of an ACD iteration from the old one, a single-tile component
# from the empty mask.
DERIVE_MAX_RATIO = 0.6


class BaseMaps:
    """A base mask's relevant map (1, C, ...) of every node before ``upto`` (graph index),
    extended on demand (``run_to``) by the ordinary rules."""

    def __init__(self, mask: torch.Tensor, rel: dict, upto: int):
        self.mask, self.rel, self.upto = mask, rel, upto
        self.mask_cpu = mask.cpu()  # looked up on the CPU: no device synchronisation per kept base
        self.size = self._nbytes()

    def run_to(self, dec, values: dict, aux: dict, stop: int) -> "BaseMaps":
        if stop > self.upto:
            propagate(dec, self.rel, values, aux, self.upto, stop, 1, free=False)
            self.upto = stop
            self.size = self._nbytes()
        return self

    def output(self, dec, values: dict, aux: dict) -> torch.Tensor:
        return self.run_to(dec, values, aux, len(dec.graph.nodes)).rel[dec.graph.result_node]

    def _nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in self.rel.values() if isinstance(t, torch.Tensor)}
        return sum(storages.values())


class BaseCache:
    """The most recently used bases' maps, at most ``limit`` bytes (the newest always kept)."""

    def __init__(self, limit: int):
        self.limit, self.items = limit, []  # oldest first

    def get(self, mask: torch.Tensor) -> BaseMaps | None:
        key = mask.cpu()
        for i, bm in enumerate(self.items):
            if bm.mask.shape == mask.shape and torch.equal(bm.mask_cpu, key):
                self.items.append(self.items.pop(i))
                return bm
        return None

    def put(self, bm: BaseMaps) -> BaseMaps:
        self.items.append(bm)
        self.trim()
        return bm

    def trim(self) -> None:
        while len(self.items) > 1 and sum(b.size for b in self.items) > self.limit:
            self.items.pop(0)

    def nearest(self, mask: torch.Tensor, recent: int = 32) -> BaseMaps | None:
        """The kept base (of the ``recent`` last used) whose mask differs from ``mask`` in the
        smallest bounding box; ties go to the most recently used."""
        items = [bm for bm in reversed(self.items[-recent:]) if bm.mask.shape == mask.shape]
        if not items:
            return None
        y0, y1, x0, x1 = diff_boxes(torch.cat([bm.mask for bm in items]), mask)
        area = (y1 - y0).clamp_min(0) * (x1 - x0).clamp_min(0)
        return items[int(area.argmin())]


def input_crop(ops, cand: torch.Tensor, x: torch.Tensor, win0: Window) -> torch.Tensor:
    """(M, C, h, w): the candidates' relevant inputs (mask times image) inside their windows."""
    mcount, dev = cand.shape[0], x.device
    w_all = win0.part(0, mcount, dev)
    ys = (w_all.oy[:, None] + torch.arange(win0.h, device=dev))[:, :, None]
    xs = (w_all.ox[:, None] + torch.arange(win0.w, device=dev))[:, None, :]
    flat = (ys * x.shape[3] + xs).reshape(mcount, 1, -1)
    cflat = cand.reshape(mcount, cand.shape[1], -1)
    mask_win = cflat.gather(2, flat.expand(-1, cand.shape[1], -1)).reshape(
        mcount, cand.shape[1], win0.h, win0.w)
    return mask_win * gather_crop(ops, x, None, None, w_all)


_LIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # graph -> single_live(graph)


def single_live(g) -> dict:
    """{index i: node d} for the positions where the only input-dependent value computed
    before node i that node i or a later node reads is d (a place to cut the graph)."""
    if g not in _LIVE:
        out: dict = {}
        defined = []
        for i, node in enumerate(g.nodes):
            live = [d for d in defined if g.last_use.get(d, -1) >= i or d is g.result_node]
            if len(live) == 1:
                out[i] = live[0]
            if node is g.input_node or node in g.steps:
                defined.append(node)
        _LIVE[g] = out
    return _LIVE[g]


def head_cut(g, plans: dict) -> tuple | None:
    """The earliest (index, node) cut after which every step of the plan is full."""
    cuts = single_live(g)
    steps = [(i, n) for i, n in enumerate(g.nodes) if n in plans]
    last_win = max((i for i, n in steps if plans[n].win is not None), default=-1)
    for i in sorted(cuts):
        if i > last_win and cuts[i] is not g.input_node and i <= steps[-1][0]:
            return i, cuts[i]
    return None


def _finish(dec, x: torch.Tensor, pending: dict, deferred: list, res: list, values: dict,
            aux: dict, chunk_size: int | None = None) -> None:
    """Score what is waiting and fill ``res[group][slot]``: ``pending`` {head cut: [(group, slot,
    frontier maps)]} and ``deferred`` [(group, slot, masks)] for full propagation.

    The layers after the latest cut (a CNN's linear head, where batch size pays most) run
    once for all of them: frontiers at earlier cuts are advanced to it, deferred masks are
    propagated up to it. With nothing pending, deferred masks get one full pass per mask shape."""
    g = dec.graph
    budget = dec.memory_budget or chunks.default_memory_budget(x.device)

    def chunked(t: torch.Tensor, start: int, fn) -> torch.Tensor:
        """fn over chunks of t sized by the largest activation from graph position ``start`` on."""
        after = [values[n] for i, n in enumerate(g.nodes) if i >= start and n in g.steps
                 and isinstance(values.get(n), torch.Tensor)]
        largest = max([t[0].numel()] + [v[0].numel() for v in after])
        step = chunk_size or max(1, int(budget // (largest * t.element_size() * chunks.BYTES_PER_MASK_FACTOR)))
        return torch.cat([fn(t[s:s + step]) for s in range(0, t.shape[0], step)])

    last = max(pending, key=lambda c: c[0]) if pending else None
    slots, parts = [], []
    for cut, items in sorted(pending.items(), key=lambda kv: kv[0][0]):
        frontier = torch.cat([t for _, _, t in items])
        if cut != last:
            frontier = chunked(frontier, cut[0], lambda t, c=cut: propagate(
                dec, {c[1]: t}, values, aux, c[0], last[0], t.shape[0])[last[1]])
        parts.append(frontier)
        slots += [(gi, slot, t.shape[0]) for gi, slot, t in items]

    def deferred_pass(r0: torch.Tensor) -> torch.Tensor:
        """Up to the latest cut (the head follows), or the whole ordinary pass."""
        if last is None:
            return dec._relevant_pass(r0, values, aux)
        return propagate(dec, {g.input_node: r0}, values, aux, 0, last[0], r0.shape[0])[last[1]]

    by_shape: dict = {}
    for item in deferred:
        by_shape.setdefault(tuple(item[2].shape[1:]), []).append(item)
    for items in by_shape.values():
        masks = torch.cat([m for _, _, m in items])
        step = chunk_size or dec.chunk_size(values, x)
        parts.append(torch.cat([deferred_pass(masks[s:s + step] * x) for s in range(0, masks.shape[0], step)]))
        slots += [(gi, slot, m.shape[0]) for gi, slot, m in items]
    out = torch.cat(parts) if parts else None
    if last is not None:
        out = chunked(out, last[0], lambda t: run_head(dec, last, t, values, aux))
    pos = 0
    for gi, slot, n in slots:
        res[gi][slot] = out[pos:pos + n]
        pos += n
    pending.clear()
    deferred.clear()


def propagate(dec, rel: dict, values: dict, aux: dict, start: int, stop: int, m: int,
              free: bool = True) -> dict:
    """The ordinary relevant pass over graph positions [start, stop) on ``rel`` (node -> maps of
    m masks, holding every value those steps read); ``free``: drop what no later step reads."""
    g = dec.graph
    for index in range(start, stop):
        node = g.nodes[index]
        step = g.steps.get(node)
        if step is None:
            continue
        rel[node] = apply_rule(step, rel, values, aux.get(node), dec._ops, m)
        if free:
            for d in step.dep:
                if g.last_use.get(d, -1) <= index and d is not g.result_node:
                    rel.pop(d, None)
    return rel


def run_head(dec, cut: tuple, rel_cut: torch.Tensor, values: dict, aux: dict) -> torch.Tensor:
    """The ordinary relevant pass from a cut (see ``head_cut``) to the output."""
    g = dec.graph
    rel = propagate(dec, {cut[1]: rel_cut}, values, aux, cut[0], len(g.nodes), rel_cut.shape[0])
    return rel[g.result_node]


def cd_delta(dec, x: torch.Tensor, base_mask, delta_masks, *, chunk_size: int | None = None,
             max_fraction: float = WINDOW_MAX_FRACTION, max_cost_ratio: float = MAX_COST_RATIO,
             stats: dict | None = None):
    """``Decomposer.cd_delta``: CD of ``base_mask | delta_masks[j]`` via windowed propagation.

    ``max_fraction``: a node whose window exceeds this fraction of its map is computed in full;
    ``max_cost_ratio``: window only when the estimated cost is below this fraction of full
    propagation (``float('inf')``: always). ``stats`` (a dict) receives ``windowed`` (bool)
    and the estimated ``cost_ratio``.
    Returns (relevant (M, K), the model's output (1, K)).
    """
    [(_, rel)], out = cd_groups(dec, x, [(base_mask, delta_masks, False)], chunk_size=chunk_size,
                                max_fraction=max_fraction, max_cost_ratio=max_cost_ratio,
                                stats=[stats] if stats is not None else None)
    return rel, out


def cd_groups(dec, x: torch.Tensor, groups, *, chunk_size: int | None = None,
              max_fraction: float = WINDOW_MAX_FRACTION, max_cost_ratio: float = MAX_COST_RATIO,
              stats: list | None = None, trusted: bool = False,
              totals: dict | None = None) -> tuple[list, torch.Tensor]:
    """Relevant outputs of several groups of masks for one input, with one total pass.

    groups: ``(base_mask, delta_masks, want_base)`` each. ``base_mask=None``: the masks
    ``delta_masks`` are scored by ordinary (full) propagation; otherwise the masks are
    ``base_mask | delta_masks[j]``, scored by windowed propagation where it pays off;
    ``delta_masks=None``: only the base. ``want_base``: also return the base's own relevant
    output (nearly free when the base is propagated for windowing). Returns ``(base_rel (1, K)
    or None, rel (M, K) or None)`` per group, and the model's output (1, K).
    ``stats``: one dict per group (filled with ``windowed``, ``cost_ratio`` and ``base``:
    how the base's maps were had: ``kept``, ``derived`` or ``propagated``), or None.
    Bases are kept (``BaseCache``, up to half the memory budget) for later groups and calls
    with an equal base mask, and a new base close to a kept one is derived from it by a
    windowed pass. A base is propagated only as far as its candidates' windows need; its own
    output, when wanted, goes through the head with the candidates.
    ``trusted``: the masks are already (M, H, W) / (H, W) tensors of x's dtype and device
    holding finite values (as ``agg_2d.Scorer`` builds them): skip the checks.
    ``totals``: a dict kept by the caller across calls for the same ``x`` (and model): the
    total pass is run once and reused, and so are the kept bases (made again when ``x``, the
    Decomposer or any weight or buffer of the model changes). The linear head after the
    last windowed node runs once for all windowed groups of the call, and every mask scored
    by full propagation (groups that do not window, lone bases) in one batched pass at the end.
    """
    x = dec._check_input(x)
    # denormals flushed as in every CD pass; the Decomposer's precision (totals stay exact float32);
    # the large blocks a chunk frees reused by the next (the crops and conv outputs repeat)
    with chunks.denormals_flushed(), dec.compute(x), chunks.reuse_buffers(x.device, dec.memory_budget):
        return _cd_groups(dec, x, groups, chunk_size=chunk_size, max_fraction=max_fraction,
                          max_cost_ratio=max_cost_ratio, stats=stats, trusted=trusted, totals=totals)


def _cd_groups(dec, x, groups, *, chunk_size, max_fraction, max_cost_ratio, stats, trusted, totals):
    if dec.backend == "reference" or x.dim() != 4:  # the oracle: mask by mask, no windows
        res = []
        for base, deltas, want_base in groups:
            b = check_masks(x, base) if base is not None else None
            d = check_masks(x, deltas) if deltas is not None else None
            rel = None if d is None else dec.cd(x, d if b is None else torch.maximum(b, d)).relevant
            res.append((dec.cd(x, b).relevant if b is not None and want_base else None, rel))
        return res, dec.forward(x)
    g, dev = dec.graph, x.device
    budget = dec.memory_budget or chunks.default_memory_budget(dev)
    # the model's weights and buffers as they are now: kept totals and bases of other weights
    # (trained in between, ``param.data`` replaced) are not reused
    weights = tuple(map(tensor_state, (*dec.model.parameters(), *dec.model.buffers())))
    if (totals is not None and totals.get("x") is x and totals.get("state") == tensor_state(x)
            and totals.get("dec") is dec and totals.get("weights") == weights):
        values, aux, cache = totals["values"], totals["aux"], totals["bases"]
    else:
        values, aux = dec._total_pass(x)
        cache = BaseCache(budget // 2)
        if totals is not None:
            totals.clear()
            totals.update(x=x, state=tensor_state(x), dec=dec, weights=weights, values=values, aux=aux, bases=cache)
    if trusted:
        def masks_of(t):
            return t.reshape((-1, 1) + tuple(t.shape[-2:])) if t.dim() in (2, 3) else t
    else:
        def masks_of(t):
            return check_masks(x, t)
    pending: dict = {}   # head cut -> [(group, slot, frontier maps)]: the head runs once per cut
    deferred: list = []  # [(group, slot, masks)]: full propagation, one batched pass at the end
    res: list = [[None, None] for _ in groups]
    for gi, (base_mask, delta_masks, want_base) in enumerate(groups):
        info = stats[gi] if stats is not None else {}
        info.update(windowed=False)
        if base_mask is None:
            deferred.append((gi, 1, masks_of(delta_masks)))
            continue
        base = masks_of(base_mask)
        if base.shape[0] != 1:
            raise ValueError(f"base_mask must be one mask, got {base.shape[0]}")
        kept = cache.get(base)
        if delta_masks is None:
            if kept is not None:
                res[gi][0] = kept.output(dec, values, aux)
            else:
                deferred.append((gi, 0, base))
            continue
        cand = torch.maximum(base, masks_of(delta_masks))
        win0 = input_windows(cand, base)
        plans, (win_macs, full_macs), largest, order = plan(g, values, win0, max_fraction)
        mcount = cand.shape[0]
        # what the base costs if the group is windowed (kept: nothing; derived from a kept base:
        # its windowed pass) and if it is not (its own full pass when its output is wanted)
        derive, base_cost = None, 0
        if kept is None:
            base_cost = full_macs
            parent = cache.nearest(base)
            if parent is not None:
                dwin = input_windows(base, parent.mask)
                dplans, (dmacs, _), _, _ = plan(g, values, dwin, max_fraction)
                if dmacs <= DERIVE_MAX_RATIO * full_macs:
                    derive, base_cost = (parent, dwin, dplans), dmacs
        plain_base_cost = full_macs if want_base and kept is None else 0
        ratio = (base_cost + mcount * win_macs) / max(mcount * full_macs + plain_base_cost, 1)
        windowed = full_macs > 0 and ratio < max_cost_ratio
        info.update(windowed=windowed, cost_ratio=ratio)
        if not windowed:
            deferred.append((gi, 1, cand))
            if want_base:
                if kept is not None:
                    res[gi][0] = kept.output(dec, values, aux)
                else:
                    deferred.append((gi, 0, base))
            continue
        cut = head_cut(g, plans)
        if cut is not None and values[cut[1]].numel() > x.numel():
            cut = None  # a frontier larger than the image: not worth holding for many groups
        stop = cut[0] if cut is not None else len(g.nodes)
        info.update(base="kept" if kept is not None else "derived" if derive else "propagated")
        if kept is None:
            if derive is not None:
                kept = cache.put(_derive(dec, *derive, base, x, values, aux, stop))
            else:
                kept = cache.put(BaseMaps(base, {g.input_node: base * x}, 0))
        kept.run_to(dec, values, aux, stop)
        r0_win = input_crop(dec._ops, cand, x, win0)
        step = chunk_size
        if step is None:
            step = max(1, int(budget // (largest * x.element_size() * chunks.BYTES_PER_MASK_FACTOR)))
        if mcount <= min(step, SORTED_CHUNK):
            parts = windowed_pass(dec, plans, kept.rel, values, aux, r0_win, win0, 0, mcount, cut)
        else:
            parts = _sorted_chunks(dec, order, kept.rel, values, aux, r0_win, win0,
                                   min(step, SORTED_CHUNK), cut, max_fraction)
        if cut is None:
            res[gi] = [kept.rel[g.result_node] if want_base else None, parts]
        else:
            pending.setdefault(cut, []).append((gi, 1, parts))
            if want_base:
                pending[cut].append((gi, 0, kept.rel[cut[1]]))
            held = sum(t.numel() * t.element_size() for items in pending.values() for _, _, t in items)
            if held > budget // 4:
                _finish(dec, x, pending, [], res, values, aux, chunk_size)
        cache.trim()  # a base extended by run_to may now exceed the cache's share
    _finish(dec, x, pending, deferred, res, values, aux, chunk_size)
    return [tuple(r) for r in res], values[g.result_node]


# Candidates of one group are windowed in chunks of at most this many, sorted by their own
# windows where most multiply-adds are, each chunk with a plan of its own: a window common to
# the whole group is padded to its largest candidate, and near the map's border candidates'
# windows are cut short (VGG16 at 224, 16x16 tiles: 16% fewer multiply-adds with each
# candidate's own windows).
SORTED_CHUNK = 16


def _sorted_chunks(dec, order: torch.Tensor, base_rel: dict, values: dict, aux: dict,
                   r0_win: torch.Tensor, win0: Window, size: int, cut, max_fraction: float) -> torch.Tensor:
    """``windowed_pass`` over the candidates in ``order``, ``size`` at a time, each chunk with its
    own plan (its windows padded only to its own largest); results in the candidates' order."""
    g, dev = dec.graph, r0_win.device
    order = order.to(win0.oy.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    order_dev, inverse = torch.stack([order, inverse]).to(dev)  # one copy, not one per chunk
    outs = []
    for s in range(0, order.shape[0], size):
        idx = order[s:s + size]
        w0 = Window(win0.oy[idx], win0.ox[idx], win0.h, win0.w)
        cplans = plan(g, values, w0, max_fraction)[0]
        outs.append(windowed_pass(dec, cplans, base_rel, values, aux, r0_win[order_dev[s:s + size]], w0, 0,
                                  idx.shape[0], cut))
    return torch.cat(outs).index_select(0, inverse)


def _derive(dec, parent: BaseMaps, dwin: Window, dplans: dict, base: torch.Tensor, x: torch.Tensor,
            values: dict, aux: dict, stop: int) -> BaseMaps:
    """The maps of ``base`` before ``stop`` by a windowed pass from a kept ``parent`` base
    (``dwin``/``dplans``: where the two masks differ and its plan)."""
    g = dec.graph
    last = max((i for i, n in enumerate(g.nodes) if n in dplans and dplans[n].win is not None), default=-1)
    parent.run_to(dec, values, aux, min(last + 1, stop))
    keep = {g.input_node: base * x}
    windowed_pass(dec, dplans, parent.rel, values, aux, input_crop(dec._ops, base, x, dwin), dwin, 0, 1,
                  keep=keep, stop=stop)
    return BaseMaps(base, keep, stop)

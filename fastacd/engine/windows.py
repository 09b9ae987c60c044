"""Windows: where the candidates of a windowed pass can differ from their base, per node.

CD's rules are local given the shared total activation (conv: a weight application, then an
element-wise split; batchnorm, activations: element-wise; max-pool: a gather at the
argmax of the total), so a candidate ``base | delta`` differs from the base only inside the
window of positions whose receptive field reaches the delta. ``plan`` tracks that window
through each node by the locality its rule declares (``fastacd.rules.base``: ``Sliding``,
``Elementwise``, ``Union``); a node whose rule is not local, and everything after it, is
computed in full. docs/engine.md, "Windowed propagation".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..capture.graph import tensors
from ..rules.base import Elementwise, Sliding, Union

# A node whose window covers more than this fraction of its map is computed in full (and so is
# everything after it); 1.0: never for size alone (docs/engine.md).
WINDOW_MAX_FRACTION = 1.0


@dataclass
class Window:
    """Per-candidate top-left corners (oy, ox: (M,) int64) of an h x w window of a map.

    A conv's input crop may reach outside the map (its zero padding); node windows never do.
    """
    oy: torch.Tensor
    ox: torch.Tensor
    h: int
    w: int

    def part(self, s: int, e: int, device) -> "Window":
        return on_device([self], s, e, device)[0]

    def same(self, other: "Window") -> bool:
        return (self.h == other.h and self.w == other.w and torch.equal(self.oy, other.oy)
                and torch.equal(self.ox, other.ox))


def on_device(windows: list, s: int, e: int, device) -> list:
    """Candidates s:e of each window (or None) on ``device``, in one host-to-device copy: the
    plan is made on the CPU, and a copy per window and chunk kept a GPU waiting (docs/gpu_check.md)."""
    real = [w for w in windows if w is not None]
    if not real or all(w.oy.device == torch.device(device) for w in real):
        return [None if w is None else Window(w.oy[s:e], w.ox[s:e], w.h, w.w) for w in windows]
    flat = iter(torch.cat([t[s:e].cpu() for w in real for t in (w.oy, w.ox)]).to(device).split(e - s))
    return [None if w is None else Window(next(flat), next(flat), w.h, w.w) for w in windows]


@dataclass
class NodePlan:
    win: Window | None              # the node's output window; None: full maps
    sliding: Sliding | None = None  # a windowed conv or max-pool
    crop: Window | None = None      # conv: the input region read (with halo / padding)


def _fdiv(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _through_each(lo: torch.Tensor, size, k: int, s: int, p: int, d: int, n_out: int):
    """Output rows of a sliding window op (kernel k, stride s, padding p, dilation d) whose
    receptive field meets each candidate's input rows [lo, lo + size): (start, size), (M,) each."""
    first = (-_fdiv(-(lo + p - (k - 1) * d), s)).clamp(0, n_out - 1)   # ceil division
    last = _fdiv(lo + size - 1 + p, s).clamp(0, n_out - 1)
    return first, (last - first + 1).clamp_min(1)


def _common(first: torch.Tensor, size: torch.Tensor, n_map: int):
    """One size for all candidates (the largest, at most the map) and the starts moved so that
    every window lies inside the map."""
    n = int(min(int(size.max()), n_map))
    return first.clamp(0, n_map - n), n


def _through(lo: torch.Tensor, size: int, k: int, s: int, p: int, d: int, n_out: int):
    """``_through_each`` with one common size: (start (M,), common size)."""
    return _common(*_through_each(lo, size, k, s, p, d, n_out), n_out)


def _union_each(lo_a, size_a, lo_b, size_b):
    """Each candidate's bounding box of two windows along one axis: (start, size)."""
    lo = torch.minimum(lo_a, lo_b)
    return lo, torch.maximum(lo_a + size_a, lo_b + size_b) - lo


def _union(lo_a, size_a, lo_b, size_b, n_map):
    return _common(*_union_each(lo_a, size_a, lo_b, size_b), n_map)




def diff_boxes(cand: torch.Tensor, base: torch.Tensor):
    """(y0, y1, x0, x1), each (M,): per candidate mask, the bounding box [y0, y1) x [x0, x1) of
    the pixels where it differs from ``base`` (no difference: y1 <= y0)."""
    diff = cand != base
    if diff.dim() == 4:  # (M, C, H, W): any channel
        diff = diff.view(torch.uint8).amax(1)
    m, hgt, wid = diff.shape
    u = diff.view(torch.uint8)  # amax over uint8 is several times faster than any() on the CPU
    rows, cols = u.amax(2).bool(), u.amax(1).bool()
    ar_h, ar_w = torch.arange(hgt, device=diff.device), torch.arange(wid, device=diff.device)
    return (torch.where(rows, ar_h, hgt).min(1).values, torch.where(rows, ar_h + 1, 0).max(1).values,
            torch.where(cols, ar_w, wid).min(1).values, torch.where(cols, ar_w + 1, 0).max(1).values)


def input_windows(cand: torch.Tensor, base: torch.Tensor) -> Window:
    """The bounding box (common size) of the pixels where each candidate mask differs from the base."""
    # one copy to the host; the rest is planning, on the CPU like the plan
    y0, y1, x0, x1 = torch.stack(diff_boxes(cand, base)).cpu()
    hgt, wid = cand.shape[-2:]
    empty = y1 <= y0
    y0, x0 = torch.where(empty, 0, y0), torch.where(empty, 0, x0)
    y1, x1 = torch.where(empty, 1, y1), torch.where(empty, 1, x1)
    h, w = int((y1 - y0).max()), int((x1 - x0).max())
    return Window(y0.clamp(0, hgt - h), x0.clamp(0, wid - w), h, w)


# --------------------------------------------------------------------------------------------
# The plan: windows per node, and what it costs
# --------------------------------------------------------------------------------------------
def plan(g, values: dict, win0: Window, max_fraction: float = WINDOW_MAX_FRACTION):
    """Windows of every dependent node for candidates whose input differs inside ``win0``.

    Returns (plans: node -> NodePlan, cost: (windowed multiply-adds, full multiply-adds) of
    the affine layers per candidate, largest: the largest per-candidate activation in elements,
    order: the candidates sorted by their own (unpadded) windows at the node with the most
    windowed multiply-adds, see ``SORTED_CHUNK``).
    """
    value_of = values.__getitem__
    plans: dict[fx.Node, NodePlan] = {}
    state: dict[fx.Node, Window | None] = {}
    # each candidate's own window (oy, h, ox, w: (M,) each), inside the common one
    own: dict[fx.Node, tuple] = {}
    x = values[g.input_node]
    state[g.input_node] = win0 if x.dim() == 4 else None
    m = win0.oy.shape[0]
    own[g.input_node] = (win0.oy, win0.oy.new_full((m,), win0.h), win0.ox, win0.ox.new_full((m,), win0.w))
    heaviest = (-1, None)  # (multiply-adds, the node's own windows): the key that sorts candidates
    win_macs = full_macs = 0
    largest = win0.h * win0.w * x.shape[1] if x.dim() == 4 else x[0].numel()
    for node in g.nodes:
        step = g.steps.get(node)
        if step is None:
            continue
        out = values[node]
        wins = [state.get(d) for d in step.dep]
        p = NodePlan(None)
        if isinstance(out, torch.Tensor) and out.dim() == 4 and all(w is not None for w in wins):
            p = _node_plan(step, values, wins, own, out.shape[2:])
            if p.crop is not None:
                largest = max(largest, p.crop.h * p.crop.w * values[step.dep[0]].shape[1])
            if p.win is not None and p.win.h * p.win.w > max_fraction * out.shape[2] * out.shape[3]:
                p = NodePlan(None)
        plans[node] = p
        state[node] = p.win
        weight = step.rule.macs(step, value_of)
        if weight:
            positions = out[0, 0].numel() if out.dim() > 2 else 1
            full_macs += weight * positions
            win_macs += weight * (p.win.h * p.win.w if p.win is not None else positions)
            if p.win is not None and weight * p.win.h * p.win.w > heaviest[0]:
                heaviest = (weight * p.win.h * p.win.w, own[node])
        if not isinstance(out, torch.Tensor):  # a tuple (chunk; attention's (out, weights)) or None
            per_mask = max((t[0].numel() for t in tensors(out) if isinstance(t, torch.Tensor)), default=0)
        else:
            per_mask = out[0].numel() if p.win is None else out.shape[1] * p.win.h * p.win.w
        largest = max(largest, per_mask)
    # the candidates sorted by their own window's size (rows, then columns) at the node with the
    # most windowed multiply-adds: neighbours in this order have similar windows where it counts
    order = torch.arange(m, device=win0.oy.device)
    if heaviest[1] is not None:
        _, rows, _, cols = heaviest[1]
        order = order[torch.argsort(cols, stable=True)]
        order = order[torch.argsort(rows[order], stable=True)]
    return plans, (win_macs, full_macs), largest, order


def _node_plan(step, values: dict, wins: list, own: dict, out_hw) -> NodePlan:
    """The window of one node from its inputs' windows, by its rule's locality (updates
    ``own``: each candidate's own window inside the common one)."""
    ho, wo = out_hw
    loc = step.rule.locality(step, values)
    d0 = step.dep[0]
    if isinstance(loc, Sliding):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = loc.kernel, loc.stride, loc.padding, loc.dilation
        w_in = wins[0]
        oy, nh = _through(w_in.oy, w_in.h, kh, sh, ph, dh, ho)
        ox, nw = _through(w_in.ox, w_in.w, kw, sw, pw, dw, wo)
        crop = None
        if loc.weight is not None:
            crop = Window(oy * sh - ph, ox * sw - pw, (nh - 1) * sh + (kh - 1) * dh + 1,
                          (nw - 1) * sw + (kw - 1) * dw + 1)
        e = own[d0]
        own[step.node] = (*_through_each(e[0], e[1], kh, sh, ph, dh, ho),
                          *_through_each(e[2], e[3], kw, sw, pw, dw, wo))
        return NodePlan(Window(oy, ox, nh, nw), sliding=loc, crop=crop)
    if isinstance(loc, Union):
        w = wins[0]
        oy, nh, ox, nw = w.oy, w.h, w.ox, w.w
        for o in wins[1:]:
            oy, nh = _union(oy, nh, o.oy, o.h, ho)
            ox, nw = _union(ox, nw, o.ox, o.w, wo)
        e = own[d0]
        for d in step.dep[1:]:
            f = own[d]
            e = (*_union_each(e[0], e[1], f[0], f[1]), *_union_each(e[2], e[3], f[2], f[3]))
        own[step.node] = e
        return NodePlan(Window(oy, ox, nh, nw))
    if isinstance(loc, Elementwise) and len(step.dep) == 1 and values[d0].shape == values[step.node].shape:
        own[step.node] = own[d0]
        return NodePlan(wins[0])
    return NodePlan(None)

"""Max-pools and max-reductions: both parts gathered at the argmax positions of the true
activation."""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, arg, call_with, load_arg, op_is
from .base import Rule, Sliding, as_tuple, mask_dim, merge_masks, per_mask, unsupported

aten = torch.ops.aten

def maxpool_fn(step: Step, value_of: Callable):
    """A function returning (pooled, flat indices) for a max-pool step."""
    m = step.module
    if m is not None:
        if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
            fn = F.adaptive_max_pool1d if isinstance(m, nn.AdaptiveMaxPool1d) else F.adaptive_max_pool2d
            return lambda t: fn(t, m.output_size, return_indices=True)
        fn = F.max_pool1d if isinstance(m, nn.MaxPool1d) else F.max_pool2d
        return lambda t: fn(t, m.kernel_size, m.stride, m.padding, m.dilation,
                            ceil_mode=m.ceil_mode, return_indices=True)
    node = step.node
    args = list(load_arg(value_of, node.args[1:]))
    kwargs = dict(load_arg(value_of, node.kwargs))
    kwargs["return_indices"] = True
    fn = node.target
    if op_is(fn, aten.max_pool1d, aten.max_pool2d):  # the same arguments; F's form gives the indices
        fn = F.max_pool1d if op_is(fn, aten.max_pool1d) else F.max_pool2d
    if fn in (F.max_pool1d, F.max_pool2d) and len(args) >= 6:
        args = args[:5]  # positional return_indices replaced by the keyword
    return lambda t: fn(t, *args, **kwargs)


def gather_at(r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """r (M, C, *S) gathered at flat argmax indices (1 or M, C, *So)."""
    idx = idx.expand(r.shape[0], *idx.shape[1:])
    n, c = idx.shape[:2]
    return r.reshape(n, c, -1).gather(2, idx.reshape(n, c, -1)).reshape(idx.shape)


def pool2d_params(step: Step, value_of: Callable):
    """(kernel, stride, padding, dilation) of a 2-d max-pool, or None (adaptive pools)."""
    m = step.module
    if m is not None:
        if not isinstance(m, nn.MaxPool2d):
            return None
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
    else:
        node = step.node
        if not op_is(node.target, F.max_pool2d, aten.max_pool2d):
            return None
        names = ["input", "kernel_size", "stride", "padding", "dilation"]
        vals = dict(zip(names, load_arg(value_of, node.args)))
        vals.update({k: v for k, v in load_arg(value_of, node.kwargs).items() if k in names})
        k, s = vals["kernel_size"], vals.get("stride")
        p, d = vals.get("padding", 0), vals.get("dilation", 1)
    if s is None or (isinstance(s, (tuple, list)) and len(s) == 0):
        s = k
    return as_tuple(k), as_tuple(s), as_tuple(p), as_tuple(d)


class MaxPool(Rule):
    kind = "maxpool"
    modules = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
    functions = (F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, aten.max_pool1d,
                 aten.max_pool2d)
    row = ("MaxPool1d/2d, AdaptiveMaxPool1d/2d, `F.max_pool*`, `aten.max_pool1d/2d`", "`r` at the argmax of `a`",
           "`i` at the same positions")

    def total(self, step, value_of):
        # the indices come from the model's own forward, not from the sum r + i: at exact ties
        # (constant backgrounds) that sum's rounding would pick the position, mask by mask
        return maxpool_fn(step, value_of)(value_of(step.dep[0]))

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        return gather_at(mags[step.dep[0]], aux), aux

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return gather_at(r, aux), gather_at(i, aux)

    def relevant(self, step, rel, values, aux, ops, m):
        return ops.maxpool_gather(rel[step.dep[0]], aux)

    def fresh(self, step, rel, out):
        return True

    # the paired pass keeps only the argmax indices (of the model's own forward when recorded)
    def paired_total(self, step, p):
        return p.pool_total(step, maxpool_fn(step, p.value_of))

    def paired_relevant(self, step, p):
        return p.pool_relevant(step, maxpool_fn(step, p.value_of))

    def paired_aux(self, step, p):
        return p.pool_indices(step, maxpool_fn(step, p.value_of))

    def locality(self, step, values):
        pool = pool2d_params(step, values.__getitem__)
        return None if pool is None else Sliding(*pool)


def _reads_values(user: fx.Node) -> bool:
    """Whether a user of ``max(dim)`` reads its values (``[0]``, ``.values``) or nothing."""
    if user.target is operator.getitem:
        return user.args[1] == 0 or not user.users
    return user.target is getattr and user.args[1] == "values"


class MaxReduce(Rule):
    """``amax`` and ``max(dim)`` over non-batch dims (Hiera's token max-pool, VOLO's token
    head): both parts at the argmax of the true input, as for a max-pool. ``max(dim)`` gives
    (values, indices); only its values (``[0]``, ``.values``) are decomposed."""
    kind = "max_reduce"
    functions = (torch.amax, torch.max, aten.amax, aten.max)
    methods = ("amax", "max")
    row = ("`amax`, `max(dim)[0]`, `max(dim).values` over non-batch dims, `aten.amax`, `aten.max.dim`",
           "`r` at the argmax of `a`",
           "`i` at the same positions")

    def claim(self, graph, node, dep, module):
        dims = arg(node, 1, "dim", None)
        if isinstance(dims, fx.Node):
            raise unsupported(node, "an element-wise max of two tensors (CD has no rule for it)")
        if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
            raise unsupported(node, "a max over every dim, the batch included")
        pair = not op_is(node.target, torch.amax, aten.amax, "amax")
        if pair and not all(_reads_values(u) for u in node.users):
            raise unsupported(node, "max's indices are read (only the values, max(dim)[0] or .values, "
                                    "are decomposed)")
        return Step(node, self, dep, extra={"pair": pair})

    @staticmethod
    def _dims(step: Step, ndim: int) -> list[int]:
        dims = arg(step.node, 1, "dim")
        dims = sorted({d % ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])})
        if 0 in dims:
            raise unsupported(step.node, "a max over the batch dim")
        return dims

    @staticmethod
    def _reduced_last(x: torch.Tensor, ndim: int, dims: list[int]) -> torch.Tensor:
        """x (..., *S), S of rank ndim: the reduced dims moved last and flattened into one."""
        lead = x.dim() - ndim
        kept = [d for d in range(ndim) if d not in dims]
        x = x.permute(*range(lead), *(lead + d for d in kept + dims))
        return x.reshape(*x.shape[:lead + len(kept)], -1)

    def _apply(self, step, t: torch.Tensor, total: torch.Tensor, idx=None):
        """A part ``t`` (masks in the dim where its shape differs from ``total``'s) at the
        total's argmax ``idx`` (computed from ``total`` when None: CDEP's paired pass)."""
        dims = self._dims(step, total.dim())
        if idx is None:
            idx = self._reduced_last(total, total.dim(), dims).argmax(-1, keepdim=True)
        k = mask_dim(t.shape, total.shape)
        flat = self._reduced_last(per_mask(t, total.shape), total.dim(), dims)
        out = flat.gather(-1, idx.expand(*flat.shape[:-1], 1)).squeeze(-1)
        if arg(step.node, 2, "keepdim", False):
            for d in dims:
                out = out.unsqueeze(1 + d)
        else:  # the masks' dim moves with the reduced dims
            k = 0 if k in dims else k - sum(d < k for d in dims)
        out = merge_masks(out, k)
        return torch.return_types.max((out, None)) if step.extra["pair"] else out  # indices: not decomposed

    def total(self, step, value_of):
        x = value_of(step.dep[0])  # aux: the flat argmax over the reduced dims, (*kept sizes, 1)
        return call_with(step, value_of, {}), self._reduced_last(x, x.dim(), self._dims(step, x.dim())).argmax(
            -1, keepdim=True)

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        return self._apply(step, mags[step.dep[0]], value_of(step.dep[0]), aux), aux

    def reference(self, step, parts, value_of, aux):
        x = value_of(step.dep[0])
        return tuple(self._apply(step, p, x, aux) for p in parts[step.dep[0]])

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        return self._apply(step, rel[d], values[d], aux)

"""Part-wise ops: maps that are linear in their input and treat every sample alike apply to
each part as they are (pools, reshapes, indexing, concatenation, sums, scaling by a
constant). A constant operand joins the irrelevant part."""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, UnsupportedOpError, arg, call_with, describe_node, load_arg, op_is, operands
from .base import (ContextOnly, Elementwise, Rule, Union, mask_dim, merge_masks, only_gates, per_mask, rel_shape,
                   unsupported)

aten = torch.ops.aten

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout)
_IDENTITY_METHODS = ("contiguous", "clone")
_IDENTITY_ATEN = (aten.clone, aten.alias, aten.detach, aten.contiguous)
# torch.export's ATen forms of the linear maps (the training IR keeps these whole)
_LINEAR_ATEN = (aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
                aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.mean, aten.sum, aten.permute,
                aten.transpose, aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle,
                aten.native_channel_shuffle, aten.upsample_nearest1d,
                aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.upsample_bicubic2d,
                aten.flip, aten.dropout, aten.im2col, aten.col2im, aten.unfold)


_ADAPTIVE_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_POOLS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, aten.adaptive_avg_pool1d,
                   aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d,
                   aten._adaptive_avg_pool3d)


def _batch_dim(node: fx.Node, dims) -> bool:
    """Whether an ATen op's ``dims`` name the batch dim (dim 0 of its first argument)."""
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    ndim = getattr(val, "ndim", None)
    dims = dims if isinstance(dims, (tuple, list)) else [dims]
    return any(isinstance(d, int) and (d == 0 or (ndim is not None and d % ndim == 0)) for d in dims)
try:  # torchvision's stochastic depth is an fx leaf function (torch.fx.wrap): identity in eval
    from torchvision.ops import stochastic_depth as _stochastic_depth
    _STOCHASTIC_DEPTH = {_stochastic_depth: 3}  # function -> position of its training flag
except ImportError:  # torchvision is optional
    _STOCHASTIC_DEPTH = {}
try:  # Swin's patch merging: zero padding, strided slices, concatenation (an fx leaf function)
    from torchvision.models.swin_transformer import _patch_merging_pad
    _TV_LINEAR = (_patch_merging_pad,)
except ImportError:
    _TV_LINEAR = ()


def _identity(t):
    return t


def _each(step: Step, parts: dict, value_of):
    """The op applied to the relevant and to the irrelevant part alike."""
    d = step.dep[0]
    r, i = parts[d]
    return call_with(step, value_of, {d: r}), call_with(step, value_of, {d: i})


class PartWise(Rule):
    """An op applied to each part as it is, ``f(r)`` and ``f(i)`` (the default forms); an op
    on gates alone is gate-like."""

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def reference(self, step, parts, value_of, aux):
        return _each(step, parts, value_of)

    def relevant(self, step, rel, values, aux, ops, m):
        return call_with(step, values.__getitem__, {d: rel[d] for d in step.dep})


def _along(node: fx.Node) -> bool:
    """Whether the node flips or cumulatively sums along given dims."""
    if node.op == "call_method":
        return node.target in ("flip", "cumsum")
    return node.op == "call_function" and op_is(node.target, torch.flip, torch.cumsum, aten.flip, aten.cumsum)


class Linear(PartWise):
    """A map linear in its input: ``f(r)``, ``f(i)``."""
    kind = "linear"
    modules = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveAvgPool3d, nn.Identity, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
               nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Unfold, nn.Fold
               ) + _DROPOUT_MODULES
    functions = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                 F.adaptive_avg_pool3d, torch.mean, torch.sum, torch.permute, torch.transpose,
                 F.interpolate, F.pixel_shuffle, F.channel_shuffle, torch.channel_shuffle, torch.movedim,
                 torch.swapaxes, torch.swapdims, F.unfold, F.fold, torch.flip, torch.cumsum, aten.cumsum
                 ) + _DROPOUT_FUNCTIONS + tuple(_STOCHASTIC_DEPTH) + _TV_LINEAR + _IDENTITY_ATEN + _LINEAR_ATEN
    methods = ("contiguous", "clone", "permute", "transpose", "mean", "sum", "movedim", "swapaxes",
               "swapdims", "unfold", "flip", "cumsum")
    row = ("avg-pools, adaptive avg-pools, dropout and stochastic depth (eval), Identity, padding, "
           "upsampling, channel shuffle, `permute`, `transpose`, `movedim`, `mean`, `Unfold`/`Fold` "
           "(im2col, col2im), `Tensor.unfold` (windows along a non-batch dim), `flip`, `cumsum`, Swin's patch "
           "merging, ...; their `aten` ops, "
           "`aten.flip`", "`f(r)`", "`f(i)`")

    def claim(self, graph, node, dep, module):
        if isinstance(module, _DROPOUT_MODULES + (nn.Identity,)):
            return Step(node, self, dep, fn=_identity, module=module, extra={"identity": True})
        if node.op == "call_function" and op_is(node.target, *_DROPOUT_FUNCTIONS, *_STOCHASTIC_DEPTH, aten.dropout):
            training = (arg(node, 2, "train", True) if op_is(node.target, aten.dropout)
                        else arg(node, _STOCHASTIC_DEPTH.get(node.target, 2), "training", True))
            if training:
                raise unsupported(node, "dropout with training=True: CD (defined on eval behaviour) "
                                        "would see random masks. Pass training=self.training and "
                                        "call model.eval()")
            return Step(node, self, dep, fn=_identity, extra={"identity": True})
        if _along(node):  # flip / cumsum: negative dims without shapes are checked at each call (total)
            dims = arg(node, 1, "dims", node.kwargs.get("dim"))  # flip's dims, cumsum's dim
            if _batch_dim(node, dims):
                raise unsupported(node, "a flip or cumulative sum across the batch dim")
            return Step(node, self, dep, extra={"dims": dims})
        if (node.target == "unfold" and node.op == "call_method" or op_is(node.target, aten.unfold)) and _batch_dim(
                node, arg(node, 1, "dimension", 0)):
            raise unsupported(node, "sliding windows along the batch dim")
        identity = (node.op == "call_method" and node.target in _IDENTITY_METHODS) or op_is(
            node.target, *_IDENTITY_ATEN)
        adaptive = isinstance(module, _ADAPTIVE_POOL_MODULES) or op_is(node.target, *_ADAPTIVE_POOLS)
        return Step(node, self, dep, module=module, extra={"identity": identity, "adaptive_pool": adaptive})

    def total(self, step, value_of):
        if "dims" in step.extra and 0 in _dims(step.extra["dims"], value_of(step.dep[0]).dim()):
            raise unsupported(step.node, "a flip or cumulative sum across the batch dim")
        return super().total(step, value_of)

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        if step.extra.get("adaptive_pool") and values[step.node].shape == values[d].shape:
            return rel[d]  # the mean of one value is that value; torch's pool took 15 ms a VGG16 head
        if "dims" in step.extra and mask_dim(rel[d].shape, values[d].shape) in _dims(step.extra["dims"], rel[d].dim()):
            return each_mask(step, rel[d], values)  # along the dim that holds the masks: each mask alone
        return super().relevant(step, rel, values, aux, ops, m)

    def locality(self, step, values):
        return Elementwise() if step.extra.get("identity") else None


class Cast(PartWise):
    """A dtype cast (``.float()``, ``.to(dtype)``; ``aten.to``, ``aten._to_copy``; e.g. timm's
    EfficientViT runs its attention in float32 whatever the model's dtype): ``cast(r)``, and
    the irrelevant part the cast total minus it. Casting r and i apart would round them apart,
    so that they no longer add up to the value the model computes (the batched engine's
    ``i = a - r`` has this form)."""
    kind = "cast"
    functions = (aten.to, aten._to_copy)
    methods = ("float", "double", "half", "bfloat16", "to", "type")
    row = ("dtype casts: `.float()`, `.double()`, `.half()`, `.bfloat16()`, `.to(dtype)`, `.type(dtype)`; "
           "`aten.to`, `aten._to_copy`", "`cast(r)`", "`cast(a) - cast(r)`")

    def claim(self, graph, node, dep, module):
        if node.op == "call_method" and (len(dep) != 1 or dep[0] is not node.args[0]):
            raise unsupported(node, "a cast to another input-dependent tensor's type (`.to(tensor)`): "
                                    "write `.to(tensor.dtype)`")
        return Step(node, self, dep, module=module)

    def reference(self, step, parts, value_of, aux):
        d = step.dep[0]
        rel = call_with(step, value_of, {d: parts[d][0]})
        return rel, value_of(step.node) - rel

    def locality(self, step, values):
        return Elementwise()


class Reshape(PartWise):
    kind = "reshape"
    modules = (nn.Flatten, nn.Unflatten)
    functions = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten, aten.view,
                 aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze)
    methods = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten")
    row = ("`flatten`, `view`, `reshape`, `squeeze`, `unsqueeze`, `unflatten`, `nn.Flatten`; window "
           "partitions merging the batch with the windows; their `aten` ops", "`f(r)`", "`f(i)`")

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        r, total_in, total_out = rel[d], values[d].shape, values[step.node].shape
        if mask_dim(r.shape, total_in) != 0:  # masks moved (a head stack): to the front first
            r = per_mask(r, total_in)
            return r.reshape(rel_shape(total_out, 0, m))
        # the masks become the outer factor of dim 0: (M, ...) where the total has its batch of
        # 1 there, (M * windows, N, C) where a window partition merges the batch with the windows;
        # the factor from the sizes, not m: CDEP's paired pass has N images' totals, K * N rows
        total = values[step.node].shape
        return r.reshape(rel_shape(total, 0, r.numel() // max(1, math.prod(total))))


class Getitem(PartWise):
    kind = "getitem"
    functions = (operator.getitem, aten.slice, aten.select, aten.narrow, aten.index, getattr)
    row = ("`x[:, ...]` keeping the batch dim; `aten.slice`, `aten.select`, `aten.narrow`, `aten.index`",
           "`r[idx]`", "`i[idx]`")

    def claim(self, graph, node, dep, module):
        if node.target is getattr:  # a named field of a decomposed tuple: max(dim).values
            return Step(node, self, dep) if node.args[1] == "values" else None
        if node.args[0] not in graph.dependent or (aten_indexing(node) and dep != [node.args[0]]):
            raise unsupported(node, "indexing with an index computed from the input")
        if op_is(node.target, aten.select, aten.narrow) and _batch_dim(node, arg(node, 1, "dim", 0)):
            raise unsupported(node, "indexing the batch dim")
        if op_is(node.target, aten.slice) and _batch_dim(node, arg(node, 1, "dim", 0)) and not (
                arg(node, 2, "start", None) in (0, None) and arg(node, 4, "step", 1) == 1
                and (arg(node, 3, "end", None) is None or arg(node, 3, "end") >= 2 ** 62)):
            raise unsupported(node, "slicing the batch dim")  # export's x[:, ...] is slice(x, 0, 0, 2**63-1)
        return Step(node, self, dep)


def aten_indexing(node: fx.Node) -> bool:
    return op_is(node.target, aten.slice, aten.select, aten.narrow, aten.index)


class Split(PartWise):
    """``chunk``, ``split``, ``unbind``: a tuple of pieces, each part cut alike (the pieces are
    read through ``getitem``)."""
    kind = "split"
    functions = (torch.chunk, torch.split, torch.unbind, aten.chunk, aten.split, aten.split_with_sizes,
                 aten.unbind)
    methods = ("chunk", "split", "unbind")
    row = ("`chunk`, `split`, `unbind` along a non-batch dim", "the pieces of `r`", "the pieces of `i`")


class Add(PartWise):
    """``a + b``: parts add; a constant operand joins the irrelevant part."""
    kind = "add"
    sign = 1
    functions = (operator.add, torch.add, operator.iadd, aten.add)
    methods = ("add", "add_")
    row = ("`+`, `+=`, `torch.add`", "`r1 + r2`", "`i1 + i2` (a constant joins here)")

    def claim(self, graph, node, dep, module):
        if arg(node, 2, "alpha", 1) != 1:
            raise unsupported(node, "add/sub with alpha")
        return Step(node, self, dep)

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        a, b = operands(step.node)
        ma, mb = (mags[t] if t in step.dep else abs(load_arg(value_of, t)) for t in (a, b))
        return ma + mb, aux  # a difference's rounding is relative to both operands too

    def reference(self, step, parts, value_of, aux):
        a, b = operands(step.node)
        pa = parts.get(a) if isinstance(a, fx.Node) else None
        pb = parts.get(b) if isinstance(b, fx.Node) else None
        s = self.sign
        if pa is not None and pb is not None:
            return pa[0] + s * pb[0], pa[1] + s * pb[1]
        if pa is not None:  # a constant joins the irrelevant part
            c = load_arg(value_of, b)
            r, i = pa
            return r + torch.zeros_like(i + s * c), i + s * c
        c = load_arg(value_of, a)
        r, i = pb
        return s * r + torch.zeros_like(c + s * i), c + s * i

    def relevant(self, step, rel, values, aux, ops, m):
        a, b = operands(step.node)
        ra = rel.get(a) if isinstance(a, fx.Node) else None
        rb = rel.get(b) if isinstance(b, fx.Node) else None
        if ra is not None and rb is not None:
            return ra + rb if self.sign > 0 else ra - rb
        r, d = (ra, a) if ra is not None else ((rb if self.sign > 0 else -rb), b)
        total = values[step.node].shape  # a constant may broadcast the shape
        k = mask_dim(r.shape, values[d].shape) + len(total) - r.dim()
        return r.expand(rel_shape(total, k, m))

    def inplace_operand(self, step):
        a, b = operands(step.node)
        return a if (a in step.dep and b in step.dep and a is not b) else None

    def relevant_(self, step, rel, values, aux, ops):
        a, b = operands(step.node)
        if rel[a].shape != rel[b].shape:
            return None
        return rel[a].add_(rel[b]) if self.sign > 0 else rel[a].sub_(rel[b])

    def fresh(self, step, rel, out):
        a, b = operands(step.node)
        return a in rel and b in rel

    def locality(self, step, values):
        if len(step.dep) != 2:
            return None
        shapes = {tuple(values[n].shape) for n in (*step.dep, step.node)}
        return Union() if len(shapes) == 1 else None


class Sub(Add):
    kind = "sub"
    sign = -1
    functions = (operator.sub, torch.sub, operator.isub, aten.sub)
    methods = ("sub", "sub_")
    row = ("`-`, `-=`, `torch.sub`", "`r1 - r2`", "`i1 - i2` (a constant joins here)")


class Neg(PartWise):
    kind = "neg"
    functions = (operator.neg, torch.neg, aten.neg)
    methods = ("neg",)
    row = ("unary `-`", "`-r`", "`-i`")

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        return mags[step.dep[0]], aux

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return -r, -i

    def relevant(self, step, rel, values, aux, ops, m):
        return -rel[step.dep[0]]

    def locality(self, step, values):
        return Elementwise()


class Scale(PartWise):
    """``x * c`` or ``x / c`` with c independent of the input."""
    kind = "scale"
    functions = (operator.mul, torch.mul, operator.imul, operator.truediv, torch.div, operator.itruediv,
                 aten.mul, aten.div)
    methods = ("mul", "mul_", "div", "div_")
    row = ("`*` or `/` by something that does not depend on the input", "`r*c`", "`i*c`")
    _DIVIDE = (operator.truediv, torch.div, operator.itruediv, "div", "div_", aten.div)

    def claim(self, graph, node, dep, module):
        a, b = operands(node)
        dependent = graph.dependent
        divide = op_is(node.target, *self._DIVIDE)
        if divide and node.kwargs.get("rounding_mode") is not None:
            raise unsupported(node, "division with rounding (not linear)")
        if (a in dependent and b in dependent) or (divide and b in dependent):
            raise unsupported(node, "a product or quotient of two input-dependent values "
                                    "(not linear; CD has no rule for it)")
        return Step(node, self, dep, extra={"divide": divide})

    def context_operands(self, graph, node, reach, gates):
        """A gate on a decomposed value (``x * sigmoid(s)``, ``attn * v``) and a denominator
        (``x / std``) are taken from the total (design.md section 8)."""
        a, b = operands(node)
        if a is b:  # read decomposed too
            return set()
        if op_is(node.target, *self._DIVIDE):
            return {b} & reach
        if a in reach and b in reach and (a in gates) != (b in gates):
            return {a, b} & gates
        return set()

    def _constant(self, step, value_of):
        a, b = operands(step.node)
        return load_arg(value_of, b if a is step.dep[0] else a)

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        c = self._constant(step, value_of)
        mag, c = mags[step.dep[0]], c if isinstance(c, torch.Tensor) and c.dtype == torch.bool else abs(c)
        return (mag / c if step.extra["divide"] else mag * c), aux

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        c = self._constant(step, value_of)
        return (r / c, i / c) if step.extra["divide"] else (r * c, i * c)

    def relevant(self, step, rel, values, aux, ops, m):
        r, c = rel[step.dep[0]], self._constant(step, values.__getitem__)
        return r / c if step.extra["divide"] else r * c

    def locality(self, step, values):
        c = self._constant(step, values.__getitem__)
        per_channel = not isinstance(c, torch.Tensor) or c.dim() < 2 or tuple(c.shape[-2:]) == (1, 1)
        return Elementwise() if per_channel else None


def listed_parts(items, parts, value_of) -> tuple[list, list]:
    """(relevant parts, irrelevant parts) of a cat's or stack's inputs: a constant joins the
    irrelevant part (zeros for the relevant)."""
    rs, is_ = [], []
    for t in items:
        if isinstance(t, fx.Node) and t in parts:
            rs.append(parts[t][0])
            is_.append(parts[t][1])
        else:
            c = load_arg(value_of, t)
            rs.append(torch.zeros_like(c))
            is_.append(c)
    return rs, is_


class Cat(PartWise):
    kind = "cat"
    functions = (torch.cat, torch.concat, torch.concatenate, aten.cat)
    row = ("`torch.cat` along a non-batch dim", "part-wise (zeros for a constant)", "part-wise (a constant joins here)")

    @staticmethod
    def _dim(node: fx.Node, total: torch.Tensor, shapes: list, mask_dim: int | None = None) -> int:
        """The cat dim, refused where it is the batch's: the dim holding the masks when known
        (``mask_dim``), else dim 0 when every operand has size 1 there (batch-1 tensors; in a
        sequence-first (T, N, F) layout dim 0 is the sequence, which may be concatenated)."""
        dim = arg(node, 1, "dim", 0) % total.dim()
        batch = mask_dim if mask_dim is not None else (0 if all(sh[0] == 1 for sh in shapes) else None)
        if dim == batch:
            raise UnsupportedOpError(f"{describe_node(node)} concatenates along the batch dimension")
        return dim

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        node = step.node
        pieces = [mags[t] if t in step.dep else abs(load_arg(value_of, t)) for t in node.args[0]]
        shapes = [tuple(p.shape) for p in pieces]
        return torch.cat(pieces, self._dim(node, value_of(node), shapes)), aux

    def reference(self, step, parts, value_of, aux):
        node = step.node
        shapes = [tuple(load_arg(value_of, t).shape) for t in node.args[0]]
        dim = self._dim(node, value_of(node), shapes)
        rs, is_ = listed_parts(node.args[0], parts, value_of)
        return torch.cat(rs, dim), torch.cat(is_, dim)

    def relevant(self, step, rel, values, aux, ops, m):
        node = step.node
        total = values[node]
        first = next(t for t in node.args[0] if isinstance(t, fx.Node) and t in rel)
        k = mask_dim(rel[first].shape, values[first].shape)
        # the masks' dim is known where the parts differ from the totals (more than one mask);
        # in a sequence-first (T, N, F) layout dim 0 is the sequence, which may be concatenated
        moved = tuple(rel[first].shape) != tuple(values[first].shape)
        shapes = [tuple((values[t] if isinstance(t, fx.Node) else t).shape) for t in node.args[0]]
        dim = self._dim(node, total, shapes, k if moved else None)
        out = []
        for t in node.args[0]:
            if isinstance(t, fx.Node) and t in rel:
                out.append(rel[t])
            else:  # a constant joins the irrelevant part (a class token: zeros for every mask)
                v = values[t] if isinstance(t, fx.Node) else t
                out.append(torch.zeros(rel_shape(v.shape, k, m), dtype=total.dtype, device=total.device))
        return torch.cat(out, dim)

    def locality(self, step, values):
        node = step.node
        parts = node.args[0]
        channels = arg(node, 1, "dim", 0) % 4 == 1 and values[node].dim() == 4
        if channels and len(parts) == len(step.dep) and all(t in step.dep for t in parts):
            return Union()
        return None


class Stack(PartWise):
    """``torch.stack`` along any dim: a new dim never mixes the samples (along dim 0 the masks
    move to dim 1, as the total's batch does)."""
    kind = "stack"
    functions = (torch.stack, aten.stack)
    row = ("`torch.stack`, `aten.stack`", "part-wise (zeros for a constant)", "part-wise (a constant joins here)")

    @staticmethod
    def _dim(node: fx.Node, total: torch.Tensor) -> int:
        return arg(node, 1, "dim", 0) % total.dim()

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        node = step.node
        pieces = [mags[t] if t in step.dep else abs(load_arg(value_of, t)) for t in node.args[0]]
        return torch.stack(pieces, self._dim(node, value_of(node))), aux

    def reference(self, step, parts, value_of, aux):
        node = step.node
        rs, is_ = listed_parts(node.args[0], parts, value_of)
        dim = self._dim(node, value_of(node))
        return torch.stack(rs, dim), torch.stack(is_, dim)

    def relevant(self, step, rel, values, aux, ops, m):
        node = step.node
        total = values[node]
        first = next(t for t in node.args[0] if isinstance(t, fx.Node) and t in rel)
        k = mask_dim(rel[first].shape, values[first].shape)
        factor = rel[first].shape[k] // max(1, values[first].shape[k])  # the masks (K*N rows in CDEP)
        out = [rel[t] if isinstance(t, fx.Node) and t in rel else  # a constant: zeros for every mask
               torch.zeros(rel_shape((values[t] if isinstance(t, fx.Node) else t).shape, k, factor),
                           dtype=total.dtype, device=total.device) for t in node.args[0]]
        return torch.stack(out, self._dim(node, total))


class OutputSoftmax(Rule):
    """A trailing softmax / log-softmax: not decomposed (CD scores are logits)."""
    kind = "output_softmax"
    modules = (nn.Softmax, nn.LogSoftmax)
    functions = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, aten.softmax, aten._softmax,
                 aten.log_softmax, aten._log_softmax)
    methods = ("softmax", "log_softmax")
    output_only = True
    row = ("softmax / log-softmax feeding the output", "not decomposed: scores are logits", "")

    def claim(self, graph, node, dep, module):
        if list(node.users) != [graph.output_node]:
            raise unsupported(node, "a softmax inside the network that weights nothing (a trailing "
                                    "softmax is not decomposed; one inside the network is context "
                                    "only as attention or gate weights of a decomposed value)")
        return Step(node, self, dep, module=module)

    def gate_like(self, graph, node, gates):
        return list(node.users) != [graph.output_node]

    def total(self, step, value_of):
        return value_of(step.dep[0]), None

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        return mags[step.dep[0]], aux

    def reference(self, step, parts, value_of, aux):
        return parts[step.dep[0]]

    def relevant(self, step, rel, values, aux, ops, m):
        return rel[step.dep[0]]


class Shape(Rule):
    """``x.size()``, ``x.shape``, ``x.dim()``, and tensors made from the size alone
    (``x.new_zeros(...)``, ``torch.zeros_like(x)``: an attention mask's canvas): a plain value
    of the total, not decomposed."""
    kind = "shape"
    functions = (getattr, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, aten.sym_size,
                 aten.sym_numel, aten.fill)
    methods = ("size", "dim", "new_zeros", "new_ones", "new_full", "new_empty")
    value = False
    row = ("`x.size()`, `x.shape`, `x.dim()`, `x.new_zeros(...)`, `torch.zeros_like(x)`, `aten.sym_size`, "
           "`aten.fill` (a slice filled with a constant), ...",
           "a plain value of `a`", "")

    def claim(self, graph, node, dep, module):
        if node.target is getattr and node.args[1] not in ("shape", "ndim", "dtype", "device"):
            return None
        if op_is(node.target, aten.fill) and arg(node, 1, "value") in graph.dependent:
            return None  # filled with an input-dependent value
        return Step(node, self, dep)


# --------------------------------------------------------------------------------------
# Shifts, paddings, broadcasts (Swin's shifted windows, class tokens): part-wise ops that
# may touch the dim holding the masks. Where they do, the op runs on each mask's part as
# on a tensor of the total's shape (torch.vmap), which is what the model computes per sample.
# --------------------------------------------------------------------------------------
def each_mask(step: Step, r: torch.Tensor, values, fn=None) -> torch.Tensor:
    """The op (or ``fn``) on each mask's relevant part alone, the masks back in the dim that held
    them (the outer factor there)."""
    d = step.dep[0]
    total_in, total_out = values[d].shape, values[step.node].shape
    k = mask_dim(r.shape, total_in)
    fn = fn or (lambda t: call_with(step, values.__getitem__, {d: t}))
    out = torch.vmap(fn)(per_mask(r, total_in))
    k_out = min(max(k + len(total_out) - len(total_in), 0), max(len(total_out) - 1, 0))
    return merge_masks(out, k_out)


def _dims(dims, ndim: int) -> set:
    dims = dims if isinstance(dims, (tuple, list)) else [dims]
    return {int(x) % ndim for x in dims}


class _ConstantsIrrelevant(Rule):
    """An op part-wise in several operands where a constant operand joins the irrelevant part
    (0 in the relevant one), as a constant added does: the op runs on each mask's operands,
    (m, *total) each, the masks then back in dim 0."""

    def _apply(self, step, part, value_of) -> torch.Tensor:
        """The op on ``part(operand)`` ((m, *its total), or a constant) -> (m, *output)."""
        raise NotImplementedError

    @staticmethod
    def _part(step, value_of, rel, irrelevant: bool = False):
        def part(t):
            total = load_arg(value_of, t)
            if t in step.dep:
                return per_mask(rel[t], total.shape)
            if not isinstance(total, torch.Tensor):
                return total if irrelevant else 0 * total  # a number
            return (total if irrelevant else torch.zeros_like(total)).unsqueeze(0)
        return part

    def reference(self, step, parts, value_of, aux):
        r = self._apply(step, self._part(step, value_of, {d: parts[d][0] for d in step.dep}), value_of)
        i = self._apply(step, self._part(step, value_of, {d: parts[d][1] for d in step.dep}, True), value_of)
        return merge_masks(r, 0), merge_masks(i, 0)

    def relevant(self, step, rel, values, aux, ops, m):
        return merge_masks(self._apply(step, self._part(step, values.__getitem__, rel), values.__getitem__), 0)


class Scatter(_ConstantsIrrelevant):
    """``slice_scatter`` / ``select_scatter``: an in-place write into a slice (``y[:, :, 0] = v``,
    MViTv2's ``attn[..., 1:, 1:] = ...``), made out of place at capture: the written region
    takes the source's parts, the rest the target's; a constant operand (a fill) joins the
    irrelevant part, as a constant added does."""
    kind = "scatter"
    functions = (aten.slice_scatter, aten.select_scatter)
    row = ("writes into a slice (`y[:, :, 0] = v` under torch.export): `aten.slice_scatter`, `aten.select_scatter`",
           "the target's `r` with the source's `r` written in (0 for a constant)", "the same of `i` (the constant)")

    def claim(self, graph, node, dep, module):
        whole = op_is(node.target, aten.slice_scatter) and arg(node, 3, "start", None) in (None, 0) and (
            arg(node, 4, "end", None) is None or arg(node, 4, "end", None) >= 2 ** 62) and arg(node, 5, "step", 1) == 1
        if _batch_dim(node, arg(node, 2, "dim", 0)) and not whole:  # y[:] = v keeps every sample's row
            raise unsupported(node, "a write across the batch dim")
        return Step(node, self, dep)

    def _apply(self, step, part, value_of):
        node = step.node
        target, source = (part(t) for t in node.args[:2])
        m = max(target.shape[0], source.shape[0])
        dim = arg(node, 2, "dim", 0) % (target.dim() - 1)
        target, source = (t.expand((m,) + tuple(t.shape[1:])).contiguous() for t in (target, source))
        return node.target(target, source, dim + 1, *node.args[3:])


class Where(_ConstantsIrrelevant):
    """``torch.where(cond, a, b)``, ``a.masked_fill(mask, v)``: the condition is a constant or
    context (a mask computed from the total, as a gate is), so the op is linear in a and b: each
    part takes a's part where cond holds and b's elsewhere, a constant branch irrelevant."""
    kind = "where"
    functions = (torch.where, aten.where, aten.masked_fill)
    methods = ("where", "masked_fill")
    row = ("`torch.where(cond, a, b)`, `masked_fill` (cond a constant or from the total: context)",
           "`where(cond, ar, br)` (0 for a constant)", "`where(cond, ai, bi)` (the constant)")

    @staticmethod
    def _operands(node):
        """(cond, a, b) of the node, whatever its form."""
        if node.op == "call_method" and node.target == "masked_fill" or op_is(node.target, aten.masked_fill):
            return node.args[1], node.args[2], node.args[0]  # where(mask, value, self)
        if node.op == "call_method":
            return node.args[1], node.args[0], node.args[2]  # self.where(cond, other)
        return tuple(node.args[:3])

    def claim(self, graph, node, dep, module):
        if len(node.args) < 3 or node.kwargs:
            raise unsupported(node, "where / masked_fill with keyword or missing operands")
        cond = self._operands(node)[0]
        if cond in dep:
            raise unsupported(node, "a condition that is decomposed")
        return Step(node, self, dep)

    def context_operands(self, graph, node, reach, gates):
        cond = self._operands(node)[0]
        return {cond} if isinstance(cond, fx.Node) and cond in reach else set()

    def _apply(self, step, part, value_of):
        cond, a, b = self._operands(step.node)
        return torch.where(load_arg(value_of, cond), part(a), part(b))


class Comparison(ContextOnly):
    """``a > b``, ``eq``, ...: a boolean mask of the total, context where it gates a decomposed
    value (``x * (x > 0)``, ``torch.where(x > 0, ...)``); no rule on its own."""
    kind = "comparison"
    functions = (operator.gt, operator.lt, operator.ge, operator.le, torch.gt, torch.lt, torch.ge, torch.le,
                 torch.eq, torch.ne, aten.gt, aten.lt, aten.ge, aten.le, aten.eq, aten.ne)
    methods = ("gt", "lt", "ge", "le", "eq", "ne")
    row = ("comparisons (`>`, `<`, `eq`, ...) gating a decomposed value", "context: from the total", "")
    alone = "a comparison that gates no decomposed value"


class Copy(Rule):
    """``aten.copy(view, src)``, an in-place copy into a slice made out of place (what ``Scatter``
    then writes back): the source's values, of the view's shape; a constant source is
    irrelevant."""
    kind = "copy"
    functions = (aten.copy,)
    row = ("`aten.copy` of a write into a slice (`y[:, :2] = z` under torch.export)", "`r` of the source (0: a "
           "constant)", "`i` of the source (the constant)")

    def claim(self, graph, node, dep, module):
        view, src = node.args[:2]
        vals = [getattr(a, "meta", {}).get("val") for a in (view, src)]
        if any(v is None for v in vals) or vals[0].shape != vals[1].shape or vals[0].dtype != vals[1].dtype:
            raise unsupported(node, "a copy that broadcasts or casts its source")
        return Step(node, self, dep)

    def reference(self, step, parts, value_of, aux):
        src = step.node.args[1]
        if src in step.dep:
            return parts[src]
        c = load_arg(value_of, src)
        r = next(iter(parts.values()))[0]  # the view's parts: their mask layout
        return torch.zeros_like(r), c.expand_as(r)

    def relevant(self, step, rel, values, aux, ops, m):
        view, src = step.node.args[:2]
        return rel[src] if src in step.dep else torch.zeros_like(rel[view])


class Roll(PartWise):
    """``torch.roll``: part-wise (Swin's cyclic shift and its reverse)."""
    kind = "roll"
    functions = (torch.roll, aten.roll)
    methods = ("roll",)
    row = ("`torch.roll`, `aten.roll`", "`f(r)`", "`f(i)`")

    def relevant(self, step, rel, values, aux, ops, m):
        r = rel[step.dep[0]]
        dims = arg(step.node, 2, "dims", None)
        if dims is None or (isinstance(dims, (tuple, list)) and not dims) or mask_dim(r.shape, values[step.dep[0]].shape) in _dims(dims, r.dim()):
            return each_mask(step, r, values)  # a roll of the flattened sample or along the masks
        return call_with(step, values.__getitem__, {step.dep[0]: r})


_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad3d)
_OTHER_PADS = (nn.ReflectionPad1d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad3d,
               nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


class Pad(Rule):
    """``F.pad`` and the padding modules: part-wise; a constant mode's value is a constant, so it
    joins the irrelevant part (the relevant part is padded with zeros)."""
    kind = "pad"
    modules = _CONSTANT_PADS + _OTHER_PADS
    functions = (F.pad, aten.pad, aten.constant_pad_nd)
    row = ("`F.pad`, ConstantPad, ReflectionPad, ReplicationPad, CircularPad; `aten.pad`, "
           "`aten.constant_pad_nd`", "`pad(r, 0)`", "`pad(i, value)` (reflect, replicate, circular: `pad(i)`)")

    def claim(self, graph, node, dep, module):
        if module is not None:
            constant = isinstance(module, _CONSTANT_PADS)
            return Step(node, self, dep, module=module, extra={
                "pad": tuple(module.padding), "mode": "constant" if constant else None,
                "value": float(module.value) if constant else 0.0})
        if dep != [node.args[0]]:
            raise unsupported(node, "padding sizes or a fill value computed from the input")
        val = node.args[0].meta.get("val")  # torch.export records shapes; fx checks at run time
        if val is not None and len(arg(node, 1, "pad")) // 2 >= val.ndim:
            raise unsupported(node, "padding the batch dim")
        if op_is(node.target, aten.constant_pad_nd):  # (input, pad, value)
            return Step(node, self, dep, extra={"pad": None, "mode": "constant", "value_at": 2})
        mode = arg(node, 2, "mode", "constant")
        if isinstance(mode, fx.Node):
            raise unsupported(node, "a padding mode computed in forward")
        return Step(node, self, dep, extra={"pad": None, "mode": mode, "value_at": 3})

    def _fn(self, step, value_of, value):
        """The padding of one tensor with the constant ``value`` (constant mode)."""
        if step.module is not None:
            if step.extra["mode"] == "constant":
                return lambda t: F.pad(t, step.extra["pad"], "constant", value)
            return step.module
        node = step.node
        pad = load_arg(value_of, arg(node, 1, "pad"))
        mode = step.extra["mode"]
        return (lambda t: F.pad(t, pad, "constant", value)) if mode == "constant" else (lambda t: F.pad(t, pad, mode))

    def _value(self, step, value_of):
        if step.module is not None:
            return step.extra["value"]
        v = load_arg(value_of, arg(step.node, step.extra["value_at"], "value", None))
        return 0.0 if v is None else v

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return self._fn(step, value_of, 0.0)(r), self._fn(step, value_of, self._value(step, value_of))(i)

    def relevant(self, step, rel, values, aux, ops, m):
        r = rel[step.dep[0]]
        fn = self._fn(step, values.__getitem__, 0.0)
        pad = step.extra["pad"] or load_arg(values.__getitem__, arg(step.node, 1, "pad"))
        if mask_dim(r.shape, values[step.dep[0]].shape) >= r.dim() - len(pad) // 2:
            return each_mask(step, r, values, fn)  # the padding reaches the dim holding the masks
        return fn(r)


class Expand(PartWise):
    """``expand``, ``expand_as``, ``broadcast_to`` of a decomposed value: each mask's part
    broadcast as the total is (a size taken from the total keeps the masks' own)."""
    kind = "expand"
    functions = (torch.broadcast_to, aten.expand, aten.expand_as)
    methods = ("expand", "expand_as")
    row = ("`expand`, `expand_as`, `broadcast_to`; their `aten` ops", "`f(r)` for each mask", "`f(i)`")

    def claim(self, graph, node, dep, module):
        if node.args[0] not in dep:
            raise unsupported(node, "a constant expanded to the shape of an input-dependent value "
                                    "(take the size with .shape / .size() instead)")
        return Step(node, self, dep)  # expand_as(y) reads y's size only (the total's)

    def reference(self, step, parts, value_of, aux):
        d = step.node.args[0]
        r, i = parts[d]
        return call_with(step, value_of, {d: r}), call_with(step, value_of, {d: i})

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.node.args[0]
        r, total_in, total_out = rel[d], tuple(values[d].shape), tuple(values[step.node].shape)
        k = mask_dim(r.shape, total_in)
        lead = (1,) * (len(total_out) - len(total_in))  # expand adds dims on the left
        out = per_mask(r, total_in).reshape((m,) + lead + total_in).expand((m,) + total_out)
        return merge_masks(out, k + len(lead))  # a view unless the dim holding the masks is expanded


class Repeat(PartWise):
    """``repeat``, ``tile``, ``repeat_interleave``: part-wise, each mask's part repeated as the
    total is."""
    kind = "repeat"
    functions = (torch.tile, torch.repeat_interleave)
    methods = ("repeat", "tile", "repeat_interleave")
    row = ("`repeat`, `tile`, `repeat_interleave`", "`f(r)` for each mask", "`f(i)`")

    def claim(self, graph, node, dep, module):
        if dep != [node.args[0]]:
            raise unsupported(node, "repeats computed from the input")
        return Step(node, self, dep)

    def relevant(self, step, rel, values, aux, ops, m):
        return each_mask(step, rel[step.dep[0]], values)

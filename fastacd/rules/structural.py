"""Part-wise ops: maps that are linear in their input and treat every sample alike apply to
each part as they are (pools, reshapes, indexing, concatenation, sums, scaling by a
constant). A constant operand joins the irrelevant part."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, UnsupportedOpError, arg, call_with, describe_node, load_arg, operands
from .base import Elementwise, Rule, Union, only_gates, unsupported

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout)
_IDENTITY_METHODS = ("contiguous", "clone")
try:  # torchvision's stochastic depth is an fx leaf function (torch.fx.wrap): identity in eval
    from torchvision.ops import stochastic_depth as _stochastic_depth
    _STOCHASTIC_DEPTH = {_stochastic_depth: 3}  # function -> position of its training flag
except ImportError:  # torchvision is optional
    _STOCHASTIC_DEPTH = {}


def _identity(t):
    return t


def _each(step: Step, parts: dict, value_of):
    """The op applied to the relevant and to the irrelevant part alike."""
    d = step.dep[0]
    r, i = parts[d]
    return call_with(step, value_of, {d: r}), call_with(step, value_of, {d: i})


class Linear(Rule):
    """A map linear in its input: ``f(r)``, ``f(i)``."""
    kind = "linear"
    modules = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveAvgPool3d, nn.Identity, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
               nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle) + _DROPOUT_MODULES
    functions = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                 F.adaptive_avg_pool3d, torch.mean, torch.sum, torch.permute, torch.transpose,
                 F.interpolate, F.pixel_shuffle) + _DROPOUT_FUNCTIONS + tuple(_STOCHASTIC_DEPTH)
    methods = ("contiguous", "clone", "permute", "transpose", "mean", "sum")
    row = ("avg-pools, adaptive avg-pools, dropout and stochastic depth (eval), Identity, padding, "
           "upsampling, `permute`, `mean`, ...", "`f(r)`", "`f(i)`")

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def claim(self, graph, node, dep, module):
        if isinstance(module, _DROPOUT_MODULES + (nn.Identity,)):
            return Step(node, self, dep, fn=_identity, module=module, extra={"identity": True})
        if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS + tuple(_STOCHASTIC_DEPTH):
            if arg(node, _STOCHASTIC_DEPTH.get(node.target, 2), "training", True):
                raise unsupported(node, "dropout with training=True: CD (defined on eval behaviour) "
                                        "would see random masks. Pass training=self.training and "
                                        "call model.eval()")
            return Step(node, self, dep, fn=_identity, extra={"identity": True})
        identity = node.op == "call_method" and node.target in _IDENTITY_METHODS
        return Step(node, self, dep, module=module, extra={"identity": identity})

    def reference(self, step, parts, value_of, aux):
        return _each(step, parts, value_of)

    def relevant(self, step, rel, values, aux, ops, m):
        return call_with(step, values.__getitem__, {d: rel[d] for d in step.dep})

    def locality(self, step, values):
        return Elementwise() if step.extra.get("identity") else None


class Reshape(Rule):
    kind = "reshape"
    modules = (nn.Flatten, nn.Unflatten)
    functions = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
    methods = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as")
    row = ("`flatten`, `view`, `reshape`, `squeeze`, `unsqueeze`, `nn.Flatten`", "`f(r)`", "`f(i)`")

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def reference(self, step, parts, value_of, aux):
        return _each(step, parts, value_of)

    def relevant(self, step, rel, values, aux, ops, m):
        return rel[step.dep[0]].reshape((m,) + tuple(values[step.node].shape[1:]))


class Getitem(Rule):
    kind = "getitem"
    functions = (operator.getitem,)
    row = ("`x[:, ...]` keeping the batch dim", "`r[idx]`", "`i[idx]`")

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def claim(self, graph, node, dep, module):
        if node.args[0] not in graph.dependent:
            raise unsupported(node, "indexing with an index computed from the input")
        return Step(node, self, dep)

    def reference(self, step, parts, value_of, aux):
        return _each(step, parts, value_of)

    def relevant(self, step, rel, values, aux, ops, m):
        return call_with(step, values.__getitem__, {d: rel[d] for d in step.dep})


class Split(Rule):
    """``chunk``, ``split``, ``unbind``: a tuple of pieces, each part cut alike (the pieces are
    read through ``getitem``)."""
    kind = "split"
    functions = (torch.chunk, torch.split, torch.unbind)
    methods = ("chunk", "split", "unbind")
    row = ("`chunk`, `split`, `unbind` along a non-batch dim", "the pieces of `r`", "the pieces of `i`")

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def reference(self, step, parts, value_of, aux):
        return _each(step, parts, value_of)

    def relevant(self, step, rel, values, aux, ops, m):
        return call_with(step, values.__getitem__, {step.dep[0]: rel[step.dep[0]]})


class Add(Rule):
    """``a + b``: parts add; a constant operand joins the irrelevant part."""
    kind = "add"
    sign = 1
    functions = (operator.add, torch.add, operator.iadd)
    methods = ("add", "add_")
    row = ("`+`, `+=`, `torch.add`", "`r1 + r2`", "`i1 + i2` (a constant joins here)")

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def claim(self, graph, node, dep, module):
        if "alpha" in node.kwargs or len(node.args) > 2:
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
        want = (m,) + tuple(values[step.node].shape[1:])  # a constant may broadcast the shape
        if ra is not None:
            return ra.expand(want)
        return (rb if self.sign > 0 else -rb).expand(want)

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
    functions = (operator.sub, torch.sub, operator.isub)
    methods = ("sub", "sub_")
    row = ("`-`, `-=`, `torch.sub`", "`r1 - r2`", "`i1 - i2` (a constant joins here)")


class Neg(Rule):
    kind = "neg"
    functions = (operator.neg, torch.neg)
    methods = ("neg",)
    row = ("unary `-`", "`-r`", "`-i`")

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        return mags[step.dep[0]], aux

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return -r, -i

    def relevant(self, step, rel, values, aux, ops, m):
        return -rel[step.dep[0]]

    def locality(self, step, values):
        return Elementwise()


class Scale(Rule):
    """``x * c`` or ``x / c`` with c independent of the input."""
    kind = "scale"
    functions = (operator.mul, torch.mul, operator.imul, operator.truediv, torch.div, operator.itruediv)
    methods = ("mul", "mul_", "div", "div_")
    row = ("`*` or `/` by something that does not depend on the input", "`r*c`", "`i*c`")
    _DIVIDE = (operator.truediv, torch.div, operator.itruediv, "div", "div_")

    def claim(self, graph, node, dep, module):
        a, b = operands(node)
        dependent = graph.dependent
        divide = node.target in self._DIVIDE
        if (a in dependent and b in dependent) or (divide and b in dependent):
            raise unsupported(node, "a product or quotient of two input-dependent values "
                                    "(not linear; CD has no rule for it)")
        return Step(node, self, dep, extra={"divide": divide})

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def context_operands(self, graph, node, reach, gates):
        """A gate on a decomposed value (``x * sigmoid(s)``, ``attn * v``) and a denominator
        (``x / std``) are taken from the total (design.md section 8)."""
        a, b = operands(node)
        if a is b:  # read decomposed too
            return set()
        if node.target in self._DIVIDE:
            return {b} & reach
        if a in reach and b in reach and (a in gates) != (b in gates):
            return {a, b} & gates
        return set()

    def _constant(self, step, value_of):
        a, b = operands(step.node)
        return load_arg(value_of, b if a is step.dep[0] else a)

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        mag, c = mags[step.dep[0]], abs(self._constant(step, value_of))
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


class Cat(Rule):
    kind = "cat"
    functions = (torch.cat, torch.concat, torch.concatenate)
    row = ("`torch.cat` along a non-batch dim", "part-wise (zeros for a constant)", "part-wise (a constant joins here)")

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    @staticmethod
    def _dim(node: fx.Node, total: torch.Tensor) -> int:
        dim = arg(node, 1, "dim", 0)
        if dim % total.dim() == 0:
            raise UnsupportedOpError(f"{describe_node(node)} concatenates along the batch dimension")
        return dim

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        node = step.node
        pieces = [mags[t] if t in step.dep else abs(load_arg(value_of, t)) for t in node.args[0]]
        return torch.cat(pieces, self._dim(node, value_of(node))), aux

    def reference(self, step, parts, value_of, aux):
        node = step.node
        dim = self._dim(node, value_of(node))
        rs, is_ = [], []
        for t in node.args[0]:
            if isinstance(t, fx.Node) and t in parts:
                rs.append(parts[t][0])
                is_.append(parts[t][1])
            else:
                c = load_arg(value_of, t)
                rs.append(torch.zeros_like(c))
                is_.append(c)
        return torch.cat(rs, dim), torch.cat(is_, dim)

    def relevant(self, step, rel, values, aux, ops, m):
        node = step.node
        total = values[node]
        dim = self._dim(node, total)
        out = []
        for t in node.args[0]:
            if isinstance(t, fx.Node) and t in rel:
                out.append(rel[t])
            else:  # a constant joins the irrelevant part
                v = values[t] if isinstance(t, fx.Node) else t
                out.append(torch.zeros((m,) + tuple(v.shape[1:]), dtype=total.dtype, device=total.device))
        return torch.cat(out, dim)

    def locality(self, step, values):
        node = step.node
        parts = node.args[0]
        channels = arg(node, 1, "dim", 0) % 4 == 1 and values[node].dim() == 4
        if channels and len(parts) == len(step.dep) and all(t in step.dep for t in parts):
            return Union()
        return None


class OutputSoftmax(Rule):
    """A trailing softmax / log-softmax: not decomposed (CD scores are logits)."""
    kind = "output_softmax"
    modules = (nn.Softmax, nn.LogSoftmax)
    functions = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
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
    """``x.size()``, ``x.shape``, ``x.dim()``: a plain value of the total, not decomposed."""
    kind = "shape"
    functions = (getattr,)
    methods = ("size", "dim")
    value = False
    row = ("`x.size()`, `x.shape`, `x.dim()`", "a plain value of `a`", "")

    def claim(self, graph, node, dep, module):
        if node.op == "call_function" and node.args[1] not in ("shape", "ndim", "dtype", "device"):
            return None
        return Step(node, self, dep)

"""Products (design.md section 8).

A value that *modulates* a decomposed one (a sigmoid gate, attention weights, a normaliser)
is context: ``RuleSet.context`` has it computed once from the total and shared by all masks,
so the product is linear in the decomposed factor (``Scale``, ``MatMul`` with a constant).
What remains is a product of two decomposed factors (SwiGLU's ``silu(u) * v``, a bilinear
layer): as in the LSTM rule (the cell's ``i * g``), only relevant x relevant is relevant.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, arg, load_arg, op_is, operands
from ..ops.precision import low_matmul
from .attention import shared_matmul, without_subnormals
from .base import ContextOnly, Elementwise, Rule, mask_dim, merge_masks, only_gates, per_mask, unsupported

aten = torch.ops.aten
_MATMULS = (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", aten.matmul, aten.bmm)


class Normaliser(ContextOnly):
    """``rsqrt`` / ``reciprocal`` of an input-dependent value: a normaliser, context wherever it
    scales a decomposed value (``(x - mean) * torch.rsqrt(var + eps)``); no rule on its own."""
    kind = "normaliser"
    functions = (torch.rsqrt, torch.reciprocal, aten.rsqrt, aten.reciprocal)
    methods = ("rsqrt", "reciprocal")
    row = ("`rsqrt`, `reciprocal` scaling a decomposed value", "context: from the total", "")
    alone = "a normaliser that scales no decomposed value"


class MatMul(Rule):
    """``a @ b`` with one input-dependent factor (the other a constant or context, e.g.
    attention weights): linear in it."""
    kind = "matmul"
    functions = (operator.matmul, torch.matmul, torch.bmm, aten.matmul, aten.bmm)
    methods = ("matmul", "bmm")
    row = ("`@`, `matmul`, `bmm` with one decomposed factor (the other a constant or context: "
           "attention weights from the total)", "`P @ r`", "`P @ i`")

    def claim(self, graph, node, dep, module):
        if len(set(dep)) > 1 or (len(dep) == 1 and operands(node)[0] is operands(node)[1]):
            return None  # two decomposed factors: Product
        a, _ = operands(node)
        return Step(node, self, dep, extra={"left": a is dep[0]})

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def context_operands(self, graph, node, reach, gates):
        a, b = operands(node)
        if a is not b and a in reach and b in reach and (a in gates) != (b in gates):
            return {a, b} & gates
        return set()

    def _apply(self, step, t, value_of):
        a, b = operands(step.node)
        left = step.extra["left"]
        other = load_arg(value_of, b if left else a)
        x, y = (t, other) if left else (other, t)
        if op_is(step.node.target, torch.bmm, "bmm", aten.bmm):  # bmm does not broadcast a batch of 1 to M masks
            n = max(x.shape[0], y.shape[0])
            x, y = x.expand(n, *x.shape[1:]), y.expand(n, *y.shape[1:])
        return low_matmul(x, y)  # bfloat16 under Decomposer(precision="bf16")

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        return self._apply(step, mags[step.dep[0]], lambda n: value_of(n).abs()), aux

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return self._apply(step, r, value_of), self._apply(step, i, value_of)

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        r, total = rel[d], values[d].shape
        a, b = operands(step.node)
        other = load_arg(values.__getitem__, b if step.extra["left"] else a)
        if not step.extra["left"] and r.dim() >= 3 and other.dim() >= 2:  # P @ v: P shared by the masks
            return shared_matmul(without_subnormals(other), r, total)
        k = mask_dim(r.shape, total)
        if total[k] == 1 or m == 1:  # the masks in a batch dim of their own: they broadcast
            return self._apply(step, r, values.__getitem__)
        out = self._apply(step, per_mask(r, total), values.__getitem__)  # masks merged (windows)
        return merge_masks(out, k + out.dim() - 1 - len(total))


class Product(Rule):
    """``u * v`` or ``u @ v`` of two decomposed factors: relevant ``ur * vr``, irrelevant the
    rest (``ur * vi + ui * vr + ui * vi``), as the LSTM rule does with ``i * g``."""
    kind = "product"
    functions = (operator.mul, torch.mul, operator.imul, operator.matmul, torch.matmul, torch.bmm,
                 aten.mul, aten.matmul, aten.bmm)
    methods = ("mul", "mul_", "matmul", "bmm")
    row = ("`u * v`, `u @ v` of two decomposed factors (SwiGLU, bilinear)", "`ur * vr`",
           "`ur*vi + ui*vr + ui*vi`")

    def claim(self, graph, node, dep, module):
        a, b = operands(node)
        if not (a in graph.dependent and b in graph.dependent):
            return None
        return Step(node, self, dep, extra={"matmul": op_is(node.target, *_MATMULS)})

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def _times(self, step, u, v):
        return torch.matmul(u, v) if step.extra["matmul"] else u * v

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        a, b = operands(step.node)
        return self._times(step, mags[a], mags[b]), aux

    def reference(self, step, parts, value_of, aux):
        a, b = operands(step.node)
        (ur, ui), (vr, vi) = parts[a], parts[b]
        return (self._times(step, ur, vr),
                self._times(step, ur, vi) + self._times(step, ui, vr) + self._times(step, ui, vi))

    def relevant(self, step, rel, values, aux, ops, m):
        a, b = operands(step.node)
        return self._times(step, rel[a], rel[b])


class GLU(Rule):
    """``F.glu(x, dim)`` = ``a * sigmoid(b)`` for x's halves a, b along dim: the sigmoid gates
    a, so it is context from the total (as the same gate written with ``chunk`` and
    ``torch.sigmoid`` is): relevant ``ar * sigmoid(b)``."""
    kind = "glu"
    modules = (nn.GLU,)
    functions = (F.glu, aten.glu)
    row = ("GLU, `F.glu`, `aten.glu` (x's halves a, b)", "`ar * sigmoid(b)`, b from the total",
           "`a * sigmoid(b) - rel`")

    def _dim(self, step, total):
        d = step.module.dim if step.module is not None else arg(step.node, 1, "dim", -1)
        d %= total.dim()
        if d == 0:
            raise unsupported(step.node, "glu over the batch dim mixes the samples")
        return d

    def _gated(self, step, t, total):
        """t's first half times the total's gate; t: parts of masks of total's shape."""
        d = self._dim(step, total)
        gate = torch.sigmoid(total.chunk(2, d)[1])
        if t.shape == total.shape:
            return t.chunk(2, d)[0] * gate
        out = per_mask(t, total.shape).chunk(2, d + 1)[0] * gate
        return merge_masks(out, mask_dim(t.shape, total.shape))

    def total(self, step, value_of):
        self._dim(step, value_of(step.dep[0]))
        return super().total(step, value_of)

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        return self._gated(step, mags[step.dep[0]], value_of(step.dep[0])), aux

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        total = value_of(step.dep[0])
        return self._gated(step, r, total), self._gated(step, i, total)

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        return self._gated(step, rel[d], values[d])

    def fresh(self, step, rel, out):
        return True

    def locality(self, step, values):
        # halves of the channels at each position of an (N, C, ...) map
        return Elementwise() if self._dim(step, values[step.dep[0]]) == 1 else None

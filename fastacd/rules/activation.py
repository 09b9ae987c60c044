"""Element-wise activations with f(0) = 0: relevant ``f(r)``, irrelevant ``f(r + i) - f(r)``."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, arg, call_with, op_is
from .base import Elementwise, Rule, unsupported

aten = torch.ops.aten

# module type -> the function it applies (out of place: an inplace=True module must not
# modify a stored activation)
_MODULE_FUNCTIONS = {
    nn.ReLU: lambda m: F.relu,
    nn.ReLU6: lambda m: F.relu6,
    nn.LeakyReLU: lambda m: (lambda t: F.leaky_relu(t, m.negative_slope)),
    nn.PReLU: lambda m: (lambda t: F.prelu(t, m.weight)),  # the slope read at each call (trained)
    nn.ELU: lambda m: (lambda t: F.elu(t, m.alpha)),
    nn.CELU: lambda m: (lambda t: F.celu(t, m.alpha)),
    nn.SELU: lambda m: F.selu,
    nn.GELU: lambda m: (lambda t: F.gelu(t, approximate=m.approximate)),
    nn.SiLU: lambda m: F.silu,
    nn.Mish: lambda m: F.mish,
    nn.Hardswish: lambda m: F.hardswish,
    nn.Hardtanh: lambda m: (lambda t: F.hardtanh(t, m.min_val, m.max_val)),
    nn.Tanh: lambda m: torch.tanh,
    nn.Softsign: lambda m: F.softsign,
    nn.Tanhshrink: lambda m: F.tanhshrink,
    nn.Hardshrink: lambda m: (lambda t: F.hardshrink(t, m.lambd)),
    nn.Softshrink: lambda m: (lambda t: F.softshrink(t, m.lambd)),
    nn.RReLU: lambda m: (lambda t: F.rrelu(t, m.lower, m.upper)),  # eval: the mean slope
}
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_, aten.relu)
_POWERS = (operator.pow, torch.pow, aten.pow, "pow")
_CLAMPS = {torch.clamp: (1, 2), torch.clip: (1, 2), aten.clamp: (1, 2), aten.clip: (1, 2), "clamp": (1, 2),
           "clip": (1, 2), torch.clamp_min: (1, None), aten.clamp_min: (1, None), "clamp_min": (1, None),
           torch.clamp_max: (None, 1), aten.clamp_max: (None, 1), "clamp_max": (None, 1)}  # (min, max) positions


def _is(node, table) -> bool:
    """Whether the node calls one of the table's functions / ATen ops, or methods (names)."""
    if node.op == "call_method":
        return node.target in [t for t in table if isinstance(t, str)]
    return op_is(node.target, *[t for t in table if not isinstance(t, str)])


def _zero_preserving(node) -> str | None:
    """Why a power or clamp node is not an activation with f(0) = 0 defined everywhere (None: it is)."""
    if _is(node, _POWERS):
        p = arg(node, 1, "exponent")
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            return "x ** p is an activation (f(0) = 0, defined for every part) only for a constant integer p >= 1"
    elif _is(node, _CLAMPS):
        lo_at, hi_at = next(at for t, at in _CLAMPS.items() if _is(node, (t,)))
        bounds = [arg(node, at, name) if at is not None else None for at, name in ((lo_at, "min"), (hi_at, "max"))]
        if not all(b is None or isinstance(b, (int, float)) for b in bounds):
            return "a clamp to bounds that are tensors"
        lo, hi = bounds
        if (lo is not None and lo > 0) or (hi is not None and hi < 0):
            return "a clamp to a range without 0 (f(0) != 0)"
    return None


class Activation(Rule):
    kind = "activation"
    modules = tuple(_MODULE_FUNCTIONS)
    functions = (F.relu, torch.relu, F.relu6, F.leaky_relu, F.prelu, torch.prelu, F.elu, F.celu,
                 F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.softsign,
                 F.tanhshrink, torch.relu_, F.relu_, F.hardshrink, F.softshrink, F.rrelu,
                 aten.relu, aten.relu6, aten.leaky_relu, aten.prelu, aten._prelu_kernel, aten.elu, aten.celu,
                 aten.selu, aten.gelu, aten.silu, aten.mish, aten.hardswish, aten.hardtanh, aten.tanh,
                 aten.hardshrink, aten.softshrink, aten.rrelu, torch.abs, aten.abs, torch.square, aten.square,
                 operator.pow, torch.pow, aten.pow) + tuple(f for f in _CLAMPS if not isinstance(f, str))
    methods = ("relu", "relu_", "tanh", "tanh_", "abs", "square", "pow") + tuple(f for f in _CLAMPS if isinstance(f, str))
    row = ("ReLU, and ReLU6, LeakyReLU, PReLU, ELU, CELU, SELU, GELU, SiLU, Mish, Hardswish, "
           "Hardtanh, Tanh, Softsign, Tanhshrink, Hardshrink, Softshrink, RReLU in eval; `abs`, `square`, "
           "`x ** p` (integer p >= 1), `clamp` to a range holding 0; their `aten` ops", "`f(r)`", "`f(a) - f(r)`")

    def claim(self, graph, node, dep, module):
        if module is None and (_is(node, _POWERS) or _is(node, _CLAMPS)):
            why = _zero_preserving(node)
            if why is not None or dep != [node.args[0]]:
                raise unsupported(node, why or "an exponent or bound computed from the input")
        if module is None and op_is(node.target, F.rrelu, aten.rrelu) and arg(node, 3, "training", False):
            raise unsupported(node, "rrelu with training=True draws a random slope at each call")
        if module is not None:
            typ = next(c for c in type(module).__mro__ if c in _MODULE_FUNCTIONS)
            return Step(node, self, dep, fn=_MODULE_FUNCTIONS[typ](module), module=module,
                        extra={"is_relu": typ is nn.ReLU})
        is_relu = (op_is(node.target, *_RELU_FUNCTIONS) if node.op == "call_function"
                   else node.target in ("relu", "relu_"))
        return Step(node, self, dep, extra={"is_relu": is_relu})

    def folds_into(self, step):
        return step.extra["is_relu"]

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        rel = call_with(step, value_of, {step.dep[0]: r})
        return rel, call_with(step, value_of, {step.dep[0]: r + i}) - rel

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        if step.fused_into is not None:
            return rel[d]  # the producer already applied this ReLU to the relevant part
        return call_with(step, values.__getitem__, {d: rel[d]})

    def paired_total(self, step, p):
        if step.fused_into is not None:  # a ReLU folded into its producer's split
            return p.relu_total(step)
        return super().paired_total(step, p)

    def inplace_operand(self, step):
        d = step.dep[0]
        usable = step.fused_into is None and step.extra["is_relu"] and step.node.args[:1] == (d,)
        return d if usable else None

    def relevant_(self, step, rel, values, aux, ops):
        return rel[step.dep[0]].clamp_min_(0)

    def locality(self, step, values):
        return Elementwise()


_OFFSET_MODULES = {nn.Sigmoid: lambda m: torch.sigmoid, nn.Hardsigmoid: lambda m: F.hardsigmoid,
                   nn.Softplus: lambda m: (lambda t: F.softplus(t, m.beta, m.threshold)),
                   nn.LogSigmoid: lambda m: F.logsigmoid,
                   nn.Threshold: lambda m: (lambda t: F.threshold(t, m.threshold, m.value))}


class OffsetActivation(Rule):
    """An element-wise function with f(0) != 0 used on its own (a sigmoid output, softplus):
    ``rel = f(r) - f(0)``, so an empty mask stays empty (Threshold's f(0) is 0 or its value,
    by the threshold's sign: one form for both). As a gate on a decomposed value it is
    context instead (``RuleSet.context``)."""
    kind = "offset_activation"
    modules = tuple(_OFFSET_MODULES)
    functions = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, F.threshold, aten.sigmoid,
                 aten.hardsigmoid, aten.softplus, aten.log_sigmoid, aten.threshold)
    methods = ("sigmoid", "sigmoid_")
    row = ("Sigmoid, Hardsigmoid, Softplus, LogSigmoid, Threshold on their own (f(0) != 0); their `aten` ops",
           "`f(r) - f(0)`",
           "`f(a) - rel`")

    def claim(self, graph, node, dep, module):
        fn = None
        if module is not None:
            typ = next(c for c in type(module).__mro__ if c in _OFFSET_MODULES)
            fn = _OFFSET_MODULES[typ](module)
        return Step(node, self, dep, fn=fn, module=module)

    def gate_like(self, graph, node, gates):
        return True

    def _f(self, step, t, value_of):
        return call_with(step, value_of, {step.dep[0]: t})

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        rel = self._f(step, r, value_of) - self._f(step, torch.zeros_like(r), value_of)
        return rel, self._f(step, r + i, value_of) - rel

    def relevant(self, step, rel, values, aux, ops, m):
        r = rel[step.dep[0]]
        f0 = self._f(step, r.new_zeros(()), values.__getitem__)
        return self._f(step, r, values.__getitem__) - f0

    def locality(self, step, values):
        return Elementwise()

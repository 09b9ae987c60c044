"""Tracing one input's forward pass: shapes, sizes and Python branches read as concrete values.

A symbolic ``torch.fx`` trace cannot evaluate Python on a tensor's shape (``(*x.shape[:-1],
-1, d)``, slicing a buffer with ``x.size(1)``) or branch on a tensor. ``transformers`` models
do both everywhere, so ``torch.fx`` stops at their first attention layer. For text CD the
graph is needed for one sentence at a time (``fastacd.text.general``), so the trace can be
taken for that sentence: ``ConcreteTracer`` runs the model on an example input while it
traces, every proxy carries the real value of its node, and whatever is not a tensor (a
size, a dtype, a bool, an int read off a tensor) is returned as the Python value it has for
this input instead of a node. The graph is then the computation of this input's forward
pass: valid for this input (its shapes, and the branches its values took), which is all a
per-sentence decomposition needs. Branches on input-dependent values follow the total, as
context does (design.md section 8).

Modules are kept or traced through exactly as by the symbolic capture tracer (``_Tracer``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from .graph import _Tracer

if TYPE_CHECKING:
    from ..rules.base import RuleSet


def _has_tensor(value) -> bool:
    found = []
    map_aggregate(value, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
    return bool(found)


class ConcreteProxy(fx.Proxy):
    """A proxy with the real value of its node for the traced input (``value``)."""

    value: Any = None

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self.value, name)
        if callable(attr):                       # a method: traced when called
            return fx.proxy.Attribute(self, name)
        if isinstance(attr, torch.Tensor):       # x.T, x.mT, x.real: a node
            return self.tracer.create_proxy("call_function", getattr, (self, name), {})
        return attr                              # shape, dtype, ndim, device: concrete

    def __len__(self) -> int:
        return len(self.value)

    def __index__(self) -> int:
        return self.value.__index__()

    def __int__(self) -> int:
        return int(self.value)

    def __float__(self) -> float:
        return float(self.value)


class ConcreteTracer(_Tracer):
    """``_Tracer`` that traces ``root`` on one example input (``trace(root, example)``)."""

    def __init__(self, rules: "RuleSet"):
        super().__init__(rules)
        self._examples: list = []
        self.values: dict = {}       # node name -> its value for the traced input
        self._evaluating = 0

    def trace(self, root, example=None, concrete_args=None):  # noqa: D102
        self._examples = list(example) if isinstance(example, tuple) else [example]
        self._root_module = root
        return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> ConcreteProxy:
        return ConcreteProxy(node, self)

    @staticmethod
    def _real(a):
        def one(v):
            if isinstance(v, ConcreteProxy):
                return v.value
            if isinstance(v, fx.proxy.Attribute):
                return getattr(one(v.root), v.attr)
            return v
        return map_aggregate(a, one)

    def _evaluate(self, kind: str, target, args, kwargs):
        if kind == "placeholder":
            if not self._examples:
                raise TypeError(f"no example value for the input {target!r}")
            return self._examples.pop(0)
        args, kwargs = self._real(args), self._real(kwargs)
        self._evaluating += 1        # module calls and attributes as without the tracer
        try:
            if kind == "get_attr":
                obj = self._root_module
                for part in target.split("."):
                    obj = getattr(obj, part)
                return obj
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return self._root_module.get_submodule(target)(*args, **kwargs)
            raise ValueError(f"unexpected node kind {kind}")
        finally:
            self._evaluating -= 1

    # while evaluating, the tracer's patches of nn.Module.__call__ / __getattr__ step aside
    # (swapping the class attributes back would invalidate the type caches of every Module
    # subclass: ~10 ms an op)
    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        with torch.no_grad():
            value = self._evaluate(kind, target, args, kwargs)
        if kind in ("call_function", "call_method") and not _has_tensor(value):
            return value             # a size, a dtype, a bool: its value for this input
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(p, ConcreteProxy):
            p.value = value
            self.values[p.node.name] = value
        return p

    # Python control flow on a proxy: the value for this input
    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self._real(obj))

    def iter(self, obj: fx.Proxy):
        return iter([obj[i] for i in range(len(self._real(obj)))])

    def keys(self, obj: fx.Proxy):
        return self._real(obj).keys()

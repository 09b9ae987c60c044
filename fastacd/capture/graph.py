"""Graph capture: trace a model with torch.fx and give every input-dependent node a CD rule.

The engine (``fastacd.engine``) and the reference (``fastacd.reference``) both walk the
``CapturedGraph`` built here; they differ only in the arithmetic of each rule kind. A node
depends on the input when any of its arguments does; each such node gets one ``kind``:

==============  ============================================================  =====================
kind            ops                                                           CD rule (design.md 2)
==============  ============================================================  =====================
affine          Conv1d/2d/3d, Linear, F.conv*, F.linear                       bias split (eps 1e-20)
batchnorm       BatchNorm1d/2d/3d (eval), F.batch_norm(training=False)        bn split (0/0 -> 0)
activation      ReLU and the f(0) = 0 family (ReLU6, LeakyReLU, ELU, GELU,    rel = f(r),
                SiLU, Hardswish, Tanh, ...)                                   irrel = f(r+i) - f(r)
maxpool         MaxPool1d/2d, AdaptiveMaxPool1d/2d, F.max_pool*               gather at argmax of r+i
linear          avg-pools, dropout (eval), identity, permute, mean, pad...   f(r), f(i)
reshape         flatten, view, reshape, squeeze, unsqueeze                    f(r), f(i)
add/sub/neg     +, -, unary -                                                 part-wise
scale           * or / by something that does not depend on the input        part-wise
cat             torch.cat along a non-batch dim                               part-wise
getitem         x[:, ...] indexing that keeps the batch dim                   part-wise
output_softmax  softmax / log-softmax feeding the output                      not decomposed
shape           x.size(), x.shape, x.dim()                                    plain value
==============  ============================================================  =====================

A constant (anything not depending on the input) added to, subtracted from or concatenated
with a decomposed value joins the irrelevant part. Unknown ops raise ``UnsupportedOpError``;
``register_rule`` maps a new module type or function to one of the kinds above.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


class UnsupportedOpError(TypeError):
    """An op that depends on the input has no CD rule."""


# --------------------------------------------------------------------------------------
# Rule tables: target -> kind. One place; `register_rule` extends them.
# --------------------------------------------------------------------------------------
_ACTIVATION_MODULES: dict[type, Callable[[nn.Module], Callable]] = {
    nn.ReLU: lambda m: F.relu,
    nn.ReLU6: lambda m: F.relu6,
    nn.LeakyReLU: lambda m: (lambda t: F.leaky_relu(t, m.negative_slope)),
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
}
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu,
                         F.silu, F.mish, F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.softsign,
                         F.tanhshrink, torch.relu_, F.relu_}
_ACTIVATION_METHODS = {"relu", "relu_", "tanh", "tanh_"}

_AFFINE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_AFFINE_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear}
_BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_MAXPOOL_FUNCTIONS = {F.max_pool1d: F.max_pool1d, F.max_pool2d: F.max_pool2d,
                      F.adaptive_max_pool1d: F.adaptive_max_pool1d,
                      F.adaptive_max_pool2d: F.adaptive_max_pool2d}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout}
_LINEAR_MODULES: tuple[type, ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.Identity, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle) + _DROPOUT_MODULES
_LINEAR_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, torch.sum,
                     torch.permute, torch.transpose, F.interpolate, F.pixel_shuffle} | _DROPOUT_FUNCTIONS
_LINEAR_METHODS = {"contiguous", "clone", "permute", "transpose", "mean", "sum"}
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_BINARY_FUNCTIONS = {operator.add: "add", torch.add: "add", operator.iadd: "add",
                     operator.sub: "sub", torch.sub: "sub", operator.isub: "sub",
                     operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
                     operator.truediv: "div", torch.div: "div", operator.itruediv: "div"}
_BINARY_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul",
                   "mul_": "mul", "div": "div", "div_": "div"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_SHAPE_METHODS = {"size", "dim"}

# User-registered rules: module type or function -> (kind, fn factory or None).
_USER_RULES: dict[Any, tuple[str, Callable | None]] = {}
_USER_KINDS = ("activation", "linear", "reshape")


def register_rule(target: type | Callable, kind: str, fn: Callable | None = None) -> None:
    """Teach fastacd a module type or function it does not know.

    ``kind`` is one of:

    * ``"linear"``: a map that is linear in its input and treats every sample of the batch
      alike (a pooling, a fixed filter, an up-sampling): relevant ``f(r)``, irrelevant ``f(i)``;
    * ``"activation"``: an element-wise function with ``f(0) = 0``: relevant ``f(r)``,
      irrelevant ``f(r + i) - f(r)``;
    * ``"reshape"``: a per-sample reshape that keeps the element order.

    ``fn`` (optional) is the function to apply to one tensor, e.g. ``lambda m: m.my_fn``
    for a module type (it receives the module) or the function itself; by default the
    module or function is called with the tensor in place of its input.
    """
    if kind not in _USER_KINDS:
        raise ValueError(f"kind must be one of {_USER_KINDS}, got {kind!r}")
    _USER_RULES[target] = (kind, fn)


# --------------------------------------------------------------------------------------
# Captured graph
# --------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """Keeps every module with a CD rule (and every torch.nn leaf) as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in _USER_RULES:
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class Step:
    """One input-dependent node and its rule."""
    node: fx.Node
    kind: str
    dep: list[fx.Node]                    # the input-dependent arguments, in order
    fn: Callable | None = None            # the op on one tensor (kinds: activation, linear, reshape, getitem, affine (no bias), maxpool)
    module: nn.Module | None = None
    relu_fused: bool = False              # affine/batchnorm followed by a ReLU that only it feeds
    fused_into: fx.Node | None = None     # for a ReLU folded into its producer
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return describe_node(self.node)


def describe_node(node: fx.Node) -> str:
    """'<op> at <module path> (node <name>)' for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    if node.op == "call_module":
        owner = node.graph.owning_module
        typ = type(owner.get_submodule(node.target)).__name__ if owner is not None else "?"
        what, path = f"module {node.target!r} ({typ})", node.target
    elif node.op == "call_method":
        what = f"method .{node.target}()"
    else:
        what = f"function {getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}"
    place = f" inside {path!r}" if path and node.op != "call_module" else ""
    return f"{what}{place} (graph node {node.name!r})"


class CapturedGraph:
    """A traced model with a CD rule for every input-dependent node.

    Parameters are read from the model's modules at call time, so training the model
    after capture is reflected; the graph (the model's structure) is fixed at capture.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        check_eval(model)  # tracing bakes `self.training` into the graph: capture eval behaviour
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:  # torch.fx raises many types; say what to do
            raise UnsupportedOpError(
                f"fastacd could not trace {type(model).__name__} with torch.fx: {exc}\n"
                "fastacd needs a forward pass without data-dependent Python control flow. "
                "Move such logic out of forward(), or wrap the offending submodule in a module "
                "type registered with fastacd.register_rule.") from exc
        self.gm = fx.GraphModule(model, graph)
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise UnsupportedOpError(f"{type(model).__name__}.forward takes no input")
        self.input_node = placeholders[0]
        self.output_node = next(n for n in self.nodes if n.op == "output")
        self.steps: dict[fx.Node, Step] = {}
        self.dependent: set[fx.Node] = {self.input_node}
        self._classify()
        out = self.output_node.args[0]
        if not isinstance(out, fx.Node) or out not in self.dependent:
            raise UnsupportedOpError(
                "the model's output must be a single tensor computed from the input "
                f"(got {type(out).__name__}); wrap the model so forward returns the logits")
        self.result_node = out
        self._fuse_relus()
        self.last_use = self._last_uses()

    # ---- classification --------------------------------------------------------------
    def _classify(self) -> None:
        for node in self.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            dep = [a for a in node.all_input_nodes if a in self.dependent]
            if not dep:
                continue
            step = self._rule_for(node, dep)
            self.steps[node] = step
            if step.kind != "shape":
                self.dependent.add(node)

    def _rule_for(self, node: fx.Node, dep: list[fx.Node]) -> Step:
        op, target = node.op, node.target
        mod = self.gm.get_submodule(target) if op == "call_module" else None
        key = type(mod) if mod is not None else target
        if op != "call_method" and key in _USER_RULES:
            kind, factory = _USER_RULES[key]
            fn = None if factory is None else (factory(mod) if mod is not None else factory)
            return Step(node, kind, dep, fn=fn, module=mod)
        if mod is not None:
            return self._module_rule(node, dep, mod)
        if op == "call_function":
            return self._function_rule(node, dep)
        if op == "call_method":
            return self._method_rule(node, dep)
        raise self._unsupported(node)

    def _module_rule(self, node, dep, mod) -> Step:
        if isinstance(mod, _AFFINE_MODULES):
            return Step(node, "affine", dep, module=mod)
        if isinstance(mod, _BATCHNORM_MODULES):
            if mod.running_mean is None:
                raise UnsupportedOpError(
                    f"{describe_node(node)}: batchnorm without running statistics "
                    "(track_running_stats=False) normalises with the batch's own statistics, "
                    "which has no CD rule")
            return Step(node, "batchnorm", dep, module=mod)
        for typ, factory in _ACTIVATION_MODULES.items():
            if type(mod) is typ:
                return Step(node, "activation", dep, fn=factory(mod), module=mod,
                            extra={"is_relu": typ is nn.ReLU})
        if isinstance(mod, _MAXPOOL_MODULES):
            return Step(node, "maxpool", dep, module=mod)
        if isinstance(mod, _DROPOUT_MODULES) or isinstance(mod, nn.Identity):
            return Step(node, "linear", dep, fn=lambda t: t, module=mod)
        if isinstance(mod, _LINEAR_MODULES):
            return Step(node, "linear", dep, module=mod)
        if isinstance(mod, _RESHAPE_MODULES):
            return Step(node, "reshape", dep, module=mod)
        if isinstance(mod, _SOFTMAX_MODULES):
            return self._softmax_rule(node, dep)
        raise self._unsupported(node)

    def _function_rule(self, node, dep) -> Step:
        t = node.target
        if t in _AFFINE_FUNCTIONS:
            self._only_first_dependent(node, dep, "weights that depend on the input")
            return Step(node, "affine", dep)
        if t is F.batch_norm:
            if node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False):
                raise UnsupportedOpError(f"{describe_node(node)}: batch_norm with training=True "
                                         "uses batch statistics; call model.eval()")
            return Step(node, "batchnorm", dep)
        if t in _ACTIVATION_FUNCTIONS:
            return Step(node, "activation", dep, extra={"is_relu": t in (F.relu, torch.relu, torch.relu_, F.relu_)})
        if t in _MAXPOOL_FUNCTIONS:
            return Step(node, "maxpool", dep)
        if t in _DROPOUT_FUNCTIONS:
            if _arg(node, 2, "training", True):
                raise UnsupportedOpError(
                    f"{describe_node(node)} runs with training=True, so CD (defined on eval "
                    "behaviour) would see random masks. Pass training=self.training and call model.eval()")
            return Step(node, "linear", dep, fn=lambda t: t)
        if t in _LINEAR_FUNCTIONS:
            return Step(node, "linear", dep)
        if t in _RESHAPE_FUNCTIONS:
            return Step(node, "reshape", dep)
        if t in _SOFTMAX_FUNCTIONS:
            return self._softmax_rule(node, dep)
        if t in _BINARY_FUNCTIONS:
            return self._binary_rule(node, dep, _BINARY_FUNCTIONS[t])
        if t is operator.neg or t is torch.neg:
            return Step(node, "neg", dep)
        if t in _CAT_FUNCTIONS:
            return Step(node, "cat", dep)
        if t is operator.getitem:
            if node.args[0] not in self.dependent:
                raise self._unsupported(node, "indexing with an index computed from the input")
            return Step(node, "getitem", dep)
        if t is getattr and node.args[1] in ("shape", "ndim", "dtype", "device"):
            return Step(node, "shape", dep)
        raise self._unsupported(node)

    def _method_rule(self, node, dep) -> Step:
        name = node.target
        if node.args[0] not in self.dependent:
            raise self._unsupported(node, "a method whose arguments depend on the input")
        if name in _SHAPE_METHODS:
            return Step(node, "shape", dep)
        if name in _ACTIVATION_METHODS:
            return Step(node, "activation", dep, extra={"is_relu": name in ("relu", "relu_")})
        if name in _LINEAR_METHODS:
            return Step(node, "linear", dep)
        if name in _RESHAPE_METHODS:
            return Step(node, "reshape", dep)
        if name in _SOFTMAX_METHODS:
            return self._softmax_rule(node, dep)
        if name in _BINARY_METHODS:
            return self._binary_rule(node, dep, _BINARY_METHODS[name])
        raise self._unsupported(node)

    def _binary_rule(self, node, dep, kind) -> Step:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if kind in ("mul", "div"):
            both = a in self.dependent and b in self.dependent  # x * x counts too
            if both or (kind == "div" and b in self.dependent):
                raise self._unsupported(
                    node, "a product or quotient of two input-dependent values (not linear; "
                    "CD has no rule for it)")
            return Step(node, "scale", dep, extra={"op": kind})
        if "alpha" in node.kwargs or len(node.args) > 2:
            raise self._unsupported(node, "add/sub with alpha")
        return Step(node, kind, dep)

    def _softmax_rule(self, node, dep) -> Step:
        if list(node.users) != [self.output_node]:
            raise self._unsupported(node, "a softmax inside the network (only a trailing softmax "
                                          "at the output is allowed, and it is not decomposed)")
        return Step(node, "output_softmax", dep)

    def _only_first_dependent(self, node, dep, what) -> None:
        if dep != [node.args[0]]:
            raise self._unsupported(node, what)

    def _unsupported(self, node: fx.Node, why: str | None = None) -> UnsupportedOpError:
        reason = f" ({why})" if why else ""
        return UnsupportedOpError(
            f"fastacd has no CD rule for {describe_node(node)}{reason}.\n"
            "If the op is linear and batch-agnostic (a pooling, a fixed filter), or an "
            "element-wise activation with f(0) = 0, register it:\n"
            "    fastacd.register_rule(<module type or function>, 'linear' | 'activation' | 'reshape')\n"
            "then build the Decomposer again. Otherwise the op needs a rule of its own "
            "(see docs/engine.md, 'Adding a rule').")

    # ---- fusion and liveness -----------------------------------------------------------
    def _fuse_relus(self) -> None:
        """Fold a ReLU into the affine/batchnorm that alone feeds it (design.md 4, fusion)."""
        for node, step in self.steps.items():
            if step.kind != "activation" or not step.extra.get("is_relu"):
                continue
            src = step.dep[0]
            src_step = self.steps.get(src)
            if (src_step is not None and src_step.kind in ("affine", "batchnorm")
                    and len(src.users) == 1 and node.args[0] is src):
                src_step.relu_fused = True
                step.fused_into = src

    def _last_uses(self) -> dict[fx.Node, int]:
        """Index of the last step that reads each dependent node (to free it early)."""
        order = {n: i for i, n in enumerate(self.nodes)}
        last: dict[fx.Node, int] = {}
        for node in self.nodes:
            for a in node.all_input_nodes:
                if a in self.dependent:
                    last[a] = order[node]
        return last


def check_eval(model: nn.Module) -> None:
    """Raise if any module is in training mode: CD is defined on eval behaviour."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"the model is in training mode ({', '.join(training[:3])}"
            f"{', ...' if len(training) > 3 else ''}); CD is defined on eval behaviour "
            "(dropout off, batchnorm running statistics). Call model.eval() first.")


def _arg(node: fx.Node, pos: int, name: str, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


# --------------------------------------------------------------------------------------
# Evaluating a node with its input-dependent argument replaced by a tensor
# --------------------------------------------------------------------------------------
def load_arg(value_of: Callable[[fx.Node], Any], arg):
    """Map graph nodes inside (nested) args to their values."""
    return fx.node.map_arg(arg, value_of)


def call_with(graph: CapturedGraph, step: Step, value_of: Callable[[fx.Node], Any],
              replace: dict[fx.Node, Any]) -> Any:
    """Run the node's own op with the input-dependent arguments replaced by ``replace``.

    In-place variants run out of place, so stored activations are never modified.
    """
    def v(n: fx.Node):
        return replace[n] if n in replace else value_of(n)

    node = step.node
    args = load_arg(v, node.args)
    kwargs = dict(load_arg(v, node.kwargs))
    if "inplace" in kwargs:
        kwargs["inplace"] = False
    if step.fn is not None:
        return step.fn(args[0]) if args else step.fn(*kwargs.values())
    if node.op == "call_module":
        return step.module(*args, **kwargs)
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__"):
            name = name[:-1]  # relu_ -> relu: never modify a stored activation
        return getattr(args[0], name)(*args[1:], **kwargs)
    target = node.target
    if target is torch.relu_ or target is F.relu_:
        target = torch.relu
    if target in (F.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.hardtanh) and len(args) > 1:
        # inplace is the last positional argument of these; drop it
        args = args[:-1] if isinstance(args[-1], bool) else args
    if target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
        target = {operator.iadd: operator.add, operator.isub: operator.sub,
                  operator.imul: operator.mul, operator.itruediv: operator.truediv}[target]
    return target(*args, **kwargs)


# oneDNN's linear (the kernel torch.compile's CPU backend calls) where torch has it.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# From this many rows on; below it the default GEMM is as fast (VGG16's 25088 -> 4096, 1 thread:
# 2 rows 28 ms vs 35 ms with oneDNN).
ONEDNN_LINEAR_MIN_ROWS = 4


def linear_no_bias(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(t, weight)``. For float32 (M, F) on the CPU without autograd it calls oneDNN's
    linear: at the 4-64 masks of an ACD call's head it is 1.3-2x faster than the default GEMM
    (VGG16's 25088 -> 4096 at 1 thread: 8 masks 42 vs 84 ms, 16 masks 51 vs 90 ms; the same
    at 256). Same numbers up to float32 rounding (another summation order)."""
    if (_ONEDNN_LINEAR and t.device.type == "cpu" and t.dtype == weight.dtype == torch.float32 and t.dim() == 2
            and t.shape[0] >= ONEDNN_LINEAR_MIN_ROWS
            and not (torch.is_grad_enabled() and (t.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(t, weight, None, "none", [], "")
    return F.linear(t, weight)


def affine_parts(step: Step, value_of: Callable[[fx.Node], Any]):
    """(apply the weights without bias to a tensor, the bias or None) for an affine step."""
    m = step.module
    if m is not None:
        if isinstance(m, nn.Linear):
            return (lambda t: linear_no_bias(t, m.weight)), m.bias
        return (lambda t: m._conv_forward(t, m.weight, None)), m.bias
    node = step.node
    args = list(load_arg(value_of, node.args[1:]))
    kwargs = dict(load_arg(value_of, node.kwargs))
    weight = args.pop(0) if args else kwargs.pop("weight")
    bias = args.pop(0) if args else kwargs.pop("bias", None)
    fn = node.target
    if fn is F.linear and not args and not kwargs:
        return (lambda t: linear_no_bias(t, weight)), bias
    return (lambda t: fn(t, weight, None, *args, **kwargs)), bias


def batchnorm_parts(step: Step, value_of: Callable[[fx.Node], Any]):
    """(scale, shift, apply) of an eval batchnorm: ``apply(a) = scale * a + shift``."""
    m = step.module
    if m is not None:
        mean, var, weight, bias, eps = m.running_mean, m.running_var, m.weight, m.bias, m.eps
    else:
        node = step.node
        args = list(load_arg(value_of, node.args[1:]))
        kw = dict(load_arg(value_of, node.kwargs))
        names = ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        vals = dict(zip(names, args))
        vals.update(kw)
        mean, var = vals["running_mean"], vals["running_var"]
        weight, bias, eps = vals.get("weight"), vals.get("bias"), vals.get("eps", 1e-5)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias

    def apply(t):
        return F.batch_norm(t, mean, var, weight, bias, False, 0.0, eps)
    return scale, shift, apply


def maxpool_fn(step: Step, value_of: Callable[[fx.Node], Any]):
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
    if fn in (F.max_pool1d, F.max_pool2d) and len(args) >= 6:
        args = args[:5]  # positional return_indices replaced by the keyword
    return lambda t: fn(t, *args, **kwargs)

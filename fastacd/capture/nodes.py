"""What a captured op is (``Step``), how it is named in errors, and how a node is evaluated.

Shared by capture, the rules and every pass; imports nothing else of fastacd.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # the rule objects a step points to (no import at run time: rules import this)
    from ..rules.base import Rule


def packing_error(exc: BaseException, model: nn.Module) -> "UnsupportedOpError | None":
    """The error to raise when tracing ``model`` failed inside ``torch.nn.utils.rnn``'s
    packing (``pack_padded_sequence`` and the rest: their Python cannot take a proxy, and
    fx's own message does not say so), else None."""
    tb, name = exc.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.replace("\\", "/").endswith("torch/nn/utils/rnn.py") and name is None:
            name = code.co_name
        tb = tb.tb_next
    if name is None:
        return None
    return UnsupportedOpError(
        f"{type(model).__name__}.forward calls torch.nn.utils.rnn.{name}: a PackedSequence has "
        "no CD rule. fastacd decomposes a recurrent module on a padded tensor (one sentence "
        "at a time for text: packing a single sentence of one length changes nothing), so "
        "call the module on the tensor itself")


class UnsupportedOpError(TypeError):
    """An op that depends on the input has no CD rule (or a variant of it that CD cannot
    decompose exactly as the model computes it)."""


class TraceError(UnsupportedOpError):
    """torch.fx cannot trace the model (Python control flow on the input): capture with
    torch.export instead (``fastacd.capture.export``)."""


def aten_op(node: fx.Node):
    """The ATen op (an ``OpOverload``) a torch.export node calls, or None."""
    target = node.target
    return target if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) else None


def op_is(target, *ops) -> bool:
    """Whether a node's target is one of ``ops``: a function, or an ATen op packet
    (``torch.ops.aten.linear``) any overload of which matches."""
    packet = getattr(target, "overloadpacket", None)
    return any(target is o or (packet is not None and packet is o) for o in ops)


@dataclass
class Step:
    """One input-dependent node and the rule that decomposes it."""
    node: fx.Node
    rule: "Rule"
    dep: list[fx.Node]                    # the input-dependent arguments, in order
    fn: Callable | None = None            # the op on one tensor, where the rule needs it
    module: nn.Module | None = None
    relu_fused: bool = False              # a producer of a ReLU that only it feeds
    fused_into: fx.Node | None = None     # for a ReLU folded into its producer
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.rule.kind

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
    elif aten_op(node) is not None:
        what = f"ATen op {node.target}"
    else:
        what = f"function {getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}"
    place = f" inside {path!r}" if path and node.op != "call_module" else ""
    return f"{what}{place} (graph node {node.name!r})"


def check_eval(model: nn.Module) -> None:
    """Raise if any module is in training mode: CD is defined on eval behaviour."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"the model is in training mode ({', '.join(training[:3])}"
            f"{', ...' if len(training) > 3 else ''}); CD is defined on eval behaviour "
            "(dropout off, batchnorm running statistics). Call model.eval() first.")


def _recompute_weight(hook, mod: nn.Module) -> bool:
    """Run a ``torch.nn.utils.weight_norm`` / ``spectral_norm`` pre-hook's weight recomputation
    (spectral_norm without its power step, in any mode); False for any other hook."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    if isinstance(hook, WeightNorm):
        setattr(mod, hook.name, hook.compute_weight(mod))
    elif isinstance(hook, SpectralNorm):
        setattr(mod, hook.name, hook.compute_weight(mod, do_power_iteration=False))
    else:
        return False
    return True


def check_hooks(model: nn.Module) -> None:
    """Raise if a module has a forward hook: CD computes each layer from its parameters and
    never calls the module, so what a hook does to inputs or outputs would be missed silently.
    The pre-hooks of ``torch.nn.utils.weight_norm`` / ``spectral_norm`` only recompute the
    weight from its parts: that is done instead (the weight the forward would use; never a
    power step, which would change the model). fastacd's own observing hooks
    (``fastacd_observer``) are allowed."""
    from torch.nn.modules import module as torch_module
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        raise UnsupportedOpError(
            "global module forward hooks are registered (torch.nn.modules.module."
            "register_module_forward_hook / register_module_forward_pre_hook); CD never calls the "
            "modules, so what they do would be missed. Remove them while decomposing.")
    found = []
    for name, mod in model.named_modules():
        for kind, hooks in (("forward pre-hook", mod._forward_pre_hooks), ("forward hook", mod._forward_hooks)):
            for hook in hooks.values():
                if kind == "forward pre-hook" and _recompute_weight(hook, mod):
                    continue
                if not getattr(hook, "fastacd_observer", False):
                    what = getattr(hook, "__name__", type(hook).__name__)
                    found.append(f"{kind} {what} on {name or type(model).__name__!r}")
    if found:
        raise UnsupportedOpError(
            f"the model has {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}. CD computes "
            "each layer from its parameters and never calls the module, so a hook's change to its "
            "inputs or outputs would be missed (and an observing hook would not fire). Remove the "
            "hooks while decomposing (handle.remove()), or move what they do into forward().")


def check_model(model: nn.Module) -> None:
    """What every capture and every call needs of the model: eval mode and no forward hooks."""
    check_eval(model)
    check_hooks(model)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block (CD is defined on eval behaviour), each module's
    own mode restored after it."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in states:
            m.training = training


def arg(node: fx.Node, pos: int, name: str, default=None):
    """A node's argument by position or keyword."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def operands(node: fx.Node) -> tuple:
    """The two operands of a binary op node (``a + b``, ``a.add(b)``, ``torch.mul(a, other=b)``)."""
    return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


def load_arg(value_of: Callable[[fx.Node], Any], a):
    """Map graph nodes inside (nested) args to their values."""
    return fx.node.map_arg(a, value_of)


_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
                 operator.imul: operator.mul, operator.itruediv: operator.truediv,
                 torch.relu_: torch.relu, F.relu_: torch.relu}
# inplace is the last positional argument of these
_INPLACE_LAST = (F.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.hardtanh, F.hardsigmoid,
                 F.hardswish, F.silu, F.mish, F.threshold, F.rrelu)


def call_with(step: Step, value_of: Callable[[fx.Node], Any], replace: dict[fx.Node, Any]) -> Any:
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
    target = _OUT_OF_PLACE.get(node.target, node.target)
    if target in _INPLACE_LAST and len(args) > 1 and isinstance(args[-1], bool):
        args = args[:-1]
    return target(*args, **kwargs)


def run_plain(gm: fx.GraphModule, node: fx.Node, value_of) -> Any:
    """Run a node that does not depend on the input, as torch.fx would."""
    args = load_arg(value_of, node.args)
    kwargs = load_arg(value_of, node.kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise RuntimeError(f"unexpected node {node.op}")


def fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

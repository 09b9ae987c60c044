"""Graph capture: trace a model with torch.fx and give every input-dependent node a CD rule.

The engine and the reference both walk the ``CapturedGraph`` built here. A node depends on
the input when any of its arguments does; each such node gets the rule (``fastacd.rules``)
of the rule set that claims it, or ``UnsupportedOpError`` names the op and its place.
In-place ops are made out of place first (later readers of the modified tensor read the
op's result), so the graph computes what the model computes.
"""
from __future__ import annotations

import weakref

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import direct_convolutions
from .nodes import (Step, TraceError, UnsupportedOpError, aten_op, check_model, describe_node,
                    fetch_attr, packing_error, run_plain)
from .transformer import traced_forward

if TYPE_CHECKING:
    from ..rules.base import RuleSet


class _Tracer(fx.Tracer):
    """Keeps every module a rule claims (and every torch.nn leaf) as one node; traces the
    plain path of the torch.nn modules whose forward torch.fx cannot trace
    (``fastacd.capture.transformer``: nn.TransformerEncoder, nn.TransformerEncoderLayer)."""

    def __init__(self, rules: "RuleSet"):
        super().__init__()
        self.rules = rules

    def _traced_forward(self, m: nn.Module):
        replaced = "forward" in vars(m)  # on the instance: fx traces it; the type's path is not it
        return None if replaced or self.rules.claims_module(m) else traced_forward(m)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if "forward" in vars(m):  # replaced on the instance: its type's rule is not what it computes
            return False
        if self._traced_forward(m) is not None:
            return False
        return self.rules.claims_module(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        fn = self._traced_forward(m)
        if fn is not None:
            forward = lambda *a, **k: fn(m, *a, **k)  # noqa: E731
        return super().call_module(m, forward, args, kwargs)


class CapturedGraph:
    """A traced model with a CD rule for every input-dependent node.

    Parameters are read from the model's modules at call time, so training the model
    after capture is reflected; the graph (the model's structure) is fixed at capture.
    ``gm``: a graph captured otherwise (``fastacd.capture.export``: torch.export's ATen
    graph); by default the model is traced with torch.fx.
    """

    @property
    def model(self) -> nn.Module | None:
        return self._model()

    def __init__(self, model: nn.Module, rules: "RuleSet", gm: fx.GraphModule | None = None):
        # weakly: the reference caches graphs per model in a WeakKeyDictionary, which a strong
        # reference from the graph would keep alive (every model passed to reference.cd leaked)
        self._model = weakref.ref(model)
        self.rules = rules
        if isinstance(model, torch.jit.ScriptModule):  # neither fx nor export reads TorchScript
            raise UnsupportedOpError(f"{type(model).__name__} is a TorchScript module (torch.jit.script / "
                                     "trace); pass the Python nn.Module it was made from")
        check_model(model)  # tracing bakes `self.training` into the graph: capture eval behaviour
        if gm is None:
            try:
                _drop_proxies(model)  # stale ones from an earlier trace would join this graph
                try:
                    graph = _Tracer(rules).trace(model)
                finally:
                    _drop_proxies(model)
            except Exception as exc:  # torch.fx raises many types; say what to do
                packing = packing_error(exc, model)
                if packing is not None:
                    raise packing from exc
                raise TraceError(
                    f"fastacd could not trace {type(model).__name__} with torch.fx: {exc}\n"
                    "fastacd needs a forward pass without data-dependent Python control flow. "
                    "Move such logic out of forward(), wrap the offending submodule in a module "
                    "type registered with fastacd.register_rule, or capture with torch.export: "
                    "Decomposer(model, capture='export').") from exc
            gm = fx.GraphModule(model, graph)
            _check_own_nodes(gm.graph)
        self.gm = gm
        self.capture = gm.meta.get("capture", "fx")
        functionalise(self.gm)
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
        self._fold_relus()
        self.last_use = self._last_uses()

    def _classify(self) -> None:
        """Give every input-dependent node its rule. Sizes read off the input and context
        (gates, attention weights, normalisers: ``RuleSet.context``) are computed from the
        total like constants; every other input-dependent node is decomposed."""
        reach, self.metadata = {self.input_node}, set()
        for node in self.nodes:
            if node.op in ("placeholder", "get_attr", "output") or not any(
                    a in reach for a in node.all_input_nodes):
                continue
            (self.metadata if self.rules.is_metadata(self, node) else reach).add(node)
        self.reach = reach
        self.context = self.rules.context(self, reach, self.metadata)
        for node in self.nodes:
            if node in reach and node not in self.context and node is not self.input_node:
                dep = [a for a in node.all_input_nodes if a in self.dependent]
                if dep:
                    self.steps[node] = self.rules.claim(self, node, dep)
                    self.dependent.add(node)

    def _fold_relus(self) -> None:
        """Fold a ReLU into the affine/batchnorm that alone feeds it (design.md 4, fusion)."""
        for node, step in self.steps.items():
            if not step.rule.folds_into(step):
                continue
            src = step.dep[0]
            src_step = self.steps.get(src)
            if (src_step is not None and src_step.rule.fuses_relu and len(src.users) == 1
                    and node.args[0] is src):
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

    def total_pass(self, x: torch.Tensor, zero_tol: float) -> tuple[dict, dict]:
        """The true activation of every node for input x, as the model computes it, and what
        the rules keep of it (``aux``: weights, statistics, argmax indices).

        Shared by the engine and the reference: max-pool indices come from these activations,
        and the tolerances of numerical zero from the magnitude scales (``Rule.magnitude``;
        ``zero_tol = 0``: none, the paper's formula).
        """
        # the model's own activations: no Winograd (its rounding would move the max-pool argmaxes
        # the rules gather at; docs/kernels.md "Winograd")
        with direct_convolutions():
            return self._total_pass(x, zero_tol)

    def _total_pass(self, x: torch.Tensor, zero_tol: float) -> tuple[dict, dict]:
        values: dict[fx.Node, Any] = {}
        aux: dict[fx.Node, Any] = {}
        mags: dict[fx.Node, Any] = {self.input_node: x.abs()}  # Rule.magnitude, while read
        value_of = values.__getitem__
        position = {n: k for k, n in enumerate(self.nodes)}
        batch = x.shape[0]
        for node in self.nodes:
            if node.op == "output":
                break
            if node.op == "placeholder":
                values[node] = x if node is self.input_node else (node.args[0] if node.args else None)
                continue
            if node.op == "get_attr":
                values[node] = fetch_attr(self.gm, node.target)
                continue
            step = self.steps.get(node)
            if step is None:
                values[node] = run_plain(self.gm, node, value_of)
                continue
            out, aux[node] = step.rule.total(step, value_of)
            for t in tensors(out):  # a tensor, or a tuple of them (chunk, split; None: MHA's weights)
                # the batch may move to another dim (attention's (3, B, heads, N, d) stack) or
                # be merged into one (window partitions: (B * windows, N, C))
                if t is None:
                    continue
                if not (isinstance(t, torch.Tensor) and any(s % batch == 0 for s in t.shape)):
                    raise UnsupportedOpError(
                        f"{describe_node(node)} changes the batch dimension (output shape "
                        f"{tuple(getattr(t, 'shape', ()))} for a batch of {batch}); CD needs every "
                        "input-dependent op to treat samples independently")
            values[node] = out
            if zero_tol:
                mags[node], aux[node] = step.rule.magnitude(step, mags, value_of, aux[node], zero_tol)
            for d in step.dep:
                if self.last_use.get(d, -1) <= position[node] and d is not self.result_node:
                    mags.pop(d, None)
        return values, aux


def module_identities(model: nn.Module) -> tuple:
    """The identities of a model's modules and of any forward replaced on an instance. A graph
    captured from the model calls those modules, so a cache of captured graphs keyed by the
    model is only good while this is unchanged (``model.fc = nn.Linear(...)`` or
    ``model.fc.forward = ...`` after a capture needs a new one)."""
    return tuple((id(m), id(vars(m).get("forward"))) for m in model.modules())


def per_model(cache, model: nn.Module) -> dict:
    """``cache``'s dict for ``model`` (a WeakKeyDictionary of (module identities, dict)), emptied
    when a submodule was replaced since: what it holds was captured from the old modules."""
    modules = module_identities(model)
    kept_for, entries = cache.get(model, (None, {}))
    if kept_for != modules:
        entries = {}
        cache[model] = (modules, entries)
    return entries


def _drop_proxies(model: nn.Module) -> None:
    """Remove the torch.fx proxies a trace left in modules' dict caches (timm's per-device
    ``attention_bias_cache`` keys on ``str(x.device)``: a proxy's name while traced)."""
    for mod in model.modules():
        for v in vars(mod).values():
            if isinstance(v, dict):
                for k in [k for k, t in v.items() if isinstance(t, fx.Proxy)]:
                    del v[k]


def _check_own_nodes(graph: fx.Graph) -> None:
    """A node reading another graph's node read a proxy the model kept from another trace."""
    own = set(graph.nodes)
    for node in graph.nodes:
        foreign = next((a for a in node.all_input_nodes if a not in own), None)
        if foreign is not None:
            raise UnsupportedOpError(
                f"{describe_node(node)} reads {foreign.name!r} of another torch.fx trace: the model "
                "keeps a traced value in a module attribute (a cache filled while traced). Clear "
                "that cache before building the Decomposer.")


def tensors(value) -> tuple:
    """A node's value as a flat tuple: the tensor itself, or the items of a (nested) tuple or
    list (an LSTM's ``(out, (h_n, c_n))``)."""
    if isinstance(value, (tuple, list)):
        return tuple(t for v in value for t in tensors(v))
    return (value,)


# --------------------------------------------------------------------------------------
# In-place ops, made out of place
# --------------------------------------------------------------------------------------
# ops whose result may share memory with their first argument
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "transpose", "permute",
                 "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "unfold", "t",
                 "chunk", "split", "unbind", "diagonal", "as_strided", "contiguous", "detach",
                 "movedim", "swapaxes", "unflatten"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.flatten, torch.transpose, torch.permute,
                   torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.chunk,
                   torch.split, torch.unbind, torch.movedim, torch.swapaxes, torch.t, torch.detach}
_INPLACE_FUNCTIONS = {torch.relu_, F.relu_}


def _mutated(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The tensor an in-place op writes into (its first argument), or None."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    schema = aten_schema(node)
    if schema is not None:  # an ATen op says so itself: its first argument is written to
        info = schema.arguments[0].alias_info if schema.arguments else None
        return first if info is not None and info.is_write else None
    if node.op == "call_method":
        name = node.target
        return first if name.endswith("_") and not name.endswith("__") else None
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return first
        if node.target is operator.setitem:
            return first
        # inplace is the last positional argument of these
        if node.target in (F.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.hardtanh,
                           F.hardsigmoid, F.hardswish, F.silu, F.mish):
            return first if node.args and node.args[-1] is True else None
        return None
    if node.op == "call_module":
        return first if getattr(gm.get_submodule(node.target), "inplace", False) is True else None
    return None


def aten_schema(node: fx.Node):
    """The schema of an ATen op node (torch.export), or None."""
    return getattr(aten_op(node), "_schema", None)


def _is_view(node: fx.Node) -> bool:
    schema = aten_schema(node)
    if schema is not None:  # an ATen view returns an alias of its input that is not written
        info = schema.returns[0].alias_info if schema.returns else None
        return info is not None and not info.is_write
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def functionalise(gm: fx.GraphModule) -> None:
    """Make in-place ops out of place: the readers after an op that modifies tensor t read
    the op's result instead of t, as they see the modified tensor when the model runs.

    Refused with ``UnsupportedOpError``: an in-place op on a parameter or buffer, on a
    tensor that shares memory with another value read later (a view, or a view of it), and
    item assignment (``t[idx] = v``)."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    reach = _from_input(nodes)
    for node in nodes:
        t = _mutated(gm, node)
        if t is None:
            continue
        if node not in reach and t.op != "get_attr":
            continue  # builds a constant in place (convit's position indices): runs as the model runs it
        where = describe_node(node)
        if node.op == "call_function" and node.target is operator.setitem:
            raise UnsupportedOpError(
                f"fastacd cannot decompose {where}: item assignment into a tensor (t[idx] = v) "
                "modifies it in place. Build the tensor out of place (torch.cat, torch.where, "
                "index_put) instead.")
        if t.op == "get_attr":
            raise UnsupportedOpError(f"fastacd cannot decompose {where}: it modifies the parameter "
                                     f"or buffer {t.target!r} in forward()")
        pos = order[node]
        family = _view_family(t, order, pos)
        if any(order[u] > pos for a in family if a is not t for u in a.users):
            if _write_back(gm, node, t, order):
                continue
            raise UnsupportedOpError(
                f"fastacd cannot decompose {where}: it modifies in place a tensor that shares "
                "memory with another value the model reads later (a view). Write the op out of "
                f"place (e.g. y = y.{_plain_name(node).rstrip('_')}(...) instead of y.{_plain_name(node)}(...)).")
        for user in list(t.users):
            if user is not node and order[user] > pos:
                user.replace_input_with(t, node)
        if aten_schema(node) is not None:  # aten.relu_ -> aten.relu: the rules run it out of place
            node.target = _out_of_place_aten(node)
    gm.recompile()


_SCATTERS = {torch.ops.aten.slice.Tensor: torch.ops.aten.slice_scatter.default,
             torch.ops.aten.select.int: torch.ops.aten.select_scatter.default}


def _write_back(gm: fx.GraphModule, node: fx.Node, t: fx.Node, order: dict) -> bool:
    """An ATen in-place op on a chain of slices / selects of a tensor (MViTv2's
    ``attn[:, :, 1:, 1:] = ...``, an ``aten.copy_`` into a view) made out of place: the op gives
    the view's new values, and ``slice_scatter`` / ``select_scatter`` put them back into the
    tensor the chain starts from, which later readers then read. False (nothing changed) where
    that does not apply: another view of the chain read later, a view other than slice / select,
    an op that is not ATen, shapes unknown."""
    if aten_schema(node) is None:
        return False
    chain, root = [], t
    while aten_op(root) in _SCATTERS:
        chain.append(root)
        root = root.args[0]
    pos = order[node]
    if not chain or _is_view(root) or any(order[u] > pos for v in chain[1:] for u in v.users):
        return False
    if root.op == "get_attr":
        raise UnsupportedOpError(f"fastacd cannot decompose {describe_node(node)}: it modifies the parameter "
                                 f"or buffer {root.target!r} in forward()")
    if any("val" not in n.meta for n in [root, node, *chain]) or any(
            isinstance(a, fx.Node) and "val" not in a.meta for a in node.args):
        return False
    functional = _out_of_place_aten(node)
    try:
        val = functional(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in node.args], **node.kwargs)
    except Exception:  # noqa: BLE001 -- e.g. a copy_ that broadcasts: keep the refusal
        return False
    node.target, node.meta["val"] = functional, val
    later = [u for u in root.users if order[u] > pos]
    for u in [u for u in t.users if u is not node and order[u] > pos]:  # the written view: its new values
        u.replace_input_with(t, node)
    value, anchor = node, node
    for view in chain:  # innermost view first: scatter into its parent
        parent = view.args[0]
        with gm.graph.inserting_after(anchor):
            value = gm.graph.call_function(_SCATTERS[aten_op(view)], (parent, value, *view.args[1:]), view.kwargs)
        value.meta["val"] = value.target(parent.meta["val"], value.args[1].meta["val"], *view.args[1:], **view.kwargs)
        order[value] = order[anchor] + 1e-3  # after the op, before the next original node
        anchor = value
    for u in later:
        u.replace_input_with(root, value)
    return True


def _from_input(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes computed from the model's input (any placeholder)."""
    reach: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    return reach


def _plain_name(node: fx.Node) -> str:
    """An in-place op's method name (``relu_``), also for an ATen op (``aten.relu_.default``)."""
    schema = aten_schema(node)
    return schema.name.split("::")[1] if schema is not None else str(node.target)


def _out_of_place_aten(node: fx.Node):
    """The functional overload of an in-place ATen op (``aten.add_.Tensor`` -> ``aten.add.Tensor``)."""
    op = node.target
    name, overload = op._schema.name.split("::")[1], op._overloadname
    try:
        return getattr(getattr(torch.ops.aten, name.rstrip("_")), overload)
    except AttributeError:
        raise UnsupportedOpError(f"fastacd cannot decompose {describe_node(node)}: an in-place ATen op "
                                 "without an out-of-place form") from None


def _view_family(t: fx.Node, order: dict, pos: int) -> set[fx.Node]:
    """t, the tensors t is a view of, and the views of any of them made before position pos."""
    family, todo = set(), [t]
    while todo:
        n = todo.pop()
        if n in family:
            continue
        family.add(n)
        if _is_view(n) and n.args and isinstance(n.args[0], fx.Node):
            todo.append(n.args[0])
        todo.extend(u for u in n.users if _is_view(u) and order[u] < pos)
    return family

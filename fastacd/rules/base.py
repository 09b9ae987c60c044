"""Rules as objects: one ``Rule`` per kind of op, collected in a ``RuleSet``.

A rule owns everything about its kind, so a pass never tests a kind by name:

* ``modules`` / ``functions`` / ``methods``: what it claims in a captured graph (functions
  include the ATen ops of a torch.export graph, as packets such as ``torch.ops.aten.linear``:
  every overload), and ``claim`` to accept a node (or refuse a variant it cannot decompose
  exactly);
* ``total``: the node's true output as the model computes it, plus what the other forms
  reuse (``aux``: weights, statistics, argmax indices);
* ``reference``: relevant and irrelevant parts propagated separately (the oracle);
* ``relevant``: the relevant part of M masks from the shared total (``i = a - r``);
  ``relevant_`` the same written into an input no later step reads;
* ``locality``: how the windowed pass recomputes it inside a window, or None (not local);
* ``row``: its line in the rules table of docs/engine.md.

A ``RuleSet`` maps kind -> rule; ``Decomposer(model, rules=...)`` picks one (the default
is ``fastacd.rules.DEFAULT``). ``register_rule`` teaches every set a new module type or
function of an existing kind.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.nodes import Step, UnsupportedOpError, call_with, describe_node


# --------------------------------------------------------------------------------------
# Locality: what the windowed pass needs to recompute a node inside a window
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Elementwise:
    """The output at a position depends only on the input at that position."""


@dataclass(frozen=True)
class Union:
    """The outputs combine the operands position by position (residual add, channel concat):
    the window is the union of the operands' windows."""


@dataclass(frozen=True)
class Sliding:
    """A 2-d sliding-window op: an output position reads a kernel-sized input patch.
    ``weight`` set: a zero-padded convolution (the rule's ``crop_aux`` adapts its aux to a
    crop); None: a max-pool (the relevant part is gathered at the total's argmax)."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    weight: torch.Tensor | None = None
    groups: int = 1


# Numerical zero (design.md section 9): a split's part near or below ZERO_TOL of its element's
# magnitude scale (|W| |a| for a conv, |s a| for a batchnorm) ramps out of the split weights, so
# rounding residues do not steer a split (fastacd.ops.torch_ops.split_weights). 0 gives the
# paper's formula. docs/engine.md "Numerical zero" has the measurements that chose it.
ZERO_TOL = 1e-4


class Rule:
    """One kind of op and its CD rule in every form (see the module docstring)."""
    kind: str = ""
    modules: tuple[type, ...] = ()
    functions: tuple = ()
    methods: tuple[str, ...] = ()
    fuses_relu: bool = False   # a ReLU that only this node feeds is folded into its split
    value: bool = True         # False: the node gives a plain value (a size), not decomposed
    output_only: bool = False  # a trailing op left out of CD (its input's parts are the result)
    context_only: bool = False  # claims nothing: it only marks context (``gate_like``)
    row: tuple[str, str, str] = ("", "", "")  # docs: ops, relevant out, irrelevant out

    # ---- capture ------------------------------------------------------------------------
    def claim(self, graph, node: fx.Node, dep: list[fx.Node], module: nn.Module | None) -> Step | None:
        """A step for ``node`` (None: not this rule's; raise for a variant it must refuse)."""
        return Step(node, self, dep, module=module)

    def folds_into(self, step: Step) -> bool:
        """Whether this step may be folded into a producer whose rule ``fuses_relu``."""
        return False

    # ---- context (design.md section 8) -----------------------------------------------------
    def gate_like(self, graph, node: fx.Node, gates: set) -> bool:
        """Whether the node's output modulates another value (a gate, attention weights, a
        normaliser); ``gates``: the gate-like nodes before it."""
        return False

    def context_operands(self, graph, node: fx.Node, reach: set, gates: set) -> set:
        """The node's input-dependent operands it reads from the total only (context)."""
        return set()

    # ---- the forms ----------------------------------------------------------------------
    def total(self, step: Step, value_of: Callable) -> tuple[Any, Any]:
        """(the node's true output, aux for the other forms)."""
        return call_with(step, value_of, {}), None

    def magnitude(self, step: Step, mags: dict, value_of: Callable, aux, zero_tol: float) -> tuple[Any, Any]:
        """(the magnitude scale of each element of the node's output, aux with the tolerance
        of numerical zero where the rule splits: design.md 9). The scale is the size the
        element's rounding is relative to: a weight layer starts one from its true input
        (``|W| |a| + |b|``), other ops carry their inputs'. Default: the op on the inputs'
        scales (pools, reshapes, concatenations; activations, |f(x)| <= |x|). ``zero_tol``: the
        tolerance as a fraction of the scale."""
        return call_with(step, value_of, {d: mags[d] for d in step.dep}), aux

    def reference(self, step: Step, parts: dict, value_of: Callable, aux) -> tuple:
        """(relevant, irrelevant) from the inputs' parts ``parts[d] = (r, i)``."""
        raise NotImplementedError

    def relevant(self, step: Step, rel: dict, values, aux, ops, m: int) -> torch.Tensor:
        """The relevant part of m masks from the inputs' relevant parts ``rel[d]`` (m, ...)
        and the true activations ``values`` (shared: batch 1; windowed: per-mask crops)."""
        raise NotImplementedError

    def inplace_operand(self, step: Step) -> fx.Node | None:
        """The input ``relevant_`` overwrites (None: no in-place form)."""
        return None

    def relevant_(self, step: Step, rel: dict, values, aux, ops) -> torch.Tensor | None:
        """``relevant`` written into ``rel[inplace_operand(step)]``; None where it does not apply."""
        return None

    def fresh(self, step: Step, rel: dict, out: torch.Tensor) -> bool:
        """Whether ``relevant``'s output is a tensor of its own (a later rule may overwrite it)."""
        return False

    def locality(self, step: Step, values) -> Elementwise | Union | Sliding | None:
        """How the windowed pass recomputes this node (None: in full)."""
        return None

    def crop_aux(self, step: Step, aux, loc, crop: Callable):
        """aux in a window's coordinates (the windowed pass): ``crop`` crops a total-shaped map;
        at a convolution's window (a ``Sliding`` with weights) it gives the map as read at the
        windows (``fastacd.engine.windowed.AtWindows``), which the split ops read in place."""
        return aux

    # ---- the paired training pass (CDEP: fastacd.train.cdep.paired_cd) ------------------
    # ``p`` is the pass: ``p.values`` the true activations of N images (node -> (N, ...)),
    # ``p.rel`` the relevant parts of K*N masks (mask-major: row k*N + n pairs with image n),
    # ``p.value_of``, ``p.ops`` (pure, differentiable torch), ``p.m`` = K*N, ``p.repeated``
    # (input-dependent values as K*N rows), and the low-memory building blocks a rule may
    # call (``p.affine``, ``p.bn_split``, ``p.pool_total``, ``p.pool_relevant``,
    # ``p.pool_indices``, ``p.relu_total``). Everything is differentiable under grad mode.
    def paired_total(self, step: Step, p) -> Any:
        """The node's true output for the N images, as the model computes it (an
        ``output_only`` rule passes its input on)."""
        if self.output_only:
            return p.values[step.dep[0]]
        return call_with(step, p.value_of, {})

    def paired_relevant(self, step: Step, p) -> torch.Tensor:
        """The relevant part of the K*N masks. Default: ``relevant`` with the N images' totals
        and no aux (a rule computes what it needs from ``values``; ``norm.rows_like`` repeats a
        per-image statistic for K*N rows); for a rule without a ``relevant`` form, its
        ``reference`` form on K*N rows with ``i = a - r`` (the oracle's arithmetic, at the
        price of the op's total and irrelevant part computed once more)."""
        if type(self).relevant is not Rule.relevant:
            return self.relevant(step, p.rel, p.values, None, p.ops, p.m)
        value_of = p.repeated
        _, aux = self.total(step, value_of)
        parts = {d: (p.rel[d], value_of(d) - p.rel[d]) for d in step.dep}
        return self.reference(step, parts, value_of, aux)[0]

    def paired_aux(self, step: Step, p) -> Any:
        """What the reference's aux takes from the true batch here (a max-pool's argmax
        indices; ``paired_cd(pool_indices=...)`` collects them), or None."""
        return None

    def macs(self, step: Step, value_of: Callable) -> int:
        """Multiply-adds per output position and mask (the windowed pass's cost model)."""
        return 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rule {self.kind!r}>"


class ContextOnly(Rule):
    """A value that is context wherever it modulates a decomposed one (a normaliser, a
    comparison's mask; design.md section 8): computed from the total, no rule of its own.
    ``alone`` says why a use that modulates nothing is refused."""
    context_only = True
    alone = ""

    def claim(self, graph, node, dep, module):
        raise unsupported(node, self.alone)

    def gate_like(self, graph, node, gates):
        return True


def only_gates(node: fx.Node, reach: set, gates: set) -> bool:
    """Whether the node's input-dependent inputs are all gate-like (and there is one): an
    op on gates alone (a reshape, ``1 - g``, ``g1 * g2``) is gate-like too."""
    dep = [a for a in node.all_input_nodes if a in reach]
    return bool(dep) and all(a in gates for a in dep)


# --------------------------------------------------------------------------------------
# Mask layout: where the M masks of a relevant part sit
# --------------------------------------------------------------------------------------
# A relevant part has its total's shape with one dim holding the masks: the total's batch
# of 1 replaced by M (dim 0, or wherever an op moved it: attention's (3, M, heads, N, d)
# stacks), or the total's size there multiplied by M with the mask the outer factor (window
# partitions merge the batch with the windows: (M * windows, N, C) for a total (windows, N, C)).
def mask_dim(shape, total) -> int:
    """The dim of a relevant part of ``shape`` that holds the masks against its total's shape:
    the one where they differ (0 where none does: one mask)."""
    for k, (a, b) in enumerate(zip(shape, total)):
        if a != b:
            return k
    return 0


def per_mask(rel: torch.Tensor, total) -> torch.Tensor:
    """``rel`` as (M, *total): the masks in a leading dim of their own (a view)."""
    total = tuple(total)
    if not total:
        return rel.reshape(-1)
    k = mask_dim(rel.shape, total)
    return rel.unflatten(k, (rel.shape[k] // total[k], total[k])).movedim(k, 0)


def merge_masks(t: torch.Tensor, k: int) -> torch.Tensor:
    """(M, *S) -> S with dim k holding the masks as its outer factor (``per_mask``'s inverse)."""
    return t.movedim(0, k).flatten(k, k + 1)


def split_by_rows(split: Callable, rel: torch.Tensor, total: torch.Tensor, tol: torch.Tensor | None = None):
    """A compiled split (bias_split, bn_split) for a total of n > 1 rows of one sample (LeViT's
    (B * N, C) tokens, TNT's pixel patches as a batch): each mask's n rows folded into the
    channels, as the kernels take a total of one row. ``split(rel, total, tol)`` gets
    (M, n*C, ...), (1, n*C, ...) and the tolerance so folded; per-channel parameters go
    repeated n times."""
    n = total.shape[0]
    fold = lambda t: t.reshape((-1, n * total.shape[1]) + tuple(total.shape[2:]))  # noqa: E731
    out = split(fold(per_mask(rel, total.shape)), fold(total), None if tol is None else fold(tol.expand(total.shape)))
    return merge_masks(out.reshape((-1,) + tuple(total.shape)), mask_dim(rel.shape, total.shape))


def rel_shape(total, k: int, m: int) -> tuple:
    """The shape of m masks' relevant part of a total of shape ``total``, masks in dim k."""
    shape = list(total)
    if shape:
        shape[k] *= m
    return tuple(shape)


def as_tuple(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


# --------------------------------------------------------------------------------------
# Rule sets and registration
# --------------------------------------------------------------------------------------
# register_rule: module type or function -> (kind, fn factory or None), for every rule set
_USER_RULES: dict[Any, tuple[str, Callable | None]] = {}
USER_KINDS = ("activation", "linear", "reshape")


def register_rule(target: type | Callable, kind: str, fn: Callable | None = None) -> None:
    """Teach fastacd a module type or function it does not know, as a rule of ``kind``:

    * ``"linear"``: a map that is linear in its input and treats every sample of the batch
      alike (a pooling, a fixed filter, an up-sampling): relevant ``f(r)``, irrelevant ``f(i)``;
    * ``"activation"``: an element-wise function with ``f(0) = 0``: relevant ``f(r)``,
      irrelevant ``f(r + i) - f(r)``;
    * ``"reshape"``: a per-sample reshape that keeps the element order.

    ``fn`` (optional) is the function to apply to one tensor, e.g. ``lambda m: m.my_fn``
    for a module type (it receives the module) or the function itself; by default the
    module or function is called with the tensor in place of its input. Every rule set
    (``fastacd.rules``) uses its own rule of that kind for the target. A new kind of rule
    is a ``Rule`` subclass added to a set: docs/engine.md, "Adding a rule".
    """
    if kind not in USER_KINDS:
        raise ValueError(f"kind must be one of {USER_KINDS}, got {kind!r}")
    _USER_RULES[target] = (kind, fn)


class RuleSet(Mapping):
    """A mapping kind -> rule, and the lookup of the rule that claims a captured node."""

    def __init__(self, rules: Iterable[Rule], name: str = ""):
        self.name = name
        self._rules: dict[str, Rule] = {}
        for r in rules:
            if not r.kind:
                raise ValueError(f"{r!r} has no kind")
            self._rules[r.kind] = r
        self._modules: dict[type, list[Rule]] = {}
        self._functions: dict[Any, list[Rule]] = {}
        self._methods: dict[str, list[Rule]] = {}
        for r in self._rules.values():
            for t in r.modules:
                self._modules.setdefault(t, []).append(r)
            for f in r.functions:
                self._functions.setdefault(f, []).append(r)
            for name_ in r.methods:
                self._methods.setdefault(name_, []).append(r)

    def __getitem__(self, kind: str) -> Rule:
        return self._rules[kind]

    def __iter__(self):
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({self.name!r}, {sorted(self._rules)})"

    def markdown(self) -> str:
        """The set's rules table (docs/engine.md carries the default set's, checked by a test)."""
        lines = ["| kind | ops | relevant | irrelevant |", "|---|---|---|---|"]
        lines += [f"| {r.kind} | {' | '.join(r.row)} |" for r in self._rules.values()]
        return "\n".join(lines)

    def replace(self, *rules: Rule, name: str | None = None) -> "RuleSet":
        """A new set: this one with ``rules`` added, or replacing the rules of their kinds."""
        kinds = {r.kind for r in rules}
        return RuleSet([r for r in self._rules.values() if r.kind not in kinds] + list(rules),
                       name if name is not None else self.name)

    # ---- lookup ---------------------------------------------------------------------------
    def claims_module(self, module: nn.Module) -> bool:
        """Whether a rule takes this module whole (the tracer keeps it as one node); not when its
        forward was replaced on the instance (the rule is its type's)."""
        if "forward" in vars(module):
            return False
        return type(module) in _USER_RULES or bool(self._module_rules(module))

    def _module_rules(self, module: nn.Module) -> list[Rule]:
        """Rules for the module's type, or for a base class whose forward it keeps (a subclass
        with a forward of its own, or a convolution's ``_conv_forward``, computes something
        else: the tracer follows it instead)."""
        typ = type(module)
        for cls in typ.__mro__:
            if cls in self._modules and (cls is typ or all(
                    getattr(typ, f, None) is getattr(cls, f, None) for f in ("forward", "_conv_forward"))):
                return self._modules[cls]
        return []

    def candidates(self, graph, node: fx.Node) -> list[Rule]:
        """The rules whose tables name the node's module type, function or method."""
        if node.op == "call_module":
            return self._module_rules(graph.gm.get_submodule(node.target))
        if node.op == "call_function":
            if not _hashable(node.target):
                return []
            found = self._functions.get(node.target)
            packet = getattr(node.target, "overloadpacket", None)  # an ATen op (torch.export)
            if found is None and packet is not None:
                found = self._functions.get(packet)
            return found or []
        if node.op == "call_method":
            return self._methods.get(node.target, [])
        return []

    def is_metadata(self, graph, node: fx.Node) -> bool:
        """Whether the node reads only sizes of its input (a rule with ``value = False`` claims it)."""
        for r in self.candidates(graph, node):
            if not r.value:
                try:
                    if r.claim(graph, node, [], None) is not None:
                        return True
                except UnsupportedOpError:
                    pass
        return False

    def context(self, graph, reach: set, metadata: set = frozenset()) -> set:
        """The input-dependent nodes that are context: computed once from the total and shared
        by all masks, like a constant (design.md section 8). A node is context when every
        reader takes it as context (a gate, attention weights, a normaliser, a size) or is
        context itself: what only feeds a gate's computation is never decomposed."""
        gates: set = set()
        operands: dict = {}
        for n in graph.nodes:
            if n in reach:
                rules = self.candidates(graph, n)
                if any(r.gate_like(graph, n, gates) for r in rules):
                    gates.add(n)
                operands[n] = set().union(*(r.context_operands(graph, n, reach, gates) for r in rules))
        context: set = set()
        for n in reversed(graph.nodes):
            if n in reach and n is not graph.input_node and n.users and all(
                    u in context or u in metadata or n in operands.get(u, ()) for u in n.users):
                context.add(n)
        return context

    def claim(self, graph, node: fx.Node, dep: list[fx.Node]) -> Step:
        """The step of the rule that claims ``node``; ``UnsupportedOpError`` if none does."""
        mod = graph.gm.get_submodule(node.target) if node.op == "call_module" else None
        key = type(mod) if mod is not None else node.target
        if key not in _USER_RULES and _hashable(key):  # an ATen op registered by its packet
            key = getattr(key, "overloadpacket", key)
        if node.op != "call_method" and key in _USER_RULES:
            kind, factory = _USER_RULES[key]
            fn = None if factory is None else (factory(mod) if mod is not None else factory)
            return Step(node, self._rules[kind], dep, fn=fn, module=mod)
        candidates = self.candidates(graph, node)
        refused = None  # a rule's refusal names the variant; a later rule may still claim it
        for rule in candidates:
            try:
                step = rule.claim(graph, node, dep, mod)
            except UnsupportedOpError as exc:
                refused = refused or exc
                continue
            if step is not None:
                return step
        raise refused or unsupported(node)


def _hashable(t) -> bool:
    try:
        hash(t)
    except TypeError:
        return False
    return True


def unsupported(node: fx.Node, why: str | None = None) -> UnsupportedOpError:
    """The error for an op without a rule (or a variant a rule refuses), naming the op."""
    reason = f" ({why})" if why else ""
    return UnsupportedOpError(
        f"fastacd has no CD rule for {describe_node(node)}{reason}.\n"
        "If the op is linear and batch-agnostic (a pooling, a fixed filter), or an "
        "element-wise activation with f(0) = 0, register it:\n"
        "    fastacd.register_rule(<module type or function>, 'linear' | 'activation' | 'reshape')\n"
        "then build the Decomposer again. Otherwise the op needs a rule of its own "
        "(see docs/engine.md, 'Adding a rule').")

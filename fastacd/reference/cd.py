"""Reference CD: one mask at a time, relevant and irrelevant parts propagated separately.

This is the oracle every fast path is tested against. It walks the graph captured by
``fastacd.capture`` and applies each rule's reference form (``Rule.reference``: both parts
through every layer, ``irrelevant`` never derived from the total), the original package's
arithmetic (design.md section 2). It imports capture and the rules only, never the engine.
Written for clarity, not speed.
"""
from __future__ import annotations

import weakref

import torch
import torch.fx as fx

from .. import rules as rules_
from ..capture.export import export_module
from ..rules.base import ZERO_TOL
from ..capture.graph import CapturedGraph, per_model
from ..capture.inputs import check_input, check_masks
from ..capture.nodes import TraceError, check_model

_GRAPHS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # (modules, {key: graph})


def propagate_graph(graph: CapturedGraph, relevant: torch.Tensor, irrelevant: torch.Tensor,
                    pool_indices: dict | None = None, totals: tuple | None = None,
                    zero_tol: float = ZERO_TOL):
    """Propagate one (relevant, irrelevant) split of the input through the captured graph.

    ``totals``: the graph's ``total_pass`` on the true input (its activations give the
    rules their context: max-pool positions, sizes); computed from ``relevant + irrelevant``
    when omitted (with numerical zero at ``zero_tol``). ``pool_indices`` (node -> argmax indices) overrides the max-pool positions,
    e.g. a batch's own indices repeated for several masks per example.
    """
    values, aux = totals if totals is not None else graph.total_pass(relevant + irrelevant, zero_tol)
    if pool_indices:
        aux = {**aux, **pool_indices}
    value_of = values.__getitem__
    parts: dict[fx.Node, tuple] = {graph.input_node: (relevant, irrelevant)}
    for node in graph.nodes:
        step = graph.steps.get(node)
        if step is not None:
            parts[node] = step.rule.reference(step, parts, value_of, aux.get(node))
    return parts[graph.result_node]


def cd_relevant_input(graph: CapturedGraph, x: torch.Tensor, relevant_input: torch.Tensor,
                      zero_tol: float = ZERO_TOL):
    """Reference CD of each row of ``relevant_input`` (M, *x.shape[1:]) against input x (1, ...):
    (relevant, irrelevant), each (M, *output_shape)."""
    totals = graph.total_pass(x, zero_tol)
    pairs = [propagate_graph(graph, r[None], x - r[None], totals=totals) for r in relevant_input]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def captured(model: torch.nn.Module, rules: rules_.RuleSet | None = None,
             example: torch.Tensor | None = None) -> CapturedGraph:
    """The captured graph of a model under a rule set, traced once per model object (and its
    modules: a replaced submodule is traced again) with torch.fx; where fx cannot trace it and
    ``example`` (an input) is given, torch.export's graph for inputs of its shape
    (docs/engine.md, "Capture")."""
    rules = rules_.resolve(rules)
    graphs = per_model(_GRAPHS, model)
    if id(rules) not in graphs:
        try:
            graphs[id(rules)] = CapturedGraph(model, rules)
        except TraceError:
            if example is None:
                raise
            graphs[id(rules)] = None  # fx cannot trace it: export, per input shape
    graph = graphs[id(rules)]
    if graph is not None:
        return graph
    key = (id(rules), tuple(example.shape[1:]))
    if key not in graphs:
        graphs[key] = CapturedGraph(model, rules, export_module(model, example))
    return graphs[key]


def cd(model: torch.nn.Module, x: torch.Tensor, mask, rules: rules_.RuleSet | None = None,
       zero_tol: float = ZERO_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference CD of ``mask`` (any shape ``Decomposer.cd`` accepts; M masks -> M rows).

    Returns (relevant, irrelevant), each (M, *output_shape). The relevant input is
    ``mask * x`` and the irrelevant ``(1 - mask) * x``. A model torch.fx cannot trace is
    captured with torch.export on x (as ``Decomposer(capture="auto")``). ``zero_tol``:
    numerical zero (``fastacd.Decomposer``); 0 is the paper's formula.
    """
    x = check_input(x)
    masks = check_masks(x, mask)
    check_model(model)  # the graph may be a cached one, captured before a hook was added
    graph = captured(model, rules, x)
    totals = graph.total_pass(x, zero_tol)
    rels, irrels = [], []
    for m in masks:
        r, i = propagate_graph(graph, m[None] * x, (1 - m[None]) * x, totals=totals)
        rels.append(r)
        irrels.append(i)
    return torch.cat(rels), torch.cat(irrels)

"""Reference CD: one mask at a time, relevant and irrelevant parts propagated separately.

This is the oracle every fast path is tested against. It follows the rules of design.md
section 2 with the original package's arithmetic (both parts through every layer,
``irrelevant`` never derived from the total), along the graph captured by
``fastacd.graph``. Written for clarity, not speed.
"""
from __future__ import annotations

import weakref

import torch
import torch.fx as fx

from ..capture.graph import (CapturedGraph, UnsupportedOpError, affine_parts, batchnorm_parts, call_with,
                     load_arg)

EPS = 1e-20
_GRAPHS: "weakref.WeakKeyDictionary[torch.nn.Module, CapturedGraph]" = weakref.WeakKeyDictionary()


def propagate_conv_linear(zr, zi, bias):
    """Split a bias between the relevant and irrelevant pre-bias outputs (eps rule)."""
    if bias is None:
        return zr, zi
    prop_rel = zr.abs() + EPS
    prop_irrel = zi.abs() + EPS
    prop_sum = prop_rel + prop_irrel
    b = bias.reshape((1, -1) + (1,) * (zr.dim() - 2))
    return zr + prop_rel / prop_sum * b, zi + prop_irrel / prop_sum * b


def propagate_batchnorm(r, i, scale, shift, apply):
    """Eval batchnorm ``scale * a + shift``; the shift goes by |s r| / (|s r| + |s i|), 0/0 -> 0."""
    view = (1, -1) + (1,) * (r.dim() - 2)
    sr, si = scale.reshape(view) * r, scale.reshape(view) * i
    prop_rel = sr.abs() / (sr.abs() + si.abs())
    prop_rel = torch.nan_to_num(prop_rel, nan=0.0)
    rel = sr + prop_rel * shift.reshape(view)
    return rel, apply(r + i) - rel


def propagate_maxpool(r, i, idx):
    """Gather both parts at the argmax positions of the true activation (= r + i).

    The indices come from the model's own forward pass, not from the floating-point sum
    r + i: at exact ties (constant backgrounds, e.g. MNIST digits) that sum's rounding
    noise would pick the position, and it differs from mask to mask (docs/engine.md).
    """
    idx = idx.expand(r.shape[0], *idx.shape[1:])
    n, c = idx.shape[:2]
    flat = idx.reshape(n, c, -1)

    def gather(t):
        return t.reshape(n, c, -1).gather(2, flat).reshape(idx.shape)
    return gather(r), gather(i)


def propagate_graph(graph: CapturedGraph, relevant: torch.Tensor, irrelevant: torch.Tensor,
                    pool_indices: dict | None = None):
    """Propagate one (relevant, irrelevant) split of the input through the captured graph.

    ``pool_indices`` maps each max-pool node to the argmax indices of the true activation
    (``pooling_indices(graph, x)``); computed from ``relevant + irrelevant`` when omitted.
    """
    if pool_indices is None:
        pool_indices = pooling_indices(graph, relevant + irrelevant)
    parts: dict[fx.Node, tuple] = {graph.input_node: (relevant, irrelevant)}
    plain: dict[fx.Node, object] = {}

    def value_of(n: fx.Node):
        return plain[n]

    for node in graph.nodes:
        if node.op == "output":
            break
        if node.op == "placeholder":
            if node is not graph.input_node:
                plain[node] = node.args[0] if node.args else None
            continue
        if node.op == "get_attr":
            obj = graph.gm
            for p in node.target.split("."):
                obj = getattr(obj, p)
            plain[node] = obj
            continue
        step = graph.steps.get(node)
        if step is None:
            from ..engine.decomposer import run_plain
            plain[node] = run_plain(graph.gm, node, value_of)
            continue
        r, i = parts[step.dep[0]]
        kind = step.kind

        def apply(t, _step=step):  # the node's own op with its input replaced by t
            return call_with(graph, _step, value_of, {d: t for d in _step.dep})

        if kind == "shape":
            plain[node] = apply(r)
            continue
        if kind == "affine":
            weights, bias = affine_parts(step, value_of)
            out = propagate_conv_linear(weights(r), weights(i), bias)
        elif kind == "batchnorm":
            out = propagate_batchnorm(r, i, *batchnorm_parts(step, value_of))
        elif kind == "activation":
            rel = apply(r)
            out = (rel, apply(r + i) - rel)
        elif kind == "maxpool":
            out = propagate_maxpool(r, i, pool_indices[node])
        elif kind in ("add", "sub"):
            out = _combine(node, kind, parts, value_of)
        elif kind == "neg":
            out = (-r, -i)
        elif kind == "scale":
            other = [a for a in node.args[:2] if a is not step.dep[0]]
            c = load_arg(value_of, other[0]) if other else load_arg(value_of, node.kwargs["other"])
            out = (r * c, i * c) if step.extra["op"] == "mul" else (r / c, i / c)
        elif kind == "cat":
            out = _cat(node, parts, value_of)
        elif kind == "output_softmax":
            out = (r, i)
        elif kind in ("linear", "reshape", "getitem"):
            out = (apply(r), apply(i))
        else:
            raise UnsupportedOpError(f"the reference has no rule of kind {kind!r}")
        parts[node] = out
    return parts[graph.result_node]


def pooling_indices(graph: CapturedGraph, x: torch.Tensor) -> dict:
    """Argmax indices of every max-pool in the model's forward pass on x (batch 1)."""
    from ..engine.decomposer import total_pass
    _, aux = total_pass(graph, x)
    return {n: aux[n] for n, s in graph.steps.items() if s.kind == "maxpool"}


def _combine(node, kind, parts, value_of):
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    pa = parts.get(a) if isinstance(a, fx.Node) else None
    pb = parts.get(b) if isinstance(b, fx.Node) else None
    sign = 1 if kind == "add" else -1
    if pa is not None and pb is not None:
        return pa[0] + sign * pb[0], pa[1] + sign * pb[1]
    if pa is not None:  # a constant joins the irrelevant part
        c = load_arg(value_of, b)
        r, i = pa
        return r + torch.zeros_like(i + sign * c), i + sign * c
    c = load_arg(value_of, a)
    r, i = pb
    return sign * r + torch.zeros_like(c + sign * i), c + sign * i


def _cat(node, parts, value_of):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rs, is_ = [], []
    for t in tensors:
        if isinstance(t, fx.Node) and t in parts:
            rs.append(parts[t][0])
            is_.append(parts[t][1])
        else:
            c = load_arg(value_of, t)
            rs.append(torch.zeros_like(c))
            is_.append(c)
    return torch.cat(rs, dim), torch.cat(is_, dim)


def captured(model: torch.nn.Module) -> CapturedGraph:
    """The captured graph of a model, traced once per model object."""
    g = _GRAPHS.get(model)
    if g is None:
        g = _GRAPHS[model] = CapturedGraph(model)
    return g


def cd(model: torch.nn.Module, x: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference CD of ``mask`` (any shape ``Decomposer.cd`` accepts; M masks -> M rows).

    Returns (relevant, irrelevant), each (M, *output_shape). The relevant input is
    ``mask * x`` and the irrelevant ``(1 - mask) * x``.
    """
    from ..engine.decomposer import Decomposer
    masks = Decomposer._check_masks(x, mask)
    graph = captured(model)
    indices = pooling_indices(graph, x)
    rels, irrels = [], []
    for m in masks:
        r, i = propagate_graph(graph, m[None] * x, (1 - m[None]) * x, indices)
        rels.append(r)
        irrels.append(i)
    return torch.cat(rels), torch.cat(irrels)

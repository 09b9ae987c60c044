"""The batched relevant pass: each step's rule maps its inputs' relevant parts (M masks) to
its own, against the shared total activations. Used by the full pass, the windowed pass
and the bases of ``fastacd.engine.windowed``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture.graph import tensors
from ..capture.nodes import UnsupportedOpError, describe_node


def masks_apart(shape: tuple, total: tuple, m: int) -> bool:
    """Whether a relevant part of m masks has the total's shape (batch 1) with the masks in
    place of its batch: in dim 0, or where an op moved the batch (attention's head stacks)."""
    if len(shape) != len(total):
        return False
    differ = [k for k in range(len(shape)) if shape[k] != total[k]]
    return differ == [] if m == 1 else (len(differ) == 1 and total[differ[0]] == 1 and shape[differ[0]] == m)


def apply_rule(step, rel: dict, values, aux_entry, ops, m: int, want: tuple | None = None) -> torch.Tensor:
    """The step's relevant output from ``rel`` (node -> relevant part of m masks), checked to
    keep the masks apart (``want``: the exact expected shape, as the windowed pass knows it)."""
    out = step.rule.relevant(step, rel, values, aux_entry, ops, m)
    got = [tuple(t.shape) for t in tensors(out)]
    totals = [tuple(t.shape) for t in tensors(values[step.node])]
    ok = (got == [tuple(want)] if want is not None else
          len(got) == len(totals) and all(masks_apart(g, t, m) for g, t in zip(got, totals)))
    if not ok:
        raise UnsupportedOpError(
            f"{describe_node(step.node)} does not treat the samples of a batch independently "
            f"(relevant part has shape {', '.join(map(str, got))} for {m} masks; the true "
            f"activation has {', '.join(map(str, totals))})")
    return out


def walk(g, rel: dict, values: dict, aux: dict, ops, start: int, stop: int, m: int,
         keep: bool = False) -> dict:
    """Apply the rules of graph positions [start, stop) to ``rel`` (node -> relevant part of
    m masks); unless ``keep``, drop each value after its last reader, and (without autograd)
    let a rule write into an input no later step reads (``in_place``)."""
    inplace = not keep and not torch.is_grad_enabled()
    fresh: set[fx.Node] = set()  # values this walk made, sharing memory with no other value
    for index in range(start, stop):
        node = g.nodes[index]
        step = g.steps.get(node)
        if step is None:
            continue
        out = in_place(g, step, rel, fresh, index, values, aux.get(node), ops) if inplace else None
        if out is None:
            out = apply_rule(step, rel, values, aux.get(node), ops, m)
            if inplace and step.rule.fresh(step, rel, out):
                fresh.add(node)
        else:
            fresh.add(node)
        rel[node] = out
        if keep:
            continue
        for d in step.dep:  # free what no later step reads
            if g.last_use.get(d, -1) <= index and d is not g.result_node:
                rel.pop(d, None)
    return rel


def in_place(g, step, rel: dict, fresh: set, index: int, values, aux_entry, ops) -> torch.Tensor | None:
    """The rule's in-place form where the input it overwrites is ``fresh`` (a tensor of its
    own), read last here and viewed by no other live value; None where that does not apply."""
    d = step.rule.inplace_operand(step)
    if d is None or d not in fresh or g.last_use.get(d) != index or d is g.result_node:
        return None
    ptr = rel[d].untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == ptr for k, v in rel.items() if k is not d
           for t in tensors(v) if isinstance(t, torch.Tensor)):
        return None
    return step.rule.relevant_(step, rel, values, aux_entry, ops)

"""The batched CD engine (design.md section 4).

``Decomposer`` traces a model once and scores many masks per call:

* the true activation ``a`` of every node is computed once per image (batch 1) and shared;
* the relevant part ``r`` carries the M masks; ``i`` is never stored: a rule that needs it
  uses ``a - r``. A conv/linear layer therefore applies its weights M + 1 times, not 2M;
* M is cut into chunks so that peak memory stays under a budget, per segment of the graph
  (``Decomposer.pass_plan``: layers after the large maps run more masks a pass); results do
  not depend on the chunk size. On the CPU the chunks reuse each other's buffers
  (``reuse_buffers``) and rules write into inputs no later step reads (``_in_place_rule``);
* backends: ``reference`` (one mask at a time, separate r and i: the oracle), ``torch``
  (batched, pure torch) and ``compiled`` (batched, fused C++/CUDA element-wise ops).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..ops import torch_ops as _torch_ops
from ..capture.graph import (CapturedGraph, UnsupportedOpError, affine_parts, batchnorm_parts,
                    call_with, check_eval, describe_node, load_arg, maxpool_fn)

BACKENDS = ("auto", "reference", "torch", "compiled")
_CPU_DEFAULT_BUDGET = 1 << 30  # 1 GiB: measured sweet spot on a 2-core CPU (bench/README.md)
_BYTES_PER_MASK_FACTOR = 6     # live copies of the largest activation per mask during a step
# On the CPU a chunk's largest activation should stay near the caches: measured here (64
# masks at 224x224, same run), ResNet18 costs 16-18 ms a mask in chunks of 8 but 24-27 ms in
# chunks of 55 (its memory-budget chunk); AlexNet's best chunk is ~41; VGG16's is 2 (161 ms)
# against 166-178 at 4 and 170-181 at 8. Cap a chunk's largest activation at 32 MB, but never
# below 2 masks (a fully connected head re-reads its weights once per chunk: VGG16's 411 MB
# first layer costs ~40 ms a read). docs/engine.md, "The batched engine".
_CPU_CHUNK_ACTIVATION_BYTES = 32 << 20
_CPU_MIN_CHUNK = 2
# The segmented pass (Decomposer.pass_plan) caps each segment's largest activation at 16 MB:
# its head no longer needs big chunks. Measured at 224x224, 1 thread, interleaved, with the
# box's other jobs running (ms a mask, best and range of 8 rounds): ResNet18 16 MB 27.6
# (27.6-29.6), 32 MB 28.2 (28.2-37.2), 8 MB 27.7 (27.7-29.8); AlexNet 10.6 / 10.5 / 10.4;
# VGG16 (4 rounds, 32 masks) 223 / 226 / 236. Large working sets are what the neighbours'
# load slows down.
_CPU_SEGMENT_ACTIVATION_BYTES = 16 << 20


def compiled_ops():
    """The fused ops module if the compiled extension is built, else None."""
    try:
        from .. import ops
    except ImportError:
        return None
    return ops if getattr(ops, "HAS_COMPILED", False) else None


def available_backends() -> list[str]:
    return ["reference", "torch"] + (["compiled"] if compiled_ops() is not None else [])


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "compiled" if compiled_ops() is not None else "torch"
    if backend == "compiled" and compiled_ops() is None:
        raise RuntimeError("backend='compiled' needs the C++ extension fastacd._C, which is not "
                           "built. Run `make setup` (or `pip install --no-build-isolation -e .`), "
                           "or use backend='torch'.")
    return backend


@dataclass
class CDResult:
    """CD scores of M masks for one input.

    relevant, irrelevant: (M, *output_shape); ``relevant + irrelevant == output`` for each mask.
    output: (*output_shape,) the model's output (logits; a trailing softmax is not applied).
    """
    relevant: torch.Tensor
    irrelevant: torch.Tensor
    output: torch.Tensor

    def scores(self, label: int) -> torch.Tensor:
        """The relevant score of one class for every mask, shape (M,)."""
        return self.relevant[:, label]

    def to_json(self) -> dict:
        return {"relevant": self.relevant.tolist(), "irrelevant": self.irrelevant.tolist(),
                "output": self.output.tolist()}


class Decomposer:
    """Trace a model once; compute CD for many masks per call.

    >>> dec = Decomposer(model.eval())
    >>> res = dec.cd(x, masks)          # x: (1, C, H, W); masks: (M, H, W) of 0/1
    >>> res.relevant.shape              # (M, num_classes)

    The model must be in eval mode (CD is defined on eval behaviour: dropout off, batchnorm
    with running statistics); a model in training mode raises ``ValueError``.
    ``memory_budget`` (bytes) bounds the activations held for the masks of one chunk; the
    default is 1 GiB on the CPU and half the free memory on a GPU.
    """

    def __init__(self, model: torch.nn.Module, backend: str = "auto",
                 memory_budget: int | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.graph = CapturedGraph(model)
        self.backend = resolve_backend(backend)
        self.memory_budget = memory_budget
        self._ops = compiled_ops() if self.backend == "compiled" else _torch_ops

    # ---- public -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for x (trailing softmax not applied)."""
        x = self._check_input(x)
        values, _ = self._total_pass(x)
        return values[self.graph.result_node]

    def cd(self, x: torch.Tensor, masks, *, chunk_size: int | None = None) -> CDResult:
        """CD of each mask: the relevant input is ``mask * x``, the irrelevant ``(1 - mask) * x``.

        masks: (H, W) or x's shape without the batch dim for one mask; (M, H, W),
        (M, 1, H, W) or (M, C, H, W) for M masks (for a 2-d input (1, F): (F,) or (M, F)).
        """
        x = self._check_input(x)
        masks = self._check_masks(x, masks)
        return self.cd_relevant_input(x, masks * x, chunk_size=chunk_size, _checked=True)

    def cd_relevant_input(self, x: torch.Tensor, relevant_input: torch.Tensor, *,
                          chunk_size: int | None = None, _checked: bool = False) -> CDResult:
        """CD with the input's relevant part given directly, shape (M, *x.shape[1:])."""
        if not _checked:
            x = self._check_input(x)
            if relevant_input.shape[1:] != x.shape[1:] or relevant_input.dim() != x.dim():
                raise ValueError(f"relevant_input must have shape (M, {', '.join(map(str, x.shape[1:]))}), "
                                 f"got {tuple(relevant_input.shape)}")
            relevant_input = relevant_input.to(device=x.device, dtype=x.dtype)
        if relevant_input.shape[0] == 0:
            raise ValueError("empty mask batch: pass at least one mask")
        values, aux = self._total_pass(x)
        out = values[self.graph.result_node]
        if self.backend == "reference":
            from ..reference.cd import propagate_graph
            indices = {n: aux[n] for n, st in self.graph.steps.items() if st.kind == "maxpool"}
            pairs = [propagate_graph(self.graph, r[None], x - r[None], indices) for r in relevant_input]
            return CDResult(relevant=torch.cat([p[0] for p in pairs]),
                            irrelevant=torch.cat([p[1] for p in pairs]), output=out[0])
        m = relevant_input.shape[0]
        plan = self.pass_plan(values, x, m, chunk_size=chunk_size)
        with reuse_buffers(x.device, self.memory_budget):
            rel = self._planned_pass(relevant_input, values, aux, plan)
        return CDResult(relevant=rel, irrelevant=out - rel, output=out[0])

    def chunk_size(self, values: dict | None = None, x: torch.Tensor | None = None) -> int:
        """Masks per engine pass: under the memory budget and, on the CPU, the cache cap.

        Depends only on the model, the input's shape and the budget (never on timings), so
        the same call always runs the same chunks.
        """
        if values is None:
            raise ValueError("chunk_size needs the activations of a forward pass")
        largest = max((v.numel() * v.element_size() for v in values.values()
                       if isinstance(v, torch.Tensor)), default=1)
        return self._chunk_for(largest, x.device)

    def _chunk_for(self, largest: int, device: torch.device, cpu_cap: int = _CPU_CHUNK_ACTIVATION_BYTES) -> int:
        """Masks per pass for steps whose largest activation is ``largest`` bytes a mask: the
        budget's share, and on the CPU at most ``cpu_cap`` bytes of that activation a pass."""
        budget = self.memory_budget or default_memory_budget(device)
        step = max(1, int(budget // (max(1, largest) * _BYTES_PER_MASK_FACTOR)))
        if device.type == "cpu":
            step = min(step, max(_CPU_MIN_CHUNK, cpu_cap // max(1, largest)))
        return step

    def pass_plan(self, values: dict, x: torch.Tensor, m: int, *,
                  chunk_size: int | None = None) -> list[tuple[int, fx.Node, int]]:
        """How the relevant pass of m masks runs: segments ``(start, source, chunk)``.

        Segment k runs the graph positions from its ``start`` to the next segment's, on the
        relevant part of ``source`` (the input for the first; for the others the only value
        the rest of the graph reads, see ``cut_points``), at most ``chunk`` masks at a time.
        Each stretch between two cuts gets the chunk its own largest activation allows
        (``chunk_size``'s rule), so the layers after the large maps run more masks per pass
        than the first ones (with the CPU cap ``_CPU_SEGMENT_ACTIVATION_BYTES``): VGG16's
        linear head (whose weights are re-read every pass) and its 14x14 layers run all 64
        masks at once, its 224x224 and 112x112 layers 2 at a time. A
        segment's chunk is split evenly into those of the segment before; stretches with the
        same chunk are one segment. Depends only on the model, the input's shape, m and the
        budget. ``chunk_size`` given: one segment with that chunk.
        """
        g = self.graph
        if chunk_size:
            return [(0, g.input_node, min(chunk_size, m))]
        cuts = cut_points(g)
        bounds = [i for i in sorted(cuts) if cuts[i] is not g.input_node]
        starts, sources = [0] + bounds, [g.input_node] + [cuts[i] for i in bounds]
        stops = bounds + [len(g.nodes)]

        def nbytes(n: fx.Node) -> int:
            v = values.get(n) if n is not g.input_node else x
            return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0

        chunks = []
        for start, src, stop in zip(starts, sources, stops):
            largest = max([nbytes(src)] + [nbytes(n) for n in g.nodes[start:stop]
                                           if n in g.steps and g.steps[n].kind != "shape"])
            chunks.append(self._chunk_for(largest, x.device, _CPU_SEGMENT_ACTIVATION_BYTES))
        # from the last segment back: each one's chunk is split evenly into passes of the one before
        effective = [min(chunks[-1], m)]
        for c in reversed(chunks[:-1]):
            effective.insert(0, balanced_chunk(effective[0], c))
        plan = []
        for start, src, c in zip(starts, sources, effective):
            if plan and plan[-1][2] == c:
                continue  # the same chunk as the segment before: no cut here
            plan.append((start, src, c))
        return plan

    def _planned_pass(self, r0: torch.Tensor, values: dict, aux: dict, plan: list) -> torch.Tensor:
        """The output's relevant part for the masks of r0, run segment by segment (``pass_plan``)."""
        g = self.graph
        stops = [seg[0] for seg in plan[1:]] + [len(g.nodes)]
        outputs = [seg[1] for seg in plan[1:]] + [g.result_node]

        def run(k: int, lo: int, hi: int) -> torch.Tensor:
            start, source, _ = plan[k]
            if k == 0:
                rel = r0[lo:hi]
            else:
                parts = [run(k - 1, a, b) for a, b in _passes(lo, hi, plan[k - 1][2])]
                rel = parts[0] if len(parts) == 1 else torch.cat(parts)
            return self._walk({source: rel}, values, aux, start, stops[k], hi - lo)[outputs[k]]

        parts = [run(len(plan) - 1, a, b) for a, b in _passes(0, r0.shape[0], plan[-1][2])]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ---- validation -----------------------------------------------------------------------
    def _check_input(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 2 or x.shape[0] != 1:
            raise ValueError(f"input must have a batch dimension of 1, e.g. (1, C, H, W); got shape "
                             f"{tuple(x.shape)}. Use x[None] for a single image, and call once per image.")
        check_eval(self.model)
        param = next(self.model.parameters(), None)
        if param is not None:
            if param.device != x.device:
                raise ValueError(f"input is on {x.device} but the model is on {param.device}; "
                                 f"move one of them, e.g. x.to('{param.device}')")
            if param.dtype != x.dtype:
                raise TypeError(f"input is {x.dtype} but the model's parameters are {param.dtype}; "
                                f"use x.to({param.dtype}) or model.to({x.dtype})")
        if not all_finite(x):
            raise ValueError("input contains NaN or Inf values")
        return x

    @staticmethod
    def _check_masks(x: torch.Tensor, masks) -> torch.Tensor:
        """Masks as (M, 1 or C, *spatial) (or (M, F) for a 2-d input), validated.

        A 3-d mask for an image is read as M masks of (H, W); a per-channel mask for one
        image is (1, C, H, W), as in the original package.
        """
        if not isinstance(masks, torch.Tensor):
            masks = torch.as_tensor(np.asarray(masks))
        masks = masks.to(device=x.device, dtype=x.dtype)
        feat, spatial, shape = tuple(x.shape[1:]), tuple(x.shape[2:]), tuple(masks.shape)
        dims = lambda t: ", ".join(map(str, t))
        if x.dim() == 2:
            if shape == feat:
                masks = masks[None]
            elif masks.dim() != 2 or shape[1:] != feat:
                raise ValueError(f"mask shape {shape} does not fit the input of shape "
                                 f"{tuple(x.shape)}; expected ({dims(feat)},) or (M, {dims(feat)})")
        elif shape == spatial:
            masks = masks[None, None]
        elif masks.dim() == len(spatial) + 1 and shape[1:] == spatial:
            masks = masks[:, None]
        elif not (masks.dim() == x.dim() and shape[2:] == spatial and shape[1] in (1, x.shape[1])):
            raise ValueError(
                f"mask shape {shape} does not fit the input of shape {tuple(x.shape)}; expected "
                f"({dims(spatial)}), (M, {dims(spatial)}), (M, 1, {dims(spatial)}) or (M, {dims(feat)})")
        if masks.shape[0] == 0:
            raise ValueError("empty mask batch: pass at least one mask")
        if not all_finite(masks):
            raise ValueError("masks contain NaN or Inf values")
        return masks

    # ---- the two passes -----------------------------------------------------------------
    def _total_pass(self, x: torch.Tensor) -> tuple[dict, dict]:
        return total_pass(self.graph, x)

    def _relevant_pass(self, r0: torch.Tensor, values: dict, aux: dict, *,
                       keep: bool = False):
        """The relevant part of every node for one chunk of masks.

        Returns the output node's relevant part, or with ``keep=True`` the dict of every
        node's (the windowed pass of ``fastacd.windowed`` reads a base mask's maps).
        """
        g = self.graph
        rel = self._walk({g.input_node: r0}, values, aux, 0, len(g.nodes), r0.shape[0], keep=keep)
        return rel if keep else rel[g.result_node]

    def _walk(self, rel: dict, values: dict, aux: dict, start: int, stop: int, m: int,
              keep: bool = False) -> dict:
        """Apply the rules of graph positions [start, stop) to ``rel`` (node -> relevant part of
        m masks); unless ``keep``, drop each value after its last reader."""
        g, ops = self.graph, self._ops
        inplace = not keep and not torch.is_grad_enabled()
        fresh: set[fx.Node] = set()  # values this walk made, sharing memory with no other value
        for index in range(start, stop):
            node = g.nodes[index]
            step = g.steps.get(node)
            if step is None or step.kind == "shape":
                continue
            out = _in_place_rule(g, step, rel, fresh, index, values, aux.get(node), ops) if inplace else None
            if out is None:
                out = apply_rule(g, step, rel, values, aux.get(node), ops, m)
                if inplace and _fresh_output(step, rel, out):
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

    def cd_delta(self, x: torch.Tensor, base_mask, delta_masks, *,
                 chunk_size: int | None = None, **options) -> CDResult:
        """CD of the masks ``base_mask | delta_masks[j]``, the same numbers as ``cd`` on them.

        The base's relevant maps are propagated once; each candidate is then recomputed only
        inside the window of every layer that its delta's receptive field reaches, the rest
        copied from the base (``fastacd.windowed``, docs/engine.md "Windowed propagation").
        Falls back to ``cd`` where windowing would not pay off (or for the reference backend).
        base_mask: one mask (H, W) (or x's shape without the batch dim); delta_masks: M masks
        in any form ``cd`` accepts. ``options`` (``max_fraction``, ``max_cost_ratio``,
        ``stats``) go to ``fastacd.windowed.cd_delta``.
        """
        from .windowed import cd_delta
        return cd_delta(self, x, base_mask, delta_masks, chunk_size=chunk_size, **options)


def structural_rule(g: CapturedGraph, step, rel: dict, values, m: int) -> torch.Tensor:
    """The rules that move or combine relevant parts without splitting anything: a ReLU
    already applied by its producer, reshapes, sums, negation, scaling by a constant, concat,
    the trailing softmax (not decomposed), and ops applied to the relevant part as they are
    (activations, linear-in-r ops, getitem, user rules). Shared by every batched pass (the
    engine's, the windowed one and CDEP's paired one), so each is written once.
    """
    node, kind = step.node, step.kind
    value_of = values.__getitem__
    r = rel[step.dep[0]]
    if kind == "activation" and step.fused_into is not None:
        return r  # the producer already applied this ReLU to the relevant part
    if kind == "reshape":
        return r.reshape((m,) + tuple(values[node].shape[1:]))
    if kind in ("add", "sub"):
        return _combine(node, kind, rel, values, m)
    if kind == "neg":
        return -r
    if kind == "scale":
        other = [a for a in node.args[:2] if a is not step.dep[0]]
        c = load_arg(value_of, other[0]) if other else load_arg(value_of, node.kwargs["other"])
        return r * c if step.extra["op"] == "mul" else r / c
    if kind == "cat":
        return _cat(node, rel, values, m)
    if kind == "output_softmax":
        return r
    # activation, linear, getitem, user rules: the op itself on r
    return call_with(g, step, value_of, {d: rel[d] for d in step.dep})


def _own_buffer(out: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``out`` may be overwritten: a contiguous tensor that shares no memory with
    ``source`` (a user rule's weights could return a view of its input) and needs no grad."""
    return (out.is_contiguous() and not (torch.is_grad_enabled() and out.requires_grad)
            and out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr())


def _operands(node: fx.Node) -> tuple:
    return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


def _fresh_output(step, rel: dict, out: torch.Tensor) -> bool:
    """Whether a rule's output is a tensor of its own (no view of another value): the
    batchnorm split, the max-pool gather, the sum or difference of two relevant parts, a
    conv/linear output that ``_own_buffer`` accepts."""
    if step.kind in ("add", "sub"):
        a, b = _operands(step.node)
        return a in rel and b in rel
    if step.kind == "affine":
        return _own_buffer(out, rel[step.dep[0]])
    return step.kind in ("batchnorm", "maxpool")


def _in_place_rule(g: CapturedGraph, step, rel: dict, fresh: set, index: int, values, aux_entry, ops):
    """The rule written into its input where that input is ``fresh`` (a tensor of its own,
    see ``_fresh_output``) and no later step reads it: a batchnorm split (``bn_split_``), a
    residual add or difference, a ReLU; None where that does not apply (then ``apply_rule``).
    ResNet18 at 224: no new (M, C, H, W) tensor for the batchnorms, additions and ReLUs."""
    node, kind = step.node, step.kind

    def consumable(d) -> bool:  # fresh, read last here, and no live view of it elsewhere
        if not (d in fresh and g.last_use.get(d) == index and d is not g.result_node):
            return False
        ptr = rel[d].untyped_storage().data_ptr()
        return not any(v.untyped_storage().data_ptr() == ptr for k, v in rel.items()
                       if k is not d and isinstance(v, torch.Tensor))

    if kind in ("add", "sub"):
        a, b = _operands(node)
        if not (consumable(a) and b in rel and a is not b and rel[a].shape == rel[b].shape):
            return None
        return rel[a].add_(rel[b]) if kind == "add" else rel[a].sub_(rel[b])
    d = step.dep[0]
    if not consumable(d) or node.args[:1] != (d,):
        return None
    if kind == "batchnorm" and rel[d].is_contiguous():
        scale, shift = aux_entry
        return ops.bn_split_(rel[d], values[d], scale, shift, step.relu_fused)
    if kind == "activation" and step.fused_into is None and step.extra.get("is_relu"):
        return rel[d].clamp_min_(0)
    return None


def apply_rule(g: CapturedGraph, step, rel: dict, values, aux_entry, ops, m: int,
               want: tuple | None = None) -> torch.Tensor:
    """The batched CD rule of one node: its relevant output from its inputs' relevant parts.

    rel: dependent node -> relevant part (m, ...); ``values``: node -> true activation
    (anything with ``__getitem__``; (1, ...) or, in the windowed pass, (m, ...) crops);
    ``aux_entry``: what the total pass kept for this node; ``want``: the expected output
    shape (default: ``(m,) + values[node].shape[1:]``). Shared by the full relevant pass and
    the windowed one (``fastacd.windowed``), so every rule is written once.
    """
    node = step.node
    r = rel[step.dep[0]]
    kind = step.kind
    if kind == "affine":
        weights, bias, pre = aux_entry
        zr = weights(r)
        if bias is None:
            out = zr.clamp_min(0) if step.relu_fused else zr
        elif _own_buffer(zr, r):  # write the split into the fresh conv output (CPU page faults)
            out = ops.bias_split_(zr, pre, bias, step.relu_fused)
        else:
            out = ops.bias_split(zr, pre, bias, step.relu_fused)
    elif kind == "batchnorm":
        scale, shift = aux_entry
        out = ops.bn_split(r, values[step.dep[0]], scale, shift, step.relu_fused)
    elif kind == "maxpool":
        out = ops.maxpool_gather(r, aux_entry)
    else:
        out = structural_rule(g, step, rel, values, m)
    if want is None:
        want = (m,) + tuple(values[node].shape[1:])
    if tuple(out.shape) != tuple(want):
        raise UnsupportedOpError(
            f"{describe_node(node)} does not treat the samples of a batch independently "
            f"(relevant part has shape {tuple(out.shape)}, expected {tuple(want)})")
    return out


def total_pass(g: CapturedGraph, x: torch.Tensor) -> tuple[dict, dict]:
    """The true activation of every node (batch 1), plus what the rules reuse per chunk.

    Shared with the reference: max-pool indices come from these true activations.
    """
    values: dict[fx.Node, Any] = {}
    aux: dict[fx.Node, Any] = {}
    value_of = values.__getitem__
    for node in g.nodes:
        if node.op == "output":
            break
        if node.op == "placeholder":
            values[node] = x if node is g.input_node else (node.args[0] if node.args else None)
            continue
        if node.op == "get_attr":
            values[node] = _fetch_attr(g.gm, node.target)
            continue
        step = g.steps.get(node)
        if step is None:
            values[node] = run_plain(g.gm, node, value_of)
            continue
        a = values[step.dep[0]]
        kind = step.kind
        if kind == "affine":
            weights, bias = affine_parts(step, value_of)
            pre = weights(a)
            aux[node] = (weights, bias, pre)
            out = pre if bias is None else pre + _torch_ops._channel_view(bias, pre)
        elif kind == "batchnorm":
            scale, shift, apply = batchnorm_parts(step, value_of)
            aux[node] = (scale, shift)
            out = apply(a)
        elif kind == "maxpool":
            out, idx = maxpool_fn(step, value_of)(a)
            aux[node] = idx
        elif kind == "output_softmax":
            out = a
        else:
            out = call_with(g, step, value_of, {})
        if kind != "shape" and not (isinstance(out, torch.Tensor) and out.dim() >= 1
                                    and out.shape[0] == 1):
            raise UnsupportedOpError(
                f"{describe_node(node)} changes the batch dimension (output shape "
                f"{tuple(getattr(out, 'shape', ()))} for a batch of 1); CD needs every "
                "input-dependent op to treat samples independently")
        values[node] = out
    return values, aux


def _combine(node: fx.Node, kind: str, rel: dict, values: dict, m: int) -> torch.Tensor:
    """Relevant part of a + b or a - b; an operand that does not depend on the input is irrelevant."""
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    ra = rel.get(a) if isinstance(a, fx.Node) else None
    rb = rel.get(b) if isinstance(b, fx.Node) else None
    if ra is not None and rb is not None:
        return ra + rb if kind == "add" else ra - rb
    want = (m,) + tuple(values[node].shape[1:])  # a constant may broadcast the shape
    if ra is not None:
        return ra.expand(want)
    return (rb if kind == "add" else -rb).expand(want)


def _cat(node: fx.Node, rel: dict, values: dict, m: int) -> torch.Tensor:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    total = values[node]
    if dim % total.dim() == 0:
        raise UnsupportedOpError(f"{describe_node(node)} concatenates along the batch dimension")
    parts = []
    for t in tensors:
        if isinstance(t, fx.Node) and t in rel:
            parts.append(rel[t])
        else:  # a constant joins the irrelevant part
            v = values[t] if isinstance(t, fx.Node) else t
            parts.append(torch.zeros((m,) + tuple(v.shape[1:]), dtype=total.dtype, device=total.device))
    return torch.cat(parts, dim)


def all_finite(t: torch.Tensor) -> bool:
    """Whether t has no NaN or Inf. A finite sum settles it in one reduction (a NaN or Inf
    anywhere makes the sum NaN or Inf); only a non-finite sum, which finite values can also
    give by overflowing, is checked element by element. (64 masks of 224x224: 0.2 ms a
    mask with isfinite().all(), 2% of AlexNet's CD.)"""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


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


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_CUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cut_points(g: CapturedGraph) -> dict[int, fx.Node]:
    """{graph position i: node d} where d is the only input-dependent value that node i or a
    later node reads: a relevant pass can stop before position i and go on from d alone.

    A value is live from after its own position to its last reader (the output: to the end);
    positions covered by exactly one such interval are cuts (counted with prefix sums).
    """
    if g not in _CUTS:
        n = len(g.nodes)
        count, owner = [0] * (n + 1), [0] * (n + 1)  # per position: live values, sum of their ids
        ids = {}
        for pos, node in enumerate(g.nodes):
            if node is not g.input_node and (node not in g.steps or g.steps[node].kind == "shape"):
                continue
            last = n - 1 if node is g.result_node else g.last_use.get(node, pos)
            if last <= pos:
                continue
            ids[pos] = node
            count[pos + 1] += 1
            count[last + 1] -= 1
            owner[pos + 1] += pos
            owner[last + 1] -= pos
        cuts, live, who = {}, 0, 0
        for i in range(n):
            live, who = live + count[i], who + owner[i]
            if live == 1:
                cuts[i] = ids[who]
        _CUTS[g] = cuts
    return _CUTS[g]


def _passes(lo: int, hi: int, step: int):
    """[lo, hi) cut into as few ranges of at most ``step`` as possible, of equal size (+-1)."""
    count = -(-(hi - lo) // max(1, step))
    size, extra = divmod(hi - lo, count) if count else (0, 0)
    a = lo
    for k in range(count):
        b = a + size + (k < extra)
        yield a, b
        a = b


def balanced_chunk(m: int, step: int) -> int:
    """Masks per pass for m masks in passes of at most ``step``: as many passes as ``step``
    needs, of equal size (64 masks at most 43 a pass: 32 + 32, not 43 + 21), so that every
    pass allocates the same activations and the reused buffers fit them."""
    passes = -(-m // max(1, step))
    return -(-m // passes)


def reuse_buffers(device: torch.device, budget: int | None = None):
    """A scope in which the large CPU blocks the chunks free are reused by the next chunk
    (``fastacd.ops.reuse_cpu_buffers``, at most ``budget`` bytes held): it saves the page
    faults of fresh activations (VGG16 at 224: 80 MB a mask). A no-op off the CPU or
    without the compiled extension. Used by both batched backends: it is the engine's
    memory handling, not an element-wise op."""
    ops = compiled_ops()
    if device.type != "cpu" or ops is None:
        return contextlib.nullcontext(False)
    return ops.reuse_cpu_buffers(budget or default_memory_budget(device))


def default_memory_budget(device: torch.device) -> int:
    """Bytes of activations for the masks of one chunk: 1 GiB on the CPU, half the free GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return _CPU_DEFAULT_BUDGET

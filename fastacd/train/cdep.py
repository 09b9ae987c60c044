"""CDEP: penalise CD explanations during training (Rieger et al., ICML 2020).

CDEP ("Interpretations are useful: penalizing explanations to align neural networks with
prior knowledge") adds a term to the loss that makes a model ignore features it should
not use: a region of the image, single pixels (colour), a phrase.

The image penalty is the CDEP repository's ``cdep`` score. For an input ``x`` and a mask
``m`` of what must *not* matter, CD splits every output logit ``z_c`` into a relevant part
``r_c`` (the masked features' contribution) and an irrelevant part ``i_c = z_c - r_c``;
the score is the softmax over that pair of the relevant part, averaged over the logits::

    cdep(x, m) = mean_c  softmax([r_c, i_c])[0]  =  mean_c  sigmoid(r_c - i_c)

(the repository takes the mean over all ``N x classes`` logits of a batch). With several
masks per batch this module averages over the masks (``reduction="mean"``); the
repository's ColorMNIST script sums over its 8 blobs (``reduction="sum"``).

How it is computed (design.md sections 2 and 4, with gradients):

* **paired evaluation**: the true activations of the N images of a batch are computed once
  (batch N); the relevant parts of K masks per image are one batch of K*N, and image n's
  relevant part is paired with image n's true activation (``i = a - r`` is never
  propagated nor stored);
* **one weight application per layer**: with gradients on, a conv/linear layer runs its
  weights once on ``cat([true input, relevant inputs])`` (``_AffinePaired``), and its
  true output, the ReLU folded into it and the relevant bias split come out of one
  autograd function;
* **low memory**: the element-wise CD rules (bias split, batchnorm split) are autograd
  functions that keep only their inputs and recompute the few element-wise products in
  the backward pass (closed-form for the bias split), max-pools keep only the argmax
  indices, so no irrelevant activation, no ReLU output and no intermediate of a rule
  stays alive between forward and backward;
* **shared forward**: ``CDEPPenalty.forward_with_penalty`` returns the model's logits from
  the same true-activation pass, so a training step costs about one plain forward + one
  relevant pass, instead of a plain forward + separate relevant and irrelevant passes.

The text penalty (``TextCDEPPenalty``, ``paired_text_cd``) does the same for an embedding ->
LSTM -> linear classifier: the true LSTM pass of N sentences once, the relevant states of
their token masks as one batch, the CDEP repository's ``-log softmax([r_y, i_y])[1]``.

The arithmetic is the project's CD (the ``acd`` package's eps rule ``1e-20`` for the bias
split, design.md section 2); the CDEP repository's copy of CD uses ``|zr| + |zi| + 1e-19``
in the same denominator, a difference far below float32 resolution except when both parts
are exactly zero.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import torch_ops as _torch_ops
from .. import ops, rules as rules_
from ..capture.graph import CapturedGraph
from ..capture.nodes import call_with, fetch_attr, run_plain
from ..engine.decomposer import Decomposer, compiled_ops
from ..reference.cd import propagate_graph
from ..rules.affine import affine_parts
from ..rules.norm import batchnorm_parts
from ..rules.pool import maxpool_fn
from ..text.lstm import TextDecomposer

REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------------------
# the penalty on CD scores
# --------------------------------------------------------------------------------------
def cdep_score(relevant: torch.Tensor, irrelevant: torch.Tensor) -> torch.Tensor:
    """The CDEP repository's ``cdep`` score of CD outputs of any shape: the mean over all
    entries of ``softmax([relevant, irrelevant])[0]`` (= ``sigmoid(relevant - irrelevant)``)."""
    pair = torch.stack((relevant.reshape(-1), irrelevant.reshape(-1)), dim=1)
    return torch.softmax(pair, dim=1)[:, 0].mean()


# --------------------------------------------------------------------------------------
# per-example masks
# --------------------------------------------------------------------------------------
def canonical_masks(x: torch.Tensor, masks) -> torch.Tensor:
    """Masks for a batch ``x`` (N, C, *S) as (K, N, 1 or C, *S): K masks per example.

    Accepted (1 = the feature must not matter):

    * ``(*S)``: one mask shared by every example;
    * ``(N, *S)``, ``(N, 1, *S)``, ``(N, C, *S)``: one mask per example;
    * ``(K, N, 1 or C, *S)``: K masks per example.

    K masks shared by the whole batch, e.g. the random pixel blobs of ColorMNIST, are
    ``shared_masks(blobs, N)``. For a 2-d input (N, F): ``(F,)``, ``(N, F)`` or ``(K, N, F)``.
    """
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(masks)
    masks = masks.to(device=x.device, dtype=x.dtype)
    n, feat, spatial = x.shape[0], tuple(x.shape[1:]), tuple(x.shape[2:])
    shape = tuple(masks.shape)
    if x.dim() == 2:
        if shape == feat:
            return masks.expand(1, n, *feat)
        if shape == (n,) + feat:
            return masks[None]
        if masks.dim() == 3 and shape[1:] == (n,) + feat:
            return masks
        raise ValueError(f"masks of shape {shape} do not fit the batch of shape {tuple(x.shape)}; "
                         f"expected {feat}, {(n,) + feat} or (K, {n}, {feat[0]})")
    if shape == spatial:
        return masks.expand(1, n, 1, *spatial)
    if masks.dim() == len(spatial) + 1 and shape == (n,) + spatial:
        return masks[None, :, None]
    if masks.dim() == x.dim() and shape[0] == n and shape[2:] == spatial and shape[1] in (1, feat[0]):
        return masks[None]
    if (masks.dim() == x.dim() + 1 and shape[1] == n and shape[3:] == spatial
            and shape[2] in (1, feat[0])):
        return masks
    s = ", ".join(map(str, spatial))
    raise ValueError(
        f"masks of shape {shape} do not fit the batch of shape {tuple(x.shape)}; expected ({s}) "
        f"shared, ({n}, {s}) or ({n}, 1|{feat[0]}, {s}) per example, or (K, {n}, 1|{feat[0]}, {s}). "
        "For K masks shared by the batch use fastacd.cdep.shared_masks(masks, N).")


def shared_masks(masks: torch.Tensor, n: int) -> torch.Tensor:
    """K masks (K, *S) or (K, 1|C, *S) used for every one of n examples -> (K, n, 1|C, *S)."""
    masks = torch.as_tensor(masks)
    if masks.dim() < 2:
        raise ValueError(f"masks must be (K, *S) or (K, C, *S), got shape {tuple(masks.shape)}")
    if masks.dim() == 3:  # (K, H, W): spatial masks for images
        masks = masks[:, None]
    return masks[:, None].expand(masks.shape[0], n, *masks.shape[1:])


def box_masks(boxes, shape) -> torch.Tensor:
    """One rectangle per example: boxes (N, 4) as (top, left, height, width), shape (H, W).

    Returns (N, 1, H, W) float masks, 1 inside the box (e.g. a decoy patch)."""
    boxes = torch.as_tensor(boxes, dtype=torch.long)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) as (top, left, height, width), got {tuple(boxes.shape)}")
    h, w = shape
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    top, left, bh, bw = (boxes[:, j, None, None] for j in range(4))
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return inside[:, None].float()


def pixel_masks(n: int, k: int, shape, prob: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """K random single-pixel masks per example (the ColorMNIST blobs): (K, n, 1, H, W).

    prob: (H, W) sampling weights (e.g. how often a pixel is foreground), uniform if None;
    or (n, H, W) weights per example (e.g. that example's own foreground)."""
    h, w = shape
    if prob is None:
        prob = torch.ones(h * w)
    prob = torch.as_tensor(prob, dtype=torch.float64)
    weights = prob.reshape(-1, h * w).expand(n, h * w) if prob.dim() <= 2 else prob.reshape(n, h * w)
    idx = torch.multinomial(weights, k, replacement=True, generator=generator)  # (n, k)
    masks = torch.zeros(k, n, h * w)
    masks.scatter_(2, idx.t()[:, :, None], 1.0)
    return masks.reshape(k, n, 1, h, w)


# --------------------------------------------------------------------------------------
# element-wise rules with a small autograd footprint
# --------------------------------------------------------------------------------------
def _repeat_total(total: torch.Tensor, k: int) -> torch.Tensor:
    """The true activation of N images for K*N relevant maps (mask-major order)."""
    return total if k == 1 else total.repeat((k,) + (1,) * (total.dim() - 1))


def _bias_split_paired(rel_pre, total_out, bias, relu: bool, k: int):
    # total_out is the layer's ordinary output (with bias), so the forward pass of the true
    # activations is the plain forward; its pre-bias value is total_out - bias.
    pre = total_out - _torch_ops._channel_view(bias, total_out)
    return _torch_ops.bias_split(rel_pre, _repeat_total(pre, k), bias, relu)


def _unrepeat(t: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of ``_repeat_total``: sum the K groups."""
    return t if k == 1 else t.reshape((k, -1) + tuple(t.shape[1:])).sum(0)


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


class _BiasSplitPaired(torch.autograd.Function):
    """``_bias_split_paired`` with a closed-form backward that keeps only its inputs.

    out = zr + pr * b (then ReLU), pr = u / s, u = |zr| + eps, v = |zi| + eps, s = u + v,
    zi = T - zr, T = total_out - b. With c = g * b / s^2:
    d/dzr = g + c * (v * sgn(zr) + u * sgn(zi)); d/dT = -c * u * sgn(zi);
    d/db = sum(g * pr) - sum(d/dT); d/dtotal_out = d/dT (summed over the K groups).
    These are autograd's derivatives of the pure-torch formula (sgn(0) = 0, as torch.abs).
    """

    @staticmethod
    def forward(ctx, rel_pre, total_out, bias, relu, k, compiled):
        ctx.relu, ctx.k, ctx.compiled = relu, k, compiled
        ctx.save_for_backward(rel_pre, total_out, bias)
        fn = _compiled_fn("fwd") if compiled else _bias_split_paired
        return fn(rel_pre, total_out, bias, relu, k)

    @staticmethod
    def backward(ctx, grad):
        fn = _compiled_fn("bwd") if ctx.compiled else _bias_split_paired_grad
        d_zr, d_total, d_bias = fn(*ctx.saved_tensors, grad.contiguous(), ctx.relu, ctx.k)
        return d_zr, d_total, d_bias, None, None, None


def _bias_split_paired_grad(zr, total_out, bias, grad, relu: bool, k: int):
    """The closed-form gradients of ``_bias_split_paired`` (see ``_BiasSplitPaired``)."""
    b = _torch_ops._channel_view(bias, zr)
    zi = _repeat_total(total_out - b, k) - zr
    u = zr.abs() + _torch_ops.EPS
    v = zi.abs() + _torch_ops.EPS
    s = u + v
    pr = u / s
    if relu:
        grad = grad * ((zr + pr * b) > 0)
    q = grad * b / s  # c = g b / s^2 as q * (u / s): s^2 underflows in float32 (see _split_pre_grad)
    d_t = -(q * pr * zi.sign())
    d_zr = grad + q * (v / s) * zr.sign() - d_t
    d_total = _unrepeat(d_t, k)
    return d_zr, d_total, _channel_sum(grad * pr) - _channel_sum(d_total)


def _split_pre(zr, t_pre, bias, relu: bool, k: int):
    """The bias split from the true pre-activation without bias (N rows) and K*N relevant
    rows: ``fastacd._torch_ops.bias_split`` (the same float operations, bit for bit), with
    in-place steps (it runs inside an autograd.Function, so nothing records them)."""
    eps = _torch_ops.EPS
    u = zr.abs().add_(eps)                                       # |zr| + eps
    den = (_repeat_total(t_pre, k) - zr).abs_().add_(eps)        # |zi| + eps
    out = u.div_(den.add_(u)).mul_(_torch_ops._channel_view(bias, zr)).add_(zr)
    return out.clamp_min_(0) if relu else out


def _split_pre_grad(zr, t_pre, bias, grad, relu: bool, k: int):
    """Closed-form gradients of ``_split_pre`` w.r.t. (zr, t_pre, bias) (see ``_BiasSplitPaired``;
    here the true pre-activation is an input, so the bias gets only ``sum(g * pr)``)."""
    eps = _torch_ops.EPS
    b = _torch_ops._channel_view(bias, zr)
    zi = _repeat_total(t_pre, k) - zr
    u = zr.abs().add_(eps)
    v = zi.abs().add_(eps)
    s = u + v
    pr = u / s
    if relu:
        grad = grad * ((zr + pr * b) > 0)
    # c = g b / s^2, applied as (g b / s) * (u / s) and (g b / s) * (v / s): s^2 underflows in
    # float32 when both parts are ~0 (zr = 0 and a zero pre-activation, e.g. a dead region)
    q = (grad * b).div_(s)                                       # g b / s
    d_t = (q * pr).mul_(zi.sign_()).neg_()                       # -c u sgn(zi)
    d_zr = v.div_(s).mul_(q).mul_(zr.sign()).add_(grad).sub_(d_t)  # g + c v sgn(zr) - d_t
    return d_zr, _unrepeat(d_t, k), _channel_sum(pr.mul_(grad))


def _affine_fwd(both, bias, n: int, k: int, relu: bool):
    """Forward of ``_AffinePaired``: (true output, ReLU'd if ``relu``; relevant part)."""
    t_pre, zr = both[:n], both[n:]
    total = t_pre + _torch_ops._channel_view(bias, t_pre)
    rel = _split_pre(zr, t_pre, bias, relu, k)
    return (total.clamp_min(0) if relu else total), rel


def _affine_bwd(both, bias, g_total, g_rel, n: int, k: int, relu: bool):
    """Closed-form backward of ``_AffinePaired``: (d both, d bias)."""
    t_pre, zr = both[:n], both[n:]
    d_zr, d_t, d_b = _split_pre_grad(zr, t_pre, bias, g_rel, relu, k)
    if relu:
        g_total = g_total * ((t_pre + _torch_ops._channel_view(bias, t_pre)) > 0)
    return torch.cat([d_t + g_total, d_zr]), d_b + _channel_sum(g_total)


class _AffinePaired(torch.autograd.Function):
    """A conv/linear layer's true output and relevant part from one weight application.

    ``both`` (N + K*N, C, *S) = W applied to ``cat([a, r])`` without bias. Returns the true
    output ``both[:N] + b`` (ReLU'd if ``relu``: the ReLU folded into the layer) and the
    relevant part (the bias split, ReLU'd if ``relu``). Keeps only ``both`` and the bias for
    backward (closed-form gradients, recomputing the element-wise products). ``fuse``: the
    forward and backward bodies run through ``torch.compile`` (one or two loops each).
    """

    @staticmethod
    def forward(ctx, both, bias, n, k, relu, fuse):
        ctx.n, ctx.k, ctx.relu, ctx.fuse = n, k, relu, fuse
        ctx.save_for_backward(both, bias)
        fn = _compiled_fn("affine_fwd") if fuse else _affine_fwd
        return fn(both, bias, n, k, relu)

    @staticmethod
    def backward(ctx, g_total, g_rel):
        both, bias = ctx.saved_tensors
        n = ctx.n
        if g_rel is None:
            g_rel = torch.zeros_like(both[n:])
        if g_total is None:
            g_total = torch.zeros_like(both[:n])
        fn = _compiled_fn("affine_bwd") if ctx.fuse else _affine_bwd
        d_both, d_b = fn(both, bias, g_total.contiguous(), g_rel.contiguous(), n, ctx.k, ctx.relu)
        return d_both, d_b, None, None, None, None


_COMPILED: dict[str, Any] = {}


def _compiled_fn(which: str):
    """torch.compile'd forward / backward of the bias split: one fused loop each instead of
    ~20 element-wise passes (compiled once per process, ~20 s on a CPU; cached on disk)."""
    if which not in _COMPILED:
        fn = {"fwd": _bias_split_paired, "bwd": _bias_split_paired_grad, "affine_fwd": _affine_fwd,
              "affine_bwd": _affine_bwd}[which]
        _COMPILED[which] = torch.compile(fn, dynamic=True)
    return _COMPILED[which]


def _bias_split_compiled(ops, rel_pre, total_out, bias, relu: bool, k: int):
    """The compiled op (total of batch 1) once per image: row k*N + n pairs with image n."""
    n = total_out.shape[0]
    pre = total_out - _torch_ops._channel_view(bias, total_out)
    rows = [ops.bias_split(rel_pre[i::n], pre[i:i + 1], bias, relu) for i in range(n)]
    return torch.stack(rows, 1).reshape(rel_pre.shape)


def _bn_split_paired(rel, total, scale, shift, relu: bool, k: int):
    return _torch_ops.bn_split(rel, _repeat_total(total, k), scale, shift, relu)


class _Recompute(torch.autograd.Function):
    """Run an element-wise rule without keeping its intermediates: backward recomputes them.

    Saves only the rule's inputs (the relevant pre-activation, the shared true activation,
    the channel parameters); the gradient is autograd's gradient of the pure-torch formula,
    so it equals the gradient of ``fastacd._torch_ops`` exactly.
    """

    @staticmethod
    def forward(ctx, fn, relu, k, *tensors):
        ctx.fn, ctx.relu, ctx.k = fn, relu, k
        ctx.save_for_backward(*tensors)
        return fn(*tensors, relu, k)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved, ctx.needs_input_grad[3:])]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(())
        if wanted:
            with torch.enable_grad():
                out = ctx.fn(*inputs, ctx.relu, ctx.k)
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, None) + tuple(next(grads) if t.requires_grad else None for t in inputs)


def _rule(fn, relu: bool, k: int, *tensors, low_memory: bool):
    if low_memory and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Recompute.apply(fn, relu, k, *tensors)
    return fn(*tensors, relu, k)


def _bias_rule(zr, total, bias, relu: bool, k: int, low_memory: bool, use_compiled: bool,
               fuse: bool = False):
    if use_compiled:
        ops = compiled_ops()
        if ops is not None and ops._compiled(zr):
            return _bias_split_compiled(ops, zr, total, bias, relu, k)
    if low_memory and torch.is_grad_enabled() and (zr.requires_grad or total.requires_grad
                                                   or bias.requires_grad):
        return _BiasSplitPaired.apply(zr, total, bias, relu, k, fuse)
    return _bias_split_paired(zr, total, bias, relu, k)


# --------------------------------------------------------------------------------------
# paired evaluation over a batch
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put a model in eval mode (CD is defined on eval behaviour)."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in states:
            m.training = training


def paired_cd(graph: CapturedGraph, x: torch.Tensor, relevant_input: torch.Tensor | None,
              low_memory: bool = True, pool_indices: dict | None = None,
              use_compiled: bool = False, fuse: bool = False):
    """CD of a batch: image n's relevant part paired with image n's true activation.

    graph: the model captured in eval mode (``CapturedGraph``); the model's parameters are
    read at call time, so it follows training.
    x: (N, *D) the batch; relevant_input: (K*N, *D), mask-major (row ``k*N + n`` belongs to
    image n), or None for the true activations only.
    pool_indices: a dict to receive the argmax indices of every max-pool (optional).
    low_memory: element-wise rules keep only their inputs for backward (closed-form or
    recomputed gradients) instead of autograd's intermediates.
    use_compiled: run the conv/linear bias split with the compiled op (once per image, as
    the op shares one true activation) when the extension is built.
    fuse: run the element-wise forward and closed-form backward of each conv/linear layer
    (true output, folded ReLU, bias split) through ``torch.compile`` (a few fused loops
    each; needs low_memory; compiled on first use, ~20 s on a CPU).
    Returns (relevant (K*N, *out) or None, output (N, *out)); the irrelevant part of row
    k*N + n is ``output[n] - relevant[k*N + n]``. Differentiable under the caller's grad mode.
    """
    n = x.shape[0]
    m = n if relevant_input is None else relevant_input.shape[0]
    if m % n:
        raise ValueError(f"relevant_input has {m} rows, not a multiple of the batch size {n}")
    k = m // n
    # low-memory autograd for the true pass too (only worth it when gradients are recorded)
    lean = low_memory and relevant_input is not None and torch.is_grad_enabled()
    g = graph
    values: dict[fx.Node, Any] = {}
    relu_done: set[fx.Node] = set()  # affine nodes whose true output is already ReLU'd
    rel: dict[fx.Node, torch.Tensor] = {g.input_node: relevant_input}
    value_of = values.__getitem__
    for index, node in enumerate(g.nodes):
        if node.op == "output":
            break
        if node.op == "placeholder":
            values[node] = x if node is g.input_node else (node.args[0] if node.args else None)
            continue
        if node.op == "get_attr":
            values[node] = fetch_attr(g.gm, node.target)
            continue
        step = g.steps.get(node)
        if step is None:
            values[node] = run_plain(g.gm, node, value_of)
            continue
        kind = step.kind
        a = values[step.dep[0]]
        # conv/linear: the true and the relevant inputs go through one weight application
        merged = lean and kind == "affine" and not use_compiled
        # ---- the true activation (batch N): the model's ordinary forward, in eval behaviour
        if merged:
            total = None  # computed with the relevant part below
        elif kind == "maxpool":
            if lean:
                with torch.no_grad():
                    _, idx = maxpool_fn(step, value_of)(a)
                total = _IndexGather.apply(a, idx, 1)  # saves the indices only
            else:
                total, idx = maxpool_fn(step, value_of)(a)
            if pool_indices is not None:
                pool_indices[node] = idx
        elif kind == "activation" and step.fused_into in relu_done:
            total = a  # the producer applied this ReLU to the true activation too
        elif kind == "activation" and step.fused_into is not None and lean:
            # a ReLU folded into its producer: keep its input (the layer's output, which the
            # bias split keeps anyway) for backward instead of a second map, its output
            total = _ReLUKeepInput.apply(a)
        elif kind == "affine" and step.module is not None:
            total = step.module(a)
        elif kind == "output_softmax":
            total = a
        else:
            total = call_with(step, value_of, {})
        values[node] = total
        if relevant_input is None:
            continue
        # ---- the relevant part (batch K*N)
        r = rel[step.dep[0]]
        if merged:
            weights, bias = affine_parts(step, value_of)
            both = weights(torch.cat([a, r]))  # (N + K*N, ...): one GEMM / conv call
            if bias is None:
                total, out = both[:n], both[n:]
                if step.relu_fused:
                    total, out = total.clamp_min(0), out.clamp_min(0)
            else:
                total, out = _AffinePaired.apply(both, bias, n, k, step.relu_fused, fuse)
            if step.relu_fused:
                relu_done.add(node)
            values[node] = total
        elif kind == "affine":
            weights, bias = affine_parts(step, value_of)
            zr = weights(r)
            if bias is None:
                out = zr.clamp_min(0) if step.relu_fused else zr
            else:
                out = _bias_rule(zr, total, bias, step.relu_fused, k, low_memory, use_compiled,
                                 fuse)
        elif kind == "batchnorm":
            scale, shift, _ = batchnorm_parts(step, value_of)
            out = _rule(_bn_split_paired, step.relu_fused, k, r, a, scale, shift,
                        low_memory=low_memory)
        elif kind == "maxpool":
            out = _IndexGather.apply(r, idx, k) if lean else _gather(r, _repeat_total(idx, k))
        else:
            out = step.rule.relevant(step, rel, values, None, _torch_ops, m)
        rel[node] = out
        for d in step.dep:  # free relevant parts no later step reads
            if g.last_use.get(d, -1) <= index and d is not g.result_node:
                rel.pop(d, None)
    return rel.get(g.result_node), values[g.result_node]


class _IndexGather(torch.autograd.Function):
    """Max-pool as a gather at given argmax indices (N, C, *So) of K*N maps (mask-major):
    saves only the indices (``torch.gather`` and ``max_pool2d`` also keep their input)."""

    @staticmethod
    def forward(ctx, r, idx, k):
        n, c = idx.shape[:2]
        ctx.shape, ctx.k = r.shape, k
        ctx.save_for_backward(idx)
        flat = r.reshape(k, n, c, -1)
        ix = idx.reshape(1, n, c, -1).expand(k, n, c, -1)
        return flat.gather(3, ix).reshape((k * n,) + tuple(idx.shape[1:]))

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        k = ctx.k
        n, c = idx.shape[:2]
        ix = idx.reshape(1, n, c, -1).expand(k, n, c, -1)
        out = grad.new_zeros((k, n, c, ctx.shape[2:].numel()))
        out.scatter_add_(3, ix, grad.reshape(k, n, c, -1))
        return out.reshape(ctx.shape), None, None


class _ReLUKeepInput(torch.autograd.Function):
    """ReLU that keeps its input for backward (``torch.relu`` keeps its output)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return grad * (a > 0)


def _gather(r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Max-pool gather of relevant maps at the argmax of their own image (same batch)."""
    n, c = idx.shape[:2]
    return r.reshape(n, c, -1).gather(2, idx.reshape(n, c, -1)).reshape(idx.shape)


# --------------------------------------------------------------------------------------
# the penalty object
# --------------------------------------------------------------------------------------
_TRAIN_DIFFERENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class CDEPPenalty:
    """The CDEP image penalty for a model, traced once.

    >>> penalty = CDEPPenalty(model)
    >>> for x, y, masks in loader:               # masks: what must not matter, per example
    ...     opt.zero_grad()
    ...     loss = F.cross_entropy(model(x), y) + lam * penalty(x, masks)
    ...     loss.backward(); opt.step()

    or, saving one forward pass when the model behaves the same in train and eval mode
    (no dropout, no batchnorm)::

    ...     logits, pen = penalty.forward_with_penalty(x, masks)
    ...     loss = F.cross_entropy(logits, y) + lam * pen

    CD is defined on eval behaviour, so the penalty runs the model in eval mode (dropout
    off, batchnorm with running statistics) whatever mode the model is in; the model's own
    mode is left as it was.

    backend: ``"paired"`` (default; batch evaluation in pure torch with the low-memory
    autograd rules), ``"engine"`` (one ``Decomposer`` call per image: uses the compiled
    ops when they are built, slower for large batches) or ``"reference"`` (relevant and
    irrelevant parts propagated separately, one image and mask at a time: the oracle).
    """

    BACKENDS = ("paired", "engine", "reference", "straightforward")

    def __init__(self, model: nn.Module, backend: str = "paired", reduction: str = "mean",
                 low_memory: bool = True, use_compiled: bool = False, fuse: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.model, self.backend, self.reduction = model, backend, reduction
        self.low_memory, self.use_compiled, self.fuse = low_memory, use_compiled, fuse
        with eval_mode(model):
            self.graph = CapturedGraph(model, rules_.DEFAULT)
        self._decomposer: Decomposer | None = None

    def __call__(self, x: torch.Tensor, masks) -> torch.Tensor:
        """The penalty (a scalar tensor) for a batch x (N, ...) and its masks."""
        return self.forward_with_penalty(x, masks, _need_logits=False)[1]

    def scores(self, x: torch.Tensor, masks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(relevant, irrelevant) each (K, N, *out), and the output (N, *out)."""
        x = self._check_batch(x)
        masks = canonical_masks(x, masks)
        k, n = masks.shape[:2]
        r0 = (masks * x[None]).reshape((k * n,) + tuple(x.shape[1:]))
        with eval_mode(self.model):
            rel, out = self._relevant(x, r0, k)
        rel = rel.reshape((k, n) + tuple(out.shape[1:]))
        return rel, out[None] - rel, out

    def forward_with_penalty(self, x: torch.Tensor, masks, _need_logits: bool = True):
        """(logits (N, classes), penalty): the logits come from the same pass of the true
        activations, in eval behaviour; use them as the ordinary forward only for a model
        that behaves the same in train and eval mode (no dropout, no batchnorm)."""
        if _need_logits:
            odd = [type(m).__name__ for m in self.model.modules()
                   if isinstance(m, _TRAIN_DIFFERENT) and m.training]
            if odd:
                raise ValueError(
                    f"the model has modules that behave differently in training ({', '.join(odd[:3])}); "
                    "its eval-mode logits are not its training forward. Use "
                    "`loss(model(x), y) + lam * penalty(x, masks)` instead of forward_with_penalty.")
        rel, irrel, out = self.scores(x, masks)
        per_mask = torch.stack([cdep_score(rel[j], irrel[j]) for j in range(rel.shape[0])])
        pen = per_mask.mean() if self.reduction == "mean" else per_mask.sum()
        return out, pen

    # ---- backends ------------------------------------------------------------------------
    def _relevant(self, x, r0, k):
        n = x.shape[0]
        if self.backend == "paired":
            return paired_cd(self.graph, x, r0, low_memory=self.low_memory,
                             use_compiled=self.use_compiled, fuse=self.fuse)
        if self.backend == "straightforward":
            return straightforward_cd(self.graph, x, r0)
        if self.backend == "engine":
            if self._decomposer is None:
                self._decomposer = Decomposer(self.model, backend="auto")
                self._decomposer.graph = self.graph
            dec = self._decomposer
            rows = [dec.cd_relevant_input(x[i:i + 1], r0[i::n]) for i in range(n)]
            rel = torch.stack([res.relevant for res in rows], 1)  # (K, N, *out)
            out = torch.stack([res.output for res in rows])
            return rel.reshape((k * n,) + tuple(out.shape[1:])), out
        pairs = [propagate_graph(self.graph, r0[j:j + 1], x[j % n:j % n + 1] - r0[j:j + 1])
                 for j in range(r0.shape[0])]
        rel = torch.cat([p[0] for p in pairs])
        out = torch.cat([p[0] + p[1] for p in pairs[:n]])
        return rel, out

    def _check_batch(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
        return x


def straightforward_cd(graph: CapturedGraph, x: torch.Tensor, relevant_input: torch.Tensor,
                       pool_indices: dict | None = None):
    """CD the way the CDEP code computes it: relevant and irrelevant parts of the whole
    batch propagated separately through every layer (the reference arithmetic). Same
    inputs and outputs as ``paired_cd``; for comparison and benchmarks.

    pool_indices: the max-pool argmax indices of the true batch, e.g. from
    ``paired_cd(graph, x, None, pool_indices=d)`` run as the ordinary forward; computed
    when omitted. The max-pool positions come from the true activations (as in the reference); the CDEP
    code takes them from ``max_pool(r + i)``, which is the same up to rounding at ties.
    """
    n, m = x.shape[0], relevant_input.shape[0]
    k = m // n
    if pool_indices is None:  # a training step has them from its forward pass
        pool_indices = {}
        with torch.no_grad():
            paired_cd(graph, x, None, pool_indices=pool_indices)
    pools = {node: _repeat_total(idx, k) for node, idx in pool_indices.items()}
    rel, irrel = propagate_graph(graph, relevant_input, _repeat_total(x, k) - relevant_input,
                                 pool_indices=pools)
    return rel, (rel + irrel)[:n]


# --------------------------------------------------------------------------------------
# text: the penalty on an embedding -> LSTM -> linear model
# --------------------------------------------------------------------------------------
TEXT_SCORES = ("log", "prob")
TEXT_CELLS = ("torch", "compiled")


def token_masks(tokens: torch.Tensor, ids, batch_first: bool = False) -> torch.Tensor:
    """(N, T) float masks, 1 where a token is one of ``ids`` (e.g. the decoy words).

    tokens: (T, N) token ids (``(N, T)`` with ``batch_first=True``), as the model takes them."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (T, N) (or (N, T) with batch_first), got {tuple(tokens.shape)}")
    ids = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, device=tokens.device)
    m = torch.isin(tokens, ids).float()
    return m if batch_first else m.T.contiguous()


def _lstm_weights(lstm: nn.LSTM, dtype) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """[(w_ih, w_hh, b_ih + b_hh)] per direction, per layer (the parameters themselves: gradients flow)."""
    out = []
    for layer in range(lstm.num_layers):
        dirs = []
        for d in range(2 if lstm.bidirectional else 1):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih = getattr(lstm, "weight_ih" + sfx).to(dtype)
            w_hh = getattr(lstm, "weight_hh" + sfx).to(dtype)
            bias = ((getattr(lstm, "bias_ih" + sfx) + getattr(lstm, "bias_hh" + sfx)).to(dtype)
                    if lstm.bias else w_ih.new_zeros(w_ih.shape[0]))
            dirs.append((w_ih, w_hh, bias))
        out.append(dirs)
    return out


def _text_cell_compiled(n: int):
    """The compiled ``lstm_cd_cell`` (total of batch 1) once per sentence: rows k*N + s pair
    with sentence s."""

    def cell(rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase, first):
        cs, hs = [], []
        for s in range(n):
            c, h = ops.lstm_cd_cell(rel_gates[s::n].contiguous(), total_gates[s:s + 1], bias,
                                    out_gate[s:s + 1], prev_rel_c[s::n].contiguous(),
                                    prev_total_c[s:s + 1], in_phrase[s::n].contiguous(), first)
            cs.append(c), hs.append(h)
        hid = prev_rel_c.shape[1]
        return torch.stack(cs, 1).reshape(-1, hid), torch.stack(hs, 1).reshape(-1, hid)
    return cell


def paired_text_cd(x: torch.Tensor, weights, masks: torch.Tensor, readout: str = "last",
                   cell: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable CD of an LSTM's readout features for a batch of N sentences, K token
    masks per sentence, in one recurrence (the rule of ``fastacd.text`` / design.md section 2).

    x: (T, N, E) word vectors; weights: ``[[(w_ih, w_hh, bias), ...directions], ...layers]``;
    masks: (K, N, T) 0/1 (1 = the token is relevant). The true LSTM pass runs once as batch N
    (it is the model's ordinary forward); the relevant states of the K*N masks are one batch,
    row ``k*N + n`` paired with sentence n (the irrelevant part is ``true - relevant``, never
    propagated). cell: ``"torch"`` (``fastacd._torch_ops.lstm_cd_cell``, its formulas
    broadcast over a total of K*N rows) or ``"compiled"`` (the compiled op with its registered
    backward, once per sentence and step).
    Returns (relevant features (K*N, F), true features (N, F)).
    """
    T, N = x.shape[:2]
    K = masks.shape[0]
    M = K * N
    if tuple(masks.shape) != (K, N, T):
        raise ValueError(f"masks must be (K, N, T) = (K, {N}, {T}), got {tuple(masks.shape)}")
    mask_steps = masks.to(x.dtype).permute(2, 0, 1).reshape(T, M)         # (T, M) step-major
    step = _torch_ops.lstm_cd_cell if cell == "torch" else _text_cell_compiled(N)
    rep = (lambda t: t) if K == 1 else (lambda t: t.repeat(K, 1))
    inp, rel_in = x, None
    true_outs = rel_outs = None
    for li, dirs in enumerate(weights):
        true_outs, rel_outs = [], []
        for d, (w_ih, w_hh, bias) in enumerate(dirs):
            H = w_hh.shape[1]
            order = range(T - 1, -1, -1) if d == 1 else range(T)
            xw = inp @ w_ih.T                                               # (T, N, 4H), no bias
            w_hh_t = w_hh.T
            # the true LSTM (batch N)
            h = c = None
            gates, cs, hs, os_ = [None] * T, [None] * T, [None] * T, [None] * T
            for t in order:
                g = xw[t] if h is None else torch.addmm(xw[t], h, w_hh_t)
                gb = g + bias
                s = torch.sigmoid(gb)
                ig = s[:, :H] * torch.tanh(gb[:, 2 * H:3 * H])
                c = ig if c is None else torch.addcmul(ig, s[:, H:2 * H], c)
                o = s[:, 3 * H:]
                h = o * torch.tanh(c)
                gates[t], cs[t], hs[t], os_[t] = g, c, h, o
            # the relevant part (batch K*N)
            if rel_in is None:
                rxw = (mask_steps.reshape(T, K, N, 1) * xw.unsqueeze(1)).reshape(T, M, -1)
            else:
                rxw = rel_in @ w_ih.T
            rel_h = rel_c = None
            rel_seq = [None] * T
            prev = None
            for k, t in enumerate(order):
                rg = rxw[t] if rel_h is None else torch.addmm(rxw[t], rel_h, w_hh_t)
                if rel_c is None:
                    rel_c = rg.new_zeros(M, H)
                rel_c, rel_h = step(rg, rep(gates[t]), bias, rep(os_[t]), rel_c,
                                    rep(cs[prev] if prev is not None else cs[t]), mask_steps[t], k == 0)
                rel_seq[t] = rel_h
                prev = t
            true_outs.append(torch.stack(hs))                               # (T, N, H)
            rel_outs.append(torch.stack(rel_seq))                           # (T, M, H)
        inp = torch.cat(true_outs, 2) if len(true_outs) > 1 else true_outs[0]
        rel_in = torch.cat(rel_outs, 2) if len(rel_outs) > 1 else rel_outs[0]
    if readout == "last" or len(true_outs) == 1:
        return rel_in[T - 1], inp[T - 1]
    H = true_outs[0].shape[2]
    return (torch.cat([rel_outs[0][T - 1], rel_outs[1][0]], 1),
            torch.cat([true_outs[0][T - 1], true_outs[1][0]], 1))


def text_cdep_terms(relevant: torch.Tensor, irrelevant: torch.Tensor, labels: torch.Tensor | None,
                    score: str = "log") -> torch.Tensor:
    """Per-example penalty terms (..., ) of CD scores (..., C).

    ``"log"`` (the CDEP repository's text penalty, ``cd_penalty_for_one_decoy_all``): for the
    true class y, ``-log softmax([r_y, i_y])[1] = softplus(r_y - i_y)``: small when the
    masked tokens' share of the true logit is small. ``"prob"`` (the image score): the mean
    over classes of ``softmax([r_c, i_c])[0] = sigmoid(r_c - i_c)``; needs no labels."""
    if score == "prob":
        return torch.sigmoid(relevant - irrelevant).mean(-1)
    if labels is None:
        raise ValueError("score='log' penalises the true class's logit: pass labels (N,)")
    idx = labels.reshape((1,) * (relevant.dim() - 2) + (-1, 1)).expand(relevant.shape[:-1] + (1,))
    return F.softplus(relevant.gather(-1, idx) - irrelevant.gather(-1, idx))[..., 0]


class TextCDEPPenalty:
    """The CDEP text penalty (decoy words, annotated phrases) for an embedding -> LSTM ->
    linear model, on batches of sentences.

    >>> pen = TextCDEPPenalty(model)                      # model: embed -> nn.LSTM -> linear
    >>> masks = token_masks(text, decoy_ids)              # text (T, N); masks (N, T)
    >>> logits, p = pen.forward_with_penalty(text, masks, labels)
    >>> loss = F.cross_entropy(logits, labels) + lam * p

    The penalty (``score="log"``, the CDEP repository's ``cd_penalty_for_one_decoy_all``):
    for sentence n with label y and token mask m (the tokens that must not matter),
    ``-log softmax([r_y, i_y])[1] = softplus(r_y - i_y)`` where r_y / i_y are CD's relevant /
    irrelevant parts of the true class's logit (without the head's bias, as ``cd_text``);
    averaged over the sentences whose mask is not empty (``weights`` (N,) or (K, N)
    multiply the terms, e.g. annotation confidences). ``score="prob"``: the image score
    ``mean_c sigmoid(r_c - i_c)``. With K masks per sentence: the mean (``reduction="mean"``)
    or sum over the K masks of those averages.

    model: anything ``fastacd.text.TextDecomposer.from_model`` reads (``.embed``, ``.lstm``,
    ``.hidden_to_label``, or a traceable embed -> LSTM -> readout -> linear), or give
    ``embed``, ``lstm``, ``head`` (``nn.Linear``) and ``readout`` (``"last"`` | ``"final"``).
    Tokens are what the model takes: (T, N), or (N, T) for a ``batch_first`` LSTM; masks
    are always (N, T) or (K, N, T). Pad tokens are part of the sentence as the model sees
    them (mask 0: irrelevant). cell: ``"torch"`` (default) or ``"compiled"`` (see
    ``paired_text_cd``). detach_embeddings: no penalty gradient into the word vectors
    (the CDEP repository's text code uses ``embed(text).data``); default False.
    """

    def __init__(self, model: nn.Module | None = None, *, embed=None, lstm: nn.LSTM | None = None,
                 head: nn.Linear | None = None, readout: str | None = None, score: str = "log",
                 reduction: str = "mean", cell: str = "torch", detach_embeddings: bool = False):
        if model is not None:
            dec = TextDecomposer.from_model(model) if readout is None else \
                TextDecomposer.from_model(model, readout=readout)
            embed, lstm, head, readout = dec.embed, dec.lstm, dec.head, dec.readout
        if lstm is None or embed is None:
            raise ValueError("give a model, or embed= and lstm= (and head=, readout=)")
        if not isinstance(lstm, nn.LSTM):  # GRUs and transformers have no paired text cell here
            raise TypeError(f"TextCDEPPenalty decomposes nn.LSTM text models; got "
                            f"{type(lstm).__name__}")
        dec = TextDecomposer(embed, lstm, head, readout=readout or "last")  # validates
        if score not in TEXT_SCORES:
            raise ValueError(f"score must be one of {TEXT_SCORES}, got {score!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if cell not in TEXT_CELLS:
            raise ValueError(f"cell must be one of {TEXT_CELLS}, got {cell!r}")
        if cell == "compiled":
            if compiled_ops() is None:
                raise RuntimeError("cell='compiled' needs the built extension (fastacd._C); use cell='torch'")
        self.model, self.embed, self.lstm, self.head = model, dec.embed, dec.lstm, dec.head
        self.readout, self.score, self.reduction, self.cell = dec.readout, score, reduction, cell
        self.detach_embeddings = detach_embeddings

    # ---- inputs
    def _vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dim() != 2:
            raise TypeError("tokens must be an integer tensor (T, N) (or (N, T) for a batch_first LSTM), "
                            f"got {getattr(tokens, 'dtype', type(tokens).__name__)} "
                            f"{tuple(getattr(tokens, 'shape', ()))}")
        vocab = getattr(self.embed, "num_embeddings", None)
        if vocab is not None and bool(((tokens < 0) | (tokens >= vocab)).any()):
            raise ValueError(f"token ids outside the embedding's vocabulary [0, {vocab})")
        if self.lstm.batch_first:
            tokens = tokens.T
        x = self.embed(tokens)                                              # (T, N, E)
        if x.dim() != 3:
            raise ValueError(f"embed must map (T, N) ids to (T, N, E) vectors, got {tuple(x.shape)}")
        x = x.to(self.lstm.weight_ih_l0.dtype)
        return x.detach() if self.detach_embeddings else x

    @staticmethod
    def _masks(masks, T: int, N: int, like: torch.Tensor) -> torch.Tensor:
        masks = torch.as_tensor(masks).to(device=like.device, dtype=like.dtype)
        if masks.dim() == 2:
            masks = masks[None]
        if masks.dim() != 3 or tuple(masks.shape[1:]) != (N, T):
            raise ValueError(f"masks must be (N, T) = ({N}, {T}) or (K, {N}, {T}) (1 = the token must "
                             f"not matter), got {tuple(masks.shape)}")
        return masks

    # ---- CD and the penalty
    def scores(self, tokens: torch.Tensor, masks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(relevant, irrelevant) each (K, N, C) (head weight times the parts, no bias, as
        ``cd_text``: relevant + irrelevant = logits - head.bias) and the logits (N, C)."""
        return self._scores(tokens, masks)[:3]

    def _scores(self, tokens, masks):
        x = self._vectors(tokens)
        T, N = x.shape[:2]
        m = self._masks(masks, T, N, x)
        rel, feats = paired_text_cd(x, _lstm_weights(self.lstm, x.dtype), m, self.readout, self.cell)
        K = m.shape[0]
        if self.head is None:
            rel = rel.reshape(K, N, -1)
            return rel, feats[None] - rel, feats, m
        w = self.head.weight.to(x.dtype)
        rel_s = (rel @ w.T).reshape(K, N, -1)
        total = feats @ w.T
        logits = total if self.head.bias is None else total + self.head.bias.to(x.dtype)
        return rel_s, total[None] - rel_s, logits, m

    def forward_with_penalty(self, tokens, masks, labels=None, weights=None):
        """(logits (N, C), penalty): the logits come from the same true LSTM pass (the model's
        forward without dropout)."""
        if self.lstm.dropout and self.lstm.training and self.lstm.num_layers > 1:
            raise ValueError("the LSTM has inter-layer dropout in training mode; its dropout-free "
                             "logits are not its training forward: use loss(model(x), y) + lam * penalty(...)")
        rel, irrel, logits, m = self._scores(tokens, masks)
        if labels is not None:
            labels = torch.as_tensor(labels, device=rel.device).long()
        terms = text_cdep_terms(rel, irrel, labels, self.score)             # (K, N)
        if weights is not None:
            terms = terms * torch.as_tensor(weights, dtype=terms.dtype, device=terms.device).expand_as(terms)
        present = (m != 0).any(-1).to(terms.dtype)                          # (K, N)
        count = present.sum(-1)                                             # (K,)
        per_mask = (terms * present).sum(-1) / count.clamp_min(1)
        pen = per_mask.sum() / (count > 0).sum().clamp_min(1) if self.reduction == "mean" else per_mask.sum()
        return logits, pen

    def __call__(self, tokens, masks, labels=None, weights=None) -> torch.Tensor:
        return self.forward_with_penalty(tokens, masks, labels, weights)[1]

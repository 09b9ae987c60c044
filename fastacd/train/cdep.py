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
  relevant pass, instead of a plain forward + separate relevant and irrelevant passes;
* **riding on the model's forward**: ``penalty(x, masks)`` right after ``model(x)`` reuses
  that forward's activations (``ForwardRecorder``: forward hooks, checked to be the same
  input and parameter versions, and eval-equivalent), so the README's
  ``loss(model(x), y) + lam * penalty(x, masks)`` costs what ``forward_with_penalty`` does;
* **fused element-wise kernels** (default): each layer's element-wise forward and
  closed-form backward run as ``torch.compile``'d loops (``_Fusable``; the plain formulas
  where compiling fails), and a layer's outputs that the next layer's weights need for
  their gradient are recomputed from the pre-activations kept anyway.

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
import types
import warnings
import weakref
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import torch_ops as _torch_ops
from .. import ops, rules as rules_
from ..capture.graph import CapturedGraph
from ..capture.nodes import call_with, check_hooks, fetch_attr, run_plain
from ..engine.decomposer import Decomposer, compiled_ops
from ..reference.cd import propagate_graph
from ..text.lstm import TextDecomposer, check_computed_parts

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


def _unrepeat(t: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of ``_repeat_total``: sum the K groups."""
    return t if k == 1 else t.reshape((k, -1) + tuple(t.shape[1:])).sum(0)


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


def _spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """(rows, C, *S) -> (rows, C): the inner, contiguous part of a channel sum. A fused kernel
    reduces over contiguous memory fast; the small sum over rows is left to the caller."""
    return t.sum(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t


def _split(zr, t_pre, b, relu: bool):
    """The bias split (design.md section 2): ``zr + pr * b`` with ``pr = (|zr| + eps) /
    ((|zr| + eps) + (|t_pre - zr| + eps))``, then ReLU if ``relu``; ``t_pre``: the true
    pre-activation without bias, one row per relevant row; ``b``: the bias as a channel view.
    The float operations of ``fastacd._torch_ops.bias_split``."""
    u = zr.abs() + _torch_ops.EPS
    out = zr + u / (u + ((t_pre - zr).abs() + _torch_ops.EPS)) * b
    return out.clamp_min(0) if relu else out


def _split_grad(zr, t_pre, b, g, relu: bool):
    """Closed-form gradients of ``_split`` for an output gradient g: (d zr, d t_pre, g * pr),
    where ``g * pr`` summed over rows and positions is the gradient of ``b``.

    With u = |zr| + eps, v = |zi| + eps, s = u + v, zi = t_pre - zr, c = g b / s^2:
    d zr = g + c (v sgn(zr) + u sgn(zi)), d t_pre = -c u sgn(zi) (sgn(0) = 0, as torch.abs);
    these are autograd's derivatives of the formula. c is applied as (g b / s) (u / s) and
    (g b / s) (v / s): s^2 underflows in float32 where both parts are ~0 (a dead region)."""
    zi = t_pre - zr
    u = zr.abs() + _torch_ops.EPS
    v = zi.abs() + _torch_ops.EPS
    s = u + v
    pr = u / s
    if relu:
        g = torch.where(zr + pr * b > 0, g, 0.0)
    q = g * b / s
    d_t = -(q * pr) * zi.sign()
    d_zr = g + q * (v / s) * zr.sign() - d_t
    return d_zr, d_t, g * pr


def _affine_fwd(both, bias, n: int, k: int, relu: bool):
    """Forward of ``_AffinePaired``: (true output, ReLU'd if ``relu``; relevant part)."""
    t_pre, zr = both[:n], both[n:]
    b = _torch_ops._channel_view(bias, t_pre)
    total = t_pre + b
    return (total.clamp_min(0) if relu else total), _split(zr, _repeat_total(t_pre, k), b, relu)


def _affine_bwd(both, bias, g_total, g_rel, n: int, k: int, relu: bool):
    """Backward of ``_AffinePaired``: (d both, the bias gradient's per-row channel sums of the
    true rows (N, C) and of the relevant rows (K*N, C))."""
    t_pre, zr = both[:n], both[n:]
    b = _torch_ops._channel_view(bias, t_pre)
    d_zr, d_t, g_pr = _split_grad(zr, _repeat_total(t_pre, k), b, g_rel, relu)
    if relu:
        g_total = torch.where(t_pre + b > 0, g_total, 0.0)
    return torch.cat([_unrepeat(d_t, k) + g_total, d_zr]), _spatial_sum(g_total), _spatial_sum(g_pr)


def _affine_fwd_cat(both, bias, n: int, k: int, relu: bool):
    """``torch.cat(_affine_fwd(...))`` in one pass: the input of the next conv/linear, recomputed
    in its backward."""
    return torch.cat(_affine_fwd(both, bias, n, k, relu))


def _total_split_fwd(zr, total_out, bias, k: int, relu: bool):
    """The bias split of ``zr`` (K*N rows) against a layer's ordinary output (N rows, with bias)."""
    b = _torch_ops._channel_view(bias, total_out)
    return _split(zr, _repeat_total(total_out - b, k), b, relu)


def _total_split_bwd(zr, total_out, bias, g, k: int, relu: bool):
    """Backward of ``_total_split_fwd``: (d zr, d total_out, per-row channel sums of g * pr
    (K*N, C) and of d total_out (N, C)); the bias gradient is the first sum minus the second
    (``total_out - b`` is the pre-activation)."""
    b = _torch_ops._channel_view(bias, total_out)
    d_zr, d_t, g_pr = _split_grad(zr, _repeat_total(total_out - b, k), b, g, relu)
    d_total = _unrepeat(d_t, k)
    return d_zr, d_total, _spatial_sum(g_pr), _spatial_sum(d_total)


class _Fusable:
    """``fn`` run through ``torch.compile`` (one or two fused loops instead of ~20
    element-wise passes over a layer's maps; compiled on first use, cached on disk by
    inductor), or ``fn`` itself where compiling is not possible: no compiler, an unsupported
    platform, an inductor error. The fallback is decided once per function and warned."""

    def __init__(self, fn):
        self.fn, self.broken = fn, None
        self._compiled: dict = {}

    def __call__(self, *args):
        if self.broken is None:
            try:
                # a parameter's sizes would be compiled in as constants (dynamo's default)
                args = tuple(a.detach() if isinstance(a, nn.Parameter) else a for a in args)
                key = _signature(args)
                compiled = self._compiled.get(key)
                if compiled is not None:
                    return compiled(*args)
                # a new kind of call (rank, dtype, flags): its own compiled copy of fn, so that
                # every call checks one set of guards, compiled with general shapes
                compiled = torch.compile(_own_code(self.fn), dynamic=True)
                with _compiling():
                    out = compiled(*args)
                self._compiled[key] = compiled
                return out
            except Exception as exc:  # noqa: BLE001 - any compile failure: fall back
                out = self.fn(*args)  # the inputs' fault (not the compiler's) raises here
                self.broken = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"fastacd.cdep: torch.compile of {self.fn.__name__} failed, using the "
                              f"unfused formulas (same numbers, slower): {self.broken}", RuntimeWarning)
                return out
        return self.fn(*args)


def _own_code(fn):
    """A copy of fn with a code object of its own (dynamo keeps one cache per code object)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


def _signature(args) -> tuple:
    """What a compiled kernel is specialised on: ranks, dtypes, devices, sizes of 1, flags."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((a.dim(), a.dtype, a.device.type, tuple(s == 1 for s in a.shape)))
        else:
            sig.append(a if isinstance(a, bool) or a in (0, 1) else type(a))
    return tuple(sig)


@contextlib.contextmanager
def _compiling():
    """Compile without "duck sizing" (which makes sizes that happen to be equal, e.g. a batch
    of 32 and 32 channels, one symbol, and recompiles when they differ), and with room for a
    few recompiles beyond dynamo's default limit; entered only when a kernel compiles."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    old = fx_config.use_duck_shape, getattr(dynamo_config, limit)
    fx_config.use_duck_shape = False
    setattr(dynamo_config, limit, max(old[1], 64))
    try:
        yield
    finally:
        fx_config.use_duck_shape = old[0]
        setattr(dynamo_config, limit, old[1])


_FUSED = {f.__name__: _Fusable(f) for f in (_affine_fwd, _affine_bwd, _affine_fwd_cat, _total_split_fwd,
                                              _total_split_bwd)}


def _maybe_fused(fn, fuse: bool):
    return _FUSED[fn.__name__] if fuse else fn


def fusion_available() -> bool:
    """Whether the fused element-wise kernels compile here (tries once, on tiny tensors)."""
    t = torch.zeros(2, 1)
    _FUSED["_total_split_fwd"](t[:1], t[1:], t.new_zeros(1), 1, False)
    return _FUSED["_total_split_fwd"].broken is None


class _AffinePaired(torch.autograd.Function):
    """A conv/linear layer's true output and relevant part from one weight application.

    ``both`` (N + K*N, C, *S) = W applied to ``cat([a, r])`` without bias. Returns the true
    output ``both[:N] + b`` (ReLU'd if ``relu``: the ReLU folded into the layer) and the
    relevant part (the bias split, ReLU'd if ``relu``). Keeps only ``both`` and the bias for
    backward (closed-form gradients, recomputing the element-wise products). ``fuse``: the
    forward and backward bodies run through ``torch.compile`` (``_Fusable``).
    """

    @staticmethod
    def forward(ctx, both, bias, n, k, relu, fuse):
        ctx.n, ctx.k, ctx.relu, ctx.fuse = n, k, relu, fuse
        ctx.save_for_backward(both, bias)
        return _maybe_fused(_affine_fwd, fuse)(both, bias, n, k, relu)

    @staticmethod
    def backward(ctx, g_total, g_rel):
        both, bias = ctx.saved_tensors
        n = ctx.n
        if g_rel is None:
            g_rel = torch.zeros_like(both[n:])
        if g_total is None:
            g_total = torch.zeros_like(both[:n])
        d_both, s_true, s_rel = _maybe_fused(_affine_bwd, ctx.fuse)(
            both, bias, g_total.contiguous(), g_rel.contiguous(), n, ctx.k, ctx.relu)
        return d_both, s_true.sum(0) + s_rel.sum(0), None, None, None, None


class _BiasSplitPaired(torch.autograd.Function):
    """The bias split of ``rel_pre`` (K*N rows) against the layer's ordinary output
    ``total_out`` (N rows, with bias), e.g. the one the model's own forward computed: keeps
    only its inputs, closed-form backward (``_split_grad``), fused with ``fuse``."""

    @staticmethod
    def forward(ctx, rel_pre, total_out, bias, relu, k, fuse):
        ctx.relu, ctx.k, ctx.fuse = relu, k, fuse
        ctx.save_for_backward(rel_pre, total_out, bias)
        return _maybe_fused(_total_split_fwd, fuse)(rel_pre, total_out, bias, k, relu)

    @staticmethod
    def backward(ctx, grad):
        zr, total_out, bias = ctx.saved_tensors
        d_zr, d_total, s_gpr, s_total = _maybe_fused(_total_split_bwd, ctx.fuse)(
            zr, total_out, bias, grad.contiguous(), ctx.k, ctx.relu)
        return d_zr, d_total, s_gpr.sum(0) - s_total.sum(0), None, None, None


def _bias_split_paired(rel_pre, total_out, bias, relu: bool, k: int):
    """``_BiasSplitPaired`` in plain differentiable torch (``fastacd._torch_ops.bias_split``)."""
    pre = total_out - _torch_ops._channel_view(bias, total_out)
    return _torch_ops.bias_split(rel_pre, _repeat_total(pre, k), bias, relu)


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
    """The relevant output of a conv/linear layer from ``zr = W r`` and its true output."""
    if use_compiled:
        ops = compiled_ops()
        if ops is not None and ops._compiled(zr):
            return _bias_split_compiled(ops, zr, total, bias, relu, k)
    if low_memory and torch.is_grad_enabled() and (zr.requires_grad or total.requires_grad
                                                   or bias.requires_grad):
        return _BiasSplitPaired.apply(zr, total, bias, relu, k, fuse)
    return _bias_split_paired(zr, total, bias, relu, k)


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
        return _scatter_back(grad, idx, ctx.shape, ctx.k), None, None


def _scatter_back(grad, idx, shape, k: int):
    """Gradient of a gather at ``idx`` (N, C, *So) from K*N maps of ``shape``."""
    n, c = idx.shape[:2]
    ix = idx.reshape(1, n, c, -1).expand(k, n, c, -1)
    out = grad.new_zeros((k, n, c, shape[2:].numel()))
    out.scatter_add_(3, ix, grad.reshape(k, n, c, -1))
    return out.reshape(shape)


class _MaxPoolKeepIndices(torch.autograd.Function):
    """A max-pool's ordinary output that keeps only its argmax indices for backward
    (``max_pool2d`` keeps its input as well). Returns (output, indices)."""

    @staticmethod
    def forward(ctx, a, pool):
        out, idx = pool(a)
        ctx.shape = a.shape
        ctx.save_for_backward(idx)
        ctx.mark_non_differentiable(idx)
        return out, idx

    @staticmethod
    def backward(ctx, grad, _):
        (idx,) = ctx.saved_tensors
        return _scatter_back(grad, idx, ctx.shape, 1), None


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


class _Recipe:
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn


@contextlib.contextmanager
def _saved_as_recipe(t: torch.Tensor, fn):
    """Inside, an op that saves ``t`` for backward keeps ``fn`` instead, and backward calls
    ``fn()`` to get ``t`` back: for a conv/linear whose input is another layer's fused output,
    ``fn`` reruns that layer's element-wise kernel on the pre-activations its own backward
    keeps anyway (the same kernel on the same inputs: the same numbers), so the layer's
    outputs (the true and relevant activations, twice a plain step's) are not kept too."""
    def pack(s):
        same = s is t or (s.data_ptr() == t.data_ptr() and s.shape == t.shape and s.stride() == t.stride())
        return _Recipe(fn) if same else s

    def unpack(s):
        return s.fn() if isinstance(s, _Recipe) else s
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# --------------------------------------------------------------------------------------
# paired evaluation over a batch
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put a model in eval mode (CD is defined on eval behaviour)."""
    # the flag set directly: nn.Module.__setattr__ costs ~1 us a module, twice a training step
    flipped = [m for m in model.modules() if m.training]
    for m in flipped:
        m.__dict__["training"] = False
    try:
        yield model
    finally:
        for m in flipped:
            m.__dict__["training"] = True


_ORDER: "weakref.WeakKeyDictionary[CapturedGraph, dict]" = weakref.WeakKeyDictionary()


class _TrueValues(dict):
    """The true activations of a pass, node -> tensor: filled by the pass as it goes and from a
    recorded forward; a value nobody filled is computed on first use, with its missing inputs
    (in graph order, no recursion). So a recorded forward's values are never computed again,
    and values no rule reads are never computed."""

    def __init__(self, known: dict, compute, order: dict):
        super().__init__(known)
        self._compute, self._order = compute, order

    def __missing__(self, node: fx.Node):
        todo, stack, seen = [], [node], set()
        while stack:
            nd = stack.pop()
            if nd in seen or dict.__contains__(self, nd):
                continue
            seen.add(nd)
            todo.append(nd)
            stack.extend(nd.all_input_nodes)
        for nd in sorted(todo, key=self._order.__getitem__):
            dict.__setitem__(self, nd, self._compute(nd))
        return dict.__getitem__(self, node)


def _true_value(g: CapturedGraph, node: fx.Node, p: "PairedPass"):
    """A node's ordinary output in eval behaviour: its rule's paired total."""
    if node.op == "placeholder":
        return node.args[0] if node.args else None
    if node.op == "get_attr":
        return fetch_attr(g.gm, node.target)
    step = g.steps.get(node)
    if step is None:
        return run_plain(g.gm, node, p.value_of)
    return step.rule.paired_total(step, p)


def _saved_pool_indices(out: torch.Tensor) -> torch.Tensor | None:
    """The argmax indices autograd saved for a max-pool output of the model's own forward
    (``MaxPool2DWithIndicesBackward0._saved_result1``: ``max_pool2d_with_indices``'s second
    output), or None (not a max-pool's output, no graph, or a graph already freed)."""
    fn = out.grad_fn
    if fn is None or "MaxPool" not in type(fn).__name__:
        return None
    for name in ("_saved_result1", "_saved_indices"):
        try:
            idx = getattr(fn, name, None)
        except RuntimeError:  # saved tensors freed by a backward pass
            return None
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.int64 and idx.shape == out.shape:
            return idx
    return None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A Linear's output over tokens (B, *T, F) as rows (B*T..., F): the row order keeps the
    mask-major pairing (relevant row (k*N + n)*T + t pairs with true row n*T + t)."""
    return t.reshape(-1, t.shape[-1])


class PairedPass:
    """One paired evaluation (``paired_cd``) as the rules' paired forms see it
    (``Rule.paired_total``, ``paired_relevant``, ``paired_aux``; fastacd/rules/base.py):

    * ``values``: the true activations of the N images, node -> (N, ...), filled as the pass
      goes and from a recorded forward; a value nobody filled is computed on first use with
      its rule's ``paired_total`` (``value_of`` reads it);
    * ``rel``: the relevant parts of the K*N masks, (K*N, ...), mask-major (row k*N + n
      belongs to image n); ``m`` = K*N; ``ops``: the pure-torch formulas (differentiable);
      ``repeated``: an input-dependent value as K*N rows;
    * the low-memory, optionally fused building blocks the conv/linear (``affine``),
      batchnorm (``bn_split``), max-pool (``pool_total``, ``pool_relevant``,
      ``pool_indices``) and folded-ReLU (``relu_total``) forms call. A rule that calls none of
      them runs its own formulas under autograd.
    """
    ops = _torch_ops

    def __init__(self, graph: CapturedGraph, n: int, k: int, *, lean: bool, low_memory: bool,
                 use_compiled: bool, fuse: bool, known: dict, rel: dict, pools: dict):
        self.graph, self.n, self.k, self.m = graph, n, k, n * k
        self.lean, self.low_memory, self.use_compiled, self.fuse = lean, low_memory, use_compiled, fuse
        self.rel, self.pools = rel, pools
        self.relu_done: set[fx.Node] = set()  # affine nodes whose true output is already ReLU'd
        # node -> (true, relevant, recompute both, recompute their concatenation) for the outputs
        # of fused layers, which the next layer's weights' backward recomputes instead of keeping
        self.recipes: dict[fx.Node, tuple] = {}
        order = _ORDER.get(graph)
        if order is None:
            order = _ORDER[graph] = {nd: i for i, nd in enumerate(graph.nodes)}
        self.values = _TrueValues(known, lambda nd: _true_value(graph, nd, self), order)
        self.value_of = self.values.__getitem__

    def repeated(self, node: fx.Node):
        """A node's true value for the K*N relevant rows: an input-dependent tensor of the N
        images repeated per mask (mask-major); anything else as it is."""
        v = self.values[node]
        if (self.k > 1 and node in self.graph.reach and isinstance(v, torch.Tensor) and v.dim()
                and v.shape[0] == self.n):
            return _repeat_total(v, self.k)
        return v

    # ---- conv / linear
    def affine(self, step, weights, bias, features_last: bool = False) -> torch.Tensor:
        """Relevant output of a conv/linear layer (``weights``: the layer without its bias):
        the bias split of ``W r`` against the layer's true output, ReLU'd if one is folded
        into it. With the model's own forward recorded, that output is the forward's (``W r``
        is the only weight application); otherwise one weight application on ``cat([a, r])``
        gives both (``_AffinePaired``). ``features_last``: a Linear over tokens (N, *T, F),
        whose bias runs along the last dim: the element-wise work runs on its rows."""
        node, dep = step.node, step.dep[0]
        values, n, k, lean, fuse, relu = self.values, self.n, self.k, self.lean, self.fuse, step.relu_fused
        recipes = self.recipes
        r = self.rel[dep]
        recipe = recipes.get(dep)
        total = dict.get(values, node)  # recorded by the model's forward (without its ReLU)
        if total is None and lean and not self.use_compiled:
            a = values[dep]
            inp = torch.cat([a, r])
            if recipe is not None and recipe[0] is a and recipe[1] is r:
                with _saved_as_recipe(inp, recipe[3]):
                    both = weights(inp)  # (N + K*N, ...): one GEMM / conv call
            else:
                both = weights(inp)
            del inp
            if bias is None:
                total, out = both[:n], both[n:]
                if relu:
                    total, out = total.clamp_min(0), out.clamp_min(0)
            else:
                shape = both.shape
                flat, rows = (_rows(both), n * (both[0].numel() // shape[-1])) if features_last else (both, n)
                back = (lambda t: t.reshape((-1,) + tuple(shape[1:]))) if features_last else (lambda t: t)
                total, out = _AffinePaired.apply(flat, bias, rows, k, relu, fuse)
                total, out = back(total), back(out)
                fwd, fwd_cat = _maybe_fused(_affine_fwd, fuse), _maybe_fused(_affine_fwd_cat, fuse)
                recipes[node] = (total, out, lambda: tuple(map(back, fwd(flat, bias, rows, k, relu))),
                                 lambda: back(fwd_cat(flat, bias, rows, k, relu)))
            values[node] = total
            if relu:
                self.relu_done.add(node)
            return out
        if lean and recipe is not None and recipe[1] is r:
            with _saved_as_recipe(r, lambda: recipe[2]()[1]):
                zr = weights(r)
        else:
            zr = weights(r)
        if bias is None:
            return zr.clamp_min(0) if relu else zr
        total = values[node]
        shape = zr.shape
        back = (lambda t: t.reshape(shape)) if features_last else (lambda t: t)  # no view op otherwise
        if features_last:
            zr, total = _rows(zr), _rows(total)
        out = _bias_rule(zr, total, bias, relu, k, self.low_memory, self.use_compiled, fuse)
        if lean and out.grad_fn is not None and type(out.grad_fn).__name__.startswith("_BiasSplitPaired"):
            split = _maybe_fused(_total_split_fwd, fuse)
            out = back(out)
            recipes[node] = (None, out, lambda: (None, back(split(zr, total, bias, k, relu))), None)
            return out
        return back(out)

    # ---- batchnorm
    def bn_split(self, step, r: torch.Tensor, a: torch.Tensor, scale, shift) -> torch.Tensor:
        """A batchnorm's relevant output (ReLU'd if one is folded into it), keeping only its
        inputs for backward."""
        return _rule(_bn_split_paired, step.relu_fused, self.k, r, a, scale, shift, low_memory=self.low_memory)

    # ---- max-pool
    def pool_total(self, step, pool) -> torch.Tensor:
        """A max-pool's true output (``pool``: returns (output, indices)); its argmax indices
        recorded for the relevant part (and, lean, the only thing kept for backward)."""
        a = self.values[step.dep[0]]
        total, self.pools[step.node] = _MaxPoolKeepIndices.apply(a, pool) if self.lean else pool(a)
        return total

    def pool_indices(self, step, pool) -> torch.Tensor:
        """A max-pool's argmax indices on the true activation: those the model's recorded
        forward saved, else computed with the true pool."""
        node = step.node
        idx = self.pools.get(node)
        if idx is None:
            recorded = dict.get(self.values, node)
            if recorded is None:
                self.values[node]  # computes the true pool and records its indices
                return self.pools[node]
            idx = _saved_pool_indices(recorded)
            if idx is None:
                with torch.no_grad():
                    idx = pool(self.values[step.dep[0]])[1]
            self.pools[node] = idx
        return idx

    def pool_relevant(self, step, pool) -> torch.Tensor:
        """A max-pool's relevant output: the relevant maps gathered at the true argmax."""
        idx = self.pool_indices(step, pool)
        r = self.rel[step.dep[0]]
        return _IndexGather.apply(r, idx, self.k) if self.lean else _gather(r, _repeat_total(idx, self.k))

    # ---- a ReLU folded into its producer (conv/linear, batchnorm)
    def relu_total(self, step) -> torch.Tensor:
        """Its true output: the producer's, where the producer applied the ReLU already;
        lean, a ReLU that keeps its input (the layer's output, which the split keeps anyway)."""
        a = self.values[step.dep[0]]
        if step.fused_into in self.relu_done:
            return a
        if self.lean:
            return _ReLUKeepInput.apply(a)
        return call_with(step, self.value_of, {})


def paired_cd(graph: CapturedGraph, x: torch.Tensor, relevant_input: torch.Tensor | None,
              low_memory: bool = True, pool_indices: dict | None = None,
              use_compiled: bool = False, fuse: bool = False, forward: dict | None = None):
    """CD of a batch: image n's relevant part paired with image n's true activation.

    graph: the model captured in eval mode (``CapturedGraph``); the model's parameters are
    read at call time, so it follows training.
    x: (N, *D) the batch; relevant_input: (K*N, *D), mask-major (row ``k*N + n`` belongs to
    image n), or None for the true activations only.
    pool_indices: a dict to receive what the reference's aux takes from the true batch (every
    max-pool's argmax indices: ``Rule.paired_aux``), optional.
    low_memory: element-wise rules keep only their inputs for backward (closed-form or
    recomputed gradients) instead of autograd's intermediates.
    use_compiled: run the conv/linear bias split with the compiled op (once per image, as
    the op shares one true activation) when the extension is built.
    fuse: run the element-wise forward and closed-form backward of each conv/linear layer
    (true output, folded ReLU, bias split) through ``torch.compile`` (``_Fusable``: a few
    fused loops each; compiled on first use; the plain formulas where compiling fails).
    forward: true activations of this very batch that the model's own forward computed
    (node -> tensor, ``ForwardRecorder.take``): used instead of computing them again, the
    gradient flowing into that forward's graph; the other ones are computed as needed.
    Returns (relevant (K*N, *out) or None, output (N, *out)); the irrelevant part of row
    k*N + n is ``output[n] - relevant[k*N + n]``. Differentiable under the caller's grad mode.

    Each node is its rule's paired form (``PairedPass``): no kind is tested here.
    """
    n = x.shape[0]
    m = n if relevant_input is None else relevant_input.shape[0]
    if m % n:
        raise ValueError(f"relevant_input has {m} rows, not a multiple of the batch size {n}")
    g = graph
    known = dict(forward) if forward else {}
    known[g.input_node] = x
    rel: dict[fx.Node, torch.Tensor] = {g.input_node: relevant_input}
    # low-memory autograd for the true pass too (only worth it when gradients are recorded)
    lean = low_memory and relevant_input is not None and torch.is_grad_enabled()
    p = PairedPass(g, n, m // n, lean=lean, low_memory=low_memory, use_compiled=use_compiled, fuse=fuse,
                   known=known, rel=rel, pools={} if pool_indices is None else pool_indices)
    recipes = p.recipes
    for index, node in enumerate(g.nodes if relevant_input is not None else ()):
        step = g.steps.get(node)
        if step is None or not step.rule.value:
            continue
        out = step.rule.paired_relevant(step, p)
        d = step.dep[0]
        if d in recipes and out is rel[d] and len(step.dep) == 1:
            recipes[node] = recipes[d]  # the same tensors (a ReLU folded into the layer)
        rel[node] = out
        for d in step.dep:  # free relevant parts no later step reads
            if g.last_use.get(d, -1) <= index and d is not g.result_node:
                rel.pop(d, None)
    total = p.values[g.result_node]
    if pool_indices is not None:  # every max-pool's indices, also where no relevant part was asked
        for node, step in g.steps.items():
            aux = step.rule.paired_aux(step, p)
            if aux is not None:
                pool_indices[node] = aux
    p.values._compute = None  # no cycle through the pass: its tensors go with the last reference
    return rel.get(g.result_node), total

# --------------------------------------------------------------------------------------
# reusing the model's own forward
# --------------------------------------------------------------------------------------
_TRAIN_DIFFERENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
# functions whose result depends on a `training` argument a traced forward bakes in as False
_TRAINING_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                       F.feature_alpha_dropout, F.batch_norm, F.instance_norm, torch.dropout}


def _mode_dependent(module: nn.Module) -> bool:
    """Whether a module may compute something else in training mode: dropout and
    normalisation layers, and any module class from outside torch.nn (unknown)."""
    return isinstance(module, _TRAIN_DIFFERENT) or not type(module).__module__.startswith("torch.nn.")


class _NoHook:
    fastacd_observer = True  # changes nothing: the engine may decompose a model carrying it

    def __call__(self, *args):
        return None


class _Hook:
    """A forward (pre-)hook that calls a recorder through a weak reference (the model keeps
    its hooks; they must not keep the penalty alive). Pickles (``torch.save(model)``) and
    copies (``copy.deepcopy(model)``) as a hook that does nothing."""

    fastacd_observer = True  # records, changes nothing: the engine may decompose a model carrying it

    def __init__(self, recorder: "ForwardRecorder", what: str):
        self.ref, self.what = weakref.ref(recorder), what

    def __call__(self, module, args, out=None):
        rec = self.ref()
        if rec is not None:
            getattr(rec, self.what)(module, args, out)

    def __reduce__(self):
        return (_NoHook, ())


_SAVED_NAMES: dict[type, list[str]] = {}


def _saved_names(fn) -> list[str]:
    """The ``_raw_saved_*`` attributes (``SavedTensor``) of an autograd node's type."""
    names = _SAVED_NAMES.get(type(fn))
    if names is None:
        names = _SAVED_NAMES[type(fn)] = [a for a in dir(fn) if a.startswith("_raw_saved_")]
    return names


def _drop(t):
    return None


class _ReLUAgain:
    """Unpack hook: a ReLU's output recomputed from its input (checked unchanged), or with
    ``relu=False`` the input itself (for the ReLU's own backward, which reads only its sign)."""

    def __init__(self, t: torch.Tensor, relu: bool = True):
        self.t, self.version, self.relu = t, t._version, relu

    def __call__(self, _):
        if self.t._version != self.version:
            raise RuntimeError("fastacd.cdep: a layer's output that the penalty recomputes a ReLU from was "
                               "modified in place after the forward pass")
        return torch.relu(self.t) if self.relu else self.t


def _remove_hooks(handles) -> None:
    for h in handles:
        h.remove()


class ForwardRecorder:
    """Records, with forward hooks, the activations of a model's forward pass that a CD
    penalty on the same batch can reuse (``take``), so ``loss(model(x), y) + lam *
    penalty(x, masks)`` does not compute the true activations twice.

    Recorded: the output of every module the captured graph calls (conv/linear outputs
    before a separate ReLU, max-pool outputs and, through their autograd node, their argmax
    indices), only while gradients are enabled. ``take(x)`` returns them only if the last
    forward was on this very tensor ``x`` (same object, not modified in place since), with
    the parameters and buffers not modified in place since (version counters), and only the
    outputs that are still intact (an in-place ReLU overwrites its conv's output) and that
    eval behaviour would give too: nothing downstream of a dropout / normalisation module in
    training mode, of a module class from outside torch.nn in training mode, or of a
    functional dropout / batch_norm while the model trains. The record is cleared by
    ``take`` and by the next forward.
    """

    def __init__(self, model: nn.Module, graph: CapturedGraph):
        self.graph = graph
        self._nodes_of: dict[nn.Module, list[fx.Node]] = {}
        for node in graph.nodes:
            step = graph.steps.get(node)
            if node.op == "call_module" and step is not None and step.rule.value:
                self._nodes_of.setdefault(model.get_submodule(node.target), []).append(node)
        self._mode_nodes = [(node, mod) for mod, nodes in self._nodes_of.items()
                            for node in nodes if _mode_dependent(mod)]
        self._mode_modules = list(dict.fromkeys(mod for _, mod in self._mode_nodes))
        self._functional = [node for node in graph.nodes
                            if node.op == "call_function" and node.target in _TRAINING_FUNCTIONS]
        self._model = model
        self._state = list(model.parameters()) + list(model.buffers())
        handles = [model.register_forward_pre_hook(_Hook(self, "_start")),
                   model.register_forward_hook(_Hook(self, "_end"))]
        handles += [mod.register_forward_hook(_Hook(self, "_module")) for mod in self._nodes_of]
        self._finalizer = weakref.finalize(self, _remove_hooks, handles)
        self._clear()

    def remove(self) -> None:
        """Remove the hooks (the record is not kept any more)."""
        self._finalizer()
        self._clear()

    def _clear(self) -> None:
        self._active = self._complete = False
        self._input = None
        self._outputs: dict[nn.Module, list] = {}

    def _version(self) -> int:
        return sum(t._version for t in self._state)  # counters only grow: equal sum = none changed

    # ---- hooks
    enabled = True  # False: forwards are not recorded (e.g. a step without the penalty)

    def _start(self, module, args, _):
        self._clear()
        if self.enabled and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
            self._input, self._input_version, self._active = args[0], args[0]._version, True

    def _module(self, module, args, out):
        if self._active and isinstance(out, torch.Tensor):
            self._outputs.setdefault(module, []).append((out, out._version))

    def _end(self, module, args, out):
        if self._active:
            self._active, self._complete = False, True
            self._state_version = self._version()
            self._training = [m.training for m in self._mode_modules]
            self._any_training = any(m.training for m in self._model.modules())

    # ---- use
    def take(self, x: torch.Tensor) -> dict[fx.Node, torch.Tensor] | None:
        """The recorded true activations usable for a penalty on ``x`` (node -> tensor), or
        None; clears the record either way (a penalty's own module calls are not recorded)."""
        ok = (self._complete and x is self._input and x._version == self._input_version
              and self._version() == self._state_version)
        outputs = self._outputs
        training, any_training = (self._training, self._any_training) if ok else (None, False)
        self._clear()
        if not ok:
            return None
        tainted = self._tainted(training, any_training)
        got = {}
        for mod, nodes in self._nodes_of.items():
            outs = outputs.get(mod, ())
            if len(outs) != len(nodes):  # called another number of times than traced
                continue
            for node, (t, version) in zip(nodes, outs):
                if (t._version == version and node not in tainted and t.dtype == x.dtype
                        and t.device == x.device):
                    got[node] = t
        if torch.is_grad_enabled():
            self._recompute_relu_outputs(got)
        return got

    def _recompute_relu_outputs(self, got: dict) -> None:
        """The model's graph keeps each ReLU's output for backward (ReLU's own and its
        consumer's: a max-pool, the next conv); the penalty keeps the ReLU's input, the layer's
        pre-activation, anyway. Let the model's graph recompute those outputs from it instead
        (``SavedTensor.register_hooks``, registered now, after the forward, so a forward without
        a penalty is left alone): one activation map less per layer, the same numbers."""
        for node, y in got.items():
            step = self.graph.steps.get(node)
            if step is None or step.fused_into is None or step.fused_into not in got:  # a folded ReLU
                continue
            mod = self.graph.gm.get_submodule(node.target)
            if type(mod) is not nn.ReLU or mod.inplace or y.grad_fn is None:
                continue
            t = got[step.fused_into]
            # the ReLU's own backward only needs where its output is > 0, which is where t > 0:
            # it gets t itself (threshold_backward(grad, t, 0) = threshold_backward(grad, relu(t), 0))
            own = [(y.grad_fn, _ReLUAgain(t, relu=False))] if type(y.grad_fn).__name__ == "ReluBackward0" else []
            again = _ReLUAgain(t)
            users = [(got[u].grad_fn, again) for u in node.users if u in got and got[u].grad_fn is not None]
            for fn, unpack in own + users:
                for name in _saved_names(fn):
                    try:
                        saved = getattr(fn, name.replace("_raw", "", 1))
                        if (isinstance(saved, torch.Tensor) and saved.data_ptr() == y.data_ptr()
                                and saved.shape == y.shape and saved.stride() == y.stride()):
                            getattr(fn, name).register_hooks(_drop, unpack)
                    except RuntimeError:  # freed by a backward pass, or hooks already there
                        continue

    def _tainted(self, training: list[bool], any_training: bool) -> set[fx.Node]:
        """Nodes whose recorded value may differ from eval behaviour, and all downstream."""
        mode_of = dict(zip(self._mode_modules, training))
        sources = {node for node, mod in self._mode_nodes if mode_of[mod]}
        if any_training:
            sources.update(self._functional)
        if not sources:
            return set()
        tainted: set[fx.Node] = set()
        for node in self.graph.nodes:
            if node in sources or any(a in tainted for a in node.all_input_nodes):
                tainted.add(node)
        return tainted


class CDEPPenalty:
    """The CDEP image penalty for a model, traced once.

    >>> penalty = CDEPPenalty(model)
    >>> for x, y, masks in loader:               # masks: what must not matter, per example
    ...     opt.zero_grad()
    ...     loss = F.cross_entropy(model(x), y) + lam * penalty(x, masks)
    ...     loss.backward(); opt.step()

    The penalty rides on the model's forward: ``penalty(x, masks)`` right after ``model(x)``
    on the same tensor ``x`` reuses that forward's activations (``ForwardRecorder``: forward
    hooks, checked to be the same input and parameter versions, and eval-equivalent), so it
    adds one relevant pass and no second true pass. ``forward_with_penalty`` returns the
    logits and the penalty from one pass (one weight application per layer for both) for a
    model that behaves the same in train and eval mode (no dropout, no batchnorm)::

    ...     logits, pen = penalty.forward_with_penalty(x, masks)
    ...     loss = F.cross_entropy(logits, y) + lam * pen

    CD is defined on eval behaviour, so the penalty runs the model in eval mode (dropout
    off, batchnorm with running statistics) whatever mode the model is in; the model's own
    mode is left as it was. Activations of a train-mode forward that eval behaviour would
    not give (after a dropout or batchnorm in training mode) are not reused: the penalty
    computes those layers again in eval behaviour.

    backend: ``"paired"`` (default; batch evaluation in pure torch with the low-memory
    autograd rules), ``"engine"`` (one ``Decomposer`` call per image: uses the compiled
    ops when they are built, slower for large batches) or ``"reference"`` (relevant and
    irrelevant parts propagated separately, one image and mask at a time: the oracle).
    fuse: the element-wise work of every conv/linear layer as ``torch.compile``'d loops
    (default; falls back to the plain formulas, same numbers, where compiling fails).
    reuse_forward: record the model's forward with hooks and reuse it (default; the hooks
    cost a few microseconds a module and keep nothing alive beyond the next forward or
    penalty call; ``remove_hooks()`` removes them).
    rules: the rule set (``fastacd.rules.RuleSet``; default ``fastacd.rules.DEFAULT``). Every
    node runs its rule's paired form (``Rule.paired_total`` / ``paired_relevant``), so a rule
    added to a set needs nothing here.
    """

    BACKENDS = ("paired", "engine", "reference", "straightforward")

    def __init__(self, model: nn.Module, backend: str = "paired", reduction: str = "mean",
                 low_memory: bool = True, use_compiled: bool = False, fuse: bool = True,
                 reuse_forward: bool = True, rules: rules_.RuleSet | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.model, self.backend, self.reduction = model, backend, reduction
        self.low_memory, self.use_compiled, self.fuse = low_memory, use_compiled, fuse
        with eval_mode(model):
            self.graph = CapturedGraph(model, rules_.resolve(rules))
        self._decomposer: Decomposer | None = None
        self._recorder = ForwardRecorder(model, self.graph) if reuse_forward else None

    def remove_hooks(self) -> None:
        """Stop recording the model's forward (``reuse_forward=False`` from now on)."""
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

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
            check_hooks(self.model)  # one added since the capture would be missed
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
        forward = self._recorder.take(x) if self._recorder is not None else None
        if self.backend == "paired":
            return paired_cd(self.graph, x, r0, low_memory=self.low_memory,
                             use_compiled=self.use_compiled, fuse=self.fuse, forward=forward)
        if self.backend == "straightforward":
            return straightforward_cd(self.graph, x, r0)
        if self.backend == "engine":
            if self._decomposer is None:
                self._decomposer = Decomposer(self.model, backend="auto", rules=self.graph.rules, zero_tol=0)
                self._decomposer.graph = self.graph
            dec = self._decomposer
            rows = [dec.cd_relevant_input(x[i:i + 1], r0[i::n]) for i in range(n)]
            rel = torch.stack([res.relevant for res in rows], 1)  # (K, N, *out)
            out = torch.stack([res.output for res in rows])
            return rel.reshape((k * n,) + tuple(out.shape[1:])), out
        pairs = [propagate_graph(self.graph, r0[j:j + 1], x[j % n:j % n + 1] - r0[j:j + 1], zero_tol=0)
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
                                 pool_indices=pools, zero_tol=0)
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
        check_computed_parts(self.lstm, self.head)
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

"""The fused CD ops: thin wrappers over ``torch.ops.fastacd.*`` (the compiled extension
``fastacd._C``), with the pure-torch formulas of :mod:`fastacd.ops.torch_ops` as fallback.

Each function has the signature of its ``torch_ops`` twin. It runs the compiled kernel
when the extension is built and has a kernel for the tensor's device and dtype (CPU:
float32/float64; CUDA: float32/float64/float16/bfloat16, on a GPU whose compute capability
the build targeted), and the pure-torch formula otherwise, so callers never special-case
devices. Floating inputs of different dtypes are promoted as torch promotes them (float32
parameters with bfloat16 activations under ``torch.autocast``, say). Below each wrapper: its
fake (meta) kernel for ``torch.compile``, and its autograd, whose backward is a compiled op
of its own.

``HAS_COMPILED`` says whether the extension imported; ``build_info()`` describes it.
``float32_precision`` / ``tf32_enabled`` (``precision.py``) keep float32 convolutions exact.
"""
from __future__ import annotations

import contextlib
import functools
import re
import warnings
import weakref

import torch

from . import torch_ops as _torch_ops
from .kept import kept, tensor_state  # noqa: F401
from .precision import (PRECISIONS, WeightMode, fast_bf16, float32_precision, low_precision,  # noqa: F401
                        low_matmul, tf32_enabled, transpose_cast, weight_apply)

try:
    from .. import _C  # loading the library registers torch.ops.fastacd.*
    HAS_COMPILED = True
    _IMPORT_ERROR = None
except ImportError as exc:  # not built (or built against another torch): pure torch
    _C = None
    HAS_COMPILED = False
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_OP_NAMES = ("bias_split", "bias_split_window_", "bn_split", "maxpool_gather", "window_gather", "lstm_cd_cell",
             "winograd_conv3x3", "transpose_cast")


def _has_kernel(op: str, key: str) -> bool:
    return HAS_COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastacd::{op}", key)


# (device type, dtype) pairs with a compiled kernel, fixed at import.
_KERNEL_TYPES = frozenset(
    ([("cpu", d) for d in (torch.float32, torch.float64)] if _has_kernel("bias_split", "CPU") else [])
    + ([("cuda", d) for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)]
       if _has_kernel("bias_split", "CUDA") else []))


def _compiled(t: torch.Tensor) -> bool:
    """Whether the compiled kernel handles ``t``'s device and dtype. Read at call time, so
    setting ``fastacd.ops.HAS_COMPILED = False`` forces the pure-torch path."""
    if not (HAS_COMPILED and (t.device.type, t.dtype) in _KERNEL_TYPES):
        return False
    return t.device.type != "cuda" or _cuda_kernels_fit(t.device)


# --------------------------------------------------------------------------- GPU capability

def _parse_archs(tag: str) -> list[tuple[str, int, str]]:
    """The build's CUDA targets, ``_C.cuda_archs`` ("sm80_compute90_sm90": machine code for
    8.0 and 9.0, PTX of 9.0), as (kind, number, suffix): ("sm", 80, ""), ("compute", 90, "").
    Also reads the older form "80_90ptx"."""
    out = []
    for word in tag.replace(";", "_").split("_"):
        m = re.fullmatch(r"(sm|compute)?(\d+)([af]?)(ptx)?", word)
        if m:
            out.append((m[1] or "sm", int(m[2]), m[3]))
            if m[4]:
                out.append(("compute", int(m[2]), m[3]))
    return out


def kernel_image_fits(archs: list[tuple[str, int, str]], capability: tuple[int, int]) -> bool:
    """Whether a GPU of ``capability`` (major, minor) can run a build with ``archs``: machine
    code of the same major version and a minor one not above the GPU's, or PTX of an arch not
    above the GPU's, which the driver compiles at load time ("a" targets: that arch only;
    "f": its family)."""
    major, minor = capability
    cc = 10 * major + minor
    for kind, num, suffix in archs:
        if suffix == "a":
            ok = num == cc
        elif kind == "sm" or suffix == "f":
            ok = num // 10 == major and num % 10 <= minor
        else:  # plain PTX
            ok = num <= cc
        if ok:
            return True
    return False


def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_name(index: int) -> str:
    try:
        return torch.cuda.get_device_name(index)
    except Exception:  # noqa: BLE001 - only for the message
        return f"cuda:{index}"


_CUDA_FITS: dict[int, bool] = {}  # device index -> whether the CUDA kernels run there


def _cuda_kernels_fit(device: torch.device) -> bool:
    """Whether the compiled CUDA kernels have an image for ``device``, cached per device; the
    first time they do not, one warning, and the pure-torch formulas run there."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    fits = _CUDA_FITS.get(index)
    if fits is None:
        tag = str(getattr(_C, "cuda_archs", "none"))
        capability = tuple(_device_capability(index))
        fits = kernel_image_fits(_parse_archs(tag), capability)
        _CUDA_FITS[index] = fits
        if not fits:
            warnings.warn(
                f"fastacd: the compiled CUDA kernels (built for {tag.replace('_', ', ')}) have no kernel "
                f"image for {_device_name(index)} (compute capability {capability[0]}.{capability[1]}); "
                f"the pure-torch formulas run there instead (slower). Rebuild with "
                f"TORCH_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" to compile for it "
                f"(docs/kernels.md, On GPUs).", RuntimeWarning, stacklevel=4)
    return fits


# --------------------------------------------------------------------------- dtype promotion

def _promoted(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in their promoted dtype (``torch.promote_types``), as the pure-torch
    formulas compute them: under ``torch.autocast`` a conv output is bfloat16 and its bias
    float32, and the kernels need one dtype."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _like(out: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For the in-place ops: the other inputs cast to the dtype of the tensor written into
    (the split then runs in that dtype's accumulation type, float32 for bfloat16)."""
    return tuple(t if t.dtype == out.dtype else t.to(out.dtype) for t in tensors)


def _tol_for(tol: torch.Tensor | None, total: torch.Tensor) -> torch.Tensor | None:
    """The split ops' ``tol`` as the kernels take it: ``total``'s dtype (a threshold does not
    promote the split's dtype, as in the formulas, where it is only compared with) and shape
    (a broadcastable one, such as one threshold per channel, is expanded; the kernels read
    one per element)."""
    if tol is None:
        return None
    if tol.dtype != total.dtype:
        tol = tol.to(total.dtype)
    return tol if tol.shape == total.shape else tol.expand(total.shape)


def _check(cond: bool, op: str, msg: str) -> None:
    # Fake kernels check shapes too, so torch.compile reports bad input when tracing.
    torch._check(cond, lambda: f"fastacd::{op}: {msg}")


def _check_same_device(op: str, *named) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        _check(t.device == first.device, op, f"{name} is on {t.device} but {first_name} is on "
               f"{first.device}. Move all arguments to one device.")


def _check_rel_total(op: str, rel, rel_name: str, total, total_name: str) -> None:
    _check(rel.dim() >= 2, op, f"{rel_name} must be (M, C, *S) with at least 2 dims, got {tuple(rel.shape)}")
    _check(total.dim() == rel.dim() and total.shape[0] == 1 and total.shape[1:] == rel.shape[1:], op,
           f"{total_name} must have shape (1, C, *S) matching {rel_name} {tuple(rel.shape)}, "
           f"got {tuple(total.shape)}.")


def _check_channel_vector(op: str, p, name: str, channels) -> None:
    _check(p.dim() == 1 and p.shape[0] == channels, op,
           f"{name} must have shape (C,) = ({channels},), got {tuple(p.shape)}.")


# --------------------------------------------------------------------------- channels_last

def nhwc(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-d map stored channels_last (and not also plainly contiguous, as a
    map with C == 1 or H * W == 1 is): the split ops then run on its (M, H*W*C) rows."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _nhwc_rows(t: torch.Tensor) -> torch.Tensor:
    """A (1, C, H, W) map as (1, H*W*C) rows: a view if it is channels_last, else a kept copy."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(1, -1)
    return kept(t, "rows", lambda u: u.permute(0, 2, 3, 1).reshape(1, -1))


def _rows(rel: torch.Tensor, total: torch.Tensor, *vectors: torch.Tensor):
    """A channels_last (M, C, H, W) map as the linear layout's rows: rel (M, H*W*C) (a view),
    total (1, H*W*C) (``_nhwc_rows``) and each per-channel vector repeated over the positions
    (one map's worth each, kept)."""
    m, c, h, w = rel.shape
    return ((rel.permute(0, 2, 3, 1).reshape(m, -1), _nhwc_rows(total))
            + tuple(kept(v, ("repeat", h * w), lambda u: u.repeat(h * w)) for v in vectors))


def _unrows(out: torch.Tensor, shape) -> torch.Tensor:
    m, c, h, w = shape
    return out.view(m, h, w, c).permute(0, 3, 1, 2)


def _row_tol(tol: torch.Tensor | None) -> torch.Tensor | None:
    """A (1, C, H, W) tolerance map in the rows form of ``_rows``."""
    return None if tol is None else _nhwc_rows(tol)


def _check_tol(op: str, tol, total, total_name: str) -> None:
    if tol is not None:
        _check(tol.shape == total.shape, op, f"tol must have the shape of {total_name} {list(total.shape)} (one "
               f"threshold per element), got {list(tol.shape)}. Broadcast it to that shape or pass None.")


# --------------------------------------------------------------------------- bias_split

def bias_split(rel_pre: torch.Tensor, total_pre: torch.Tensor, bias: torch.Tensor,
               relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """Relevant output of a conv/linear layer for M masks (the bias split, then ReLU if asked).

    rel_pre (M, C, *S) = W r without bias; total_pre (1, C, *S) = W a without bias;
    bias (C,). Returns (M, C, *S). Linear layers pass (M, F), (1, F), (F,).
    tol: None, or thresholds broadcastable to total_pre's shape: a part (``|zr|``,
    ``|total_pre - zr|``) below its threshold counts as zero in the split ratio (design.md
    section 9); no gradient flows to it.
    """
    rel_pre, total_pre, bias = _promoted(rel_pre, total_pre, bias)
    tol = _tol_for(tol, total_pre)
    if _compiled(rel_pre) and nhwc(rel_pre):  # keep channels_last: the kernel's rows form
        return _unrows(torch.ops.fastacd.bias_split.default(*_rows(rel_pre, total_pre, bias), relu, _row_tol(tol)),
                       rel_pre.shape)
    if _compiled(rel_pre):
        return torch.ops.fastacd.bias_split.default(rel_pre, total_pre, bias, relu, tol)
    return _torch_ops.bias_split(rel_pre, total_pre, bias, relu, tol)


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::bias_split")
    def _bias_split_fake(rel_pre, total_pre, bias, relu=False, tol=None):
        op = "bias_split"
        _check_same_device(op, ("rel_pre", rel_pre), ("total_pre", total_pre), ("bias", bias),
                           *([("tol", tol)] if tol is not None else []))
        _check_rel_total(op, rel_pre, "rel_pre", total_pre, "total_pre")
        _check_channel_vector(op, bias, "bias", rel_pre.shape[1])
        _check_tol(op, tol, total_pre, "total_pre")
        return rel_pre.new_empty(rel_pre.shape)

    @torch.library.register_fake("fastacd::bias_split_backward")
    def _bias_split_backward_fake(grad, rel_pre, total_pre, bias, relu, tol=None):
        return rel_pre.new_empty(rel_pre.shape), total_pre.new_empty(total_pre.shape), bias.new_empty(bias.shape)

    def _bias_split_setup(ctx, inputs, output):
        rel_pre, total_pre, bias, relu, tol = inputs  # (defaults filled in by torch.library)
        ctx.relu = relu
        ctx.save_for_backward(rel_pre, total_pre, bias, tol)

    def _bias_split_backward(ctx, grad):
        rel_pre, total_pre, bias, tol = ctx.saved_tensors
        g_rel, g_total, g_bias = torch.ops.fastacd.bias_split_backward.default(
            grad, rel_pre, total_pre, bias, ctx.relu, tol)
        return g_rel, g_total, g_bias, None, None  # tol: a threshold, no gradient

    torch.library.register_autograd("fastacd::bias_split", _bias_split_backward, setup_context=_bias_split_setup)


def bias_split_(rel_pre: torch.Tensor, total_pre: torch.Tensor, bias: torch.Tensor,
                relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """``bias_split`` written into ``rel_pre`` (contiguous) and returned; inference only (no
    autograd). On the CPU it saves the page faults of a fresh (M, C, *S) output."""
    total_pre, bias = _like(rel_pre, total_pre, bias)
    tol = _tol_for(tol, total_pre)
    if _compiled(rel_pre):
        if nhwc(rel_pre):  # written through the rows view of the channels_last map
            torch.ops.fastacd.bias_split_.default(*_rows(rel_pre, total_pre, bias), relu, _row_tol(tol))
            return rel_pre
        return torch.ops.fastacd.bias_split_.default(rel_pre, total_pre, bias, relu, tol)
    return _torch_ops.bias_split_(rel_pre, total_pre, bias, relu, tol)


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::bias_split_")
    def _bias_split_inplace_fake(rel_pre, total_pre, bias, relu=False, tol=None):
        _bias_split_fake(rel_pre, total_pre, bias, relu, tol)  # the same checks
        return rel_pre


def bias_split_window_(rel_pre: torch.Tensor, total_pre: torch.Tensor, bias: torch.Tensor, oy: torch.Tensor,
                       ox: torch.Tensor, relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """``bias_split_`` of the windowed pass: rel_pre (M, C, h, w) (contiguous), each candidate's
    window values, against total_pre (and tol) (1, C, H, W) read at the window's corner oy, ox
    (M,) int64, which keeps it inside the map. Written into rel_pre and returned; inference
    only. The CPU kernel reads the total in place; elsewhere (no kernel: CUDA) the total is
    cropped first (``window_gather``), as the windowed pass did before."""
    total_pre, bias = _like(rel_pre, total_pre, bias)
    tol = _tol_for(tol, total_pre)
    if (rel_pre.device.type == "cpu" and _compiled(rel_pre) and rel_pre.is_contiguous()
            and _has_kernel("bias_split_window_", "CPU")):
        return torch.ops.fastacd.bias_split_window_.default(rel_pre, total_pre, bias, oy, ox, relu, tol)
    h, w = rel_pre.shape[2:]
    crops = [window_gather(t, None, None, None, oy, ox, h, w) for t in (total_pre, tol) if t is not None]
    m, c = rel_pre.shape[:2]
    fold = (1, m * c, h, w)  # masks folded into channels: the crops are per-mask totals
    bias_split_(rel_pre.reshape(fold), crops[0].reshape(fold), bias.repeat(m), relu,
                crops[1].reshape(fold) if tol is not None else None)
    return rel_pre


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::bias_split_window_")
    def _bias_split_window_fake(rel_pre, total_pre, bias, oy, ox, relu=False, tol=None):
        op = "bias_split_window_"
        _check(rel_pre.dim() == 4 and total_pre.dim() == 4 and total_pre.shape[0] == 1
               and total_pre.shape[1] == rel_pre.shape[1], op,
               f"rel_pre must be (M, C, h, w) and total_pre (1, C, H, W), got {tuple(rel_pre.shape)} "
               f"and {tuple(total_pre.shape)}")
        _check(tuple(oy.shape) == tuple(ox.shape) == (rel_pre.shape[0],), op, "oy, ox must be (M,)")
        return rel_pre


# --------------------------------------------------------------------------- bn_split

def bn_split(rel: torch.Tensor, total: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """Relevant output of an eval batchnorm ``scale * a + shift`` for M masks (then ReLU if asked).

    rel (M, C, *S), total (1, C, *S), scale and shift (C,). Returns (M, C, *S).
    tol: None, or thresholds broadcastable to total's shape: a part (``|s r|``, ``|s i|``)
    below its threshold counts as zero in the split ratio; no gradient flows to it.
    """
    rel, total, scale, shift = _promoted(rel, total, scale, shift)
    tol = _tol_for(tol, total)
    if _compiled(rel) and nhwc(rel):  # keep channels_last: the kernel's rows form
        return _unrows(torch.ops.fastacd.bn_split.default(*_rows(rel, total, scale, shift), relu, _row_tol(tol)),
                       rel.shape)
    if _compiled(rel):
        return torch.ops.fastacd.bn_split.default(rel, total, scale, shift, relu, tol)
    return _torch_ops.bn_split(rel, total, scale, shift, relu, tol)


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::bn_split")
    def _bn_split_fake(rel, total, scale, shift, relu=False, tol=None):
        op = "bn_split"
        _check_same_device(op, ("rel", rel), ("total", total), ("scale", scale), ("shift", shift),
                           *([("tol", tol)] if tol is not None else []))
        _check_rel_total(op, rel, "rel", total, "total")
        _check_channel_vector(op, scale, "scale", rel.shape[1])
        _check_channel_vector(op, shift, "shift", rel.shape[1])
        _check_tol(op, tol, total, "total")
        return rel.new_empty(rel.shape)

    @torch.library.register_fake("fastacd::bn_split_backward")
    def _bn_split_backward_fake(grad, rel, total, scale, shift, relu, tol=None):
        return (rel.new_empty(rel.shape), total.new_empty(total.shape), scale.new_empty(scale.shape),
                shift.new_empty(shift.shape))

    def _bn_split_setup(ctx, inputs, output):
        rel, total, scale, shift, relu, tol = inputs  # (defaults filled in by torch.library)
        ctx.relu = relu
        ctx.save_for_backward(rel, total, scale, shift, tol)

    def _bn_split_backward(ctx, grad):
        rel, total, scale, shift, tol = ctx.saved_tensors
        g_rel, g_total, g_scale, g_shift = torch.ops.fastacd.bn_split_backward.default(
            grad, rel, total, scale, shift, ctx.relu, tol)
        return g_rel, g_total, g_scale, g_shift, None, None  # tol: a threshold, no gradient

    torch.library.register_autograd("fastacd::bn_split", _bn_split_backward, setup_context=_bn_split_setup)


def bn_split_(rel: torch.Tensor, total: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
              relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """``bn_split`` written into ``rel`` (contiguous) and returned; inference only (no
    autograd). The engine uses it on a conv output that no later step reads."""
    total, scale, shift = _like(rel, total, scale, shift)
    tol = _tol_for(tol, total)
    if _compiled(rel):
        if nhwc(rel):  # written through the rows view of the channels_last map
            torch.ops.fastacd.bn_split_.default(*_rows(rel, total, scale, shift), relu, _row_tol(tol))
            return rel
        return torch.ops.fastacd.bn_split_.default(rel, total, scale, shift, relu, tol)
    return _torch_ops.bn_split_(rel, total, scale, shift, relu, tol)


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::bn_split_")
    def _bn_split_inplace_fake(rel, total, scale, shift, relu=False, tol=None):
        _bn_split_fake(rel, total, scale, shift, relu, tol)  # the same checks
        return rel


# --------------------------------------------------------------------------- maxpool_gather

def maxpool_gather(rel: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Max-pool of M relevant maps at the argmax positions of the shared total.

    rel (M, C, *S); indices (1, C, *So) int64, flat positions into the spatial dims of rel
    (as ``max_pool{1,2,3}d(total, ..., return_indices=True)`` gives). Returns (M, C, *So).
    """
    if nhwc(rel) and indices.dim() == 4 and not (torch.is_grad_enabled() and rel.requires_grad):
        return _maxpool_gather_nhwc(rel, indices)
    if _compiled(rel):
        return torch.ops.fastacd.maxpool_gather.default(rel, indices)
    return _torch_ops.maxpool_gather(rel, indices)


def _maxpool_gather_nhwc(rel: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The gather on a channels_last map, staying channels_last: position p of channel c is
    element p * C + c of a mask's (H*W*C) row."""
    m, c, h, w = rel.shape
    ho, wo = indices.shape[2:]
    chan = torch.arange(c, device=indices.device)
    idx = (indices.permute(0, 2, 3, 1) * c + chan).reshape(1, -1)  # (1, Ho*Wo*C)
    out = rel.permute(0, 2, 3, 1).reshape(m, -1).gather(1, idx.expand(m, -1))
    return _unrows(out, (m, c, ho, wo))


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::maxpool_gather")
    def _maxpool_gather_fake(rel, indices):
        op = "maxpool_gather"
        _check_same_device(op, ("rel", rel), ("indices", indices))
        _check(indices.dtype == torch.int64, op, f"indices must be int64, got {indices.dtype}.")
        _check(rel.dim() >= 2, op, f"rel must be (M, C, *S) with at least 2 dims, got {tuple(rel.shape)}")
        _check(indices.dim() >= 2 and indices.shape[0] == 1 and indices.shape[1] == rel.shape[1], op,
               f"indices must have shape (1, C, *So) with C = {rel.shape[1]}, got {tuple(indices.shape)}.")
        return rel.new_empty((rel.shape[0],) + tuple(indices.shape[1:]))

    @torch.library.register_fake("fastacd::maxpool_gather_backward")
    def _maxpool_gather_backward_fake(grad, indices, rel_shape):
        return grad.new_empty(rel_shape)

    def _maxpool_gather_setup(ctx, inputs, output):
        rel, indices = inputs
        ctx.rel_shape = list(rel.shape)
        ctx.save_for_backward(indices)

    def _maxpool_gather_backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return torch.ops.fastacd.maxpool_gather_backward.default(grad, indices, ctx.rel_shape), None

    torch.library.register_autograd("fastacd::maxpool_gather", _maxpool_gather_backward,
                                    setup_context=_maxpool_gather_setup)


# --------------------------------------------------------------------------- window_gather

def window_gather(base: torch.Tensor, win: torch.Tensor | None, win_oy: torch.Tensor | None,
                  win_ox: torch.Tensor | None, oy: torch.Tensor, ox: torch.Tensor, h: int, w: int,
                  indices: torch.Tensor | None = None) -> torch.Tensor:
    """Every candidate's map of a node over an h x w window of its own (the windowed pass's
    gather; shapes and rule: ``fastacd._torch_ops.window_gather``).

    base (1, C, H, W); win (M, C, wh, ww) at corners win_oy, win_ox (M,) int64, or all three
    None; oy, ox (M,) int64; indices None (a crop, zero outside the map) or a max-pool's
    argmax (1, C, Ho, Wo) int64. Returns (M, C, h, w). Inference only: with autograd on and
    an input that requires grad, the pure-torch formula runs (it is differentiable).
    """
    if win is not None:
        base, win = _promoted(base, win)
    if _compiled(base) and not (torch.is_grad_enabled() and (base.requires_grad or (
            win is not None and win.requires_grad))):
        return torch.ops.fastacd.window_gather.default(base, win, win_oy, win_ox, oy, ox, h, w, indices)
    return _torch_ops.window_gather(base, win, win_oy, win_ox, oy, ox, h, w, indices)


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::window_gather")
    def _window_gather_fake(base, win, win_oy, win_ox, oy, ox, h, w, indices=None):
        op = "window_gather"
        named = [("base", base), ("oy", oy), ("ox", ox)]
        named += [(n, t) for n, t in (("win", win), ("win_oy", win_oy), ("win_ox", win_ox),
                                      ("indices", indices)) if t is not None]
        _check_same_device(op, *named)
        _check(base.dim() == 4 and base.shape[0] == 1, op, f"base must be one map (1, C, H, W), got "
               f"{tuple(base.shape)}.")
        _check(oy.dim() == 1, op, f"oy must be an int64 vector (M,), got shape {tuple(oy.shape)}.")
        m = oy.shape[0]
        for name, t in (("oy", oy), ("ox", ox)) + (((("win_oy", win_oy), ("win_ox", win_ox))
                                                   if win is not None else ())):
            _check(t.dtype == torch.int64 and t.dim() == 1 and t.shape[0] == m, op,
                   f"{name} must be an int64 vector (M,) with M = {m}, got {t.dtype} {tuple(t.shape)}.")
        _check((win is None) == (win_oy is None) == (win_ox is None), op,
               "pass win, win_oy and win_ox together (the candidates' windows and their corners) or none.")
        _check(win is None or (win.dim() == 4 and win.shape[:2] == (m, base.shape[1])), op,
               f"win must be (M, C, wh, ww) with M = {m} and C = {base.shape[1]}, got "
               f"{None if win is None else tuple(win.shape)}.")
        _check(indices is None or (indices.dtype == torch.int64 and indices.dim() == 4
                                   and indices.shape[:2] == (1, base.shape[1])), op,
               f"indices must be int64 (1, C, Ho, Wo) with C = {base.shape[1]}.")
        return base.new_empty((m, base.shape[1], h, w))


# --------------------------------------------------------------------------- transpose_cast
# (the wrapper is in precision.py, beside the bf16 casts that use it)

if HAS_COMPILED:
    @torch.library.register_fake("fastacd::transpose_cast")
    def _transpose_cast_fake(x, dtype, channels_last):
        _check(x.dim() == 4, "transpose_cast", f"x must be a 4-d map (N, C, H, W), got {x.dim()} dims.")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty_like(x, dtype=dtype, memory_format=fmt)


# --------------------------------------------------------------------------- lstm_cd_cell

def lstm_cd_cell(rel_gates: torch.Tensor, total_gates: torch.Tensor, bias: torch.Tensor,
                 out_gate: torch.Tensor, prev_rel_c: torch.Tensor, prev_total_c: torch.Tensor,
                 in_phrase: torch.Tensor, first_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step of CD (the reference ``cd_text`` cell rule) for M masks.

    rel_gates (M, 4H) and total_gates (1, 4H): gate pre-activations without bias, gates
    i, f, g, o; bias (4H,); out_gate (1, H) the true output gate (after sigmoid);
    prev_rel_c (M, H), prev_total_c (1, H) (unused on the first step); in_phrase (M,)
    0/1 (float, int or bool); first_step: no forget-gate term. Returns (rel_c, rel_h), (M, H).
    """
    rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c = _promoted(
        rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c)
    if _compiled(rel_gates):
        return torch.ops.fastacd.lstm_cd_cell.default(rel_gates, total_gates, bias, out_gate, prev_rel_c,
                                                      prev_total_c, in_phrase, first_step)
    return _torch_ops.lstm_cd_cell(rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c,
                                   in_phrase, first_step)


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::lstm_cd_cell")
    def _lstm_cd_cell_fake(rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase,
                           first_step):
        op = "lstm_cd_cell"
        _check_same_device(op, ("rel_gates", rel_gates), ("total_gates", total_gates), ("bias", bias),
                           ("out_gate", out_gate), ("prev_rel_c", prev_rel_c), ("prev_total_c", prev_total_c),
                           ("in_phrase", in_phrase))
        _check(prev_rel_c.dim() == 2, op, f"prev_rel_c must be (M, H), got {tuple(prev_rel_c.shape)}.")
        m, h = prev_rel_c.shape
        for name, t, shape in (("rel_gates", rel_gates, (m, 4 * h)), ("total_gates", total_gates, (1, 4 * h)),
                               ("bias", bias, (4 * h,)), ("out_gate", out_gate, (1, h)),
                               ("prev_total_c", prev_total_c, (1, h)), ("in_phrase", in_phrase, (m,))):
            _check(tuple(t.shape) == shape, op, f"{name} must have shape {shape} (M = {m}, H = {h} from "
                   f"prev_rel_c), got {tuple(t.shape)}.")
        return rel_gates.new_empty((m, h)), rel_gates.new_empty((m, h))

    @torch.library.register_fake("fastacd::lstm_cd_cell_backward")
    def _lstm_cd_cell_backward_fake(grad_c, grad_h, rel_gates, total_gates, bias, out_gate, prev_rel_c,
                                    prev_total_c, in_phrase, first_step):
        like = rel_gates.new_empty
        return (like(rel_gates.shape), like(total_gates.shape), like(bias.shape), like(out_gate.shape),
                like(prev_rel_c.shape), like(prev_total_c.shape), like(in_phrase.shape))

    def _lstm_cd_cell_setup(ctx, inputs, output):
        ctx.first_step = inputs[7]
        ctx.save_for_backward(*inputs[:7])

    def _lstm_cd_cell_backward(ctx, grad_c, grad_h):
        saved = ctx.saved_tensors
        grads = list(torch.ops.fastacd.lstm_cd_cell_backward.default(grad_c, grad_h, *saved, ctx.first_step))
        if not saved[6].is_floating_point():  # an int/bool in_phrase mask has no gradient
            grads[6] = None
        return (*grads, None)

    torch.library.register_autograd("fastacd::lstm_cd_cell", _lstm_cd_cell_backward,
                                    setup_context=_lstm_cd_cell_setup)


# --------------------------------------------------------------------------- 3x3 convolutions

# Winograd for float32 CPU 3x3 stride-1 convolutions with at least this many input and output
# channels; at fewer channels (and large maps) oneDNN's direct convolution is faster. F(4x4, 3x3)
# (36 multiply-adds per 4x4 outputs instead of 144) where it has at least WINOGRAD_F4_MIN_TILES
# tiles and fewer products than F(2x2, 3x3) (16 per 2x2): below that its 2.25x larger
# transformed weights, read once per call, cost more than the products it saves. Measured in
# docs/kernels.md, "Winograd".
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_F4_MIN_TILES = 32
# From 128 channels F(4x4) alone also wins, up to this many outputs per channel over the batch
# (1.25-2.1x); beyond, its transformed maps outgrow the caches and it loses (0.8-0.9x), and
# F(2x2) loses at 128 channels nearly everywhere.
WINOGRAD_F4_MIN_CHANNELS = 128
WINOGRAD_F4_MAX_OUTPUTS = 16384
_WINOGRAD = {"on": True}
_WINOGRAD_G = {2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
               4: ((1.0, 0.0, 0.0), (-1 / 3, -1 / 3, -1 / 3), (1 / 3, -1 / 3, 1 / 3),  # points 0, 1, -1, 2, -1/2
                   (1 / 15, 2 / 15, 4 / 15), (-16 / 15, 8 / 15, -4 / 15), (0.0, 0.0, 1.0))}


@contextlib.contextmanager
def direct_convolutions():
    """Within this scope ``conv2d`` never uses Winograd (every convolution is the vendor's)."""
    saved = _WINOGRAD["on"]
    _WINOGRAD["on"] = False
    try:
        yield
    finally:
        _WINOGRAD["on"] = saved


def winograd_weight(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """((tile+2)^2, C_in, C_out): ``G w G^T`` of a (C_out, C_in, 3, 3) weight for Winograd
    F(tile x tile, 3x3), tile 2 or 4, computed in float64."""
    if tile not in _WINOGRAD_G:
        raise ValueError(f"winograd_weight: tile must be 2 or 4, got {tile!r}")
    g = torch.tensor(_WINOGRAD_G[tile], dtype=torch.float64, device=weight.device)
    c_out, c_in = weight.shape[:2]
    # u[(a, b), i, o] = sum over k, l of g[a, k] g[b, l] w[o, i, k, l]: one matmul by kron(g, g)
    # that writes the output's layout (einsum took 3x as long: a transposing copy of its result)
    w = weight.detach().permute(2, 3, 1, 0).reshape(9, c_in * c_out).double()
    return (torch.kron(g, g) @ w).to(weight.dtype).reshape((tile + 2) ** 2, c_in, c_out)


def _winograd_weight_cached(weight: torch.nn.Parameter, tile: int) -> torch.Tensor:
    """``winograd_weight`` once per parameter and tile (``kept``)."""
    return kept(weight, ("winograd", tile), lambda w: winograd_weight(w, tile))


def winograd_tile(n: int, h_out: int, w_out: int) -> int:
    """The Winograd output tile (2 or 4) that needs the least time for n maps of h_out x w_out
    outputs at 256 channels and more."""
    t2 = n * -(-h_out // 2) * -(-w_out // 2)
    t4 = n * -(-h_out // 4) * -(-w_out // 4)
    return 4 if t4 >= WINOGRAD_F4_MIN_TILES and 36 * t4 < 16 * t2 else 2


def conv3x3_tile(n: int, channels: int, h_out: int, w_out: int) -> int:
    """What ``conv2d`` runs a 3x3 stride-1 float32 CPU convolution of n maps with as
    (``channels``: the fewer of its input and output channels): 4 or 2 (Winograd F(4x4) or
    F(2x2)), or 0 (oneDNN's direct convolution)."""
    if channels < WINOGRAD_F4_MIN_CHANNELS or h_out < 1 or w_out < 1:
        return 0
    tile = winograd_tile(n, h_out, w_out)
    if channels >= WINOGRAD_MIN_CHANNELS or (tile == 4 and n * h_out * w_out <= WINOGRAD_F4_MAX_OUTPUTS):
        return tile
    return 0


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d(t: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d(t, weight)`` without bias. A float32 CPU 3x3 stride-1 convolution of a
    parameter with >= ``WINOGRAD_MIN_CHANNELS`` channels each side (F(4x4) from
    ``WINOGRAD_F4_MIN_CHANNELS`` on small batches of maps), outside autograd, runs as
    Winograd F(2x2, 3x3) or F(4x4, 3x3) (``winograd_tile``; ``torch.ops.fastacd.winograd_conv3x3``;
    float32 rounding 2x and 8-20x the direct convolution's, docs/kernels.md); everything else is
    ``F.conv2d``."""
    if (_WINOGRAD["on"] and isinstance(weight, torch.nn.Parameter) and t.device.type == "cpu"
            and t.dtype == weight.dtype == torch.float32 and t.dim() == 4 and weight.shape[2:] == (3, 3)
            and groups == 1 and _pair(stride) == (1, 1) and _pair(dilation) == (1, 1)
            and not isinstance(padding, str)
            and not (torch.is_grad_enabled() and (t.requires_grad or weight.requires_grad))
            and _has_kernel("winograd_conv3x3", "CPU")):
        ph, pw = _pair(padding)
        tile = conv3x3_tile(t.shape[0], min(weight.shape[0], weight.shape[1]), t.shape[2] + 2 * ph - 2,
                            t.shape[3] + 2 * pw - 2)
        if tile:
            return torch.ops.fastacd.winograd_conv3x3.default(t, _winograd_weight_cached(weight, tile), ph, pw)
    return torch.nn.functional.conv2d(t, weight, None, stride, padding, dilation, groups)


if HAS_COMPILED:
    @torch.library.register_fake("fastacd::winograd_conv3x3")
    def _winograd_conv3x3_fake(x, u, pad_h, pad_w):
        return x.new_empty((x.shape[0], u.shape[2], x.shape[2] + 2 * pad_h - 2, x.shape[3] + 2 * pad_w - 2))


# --------------------------------------------------------------------------- build info

# --------------------------------------------------------------------------- CPU buffer reuse

@contextlib.contextmanager
def reuse_cpu_buffers(cap_bytes: int):
    """Within this scope, large CPU blocks (>= 1 MiB) that torch frees are kept by size and
    handed out again for the next request they fit (the smallest that does, if at most twice
    the request; at most ``cap_bytes`` held);
    leaving the outermost scope frees them. The engine opens one around its chunk loop, whose
    chunks allocate the same activations again and again: the page faults of getting them
    back from the system were 12% of VGG16's CD time (docs/kernels.md). Yields whether reuse
    is on (False without the extension, or if the allocator wrapper could not be installed);
    outside any scope torch's allocator is used unchanged."""
    on = HAS_COMPILED and _C.buffer_reuse_enter(int(cap_bytes))
    try:
        yield on
    finally:
        if on:
            _C.buffer_reuse_exit()


def buffer_reuse_stats() -> dict:
    """Counters of the CPU buffer reuse (open scopes, cached bytes and blocks, hits, misses)."""
    if not HAS_COMPILED:
        return {"open_scopes": 0, "cached_bytes": 0, "cached_blocks": 0, "hits": 0, "misses": 0}
    return _C.buffer_reuse_stats()


def build_info() -> dict:
    """What was compiled: the extension, its CUDA kernels, the ops and their kernels, flags."""
    info = {"compiled": HAS_COMPILED, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if not HAS_COMPILED:
        info.update(cuda_kernels=False, ops={}, import_error=_IMPORT_ERROR)
        return info
    info.update(
        cuda_kernels=bool(_C.with_cuda),
        ops={op: [key for key in ("CPU", "CUDA") if _has_kernel(op, key)] for op in _OP_NAMES},
        cuda_archs=_C.cuda_archs.replace("_", ";") if _C.with_cuda else None,
        cuda_devices=[dict(index=i, name=_device_name(i), capability=list(_device_capability(i)),
                           kernels_fit=bool(_C.with_cuda) and _cuda_kernels_fit(torch.device("cuda", i)))
                      for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        openmp=_C.openmp,
        cxx_compiler=_C.cxx_compiler,
        library=_C.__file__,
    )
    return info

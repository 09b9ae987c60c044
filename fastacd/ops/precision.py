"""Precision of the vendor libraries' convolutions and matrix products.

Reduced precision (``WeightMode``, ``weight_apply``: ``Decomposer(precision="bf16")``) is at
the end of this file; docs/precision.md has the measurements behind its boundary.

On Ampere and later GPUs, torch lets cuDNN run float32 convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32 = True``: ~1e-3 relative error), and
``torch.set_float32_matmul_precision("high")`` does the same for matrix products (and, on
the CPU, lets oneDNN use reduced precision). CD compares sums with heavy cancellation, so
fastacd's float32 default is exact IEEE float32: run the engine inside
``float32_precision("ieee")``; ``"tf32"`` is the explicit opt-in.

The flags are process-wide. torch has two APIs for them (``allow_tf32`` and, since 2.9, the
per-backend ``fp32_precision``) and raises when a legacy flag is read after the new API was
used, so the scope sets and restores through the legacy setters where they suffice and the
new API only for what they leave different.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings

import torch

MODES = ("ieee", "tf32")

# Every (backend, op) of the per-backend fp32_precision API ("cuda" holds cuDNN's conv and
# rnn and cuBLAS's matmul): a scope restores them all.
_KEYS = tuple((b, o) for b in ("generic", "cuda", "mkldnn") for o in ("all", "matmul", "conv", "rnn")
              if not (b == "generic" and o != "all"))


def _new_api() -> bool:
    return hasattr(torch._C, "_get_fp32_precision_getter")


def _get(backend: str, op: str) -> str:
    return torch._C._get_fp32_precision_getter(backend, op)


def _set(backend: str, op: str, value: str) -> None:
    torch._C._set_fp32_precision_setter(backend, op, value)


def _effective(backend: str, op: str) -> str:
    """The precision an op runs at: its own setting, else its backend's, else the global one."""
    for b, o in ((backend, op), (backend, "all"), ("generic", "all")):
        v = _get(b, o)
        if v != "none":
            return v
    return "ieee"


def _matmul_precision() -> str | None:
    """torch.get_float32_matmul_precision(), or None where the caller mixed the two APIs
    (torch then refuses to answer)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _legacy(which: str) -> bool | None:
    """The legacy allow_tf32 flag of cuBLAS ("matmul") or cuDNN, or None where torch refuses
    to answer (the caller mixed the two APIs)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32 if which == "matmul" else torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None


def tf32_enabled() -> dict:
    """Whether float32 convolutions (cuDNN) and matrix products (cuBLAS) on a GPU may run in
    TF32 under the current settings: ``{"conv": bool, "matmul": bool}``."""
    if not _new_api():
        return {"conv": bool(torch.backends.cudnn.allow_tf32),
                "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    mm = _effective("cuda", "matmul")
    if _get("cuda", "matmul") == "none" and _matmul_precision() not in (None, "highest"):
        mm = "tf32"
    return {"conv": _effective("cuda", "conv") == "tf32", "matmul": mm == "tf32"}


@contextlib.contextmanager
def float32_precision(mode: str = "ieee"):
    """Within this scope float32 convolutions and matrix products run in ``mode``: ``"ieee"``
    (exact float32, fastacd's default) or ``"tf32"`` (TF32 tensor cores on Ampere and later
    GPUs; the CPU's settings are left as they are). The previous settings come back on exit.
    Process-wide, not per thread.

    >>> with fastacd.ops.float32_precision():      # exact, whatever the caller set
    ...     res = dec.cd(x, masks)
    """
    if mode not in MODES:
        raise ValueError(f"float32 precision must be one of {MODES}, got {mode!r}")
    tf32 = mode == "tf32"
    if not _new_api():  # torch < 2.9: the legacy flags only
        saved = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = saved[0]
            torch.set_float32_matmul_precision(saved[1])
        return
    matmul_precision = _matmul_precision()
    cublas_tf32, cudnn_tf32 = _legacy("matmul"), _legacy("cudnn")
    saved = {key: _get(*key) for key in _KEYS}
    # Through the legacy setters where they can, so that code reading the legacy flags inside
    # the scope (torch.backends.cudnn.allow_tf32) gets an answer, not an error.
    if matmul_precision is not None:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")  # cuBLAS and oneDNN
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32  # conv and rnn
    for backend, op in (("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn")):
        if _effective(backend, op) != mode:  # e.g. a global "tf32" that "none" inherits
            _set(backend, op, mode)
    if not tf32:
        for op in ("matmul", "conv", "rnn"):
            if _effective("mkldnn", op) != "ieee":
                _set("mkldnn", op, "ieee")
    try:
        yield
    finally:
        # the legacy setters first (a new-API set, even of the same value, makes later legacy
        # reads raise), then whatever they did not bring back
        if matmul_precision is not None:
            torch.set_float32_matmul_precision(matmul_precision)
        elif cublas_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = cublas_tf32
        if cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        for key, value in saved.items():
            if _get(*key) != value:
                _set(*key, value)


# --------------------------------------------------------------------------- reduced precision
# ``Decomposer(model, precision=...)``: "float32" (exact IEEE float32, the default), "bf16"
# (weight applications in bfloat16, docs/precision.md) or "tf32" (TF32 tensor cores on CUDA).
PRECISIONS = ("float32", "bf16", "tf32")

_LOW: contextvars.ContextVar = contextvars.ContextVar("fastacd_low_precision", default=None)


class WeightMode:
    """How one Decomposer applies weights in its relevant passes: in ``dtype`` (bfloat16 for
    ``precision="bf16"``: the activation is cast on the way in and the product cast back to
    float32 on the way out, so the splits, the totals and every comparison stay float32) and,
    with ``channels_last``, with a 4-d convolution input in channels_last memory format (where
    oneDNN's AMX kernels and cuDNN's tensor-core kernels are fast; the maps then stay
    channels_last through the element-wise rules). Keeps a copy of each parameter in that
    dtype and layout (made again when the parameter changes in place)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True):
        self.dtype = dtype
        self.channels_last = channels_last
        self._weights: dict[int, tuple] = {}

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        if not isinstance(w, torch.nn.Parameter) or (torch.is_grad_enabled() and w.requires_grad):
            return self.cast(w)  # a computed weight (new each image) or one being trained
        # kept.tensor_state's tuple, written out: this module is also loaded on its own, without
        # its package (tests/test_cuda.py runs it in a bare interpreter)
        state = (object() if w.is_inference() else w._version, w.data_ptr(), w.dtype, w.device, w.shape)
        hit = self._weights.get(id(w))
        if hit is not None and hit[0] is w and hit[1] == state:
            return hit[2]
        low = self.cast(w.detach())
        self._weights[id(w)] = (w, state, low)
        return low

    def cast(self, t: torch.Tensor, image: bool = True) -> torch.Tensor:
        """``t`` in the low dtype; a 4-d ``image`` (N, C, H, W) also channels_last (not the
        (N, H, W, C) tokens a Linear reads: channels_last there made every product a strided
        batched matmul through copies, ConvNeXt's bf16 CD 5x slower than float32)."""
        if self.channels_last and image and t.dim() == 4:
            return transpose_cast(t, self.dtype, channels_last=True)
        return t.to(self.dtype)


_TRANSPOSE_CASTS = frozenset({(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)})
_TRANSPOSE_CAST_MIN = 4096  # values; below it the op's call costs more than torch's slower copy


@functools.cache
def _transpose_kernel() -> bool:
    """Whether the compiled CPU kernel is registered (fastacd._C loads before any call)."""
    return hasattr(torch.ops.fastacd, "transpose_cast") and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastacd::transpose_cast", "CPU")


def transpose_cast(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """``x.to(dtype, memory_format=torch.channels_last if channels_last else
    torch.contiguous_format)``: on the CPU, from NCHW-contiguous to channels_last (or back) in
    one blocked pass for float32 <-> bfloat16 (``torch.ops.fastacd.transpose_cast``;
    docs/kernels.md "Transposing casts"), torch's copy elsewhere and for any other input. The
    same values either way."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if (x.device.type == "cpu" and x.dim() == 4 and (x.dtype, dtype) in _TRANSPOSE_CASTS
            and x.numel() >= _TRANSPOSE_CAST_MIN
            and x.is_contiguous(memory_format=torch.contiguous_format if channels_last else torch.channels_last)
            and not x.is_contiguous(memory_format=fmt) and _transpose_kernel()
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return torch.ops.fastacd.transpose_cast.default(x, dtype, channels_last)
    return x.to(dtype, memory_format=fmt)


@contextlib.contextmanager
def low_precision(low: "WeightMode | None"):
    """Within this scope ``weight_apply`` / ``low_matmul`` run in ``low``'s dtype (None:
    exact float32). Per thread / task (a context variable), unlike ``float32_precision``."""
    token = _LOW.set(low)
    try:
        yield
    finally:
        _LOW.reset(token)


def current_low_precision() -> "WeightMode | None":
    return _LOW.get()


def weight_apply(fn, t: torch.Tensor, weight: torch.Tensor, *args, nchw_out: bool = False,
                 **kwargs) -> torch.Tensor:
    """``fn(t, weight, *args, **kwargs)`` (a conv or linear without bias), in bfloat16 inside a
    ``low_precision`` scope (float32 in, float32 out), exact otherwise. ``nchw_out``: a 4-d
    output comes back NCHW, not channels_last (the windowed pass's crops: docs/precision.md)."""
    low = _LOW.get()
    if low is None or t.dtype != torch.float32 or weight.dtype != torch.float32:
        return fn(t, weight, *args, **kwargs)
    out = fn(low.cast(t, image=weight.dim() == 4), low.weight(weight), *args, **kwargs)
    if nchw_out and out.dim() == 4:
        return transpose_cast(out, torch.float32, channels_last=False)
    return out.to(torch.float32)


def low_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)``, in bfloat16 inside a ``low_precision`` scope (attention's
    ``P @ v``: both factors are cast, the product comes back float32)."""
    low = _LOW.get()
    if low is None or a.dtype != torch.float32 or b.dtype != torch.float32:
        return torch.matmul(a, b)
    return torch.matmul(a.to(low.dtype), b.to(low.dtype)).to(torch.float32)


_WARNED: set = set()


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` has a fast bfloat16 path for convolutions and matrix products, and
    why not: CUDA compute capability >= 8.0 (Ampere: bf16 tensor cores); a CPU with oneDNN and
    AMX or AVX512-BF16 (read from /proc/cpuinfo's flags where torch does not say)."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return cap >= (8, 0), f"compute capability {cap[0]}.{cap[1]} < 8.0 (no bf16 tensor cores)"
    if device.type != "cpu":
        return False, f"no known bf16 path on {device.type}"
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN (mkldnn)"
    flags = _cpu_flags()
    if flags is None:
        return True, ""  # cannot tell: do not warn
    if flags & {"amx_bf16", "avx512_bf16"}:
        return True, ""
    return False, "the CPU has neither AMX-BF16 nor AVX512-BF16 (oneDNN emulates bf16: slower than float32)"


def _cpu_flags() -> set | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

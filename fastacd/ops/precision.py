"""Float32 precision of the vendor libraries' convolutions and matrix products.

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

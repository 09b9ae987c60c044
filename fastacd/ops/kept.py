"""Tensors derived from a tensor, kept while it is unchanged (``kept``), and the state that
says whether it is (``tensor_state``)."""
from __future__ import annotations

import weakref

import torch


def tensor_state(t: torch.Tensor) -> tuple:
    """What tells a tensor's values unchanged: the version sees in-place writes, the data
    pointer, dtype, device and shape see ``.data`` replaced (no version bump; ``model.double()``
    keeps the Parameter objects). An inference tensor (made under ``torch.inference_mode``) has
    no version: its state equals no other, so nothing derived from it is reused."""
    return (object() if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device, t.shape)


_KEPT: dict = {}  # (id(tensor), tag) -> (weak ref, its state, derived tensor)


def kept(t: torch.Tensor, tag, make):
    """``make(t)``, made once per tensor and ``tag`` while ``t`` lives with the same
    ``tensor_state``. Winograd's transformed weights, and the rows forms of a total, its
    tolerance and a bias, which every split of every chunk of a pass reads (docs/precision.md,
    "channels_last"). Not kept where autograd records (a kept tensor would carry the first
    call's graph)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return make(t)
    key, state = (id(t), tag), tensor_state(t)
    hit = _KEPT.get(key)
    if hit is not None and hit[0]() is t and hit[1] == state:
        return hit[2]
    out = make(t)
    _KEPT[key] = (weakref.ref(t, lambda _, k=key: _KEPT.pop(k, None)), state, out)
    return out

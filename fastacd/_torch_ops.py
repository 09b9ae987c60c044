"""Pure-torch definitions of the fused CD element-wise ops.

These are the formulas of design.md section 2, batched over M masks, written once
in torch. They are (1) the ``torch`` backend of the engine, (2) the fallback when
the compiled extension is absent, and (3) the oracle the compiled ops
(``torch.ops.fastacd.*``) are tested against. Signatures match the compiled ops.

Shapes: ``M`` masks share one true activation (batch 1). Channel-wise parameters
broadcast over dim 1 (``C``); any trailing dims are spatial.
"""
from __future__ import annotations

import torch

EPS = 1e-20  # the reference's constant in the conv/linear bias split


def _channel_view(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector (C,) to broadcast along dim 1 of ``like``."""
    return p.reshape((1, -1) + (1,) * (like.dim() - 2))


def bias_split(rel_pre: torch.Tensor, total_pre: torch.Tensor, bias: torch.Tensor,
               relu: bool = False) -> torch.Tensor:
    """Relevant output of a conv/linear layer for M masks.

    rel_pre:   (M, C, *S)  W * r, no bias
    total_pre: (1, C, *S)  W * a, no bias (a = r + i, shared by all masks)
    bias:      (C,)
    Returns (M, C, *S): ``zr + pr * b`` with ``zi = total_pre - rel_pre`` and
    ``pr = (|zr| + eps) / ((|zr| + eps) + (|zi| + eps))``; followed by ``relu`` if asked
    (the ReLU rule's relevant part is ``relu(r)``).
    """
    zi = total_pre - rel_pre
    prop_rel = rel_pre.abs() + EPS
    prop_irrel = zi.abs() + EPS
    out = rel_pre + prop_rel / (prop_rel + prop_irrel) * _channel_view(bias, rel_pre)
    return out.clamp_min(0) if relu else out


def bn_split(rel: torch.Tensor, total: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             relu: bool = False) -> torch.Tensor:
    """Relevant output of an eval-mode batchnorm ``scale * a + shift`` for M masks.

    rel:   (M, C, *S) relevant input r
    total: (1, C, *S) true input a (i = a - r)
    scale, shift: (C,)
    Returns ``s*r + qr * shift`` with ``qr = |s r| / (|s r| + |s i|)`` and ``qr = 0``
    where that is 0/0 (no eps here, as in the reference); then ``relu`` if asked.
    """
    s = _channel_view(scale, rel)
    sr = s * rel
    si = s * (total - rel)
    denom = sr.abs() + si.abs()
    qr = torch.where(denom == 0, torch.zeros_like(denom), sr.abs() / denom)
    out = sr + qr * _channel_view(shift, rel)
    return out.clamp_min(0) if relu else out


def maxpool_gather(rel: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Max-pool of M relevant maps at the argmax positions of the shared total.

    rel:     (M, C, H, W) (or (M, C, L) for 1-d pooling)
    indices: (1, C, Ho, Wo) int64, flat positions into H*W as returned by
             ``max_pool2d(total, ..., return_indices=True)``
    Returns (M, C, Ho, Wo).
    """
    m, c = rel.shape[:2]
    flat = rel.reshape(m, c, -1)
    idx = indices.reshape(1, c, -1).expand(m, c, -1)
    return flat.gather(2, idx).reshape((m, c) + tuple(indices.shape[2:]))

"""Traceable forwards of torch.nn modules whose own forward cannot be traced by torch.fx.

``nn.TransformerEncoder`` and ``nn.TransformerEncoderLayer`` choose between a fused fast path
and the plain computation with Python checks on their input (``src.dim()``,
``src.is_nested``, mask dtypes) that a symbolic trace cannot evaluate. Their plain path (the
"slow path": self-attention, dropout, add, LayerNorm, feed-forward) is written here with the
same submodule calls in the same order, and the capture tracer traces it instead of the
module's ``forward``: the graph then holds ``nn.MultiheadAttention``, ``nn.LayerNorm``,
``nn.Linear``, the activation and the adds, each decomposed by its own rule.

The fast path computes the same function (a fused kernel, equal up to float rounding),
except that with ``enable_nested_tensor`` and a key padding mask it returns zeros at the
padded positions where the plain path computes them: the traced graph follows the plain
path (``torch.backends.mha.set_fastpath_enabled(False)`` makes the module do the same).
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn


def encoder_layer_forward(mod: nn.TransformerEncoderLayer, src, src_mask=None,
                          src_key_padding_mask=None, is_causal: bool = False):
    """``nn.TransformerEncoderLayer``'s plain path (masks go to the attention as given: it
    converts a boolean mask to -inf / 0 as the layer would)."""
    x = src
    if mod.norm_first:
        x = x + mod._sa_block(mod.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        x = x + mod._ff_block(mod.norm2(x))
    else:
        x = mod.norm1(x + mod._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        x = mod.norm2(x + mod._ff_block(x))
    return x


def encoder_forward(mod: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None,
                    is_causal=None):
    """``nn.TransformerEncoder``'s plain path: the layers in turn, then the final norm."""
    output = src
    for layer in mod.layers:
        output = layer(output, src_mask=mask, is_causal=is_causal is True,
                       src_key_padding_mask=src_key_padding_mask)
    if mod.norm is not None:
        output = mod.norm(output)
    return output


TRACED_FORWARDS: dict[type, Callable] = {
    nn.TransformerEncoderLayer: encoder_layer_forward,
    nn.TransformerEncoder: encoder_forward,
}


def traced_forward(module: nn.Module) -> Callable | None:
    """The forward to trace for this module (None: its own). Subclasses with a forward of
    their own keep theirs."""
    typ = type(module)
    for cls, fn in TRACED_FORWARDS.items():
        if isinstance(module, cls) and typ.forward is cls.forward:
            return fn
    return None

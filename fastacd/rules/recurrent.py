"""The LSTM rule (design.md section 2): gates split with the three-player rule, the bias's
share ``f(c)``, the output gate from the full input, ``tanh`` of the cell split in two.

``propagate_three`` and ``propagate_tanh_two`` are the reference forms (the original's names,
re-exported at the top level); ``lstm_cell_reference`` is one step of the cell with both
parts propagated; ``cell_fn`` the batched form: the fused cell op for M masks
(``fastacd.ops.lstm_cd_cell``, formulas in ``fastacd.ops.torch_ops``).
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import ops
from ..ops import torch_ops


def propagate_three(a, b, c, act):
    """Three-player split of ``act(a + b + c)``: shares of a, b and of c (the bias)."""
    a_share = 0.5 * (act(a + c) - act(c) + act(a + b + c) - act(b + c))
    b_share = 0.5 * (act(b + c) - act(c) + act(a + b + c) - act(a + c))
    return a_share, b_share, act(c)


def propagate_tanh_two(a, b):
    """Two-player split of ``tanh(a + b)``."""
    return (0.5 * (torch.tanh(a) + (torch.tanh(a + b) - torch.tanh(b))),
            0.5 * (torch.tanh(b) + (torch.tanh(a + b) - torch.tanh(a))))


def lstm_cell_reference(rel_gates, irrel_gates, bias, out_gate, rel_c, irrel_c, in_phrase: bool,
                        first: bool):
    """One LSTM step with both parts: gate pre-activations without bias ``(i, f, g)`` of each
    part (tuples), ``bias`` ``(b_i, b_f, b_g)``, the true output gate (sigmoid, from the full
    input), the previous cell parts. Returns (rel_c, irrel_c, rel_h, irrel_h). The
    bias-times-bias term goes to the relevant part inside the phrase (the reference's cd_text)."""
    (rel_i, rel_f, rel_g), (irrel_i, irrel_f, irrel_g), (b_i, b_f, b_g) = rel_gates, irrel_gates, bias
    rel_ci, irrel_ci, bias_ci = propagate_three(rel_i, irrel_i, b_i, torch.sigmoid)
    rel_cg, irrel_cg, bias_cg = propagate_three(rel_g, irrel_g, b_g, torch.tanh)
    new_rel_c = rel_ci * (rel_cg + bias_cg) + bias_ci * rel_cg
    new_irrel_c = irrel_ci * (rel_cg + irrel_cg + bias_cg) + (rel_ci + bias_ci) * irrel_cg
    if in_phrase:
        new_rel_c = new_rel_c + bias_ci * bias_cg
    else:
        new_irrel_c = new_irrel_c + bias_ci * bias_cg
    if not first:
        rel_cf, irrel_cf, bias_cf = propagate_three(rel_f, irrel_f, b_f, torch.sigmoid)
        new_rel_c = new_rel_c + (rel_cf + bias_cf) * rel_c
        new_irrel_c = new_irrel_c + (rel_cf + irrel_cf + bias_cf) * irrel_c + irrel_cf * rel_c
    new_rel_h, new_irrel_h = propagate_tanh_two(new_rel_c, new_irrel_c)
    return new_rel_c, new_irrel_c, out_gate * new_rel_h, out_gate * new_irrel_h


def cell_fn(backend: str) -> Callable:
    """The batched cell for M masks: the compiled op where built (``backend`` 'auto' or
    'compiled'), its pure-torch formulas for 'torch'."""
    if backend not in ("auto", "torch", "compiled"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'compiled', got {backend!r}")
    if backend == "torch":
        return torch_ops.lstm_cd_cell
    if ops.HAS_COMPILED:
        return ops.lstm_cd_cell
    if backend == "compiled":
        raise RuntimeError("backend='compiled' needs fastacd.ops.lstm_cd_cell from the built C++ "
                           "extension, which is not available; build it (`pip install "
                           "--no-build-isolation -e .`) or use backend='torch'")
    return torch_ops.lstm_cd_cell

"""CD for text models with an ``nn.GRU``: embedding -> GRU -> linear head, many phrases per call.

The GRU rule (docs/text.md, "The GRU rule"), by analogy with the LSTM's: the update gate z
and the candidate n are split with the three-player rule; the reset gate r is the true one
(context from the total, as the LSTM's output gate), so the candidate's pre-activation parts
are ``W_in x_part + r * W_hn h_part`` with ``b_in + r * b_hn`` as its bias; the update
``(1 - z) n + z h`` splits as the LSTM's ``i g + f c``. Formulas in
``fastacd.rules.recurrent`` (``gru_cell_reference``, ``gru_cd_cell``, ``GRUDirection``).

``GRUDecomposer`` is the ``TextDecomposer`` of a GRU (``TextDecomposer(embed, gru, head)``
and ``TextDecomposer.from_model`` give one): the same calls and results, the general
batched path (the true pass once per sentence, one GEMM and one cell per step for all M
masks, irrelevant = total - relevant); multi-layer and bidirectional as for the LSTM.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..capture.phrases import tokens_of
from ..rules.recurrent import GRUDirection, direction_weights
from .lstm import Sentence, TextDecomposer


class GRUDecomposer(TextDecomposer):
    """``TextDecomposer`` for ``head(readout(gru(embed(tokens))))`` (see its docstring).

    backend: ``"auto"`` or ``"torch"`` (the GRU cell is pure torch; there is no compiled GRU
    op and no one-layer fast path). ``prepare(..., keep_states=True)`` is accepted and has
    no effect.
    """

    def __init__(self, embed, rnn: nn.GRU, head: nn.Module | None = None, readout: str = "last",
                 dtype: torch.dtype | None = None, backend: str = "auto",
                 memory_budget: int | None = None):
        if not isinstance(rnn, nn.GRU):
            raise TypeError(f"rnn must be a torch.nn.GRU, got {type(rnn).__name__}")
        if backend not in ("auto", "torch"):
            raise ValueError(f"a GRU's backend must be 'auto' or 'torch' (its cell is pure torch), "
                             f"got {backend!r}")
        self._setup(embed, rnn, head, readout, dtype, memory_budget)
        self.backend = backend
        self._cell = None

    def prepare(self, tokens, keep_states: bool = False) -> Sentence:
        """Run the true GRU once on a sentence; reuse the result for any number of masks."""
        tokens = tokens_of(tokens, self.vocab_size)
        x = self.embed_tokens(tokens)
        T = x.shape[0]
        layers = []
        for layer in range(self.rnn.num_layers):
            dirs = [GRUDirection.total(x, *direction_weights(self.rnn, layer, d == 1, self.dtype),
                                       d == 1)
                    for d in range(self.num_directions)]
            layers.append(dirs)
            x = torch.cat([dd.h for dd in dirs], dim=1)
        feats = self._readout([dd.h.unsqueeze(0) for dd in layers[-1]], T)[0]
        return Sentence(tokens, layers, feats, None)

    def _run_direction(self, dd: GRUDirection, rel_in, mask, active, keep_sequence):
        return dd.relevant(rel_in, mask, active, keep_sequence)[0]


TextDecomposer.families[nn.GRU] = GRUDecomposer

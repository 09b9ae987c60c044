"""The original package's text entry points (``acd.cd_text``), on ``TextDecomposer``."""
from __future__ import annotations

import numpy as np
import torch

from ..capture.phrases import check_phrase
from .lstm import TextDecomposer


def _drop_in_decomposer(model) -> TextDecomposer:
    for a in ("embed", "lstm", "hidden_to_label"):
        if not hasattr(model, a):
            raise AttributeError(f"cd_text needs model.{a} (the original package's text model: "
                                 ".embed, .lstm, .hidden_to_label, .hidden_dim); for other models "
                                 "use fastacd.text.TextDecomposer(embed, lstm, head)")
    if model.lstm.num_layers != 1 or model.lstm.bidirectional:
        raise ValueError("cd_text follows the original: a one-layer unidirectional LSTM; use "
                         "TextDecomposer for multi-layer or bidirectional LSTMs")
    return TextDecomposer(model.embed, model.lstm, model.hidden_to_label, readout="last",
                          dtype=torch.float64)


def cd_text(batch, model, start, stop, return_irrel_scores=False):
    """Drop-in for ``acd.cd_text``: CD scores of the phrase ``start..stop`` (inclusive).

    ``batch.text`` is the sentence, (seq_len, 1) token ids; ``model`` has ``.embed``,
    ``.lstm`` (one layer), ``.hidden_to_label``. Returns a float64 numpy array of class
    scores ``hidden_to_label.weight @ h_relevant`` (no bias, as the original), and the
    irrelevant scores too when ``return_irrel_scores``.
    """
    dec = _drop_in_decomposer(model)
    with torch.no_grad():
        sent = dec.prepare(batch)
        start, stop = check_phrase(start, stop, sent.length)
        res = dec.cd(sent, phrases=[(start, stop)])
    scores = res.relevant[0].cpu().numpy()
    if return_irrel_scores:
        return scores, res.irrelevant[0].cpu().numpy()
    return scores


def cd_text_phrases(batch, model, phrases) -> tuple[np.ndarray, np.ndarray]:
    """``cd_text`` for many phrases in one call: (M, C) relevant and irrelevant float64 scores."""
    dec = _drop_in_decomposer(model)
    with torch.no_grad():
        res = dec.cd(batch, phrases=phrases)
    return res.relevant.cpu().numpy(), res.irrelevant.cpu().numpy()

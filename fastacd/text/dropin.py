"""The original package's text entry points (``acd.cd_text``), on ``TextDecomposer``."""
from __future__ import annotations

import numpy as np
import torch

from ..capture.phrases import original_phrase
from .lstm import TextDecomposer


def _drop_in_decomposer(model) -> TextDecomposer:
    """The original's text model (``.embed``, ``.lstm``, ``.hidden_to_label``; ``.lstm`` an
    ``nn.LSTM`` or ``nn.GRU``, read at the last position), or any model
    ``TextDecomposer.from_model`` reads; float64 like the reference."""
    if all(hasattr(model, a) for a in ("embed", "lstm", "hidden_to_label")):
        return TextDecomposer(model.embed, model.lstm, model.hidden_to_label, readout="last",
                              dtype=torch.float64)
    try:
        return TextDecomposer.from_model(model, dtype=torch.float64)
    except ValueError as exc:
        missing = [a for a in ("embed", "lstm", "hidden_to_label") if not hasattr(model, a)]
        raise AttributeError(
            f"cd_text needs model.{missing[0]} (the original package's text model: .embed, .lstm, "
            ".hidden_to_label, .hidden_dim) or a model fastacd.text.TextDecomposer.from_model can "
            f"read; this one: {exc}") from exc


def cd_text(batch, model, start, stop, return_irrel_scores=False):
    """Drop-in for ``acd.cd_text``: CD scores of the phrase ``start..stop`` (inclusive).

    ``batch.text`` is the sentence, (seq_len, 1) token ids; ``model`` has ``.embed``,
    ``.lstm`` (an ``nn.LSTM`` or ``nn.GRU``), ``.hidden_to_label``, or is any text model
    ``TextDecomposer.from_model`` reads. The phrase is the tokens i with
    ``start <= i <= stop``, as in the original: ``stop=len(sentence)`` reads to the end
    (``fastacd.capture.phrases.original_phrase``). Returns a float64 numpy array of class
    scores ``hidden_to_label.weight @ h_relevant`` (no bias, as the original), and the
    irrelevant scores too when ``return_irrel_scores``.
    """
    dec = _drop_in_decomposer(model)
    with torch.no_grad():
        sent = dec.prepare(batch)
        mask = original_phrase(start, stop, sent.length)
        if mask.any():
            pos = np.flatnonzero(mask)
            res = dec.cd(sent, phrases=[(int(pos[0]), int(pos[-1]))])
        else:
            res = dec.cd(sent, masks=torch.zeros(1, sent.length))
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

"""Reference text CD and 1-D agglomeration: one phrase at a time, the published arithmetic.

This is the oracle the batched engine (``fastacd.text``) and the fast agglomeration
(``fastacd.agg_1d``) are tested against. It follows the original ``acd`` package
(``cd_text``, ``agg_1d.agglomerate``) step by step, written in plain torch:

* relevant and irrelevant parts are propagated separately (no ``total - relevant``);
* every gate is split with the three-player rule, the bias-times-bias term goes to the
  relevant part inside the phrase; the output gate is computed from the full input;
* one phrase per call, in float64 (the original's numpy arithmetic is float64 too).

It also defines the rule for multi-layer and bidirectional LSTMs and for GRUs
(``rnn_cd``), which the original does not have: the same cell per layer and direction,
layer l > 0 taking the relevant / irrelevant output of layer l-1 as its relevant /
irrelevant input; the GRU cell is ``fastacd.rules.recurrent.gru_cell_reference``
(docs/text.md, "The GRU rule").
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from skimage import measure

from ..capture.phrases import original_phrase, tokens_of
from ..rules.recurrent import (gru_reference_direction, lstm_cell_reference,  # noqa: F401
                               lstm_reference_direction, propagate_tanh_two, propagate_three)


def rnn_cd(x: torch.Tensor, rnn: nn.Module, mask, readout: str = "last"):
    """Relevant and irrelevant parts of an LSTM's or GRU's readout features for one token mask.

    x: (T, E) word vectors; mask: (T,) 0/1, 1 where the token is relevant; readout:
    ``"last"`` (output at position T-1) or ``"final"`` (each direction's final state).
    Computed in float64. Returns two (F,) tensors.
    """
    if not isinstance(rnn, (nn.LSTM, nn.GRU)):
        raise TypeError(f"the reference has rules for nn.LSTM and nn.GRU, got {type(rnn).__name__}")
    dt = torch.float64
    in_phrase = [bool(v) for v in torch.as_tensor(mask).tolist()]
    x = x.to(dt)
    keep = torch.tensor(in_phrase, dtype=dt, device=x.device).unsqueeze(1)
    rel, irrel = x * keep, x * (1 - keep)  # a token's vector is wholly one or the other
    D = 2 if rnn.bidirectional else 1
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih = getattr(rnn, "weight_ih" + sfx).to(dt)
            w_hh = getattr(rnn, "weight_hh" + sfx).to(dt)
            if rnn.bias:
                b_ih, b_hh = getattr(rnn, "bias_ih" + sfx), getattr(rnn, "bias_hh" + sfx)
            else:
                b_ih = b_hh = torch.zeros(w_ih.shape[0], dtype=dt, device=x.device)
            if isinstance(rnn, nn.LSTM):
                # b_ih + b_hh summed in the model's dtype, as the original (numpy, float32)
                outs.append(lstm_reference_direction(rel, irrel, w_ih, w_hh, (b_ih + b_hh).to(dt),
                                                     in_phrase, reverse=d == 1)[:2])
            else:
                outs.append(gru_reference_direction(rel, irrel, w_ih, w_hh, b_ih.to(dt),
                                                    b_hh.to(dt), in_phrase, reverse=d == 1))
        rel = torch.cat([r for r, _ in outs], dim=1)
        irrel = torch.cat([i for _, i in outs], dim=1)
    T, H = x.shape[0], rnn.hidden_size
    if readout == "last" or D == 1:
        return rel[T - 1], irrel[T - 1]
    if readout != "final":
        raise ValueError(f"readout must be 'last' or 'final', got {readout!r}")
    return (torch.cat([rel[T - 1, :H], rel[0, H:]]), torch.cat([irrel[T - 1, :H], irrel[0, H:]]))


lstm_cd = rnn_cd  # the earlier name


def text_cd(embed, rnn: nn.Module, head: nn.Linear | None, tokens, mask, readout: str = "last"):
    """Reference CD of one token mask for embed -> LSTM / GRU -> readout -> linear head.

    Returns (relevant, irrelevant) float64 tensors: ``head.weight @`` each part of the head
    input, without the head's bias (as the original ``cd_text``); the parts themselves if
    ``head`` is None.
    """
    vocab = embed.num_embeddings if isinstance(embed, nn.Embedding) else None
    tokens = tokens_of(tokens, vocab).to(rnn.weight_ih_l0.device)
    mask = torch.as_tensor(mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask must be ({tokens.shape[0]},), got {tuple(mask.shape)}")
    with torch.no_grad():
        rel, irrel = rnn_cd(embed(tokens), rnn, mask, readout)
        if head is None:
            return rel, irrel
        w = head.weight.to(torch.float64)
        return w @ rel, w @ irrel


def cd_text(batch, model, start, stop, return_irrel_scores=False):
    """Reference ``acd.cd_text``: scores of the phrase ``start..stop`` (inclusive; the tokens
    i with ``start <= i <= stop``, so ``stop >= len`` reads to the end, as the original),
    float64 numpy, ``hidden_to_label.weight @ h`` without the bias. ``model.lstm`` may be an
    ``nn.GRU``."""
    tokens = tokens_of(batch, model.embed.num_embeddings
                       if isinstance(model.embed, nn.Embedding) else None)
    mask = torch.from_numpy(original_phrase(start, stop, tokens.shape[0]).astype(np.float64))
    rel, irrel = text_cd(model.embed, model.lstm, model.hidden_to_label, tokens, mask)
    if return_irrel_scores:
        return rel.cpu().numpy(), irrel.cpu().numpy()
    return rel.cpu().numpy()


# --------------------------------------------------------------------------- agglomeration


def _threshold(scores, percentile_include, absolute):
    """The original's ``threshold_scores``: at or above a percentile of the scores left."""
    if absolute:
        scores = np.absolute(scores)
    num_left = scores.size - np.sum(np.isnan(scores))
    # the last few words: fixed percentiles so that about half are picked
    percentile_include = {5: 59, 4: 49, 3: 59, 2: 49, 1: 0}.get(int(num_left), percentile_include)
    if num_left == 0:
        return np.zeros(scores.shape, dtype=bool)
    return scores >= np.nanpercentile(scores, percentile_include)


def _span_of(tile_mask):
    pos = np.flatnonzero(tile_mask)
    return int(pos[0]), int(pos[-1])


def agglomerate_1d(model, batch, percentile_include, method, sweep_dim, label, num_iters=5,
                   subtract=True, absolute=True, device=None):
    """Reference ``acd.agg_1d.agglomerate``: one phrase (or one tile) per model call.

    Same arguments and returned dict as the original. Differences from the original (none
    change a result on its supported inputs): the phrase of a CD tile is read from the
    tile's positions, not from its non-zero token ids; ``batch`` is not modified; only
    ``sweep_dim=1`` is accepted (the original crashes otherwise).
    """
    if method not in ("cd", "occlusion", "build_up"):
        raise ValueError(f"method must be 'cd', 'occlusion' or 'build_up', got {method!r}")
    if sweep_dim != 1:
        raise ValueError("1-D agglomeration supports sweep_dim=1 only (the original indexes "
                         "words by tile and fails for other values)")
    text = tokens_of(batch).cpu().numpy()
    L = text.shape[0]
    dev = device if device is not None else batch.text.device

    def model_scores(tile_masks):
        # the model on tiles: build_up keeps the tile's words (0 elsewhere), occlusion blanks them
        cols = []
        for m in tile_masks:
            if method == "occlusion":
                cols.append(np.where(m, 0, text))
            else:
                cols.append(np.where(m, text, 0))
        b = copy.copy(batch)
        b.text = torch.as_tensor(np.stack(cols, axis=1), dtype=torch.long, device=dev)
        with torch.no_grad():
            return model(b).detach().cpu().numpy()

    def get_scores(tile_masks, only_one, score_orig):
        if method == "cd":
            spans = [(0, L - 1)] if only_one else [_span_of(m) for m in tile_masks]
            scores = np.array([cd_text(batch, model, s, e) for s, e in spans])
        else:
            if only_one:
                b = copy.copy(batch)
                b.text = torch.as_tensor(text[:, None], dtype=torch.long, device=dev)
                with torch.no_grad():
                    scores = model(b).detach().cpu().numpy()
            else:
                scores = model_scores(tile_masks)
                if method == "occlusion":
                    scores = score_orig - scores
        if subtract:
            return scores[:, label] - scores[:, int(1 - label)]
        return scores[:, label]

    score_orig = get_scores(None, True, None)[0]
    singles = [np.arange(L) == i for i in range(L)]
    scores = get_scores(singles, False, score_orig)
    mask = _threshold(scores, percentile_include, absolute)
    scores_list, mask_list, comps_list = [np.copy(scores)], [mask], []
    comp_scores_list = [{0: score_orig}]
    for _ in range(num_iters):
        comps = np.copy(measure.label(mask_list[-1], background=0, connectivity=1))
        comp_scores = {}
        for num in range(1, np.max(comps) + 1):
            comp = comps == num
            pos = np.flatnonzero(comp)
            left, right = max(0, pos[0] - sweep_dim), min(L - 1, pos[-1] + sweep_dim)
            tiles = [comp, comp | (np.arange(L) == left), comp | (np.arange(L) == right)]
            s = get_scores(tiles, False, score_orig)
            comp_scores[num] = np.copy(s[0])
            for idx, v in zip((left, right), s[1:]):
                scores[idx] = v - s[0]
        scores[mask_list[-1]] = np.nan
        mask = _threshold(scores, percentile_include, absolute)
        scores_list.append(np.copy(scores))
        mask_list.append(mask_list[-1] + mask)
        comps_list.append(comps)
        comp_scores_list.append(comp_scores)
        if np.sum(mask) == 0:
            break
    comps_list = [np.zeros(L, dtype=int)] + comps_list
    return {"scores_list": scores_list, "mask_list": mask_list, "comps_list": comps_list,
            "comp_scores_list": comp_scores_list, "score_orig": score_orig}

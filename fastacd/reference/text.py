"""Reference text CD and 1-D agglomeration: one phrase at a time, the published arithmetic.

This is the oracle the batched engine (``fastacd.text``) and the fast agglomeration
(``fastacd.agg_1d``) are tested against. It follows the original ``acd`` package
(``cd_text``, ``agg_1d.agglomerate``) step by step, written in plain torch:

* relevant and irrelevant parts are propagated separately (no ``total - relevant``);
* every gate is split with the three-player rule, the bias-times-bias term goes to the
  relevant part inside the phrase; the output gate is computed from the full input;
* one phrase per call, in float64 (the original's numpy arithmetic is float64 too).

It also defines the rule for multi-layer and bidirectional LSTMs (``lstm_cd``), which
the original does not have: the same cell per layer and direction, layer l > 0 taking
the relevant / irrelevant output of layer l-1 as its relevant / irrelevant input.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from skimage import measure

from ..capture.phrases import check_phrase, tokens_of
from ..rules.recurrent import lstm_cell_reference, propagate_tanh_two, propagate_three  # noqa: F401


def _direction(rel_x, irrel_x, w_ih, w_hh, bias, in_phrase, reverse):
    """One LSTM direction, relevant and irrelevant parts side by side, one step at a time."""
    T = rel_x.shape[0]
    W_ii, W_if, W_ig, W_io = w_ih.chunk(4, 0)
    W_hi, W_hf, W_hg, W_ho = w_hh.chunk(4, 0)
    b_i, b_f, b_g, b_o = bias.chunk(4)
    H = w_hh.shape[1]
    rel_out = rel_x.new_zeros(T, H)
    irrel_out = rel_x.new_zeros(T, H)
    rel_h = irrel_h = rel_c = irrel_c = rel_x.new_zeros(H)
    for k, t in enumerate(range(T - 1, -1, -1) if reverse else range(T)):
        rel_gates = (W_hi @ rel_h + W_ii @ rel_x[t], W_hf @ rel_h + W_if @ rel_x[t],
                     W_hg @ rel_h + W_ig @ rel_x[t])
        irrel_gates = (W_hi @ irrel_h + W_ii @ irrel_x[t], W_hf @ irrel_h + W_if @ irrel_x[t],
                       W_hg @ irrel_h + W_ig @ irrel_x[t])
        # the output gate of the true LSTM: full input, full previous hidden state
        o = torch.sigmoid(W_io @ (rel_x[t] + irrel_x[t]) + W_ho @ (rel_h + irrel_h) + b_o)
        rel_c, irrel_c, rel_h, irrel_h = lstm_cell_reference(
            rel_gates, irrel_gates, (b_i, b_f, b_g), o, rel_c, irrel_c, bool(in_phrase[t]), k == 0)
        rel_out[t], irrel_out[t] = rel_h, irrel_h
    return rel_out, irrel_out


def lstm_cd(x: torch.Tensor, lstm: nn.LSTM, mask, readout: str = "last"):
    """Relevant and irrelevant parts of an LSTM's readout features for one token mask.

    x: (T, E) word vectors; mask: (T,) 0/1, 1 where the token is relevant; readout:
    ``"last"`` (output at position T-1) or ``"final"`` (each direction's final state).
    Computed in float64. Returns two (F,) tensors.
    """
    dt = torch.float64
    in_phrase = [bool(v) for v in torch.as_tensor(mask).tolist()]
    x = x.to(dt)
    keep = torch.tensor(in_phrase, dtype=dt, device=x.device).unsqueeze(1)
    rel, irrel = x * keep, x * (1 - keep)  # a token's vector is wholly one or the other
    D = 2 if lstm.bidirectional else 1
    for layer in range(lstm.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih = getattr(lstm, "weight_ih" + sfx).to(dt)
            w_hh = getattr(lstm, "weight_hh" + sfx).to(dt)
            bias = ((getattr(lstm, "bias_ih" + sfx) + getattr(lstm, "bias_hh" + sfx)).to(dt)
                    if lstm.bias else torch.zeros(w_ih.shape[0], dtype=dt, device=x.device))
            outs.append(_direction(rel, irrel, w_ih, w_hh, bias, in_phrase, reverse=d == 1))
        rel = torch.cat([r for r, _ in outs], dim=1)
        irrel = torch.cat([i for _, i in outs], dim=1)
    T, H = x.shape[0], lstm.hidden_size
    if readout == "last" or D == 1:
        return rel[T - 1], irrel[T - 1]
    if readout != "final":
        raise ValueError(f"readout must be 'last' or 'final', got {readout!r}")
    return (torch.cat([rel[T - 1, :H], rel[0, H:]]), torch.cat([irrel[T - 1, :H], irrel[0, H:]]))


def text_cd(embed, lstm: nn.LSTM, head: nn.Linear | None, tokens, mask, readout: str = "last"):
    """Reference CD of one token mask for embed -> LSTM -> readout -> linear head.

    Returns (relevant, irrelevant) float64 tensors: ``head.weight @`` each part of the head
    input, without the head's bias (as the original ``cd_text``); the parts themselves if
    ``head`` is None.
    """
    vocab = embed.num_embeddings if isinstance(embed, nn.Embedding) else None
    tokens = tokens_of(tokens, vocab).to(lstm.weight_ih_l0.device)
    mask = torch.as_tensor(mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask must be ({tokens.shape[0]},), got {tuple(mask.shape)}")
    with torch.no_grad():
        rel, irrel = lstm_cd(embed(tokens), lstm, mask, readout)
        if head is None:
            return rel, irrel
        w = head.weight.to(torch.float64)
        return w @ rel, w @ irrel


def cd_text(batch, model, start, stop, return_irrel_scores=False):
    """Reference ``acd.cd_text``: scores of the phrase ``start..stop`` (inclusive), float64
    numpy, ``hidden_to_label.weight @ h`` without the bias."""
    tokens = tokens_of(batch, model.embed.num_embeddings
                       if isinstance(model.embed, nn.Embedding) else None)
    start, stop = check_phrase(start, stop, tokens.shape[0])
    mask = torch.zeros(tokens.shape[0])
    mask[start:stop + 1] = 1
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

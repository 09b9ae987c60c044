"""CD for text models: embedding -> ``nn.LSTM`` -> linear head, many phrases per call.

The cell rule is the reference ``cd_text`` (design.md section 2): at step t the relevant
part of the LSTM input is the word vector where token t is in the phrase (else 0); gates
are split with the three-player rule, the ``sigmoid(b_i) * tanh(b_g)`` term goes to the
relevant part inside the phrase and to the irrelevant part outside it, the forget gate
carries the previous cell, the output gate is the true one (computed from the full input),
and the hidden state splits the cell with the two-player tanh rule.

The batched engine (``TextDecomposer``) runs that rule for M masks at once:

* the true LSTM pass of a sentence (gates, cells, hidden states, output gates) is
  computed once and cached, shared by all masks and calls;
* the relevant state of the M masks is one (M, H) batch: one GEMM per step
  (``W_hh @ rel_h``) and one fused cell op (``fastacd.ops.lstm_cd_cell`` when the
  compiled extension is built, ``fastacd.ops.torch_ops.lstm_cd_cell`` otherwise);
* irrelevant parts are never propagated: ``irrelevant = total - relevant`` (the rule keeps
  ``relevant + irrelevant == true state`` at every step);
* a mask's steps before its first relevant token (after its last, for a backward
  direction) are skipped: there its relevant state is exactly zero;
* one-layer unidirectional LSTMs without autograd take a fast path (``_fast_features``):
  masks that agree up to a step share one row up to there (``_phrase_plan`` /
  ``_row_plan``), the relevant gates need only i, f, g (a 3H-column GEMM), and the cell is
  ~16 small in-place ops per step on preallocated, per-thread buffers; with
  ``prepare(keep_states=True)`` a phrase resumes from the stored state of an earlier one
  with the same start (the agglomeration grows phrases a word at a time).

Beyond the reference: multi-layer and bidirectional ``nn.LSTM``. The rule is applied per
layer and per direction; layer l > 0 gets the relevant part of layer l-1's output (both
directions concatenated) as its relevant input, and the bias-times-bias term follows the
token mask of step t in every layer and direction (see docs/text.md).
"""
from __future__ import annotations

import operator
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.nodes import UnsupportedOpError, check_hooks
from ..capture.phrases import _pair_masks, check_phrase, check_phrases, check_token_masks, tokens_of
from ..ops import tensor_state, torch_ops as _torch_ops
from ..rules.recurrent import (LSTMDirection, cell_fn, lstm_true_pass as _true_pass,  # noqa: F401
                               lstm_true_pass_autograd as _true_pass_autograd)

READOUTS = ("last", "final")

# converted LSTM weights per module (see TextDecomposer._weights)
_WEIGHT_CACHE: "weakref.WeakKeyDictionary[nn.LSTM, dict]" = weakref.WeakKeyDictionary()


_NP_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def _from_numpy(arr: np.ndarray, dtype, device) -> torch.Tensor:
    """A tensor of ``arr`` in ``dtype`` (None: keep) on ``device``, converting in NumPy
    where it can (cheaper than ``Tensor.to`` for the small arrays of a call)."""
    if dtype is not None and dtype in _NP_DTYPES:
        arr, dtype = arr.astype(_NP_DTYPES[dtype]), None
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype is not None:
        t = t.to(dtype)
    return t if t.device == torch.device(device) else t.to(device)


# --------------------------------------------------------------------------- the engine


# weights and the true pass of one layer and direction (shared with the Recurrent rule)
_Direction = LSTMDirection


@dataclass
class _FastConsts:
    """What the one-layer forward fast path needs of a sentence, made once per sentence.

    The relevant gates need only i, f, g (the output gate is the true one), so the
    recurrence multiplies by the first 3H columns of W_hh^T. Per step t, ``steps[t]`` =
    (xw3_t (3H,) W_ih x_t of i, f, g; base_p (2, 1, 3H) = [b3; pre3_t] with pre3_t the
    true pre-activations with bias; base_q (2, 1, 3H) = [-act(b3) / 2; act(pre3_t) / 2];
    base_c (2, 1, H) = [0; c_t] the true cell; o_t tanh(c_t) / 2 (H,); o_t / 2 (H,)). With the
    signs ``[1; -1]`` and ``[1/2; -1/2]`` one addcmul gives both rows of a pair: e.g.
    [b3 + g; pre3 - g] = [act. input of relevant + bias; of irrelevant + bias], exactly
    the separate sums (a product by +-1 or +-1/2 is exact).
    """
    w3: torch.Tensor         # (H, 3H) contiguous W_hh^T of i, f, g
    b_fg: torch.Tensor       # (1, 2H) act(b_f), act(b_g)
    b_i: torch.Tensor        # (1, H) sigmoid(b_i)
    bb: torch.Tensor         # (1, H) sigmoid(b_i) * tanh(b_g)
    sign: torch.Tensor       # (2, 1, 1) [1; -1]
    half_sign: torch.Tensor  # (2, 1, 1) [1/2; -1/2]
    steps: list


@dataclass
class Sentence:
    """One sentence prepared for CD: the true LSTM pass, computed once for all masks."""
    tokens: torch.Tensor                 # (T,)
    layers: list[list[_Direction]]
    features: torch.Tensor               # (F,) true readout features (head input)
    # with prepare(..., keep_states=True): start -> [(stop, h, c)], the relevant state of
    # phrase start..stop after its last token (one-layer forward LSTMs, phrases, no grad)
    memo: dict | None = None

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class TextCDResult:
    """CD scores of M phrases (or token masks) of one sentence.

    relevant, irrelevant: (M, C) = ``head.weight @ feature`` for the relevant and the
    irrelevant part of the head input, without the head's bias (as the reference
    ``cd_text``): ``relevant + irrelevant == logits - head.bias``. Without a head, (M, F)
    parts of the features themselves. masks: (M, T) the token masks scored.
    """
    relevant: torch.Tensor
    irrelevant: torch.Tensor
    masks: torch.Tensor
    bias: torch.Tensor | None = None

    def scores(self, label: int) -> torch.Tensor:
        return self.relevant[:, label]

    def to_json(self) -> dict:
        return {"relevant": self.relevant.tolist(), "irrelevant": self.irrelevant.tolist(),
                "masks": self.masks.to(torch.int64).tolist(),
                "bias": None if self.bias is None else self.bias.tolist()}


def check_computed_parts(*parts) -> None:
    """Refuse a hook on, or a forward replaced on, a module the recurrent engines compute from its
    weights (the LSTM / GRU and the head; the embedding is called, so its hooks apply): either
    would be missed."""
    for part in parts:
        if part is None:
            continue
        check_hooks(part)
        if "forward" in vars(part):
            raise UnsupportedOpError(
                f"the {type(part).__name__}'s forward was replaced on the instance; the recurrent "
                "engine computes it from its weights. Decompose the whole model with "
                "fastacd.text.ModelTextDecomposer(model), which traces what it computes")


class TextDecomposer:
    """CD for ``head(readout(lstm(embed(tokens))))``, many phrases per call.

    >>> dec = TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    >>> res = dec.cd(tokens, phrases=[(0, 1), (2, 4)])   # inclusive (start, stop) pairs
    >>> res.relevant.shape                               # (2, num_classes)

    embed:   ``nn.Embedding`` (ids are checked against its vocabulary) or any callable
             mapping (T,) token ids to (T, E) vectors.
    rnn:     ``nn.LSTM``, any ``num_layers``, uni- or bidirectional, ``batch_first`` either
             way (CD is defined on eval behaviour: no inter-layer dropout); ``proj_size=0``.
             An ``nn.GRU`` gives a ``GRUDecomposer`` (``fastacd.text.gru``: the GRU rule).
    head:    ``nn.Linear`` on the readout features, or None to get the features' parts.
    readout: ``"last"`` the LSTM output at the last position (``out[-1]``; both
             directions at position T-1) or ``"final"`` the final hidden state of each
             direction (``h_n`` of the last layer: forward at T-1, backward at 0). The
             two agree for a unidirectional LSTM.
    dtype:   arithmetic dtype (default: the LSTM's); the drop-in ``cd_text`` uses float64
             like the reference.
    backend: ``"auto"``: for a one-layer unidirectional LSTM when no gradient is needed,
             the fast path (the cell written out in pure torch with the sentence's per-step
             constants, rows shared by masks with a common prefix; measured 1.5x to 5x
             faster than the compiled cell op at M = 4..820, H = 128, float64); otherwise
             the compiled cell when built, else torch. ``"torch"`` / ``"compiled"``: the
             general path with that cell (the fast path's oracles).
    memory_budget: bytes for the per-chunk mask state; M is split into chunks under it
             (results do not depend on the chunking).

    Gradients flow through the engine (no ``.data``/``no_grad`` inside); wrap calls in
    ``torch.no_grad()`` when you do not need them.
    """

    # recurrent module type -> the TextDecomposer subclass for it (fastacd.text.gru adds the
    # GRU's): ``TextDecomposer(embed, gru, head)`` gives a ``GRUDecomposer``
    families: dict = {}
    # from_model's family for other models (fastacd.text.general.ModelTextDecomposer)
    general = None

    def __new__(cls, embed=None, rnn=None, *args, **kwargs):
        if cls is TextDecomposer:
            for typ, sub in TextDecomposer.families.items():
                if isinstance(rnn, typ):
                    cls = sub
                    break
        return super().__new__(cls)

    def __init__(self, embed, rnn: nn.LSTM, head: nn.Module | None = None, readout: str = "last",
                 dtype: torch.dtype | None = None, backend: str = "auto",
                 memory_budget: int | None = None):
        if not isinstance(rnn, nn.LSTM):
            raise TypeError(f"rnn must be a torch.nn.LSTM or nn.GRU, got {type(rnn).__name__}; "
                            "other recurrent modules have no CD rule here")
        if getattr(rnn, "proj_size", 0):
            raise ValueError("nn.LSTM with proj_size > 0 is not supported (no CD rule for the "
                             "projection); use proj_size=0")
        self._setup(embed, rnn, head, readout, dtype, memory_budget)
        self.backend = backend
        self._cell = cell_fn(backend)

    def _setup(self, embed, rnn, head, readout, dtype, memory_budget):
        """The checks and attributes every family shares."""
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if head is not None and not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear (or None for the features), got "
                            f"{type(head).__name__}; decompose other heads on the features")
        if not callable(embed):
            raise TypeError("embed must be an nn.Embedding or a callable mapping token ids to "
                            "vectors")
        self.embed, self.rnn, self.head, self.readout = embed, rnn, head, readout
        self.dtype = dtype or rnn.weight_ih_l0.dtype
        self.memory_budget = memory_budget or (1 << 28)
        self.num_directions = 2 if rnn.bidirectional else 1

    @property
    def lstm(self) -> nn.Module:
        """The recurrent module (the original package's attribute name; an nn.GRU for a
        ``GRUDecomposer``)."""
        return self.rnn

    # -------------------------------------------------------------- construction helpers

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> "TextDecomposer":
        """Find the embedding, recurrent module and head of a text classifier.

        Models with the original package's attribute names (``.embed``, ``.lstm``,
        ``.hidden_to_label``; ``.lstm`` may be an ``nn.GRU``) use those, read out at the
        last position as ``cd_text`` does. Otherwise ``model.forward`` is traced with
        ``torch.fx`` and must be embedding -> ``nn.LSTM`` or ``nn.GRU`` -> (output at the
        last position, or the last layer's ``h_n``) -> linear, optionally followed by
        softmax / log-softmax. A GRU gives a ``GRUDecomposer``. Any other model (a
        transformer classifier, a recurrent layer inside a larger network) goes through the
        general engine: a ``ModelTextDecomposer`` (``fastacd.text.general``: token masks over
        the word vectors of its ``nn.Embedding``, same results).
        """
        if all(hasattr(model, a) for a in ("embed", "lstm", "hidden_to_label")):
            kwargs.setdefault("readout", "last")
            return cls(model.embed, model.lstm, model.hidden_to_label, **kwargs)
        try:
            embed, rnn, head, readout = _discover_cached(model)
        except ValueError as exc:
            if TextDecomposer.general is None:
                raise
            try:
                return TextDecomposer.general(model, **kwargs)
            except UnsupportedOpError:
                raise             # an op no rule decomposes (a PackedSequence): named as it is
            except ValueError as exc2:
                raise ValueError(f"{exc}\nNor through the general engine: {exc2}") from exc2
        kwargs.setdefault("readout", readout)
        return cls(embed, rnn, head, **kwargs)

    @property
    def vocab_size(self) -> int | None:
        return self.embed.num_embeddings if isinstance(self.embed, nn.Embedding) else None

    def _weights(self, layer: int, reverse: bool):
        """(w_ih, w_hh, b_ih + b_hh, w_ih^T, w_hh^T, w_hh^T[:, :3H]) of one layer and
        direction in the arithmetic dtype (the transposes contiguous).

        Without autograd the converted weights are cached on the LSTM module (keyed by each
        parameter's storage and version counter, so an in-place update or a new tensor is
        seen): a dataset of sentences does not convert them once per sentence.
        """
        sfx = f"_l{layer}" + ("_reverse" if reverse else "")
        lstm, dt = self.lstm, self.dtype
        params = [getattr(lstm, "weight_ih" + sfx), getattr(lstm, "weight_hh" + sfx)]
        if lstm.bias:
            params += [getattr(lstm, "bias_ih" + sfx), getattr(lstm, "bias_hh" + sfx)]
        cache = None
        if not (torch.is_grad_enabled() and any(q.requires_grad for q in params)):
            cache = _WEIGHT_CACHE.setdefault(lstm, {})
            key = (sfx, dt) + tuple(map(tensor_state, params))
            hit = cache.get(sfx)
            if hit is not None and hit[0] == key:
                return hit[1]
        w_ih, w_hh = params[0].to(dt), params[1].to(dt)
        if lstm.bias:
            bias = (params[2] + params[3]).to(dt)
        else:
            bias = torch.zeros(w_ih.shape[0], dtype=dt, device=w_ih.device)
        # contiguous transposes: a (n, H) x (H, 4H) GEMM with a transposed view was about
        # 2x slower at n <= 16 (one thread, MKL)
        w_hh_t = w_hh.T.contiguous()
        out = (w_ih, w_hh, bias, w_ih.T.contiguous(), w_hh_t,
               w_hh_t[:, :3 * w_hh.shape[1]].contiguous())   # i, f, g columns (fast path)
        if cache is not None:
            cache[sfx] = (key, out)
        return out

    # -------------------------------------------------------------- the true pass

    def embed_tokens(self, tokens) -> torch.Tensor:
        tokens = tokens_of(tokens, self.vocab_size).to(self.lstm.weight_ih_l0.device)
        vecs = self.embed(tokens)
        if vecs.dim() != 2 or vecs.shape[0] != tokens.shape[0]:
            raise ValueError(f"embed must map (T,) token ids to (T, E) vectors, got "
                             f"{tuple(vecs.shape)} for T={tokens.shape[0]}")
        return vecs.to(self.dtype)

    def prepare(self, tokens, keep_states: bool = False) -> Sentence:
        """Run the true LSTM once on a sentence; reuse the result for any number of masks.

        keep_states: remember, for every phrase scored later on this sentence, its relevant
        state after its last token, so that a later phrase with the same start and a
        longer stop resumes from there instead of from its start (the agglomeration grows
        phrases one word at a time). Used by the one-layer forward fast path for
        ``phrases=``; a few kB per phrase.
        """
        check_computed_parts(self.rnn, self.head)
        tokens = tokens_of(tokens, self.vocab_size)
        x = self.embed_tokens(tokens)
        T = x.shape[0]
        layers = []
        one_forward = self.lstm.num_layers == 1 and self.num_directions == 1
        for layer in range(self.lstm.num_layers):
            dirs = []
            for d in range(self.num_directions):
                w_ih, w_hh, bias, w_ih_t, w_hh_t, w3 = self._weights(layer, reverse=d == 1)
                H = w_hh.shape[1]
                xw = x @ w_ih_t
                xwb = xw + bias
                if torch.is_grad_enabled() and xwb.requires_grad:
                    gates, act, c, tc, h = _true_pass_autograd(xwb, w_hh_t, d == 1)
                else:
                    gates, act, c, tc, h = _true_pass(xwb, w_hh_t, d == 1)
                dd = _Direction(w_ih, w_hh, bias, d == 1, xw, gates - bias, c, h,
                                act[:, 3 * H:], w_hh_t)
                if one_forward and not gates.requires_grad:
                    dd.fast = _fast_consts(dd, gates, act, tc, w3)
                dirs.append(dd)
            layers.append(dirs)
            x = torch.cat([dd.h for dd in dirs], dim=1)
        feats = self._readout([dd.h.unsqueeze(0) for dd in layers[-1]], T)[0]
        return Sentence(tokens, layers, feats, {} if keep_states else None)

    def _readout(self, outs: list[torch.Tensor], T: int) -> torch.Tensor:
        """Head input from per-direction (M, T, H) outputs of the last layer."""
        if self.readout == "last" or len(outs) == 1:
            return torch.cat([o[:, T - 1] for o in outs], dim=1)
        return torch.cat([outs[0][:, T - 1], outs[1][:, 0]], dim=1)

    def forward(self, tokens) -> torch.Tensor:
        """The model's output (logits, with the head's bias) recomputed from the parts."""
        s = self.prepare(tokens)
        return s.features if self.head is None else self.head(s.features.to(self.head.weight.dtype))

    # -------------------------------------------------------------- CD

    def cd(self, tokens_or_sentence, phrases=None, masks=None) -> TextCDResult:
        """CD of M phrases (``phrases``: inclusive (start, stop) pairs) or M token masks
        (``masks``: (T,) or (M, T) of 0/1) of one sentence, in one recurrence."""
        sent = (tokens_or_sentence if isinstance(tokens_or_sentence, Sentence)
                else self.prepare(tokens_or_sentence))
        T = sent.length
        if (phrases is None) == (masks is None):
            raise ValueError("give exactly one of phrases=[(start, stop), ...] or masks=(M, T)")
        dev = sent.features.device
        fast = self.backend == "auto" and getattr(sent.layers[0][0], "fast", None) is not None and not (
            torch.is_grad_enabled() and sent.features.requires_grad)
        pairs = mask_np = None
        if phrases is not None:
            pairs = check_phrases(phrases, T)
            mask_np = _pair_masks(pairs, T)
            mask = _from_numpy(mask_np, self.dtype, dev)
        else:
            mask = check_token_masks(masks, T).to(dev, self.dtype)
            if fast:
                mask_np = mask.cpu().numpy() != 0
        M = mask.shape[0]
        feats = []
        chunk = self._chunk(T)
        for lo in range(0, M, chunk):
            if fast:
                plan = (_phrase_plan(pairs[lo:lo + chunk], T, sent.memo) if pairs is not None
                        else _row_plan(mask_np[lo:lo + chunk]))
                feats.append(self._fast_features(sent, plan))
            else:
                feats.append(self._relevant_features(sent, mask[lo:lo + chunk]))
        rel = torch.cat(feats) if len(feats) != 1 else feats[0]
        if not feats:
            rel = sent.features.new_zeros(0, sent.features.shape[0])
        irrel = sent.features.unsqueeze(0) - rel
        if self.head is None:
            return TextCDResult(rel, irrel, mask)
        w_t, bias = self._head_weights()
        return TextCDResult(rel @ w_t, irrel @ w_t, mask, bias)

    def _head_weights(self):
        """(head.weight^T, head.bias) in the arithmetic dtype; cached without autograd."""
        w, b = self.head.weight, self.head.bias
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            return w.to(self.dtype).T, None if b is None else b.to(self.dtype)
        key = tuple(None if t is None else tensor_state(t) for t in (w, b))
        hit = getattr(self, "_head_cache", None)
        if hit is None or hit[0] != key:
            hit = self._head_cache = (key, (w.to(self.dtype).T.contiguous(),
                                            None if b is None else b.to(self.dtype)))
        return hit[1]

    def _fast_features(self, sent: Sentence, plan) -> torch.Tensor:
        """Relevant final hidden states (M, H) of a one-layer forward LSTM for M token masks
        planned by ``_row_plan`` / ``_phrase_plan`` (masks that agree up to a step share one
        row up to there). The cell rule of ``_torch_ops.lstm_cd_cell``, written out with the
        sentence's per-step constants (true activations, cell, tanh(cell), output gate, bias
        terms: computed once in ``prepare``) into preallocated buffers: about 16 small ops
        per step for all rows. No autograd (in-place buffers): ``cd`` uses it only when no
        gradient is needed.
        """
        n_at, joins, bits, final, memo_joins, captures = plan
        dd = sent.layers[0][0]
        fc = dd.fast
        T, H = sent.length, dd.w_hh.shape[1]
        R = bits.shape[1]
        dev = dd.xw.device
        ws = _workspace(R, H, self.dtype, dev)
        hb = ws.h
        hb[:R].zero_()                      # rows start from zero; row ws.cap stays zero
        ws.c[0][:R].zero_()
        ws.c[1][:R].zero_()
        bit_cols = _from_numpy(bits[:, :, None], self.dtype, dev).unbind(0)      # (R, 1) each
        # per step: 0 no live row has a relevant token, 1 all do, 2 some do
        live = np.arange(R) < np.asarray(n_at)[:, None]                 # (T, R)
        has_bit = np.where((bits | ~live).all(1), 1, np.where((bits & live).any(1), 2, 0))
        has_bit = np.where(np.asarray(n_at) > 0, has_bit, 0).tolist()
        w, b_fg, b_i, bb, sign, half_sign = fc.w3, fc.b_fg, fc.b_i, fc.bb, fc.sign, fc.half_sign
        views = ws.views
        n_cur, a = -1, 0
        for k in range(_first_live(n_at), T):
            n = n_at[k]
            if n != n_cur:                  # the buffers' views for n live rows
                n_cur = n
                (h, cs, cs3, g, g3, p, p_sig, p_tanh, share, q_i, r_i, r_g, r_fg, t, t_f, t_g,
                 th, th_r, th_i) = views.get(n) or ws.make_views(n)
            c_prev, c = cs[a], cs[1 - a]
            if joins[k] is not None:        # rows that split off now copy the shared state
                lo, par = joins[k]
                par = _from_numpy(par, None, dev)
                torch.index_select(hb[:lo], 0, par, out=hb[lo:lo + par.numel()])
                cb = ws.c[a]
                torch.index_select(cb[:lo], 0, par, out=cb[lo:lo + par.numel()])
            if k in memo_joins:             # rows resuming from a stored state
                cb = ws.c[a]
                for row, sh, sc in memo_joins[k]:
                    hb[row].copy_(sh)
                    cb[row].copy_(sc)
            xw3, base_p, base_q, base_c, half_o_tc, half_o = fc.steps[k]
            # relevant gates i, f, g: W_ih x_t [t in mask] + W_hh h_rel
            hb_k = has_bit[k]
            if hb_k == 2:
                bit = bit_cols[k][:n]
                torch.mul(bit, xw3, out=g)
                g.addmm_(h, w)
            elif hb_k:
                torch.addmm(xw3, h, w, out=g)
            else:
                torch.mm(h, w, out=g)
            # [rel + b; total - rel] (irrelevant = total - relevant), then the activations
            torch.addcmul(base_p, sign, g3, out=p)
            p_sig.sigmoid_()
            p_tanh.tanh_()
            # three-player split: 0.5 (act(r + b) - act(b)) + 0.5 (act(total) - act(i + b))
            torch.addcmul(base_q, half_sign, p, out=p)
            share.add_(q_i)
            torch.add(r_fg, b_fg, out=t)                   # r_f + b_f, r_g + b_g
            torch.mul(t_g, r_i, out=c).addcmul_(b_i, r_g)
            if hb_k == 2:
                c.addcmul_(bit, bb)
            elif hb_k:
                c.add_(bb)
            if k > 0:
                c.addcmul_(t_f, c_prev)                    # forget term
            # two-player tanh split of the cell [c; c_true - c], times the true output gate:
            # o/2 (tanh(c) + tanh(c_true) - tanh(c_true - c)), with o/2 tanh(c_true) made once
            torch.addcmul(base_c, sign, cs3[1 - a], out=th)
            th.tanh_()
            torch.sub(th_r, th_i, out=th_i)
            torch.addcmul(half_o_tc, half_o, th_i, out=h)
            a = 1 - a
            if k in captures:               # remember phrases' states after their last token
                idx, spans = captures[k]
                idx = torch.tensor(idx, device=dev)
                hs, cs_ = h.index_select(0, idx), c.index_select(0, idx)
                for q, (lo_, hi_) in enumerate(spans):
                    sent.memo.setdefault(lo_, []).append((hi_, hs[q], cs_[q]))
        final = np.where(final == R, ws.cap, final)   # masks without a 1: the zero row
        return hb[_from_numpy(final, None, dev)]

    def _chunk(self, T: int) -> int:
        H = self.lstm.hidden_size
        itemsize = self.dtype.itemsize
        # per mask: W_ih x of one direction (4H) and the relevant outputs of a layer and its
        # input (D*H each), for every step
        per_mask = T * H * itemsize * (4 + 2 * self.num_directions) + 1
        return max(1, self.memory_budget // per_mask)

    def _relevant_features(self, sent: Sentence, mask: torch.Tensor) -> torch.Tensor:
        T = sent.length
        last_layer = len(sent.layers) - 1
        rel_in = None
        active = mask != 0  # (M, T): where a mask has a relevant input
        for li, dirs in enumerate(sent.layers):
            outs = []
            if rel_in is not None:
                # a backward direction carries relevance to positions before the phrase
                active = active | (rel_in != 0).any(dim=2)
            for dd in dirs:
                keep = li < last_layer or (self.readout == "last" and dd.reverse)
                outs.append(self._run_direction(dd, rel_in, mask, active, keep))
            if li < last_layer:
                rel_in = torch.cat(outs, dim=2)
        if len(outs) == 1:
            return outs[0] if outs[0].dim() == 2 else outs[0][:, T - 1]
        fwd, bwd = outs
        fwd = fwd if fwd.dim() == 2 else fwd[:, T - 1]
        if self.readout == "last":
            bwd = bwd[:, T - 1]
        return torch.cat([fwd, bwd if bwd.dim() == 2 else bwd[:, 0]], dim=1)

    def _run_direction(self, dd, rel_in: torch.Tensor | None, mask: torch.Tensor,
                       active: torch.Tensor, keep_sequence: bool) -> torch.Tensor:
        """Relevant hidden states of one direction: (M, T, H) if ``keep_sequence``, else the
        state after the direction's last step, (M, H). ``rel_in``: the relevant input
        (M, T, In) of a layer > 0; None for layer 0, whose relevant input is the word vector
        where the mask is 1 (``LSTMDirection.relevant``: masks sorted by their first step
        with a relevant input; before it a mask's relevant state is exactly zero)."""
        return dd.relevant(rel_in, mask, active, keep_sequence, self._cell)[0]


def _fast_consts(dd: _Direction, gates, act, tc, w3) -> _FastConsts:
    """Per-step constants of the one-layer fast path from the true pass: gates (T, 4H) with
    bias, act (T, 4H) their activations (tanh for g), tc = tanh(c) (T, H); w3 (H, 3H) the
    i, f, g columns of W_hh^T."""
    T, H = dd.c.shape
    b3 = dd.bias[:3 * H].unsqueeze(0)
    act_b = torch.cat([torch.sigmoid(b3[:, :2 * H]), torch.tanh(b3[:, 2 * H:])], dim=1)
    b_i = act_b[:, :H]
    base_p = torch.stack([b3.expand(T, -1), gates[:, :3 * H]], 1).unsqueeze(2)  # (T,2,1,3H)
    base_q = torch.stack([(-0.5 * act_b).expand(T, -1), 0.5 * act[:, :3 * H]], 1).unsqueeze(2)
    base_c = torch.stack([torch.zeros_like(dd.c), dd.c], 1).unsqueeze(2)         # (T,2,1,H)
    half_o = 0.5 * dd.o
    steps = list(zip(dd.xw[:, :3 * H].unbind(0), base_p.unbind(0), base_q.unbind(0),
                     base_c.unbind(0), (half_o * tc).unbind(0), half_o.unbind(0)))
    sign, half_sign = _signs(b3.dtype, b3.device)
    return _FastConsts(w3, act_b[:, H:], b_i, b_i * act_b[:, 2 * H:], sign, half_sign, steps)


_SIGNS: dict = {}


def _signs(dtype, device):
    """[1; -1] and [1/2; -1/2] as (2, 1, 1) tensors (made once per dtype and device)."""
    key = (dtype, str(device))
    if key not in _SIGNS:
        sign = torch.tensor([1.0, -1.0], dtype=dtype, device=device).view(2, 1, 1)
        _SIGNS[key] = (sign, 0.5 * sign)
    return _SIGNS[key]


_WORKSPACES = threading.local()
_WS_MAX_ROWS = 2048       # larger batches get a workspace of their own, not kept


class _Workspace:
    """Buffers of the fast recurrence for up to ``cap`` rows of H units, with their views
    for each row count n (kept: a view costs ~1 us to make, and there are ~20 per n)."""

    def __init__(self, cap: int, H: int, dtype, device):
        new = lambda *shape: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.cap, self.H = cap, H
        # h, and c twice (the step reads the previous cell while writing the new one);
        # row cap stays 0: the state of a mask without a relevant token
        self.h, self.c = zeros(cap + 1, H), (zeros(cap + 1, H), zeros(cap + 1, H))
        self.g, self.t = new(cap, 3 * H), new(cap, 2 * H)
        self.p, self.th = new(2, cap, 3 * H), new(2, cap, H)
        self.views: dict = {}

    def make_views(self, n: int):
        H = self.H
        p, th, g, t = self.p[:, :n], self.th[:, :n], self.g[:n], self.t[:n]
        share = p[0]
        c0, c1 = self.c[0][:n], self.c[1][:n]
        v = (self.h[:n], (c0, c1), (c0.unsqueeze(0), c1.unsqueeze(0)), g, g.unsqueeze(0), p,
             p[:, :, :2 * H], p[:, :, 2 * H:], share, p[1], share[:, :H], share[:, 2 * H:],
             share[:, H:], t, t[:, :H], t[:, H:], th, th[0], th[1])
        self.views[n] = v
        return v


def _workspace(rows: int, H: int, dtype, device) -> _Workspace:
    """A per-thread workspace with room for ``rows`` rows (grown by doubling)."""
    if rows > _WS_MAX_ROWS:
        return _Workspace(rows, H, dtype, device)
    cache = getattr(_WORKSPACES, "by_key", None)
    if cache is None:
        cache = _WORKSPACES.by_key = {}
    key = (H, dtype, device)
    ws = cache.get(key)
    if ws is None or ws.cap < rows:
        ws = cache[key] = _Workspace(max(rows, 2 * ws.cap if ws else 32), H, dtype, device)
    return ws


def _first_live(n_at: list) -> int:
    """The first step with a live row (len(n_at) when there is none)."""
    for k, n in enumerate(n_at):
        if n:
            return k
    return len(n_at)


_COPY, _MEMO, _ZERO = 0, 1, 2     # how a row starts: copy of a live row, stored, zero


def _phrase_plan(pairs: list[tuple[int, int]], T: int, memo: dict | None = None):
    """``_row_plan`` of the masks of inclusive (start, stop) phrases, without building and
    sorting masks: in lexicographic order the phrases go by start descending, then stop
    ascending; a phrase starts from zero at its start unless an earlier one with the same
    start exists, from whose state it splits one step after that one's stop.

    With a ``memo`` (``Sentence.memo``) a phrase start..stop also resumes from the stored
    state of an earlier phrase start..s (s <= stop, the largest) at step s + 1, when that
    is not earlier than it would otherwise start; and the plan lists where to store the
    new phrases' states (``captures``: step -> rows, for stops before the last step).
    Returns ``(n_at, joins, bits, final, memo_joins, captures)``.
    """
    uniq = sorted(set(pairs), key=lambda p: (-p[0], p[1]))
    rows, prev = [], None
    for lo, hi in uniq:
        if prev is not None and prev[0] == lo:
            e, kind, src = prev[1] + 1, _COPY, prev
        else:
            e, kind, src = lo, _ZERO, None
        if memo:
            best = None
            for stored in memo.get(lo, ()):
                if stored[0] <= hi and (best is None or stored[0] > best[0]):
                    best = stored
            if best is not None and best[0] + 1 >= e:
                e, kind, src = best[0] + 1, _MEMO, best
        rows.append((e, kind, lo, hi, src))
        prev = (lo, hi)
    rows.sort(key=lambda r: (r[0], r[1]))                  # stable: ties keep the order above
    R = len(rows)
    row_of = {(r[2], r[3]): i for i, r in enumerate(rows)}
    n_at, joins = [0] * T, [None] * T
    memo_joins, captures = {}, {}
    for i, r in enumerate(rows):
        n_at[r[0]] = i + 1
        if r[1] == _MEMO:
            memo_joins.setdefault(r[0], []).append((i, r[4][1], r[4][2]))
        if memo is not None and r[3] < T - 1 and r[0] <= r[3]:
            captures.setdefault(r[3], []).append(i)
    for k in range(1, T):
        n_at[k] = max(n_at[k], n_at[k - 1])
    i = 0
    while i < R:
        if rows[i][1] == _COPY:
            k, j = rows[i][0], i
            while j < R and rows[j][0] == k and rows[j][1] == _COPY:
                j += 1
            joins[k] = (i, np.array([row_of[rows[q][4]] for q in range(i, j)], dtype=np.int64))
            i = j
        else:
            i += 1
    se = np.array([(r[2], r[3]) for r in rows], dtype=np.int64).reshape(-1, 2)
    pos = np.arange(T)[:, None]
    bits = (pos >= se[:, 0]) & (pos <= se[:, 1])
    final = np.array([row_of[p] for p in pairs], dtype=np.int64)
    if memo is not None:
        captures = {k: (v, [(rows[q][2], rows[q][3]) for q in v]) for k, v in captures.items()}
    return n_at, joins, bits, final, memo_joins, captures


def _row_plan(masks: np.ndarray):
    """Which rows a batched recurrence over 0/1 token masks (M, T) must compute, and when.

    A mask's relevant state at step t depends only on its first t + 1 entries, and is
    exactly zero before its first 1. So masks that agree up to step t share one state up
    to t: in lexicographic order, row j splits from row j - 1 at the first position d_j
    where they differ, and needs a row of its own from step e_j = max(d_j, f_j) on (f_j:
    its first 1). It starts there from zero (d_j <= f_j: nothing relevant before) or from
    a copy of the state it shared, held by the nearest earlier row with a smaller d.

    Returns ``(n_at, joins, bits, final)``: ``n_at[k]`` rows are live at step k (rows are
    numbered in the order they start); ``joins[k]`` = (first new row, parents) for the new
    rows at step k whose state is copied (the others start at zero); ``bits`` (T, R) the
    masks of the R computed rows; ``final[m]`` the row holding mask m's state at the end
    (R: a zero row, for a mask without a 1).
    """
    M, T = masks.shape
    order = np.lexsort(masks.T[::-1]) if M > 1 else np.arange(M)
    ms = masks[order]
    nz = ms.any(1)
    f = np.where(nz, ms.argmax(1), T)
    d = np.zeros(M, dtype=np.int64)
    if M > 1:
        diff = ms[1:] != ms[:-1]
        d[1:] = np.where(diff.any(1), diff.argmax(1), T)
    e = np.maximum(d, f)
    copied = d > f                    # shares a started state with an earlier row
    parent = np.full(M, -1, dtype=np.int64)
    if copied.any():
        stack: list[int] = []        # previous row with a smaller d
        dl = d.tolist()
        for j in range(M):
            while stack and dl[stack[-1]] >= dl[j]:
                stack.pop()
            if stack:
                parent[j] = stack[-1]
            stack.append(j)
    own = np.flatnonzero(e < T)
    own = own[np.lexsort((~copied[own], e[own]))]      # by start step, copies first
    R = own.size
    row_of = np.full(M, R, dtype=np.int64)
    row_of[own] = np.arange(R)
    e_own = e[own]
    n_at = np.searchsorted(e_own, np.arange(T), side="right").tolist()
    joins = [None] * T
    copied_own = copied[own]
    for k in np.unique(e_own[copied_own]).tolist():
        lo, hi = np.searchsorted(e_own, [k, k + 1]).tolist()
        rows = own[lo:lo + int(copied_own[lo:hi].sum())]
        joins[k] = (lo, row_of[parent[rows]])
    # the row that holds each mask's final state: the first of its run of equal masks
    run_head = np.maximum.accumulate(np.where(d < T, np.arange(M), 0)) if M else d
    fin_sorted = np.where(f < T, row_of[run_head], R)
    final = np.empty(M, dtype=np.int64)
    final[order] = fin_sorted
    return n_at, joins, np.ascontiguousarray(ms[own].T), final, {}, {}


_DISCOVERED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _discover_cached(model: nn.Module):
    """``_discover`` once per model (tracing takes ~10 ms; the agglomeration builds a
    decomposer per sentence). Traced again when the forward or the submodules change."""
    fwd = model.__dict__.get("forward", type(model).forward)
    key = (fwd, tuple((name, id(m)) for name, m in model.named_modules()))
    hit = _DISCOVERED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    found = _discover(model)
    _DISCOVERED[model] = (key, found)
    return found


_LAYOUT_METHODS = {"transpose", "permute", "t", "contiguous", "long", "to", "view", "reshape", "int"}
_LAYOUT_FUNCTIONS = {torch.transpose, torch.permute, torch.t}


def _through_layout(node, mods):
    """The node ``node`` reads through transposes, dtype casts, ``.text`` and dropout."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target is getattr and node.args[1] == "text":
            node = node.args[0]
        elif node.op == "call_method" and node.target in _LAYOUT_METHODS:
            node = node.args[0]
        elif node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS:
            node = node.args[0]
        elif node.op == "call_module" and isinstance(mods[node.target], (nn.Dropout, nn.Identity)):
            node = node.args[0]
        else:
            return node
    return node


def _discover(model: nn.Module):
    """Embedding, recurrent module, head and readout of an embedding -> LSTM / GRU -> linear
    model, by fx."""
    def fail(why):
        return ValueError(
            f"cannot read {type(model).__name__} as embedding -> nn.LSTM / nn.GRU -> linear on "
            f"the last step ({why}); build TextDecomposer(embed, rnn, head, readout=...) "
            "yourself, or give the model the attributes .embed, .lstm and .hidden_to_label")

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure gets the same advice
        raise fail(f"torch.fx could not trace forward: {type(e).__name__}: {e}") from e
    mods = dict(gm.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    by_type = lambda t: [n for n in calls if isinstance(mods[n.target], t)]  # noqa: E731
    embs, lstms, lins = by_type(nn.Embedding), by_type((nn.LSTM, nn.GRU)), by_type(nn.Linear)
    if len(embs) != 1 or len(lstms) != 1 or len(lins) != 1:
        raise fail(f"found {len(embs)} embeddings, {len(lstms)} LSTMs / GRUs, {len(lins)} linear "
                   "layers; need one of each")
    lstm_node, head_node = lstms[0], lins[0]
    lstm = mods[lstm_node.target]
    # the recurrent engine computes rnn(embed(ids)): only layout ops (and dropout, identity
    # in eval) may sit between the ids, the embedding and the recurrent module; anything
    # else (a scale, a position embedding, packing) is the general engine's
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    ids_src = _through_layout(embs[0].args[0], mods)
    if ids_src is not placeholder:
        raise fail(f"the embedding's input comes from {ids_src.format_node()}, not the token ids")
    if lstm_node.kwargs.get("hx") is not None or len(lstm_node.args) > 1:
        raise fail("the recurrent module gets an initial state")
    src = _through_layout(lstm_node.args[0] if lstm_node.args else lstm_node.kwargs.get("input"), mods)
    if src is not embs[0]:
        raise fail(f"the recurrent module's input comes from {getattr(src, 'format_node', lambda: src)()}, "
                   "not the embedding")
    # walk back from the head's input to the LSTM through getitem nodes
    node, path = head_node.args[0], []
    while isinstance(node, fx.Node) and node is not lstm_node:
        if node.op == "call_function" and node.target is operator.getitem:
            path.append(node.args[1])
            node = node.args[0]
        elif node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) in ("contiguous", "squeeze"):
            node = node.args[0]
        else:
            raise fail(f"the head's input comes from {node.format_node()}")
    if node is not lstm_node:
        raise fail("the head's input does not come from the recurrent module")
    path = path[::-1]
    last = (-1, ) if not lstm.batch_first else ((slice(None), -1),)
    if len(path) == 2 and path[0] == 0 and (path[1] == -1 or (lstm.batch_first and path[1] in last)):
        readout = "last"
    elif not lstm.bidirectional and (
            (isinstance(lstm, nn.LSTM) and path == [1, 0, -1])     # (h_n, c_n)[0][-1]
            or (isinstance(lstm, nn.GRU) and path == [1, -1])):    # h_n[-1]
        readout = "final"
    else:
        raise fail(f"unsupported readout {path} (supported: out[-1], out[:, -1] for batch_first, "
                   "h_n[-1] of a unidirectional LSTM or GRU)")
    for user in head_node.users:
        if user.op != "output" and not (user.op in ("call_function", "call_method") and
                                        getattr(user.target, "__name__", "") in
                                        ("softmax", "log_softmax")):
            raise fail(f"the head's output goes on to {user.format_node()}")
    return mods[embs[0].target], lstm, mods[head_node.target], readout

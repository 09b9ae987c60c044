"""Recurrent rules: the LSTM rule (design.md section 2) and the GRU rule by analogy with it
(docs/text.md, "The GRU rule"), in every form.

* One step: ``propagate_three`` and ``propagate_tanh_two`` (the original's names, re-exported
  at the top level); ``lstm_cell_reference`` / ``gru_cell_reference`` with both parts
  propagated (the oracle); the batched cells for M masks, irrelevant = total - relevant:
  ``cell_fn`` (the fused ``fastacd.ops.lstm_cd_cell``, formulas in ``fastacd.ops.torch_ops``)
  and ``gru_cd_cell``.
* One layer and direction: the true pass (``lstm_true_pass``, ``gru_true_pass``), kept in an
  ``LSTMDirection`` / ``GRUDirection`` whose ``relevant`` runs the batched recurrence of M
  masks; ``lstm_reference_direction`` / ``gru_reference_direction`` run both parts of one
  mask. Shared by the text engine (``fastacd.text``), its reference and the rule below.
* ``Recurrent``: ``nn.LSTM`` and ``nn.GRU`` as leaf modules of the general engine.

The bias-times-bias term of a cell (the LSTM's ``sigmoid(b_i) tanh(b_g)``, the GRU's
``(1 - sigmoid(b_z)) tanh(b_n)``) goes to the relevant part at a step inside the phrase: a
weight ``p_t`` (1 in the phrase, 0 outside, as the reference ``cd_text``). The general engine
has no phrase, only the relevant part of the module's input; there ``p_t = |x_r| / (|x_r| +
|x_i|)`` summed over the step's features (0 where both are 0): exactly the token mask for a
token mask over nonzero word vectors, the mask's value for a soft per-token mask.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .. import ops
from ..capture.nodes import Step, arg, call_with, load_arg
from ..ops import torch_ops
from .base import Rule, unsupported


# --------------------------------------------------------------------------- one step


def propagate_three(a, b, c, act):
    """Three-player split of ``act(a + b + c)``: shares of a, b and of c (the bias)."""
    a_share = 0.5 * (act(a + c) - act(c) + act(a + b + c) - act(b + c))
    b_share = 0.5 * (act(b + c) - act(c) + act(a + b + c) - act(a + c))
    return a_share, b_share, act(c)


def propagate_tanh_two(a, b):
    """Two-player split of ``tanh(a + b)``."""
    return (0.5 * (torch.tanh(a) + (torch.tanh(a + b) - torch.tanh(b))),
            0.5 * (torch.tanh(b) + (torch.tanh(a + b) - torch.tanh(a))))


def lstm_cell_reference(rel_gates, irrel_gates, bias, out_gate, rel_c, irrel_c, in_phrase,
                        first: bool):
    """One LSTM step with both parts: gate pre-activations without bias ``(i, f, g)`` of each
    part (tuples), ``bias`` ``(b_i, b_f, b_g)``, the true output gate (sigmoid, from the full
    input), the previous cell parts. Returns (rel_c, irrel_c, rel_h, irrel_h). The
    bias-times-bias term goes to the relevant part inside the phrase (the reference's
    cd_text): ``in_phrase`` True / False, or a weight in [0, 1] (the relevant share)."""
    (rel_i, rel_f, rel_g), (irrel_i, irrel_f, irrel_g), (b_i, b_f, b_g) = rel_gates, irrel_gates, bias
    rel_ci, irrel_ci, bias_ci = propagate_three(rel_i, irrel_i, b_i, torch.sigmoid)
    rel_cg, irrel_cg, bias_cg = propagate_three(rel_g, irrel_g, b_g, torch.tanh)
    new_rel_c = rel_ci * (rel_cg + bias_cg) + bias_ci * rel_cg
    new_irrel_c = irrel_ci * (rel_cg + irrel_cg + bias_cg) + (rel_ci + bias_ci) * irrel_cg
    if isinstance(in_phrase, bool):
        if in_phrase:
            new_rel_c = new_rel_c + bias_ci * bias_cg
        else:
            new_irrel_c = new_irrel_c + bias_ci * bias_cg
    else:
        new_rel_c = new_rel_c + in_phrase * (bias_ci * bias_cg)
        new_irrel_c = new_irrel_c + (1 - in_phrase) * (bias_ci * bias_cg)
    if not first:
        rel_cf, irrel_cf, bias_cf = propagate_three(rel_f, irrel_f, b_f, torch.sigmoid)
        new_rel_c = new_rel_c + (rel_cf + bias_cf) * rel_c
        new_irrel_c = new_irrel_c + (rel_cf + irrel_cf + bias_cf) * irrel_c + irrel_cf * rel_c
    new_rel_h, new_irrel_h = propagate_tanh_two(new_rel_c, new_irrel_c)
    return new_rel_c, new_irrel_c, out_gate * new_rel_h, out_gate * new_irrel_h


def gru_cell_reference(rel_z, irrel_z, b_z, rel_n, irrel_n, b_n, rel_h, irrel_h, in_phrase):
    """One GRU step with both parts (the GRU rule, docs/text.md).

    rel_z, irrel_z: the update gate's pre-activation parts without bias (``W_iz x + W_hz h``
    of each part); b_z = b_iz + b_hz. rel_n, irrel_n: the candidate's pre-activation parts
    without bias, ``W_in x + r * (W_hn h)`` of each part with ``r`` the true reset gate
    (context from the total, as the LSTM's output gate); b_n = b_in + r * b_hn. rel_h,
    irrel_h: the previous hidden parts. in_phrase: the bias-times-bias term's relevant share
    (True / False or a weight in [0, 1]). Returns (rel_h, irrel_h) of ``(1 - z) n + z h``.

    z and n are split with the three-player rule; ``1 - z`` has the shares ``-z_r``, ``-z_i``
    and ``1 - sigmoid(b_z)``. As the LSTM's ``i * g``: a product of two shares is relevant
    when both are relevant or bias and not both bias; as its ``f * c``: the gate's relevant
    and bias shares carry the relevant state."""
    rel_cz, irrel_cz, bias_cz = propagate_three(rel_z, irrel_z, b_z, torch.sigmoid)
    rel_cn, irrel_cn, bias_cn = propagate_three(rel_n, irrel_n, b_n, torch.tanh)
    keep_b = 1 - bias_cz                    # bias share of 1 - z
    new_rel = -rel_cz * (rel_cn + bias_cn) + keep_b * rel_cn + (rel_cz + bias_cz) * rel_h
    new_irrel = (-irrel_cz * (rel_cn + irrel_cn + bias_cn) + (keep_b - rel_cz) * irrel_cn
                 + irrel_cz * rel_h + (rel_cz + irrel_cz + bias_cz) * irrel_h)
    bb = keep_b * bias_cn
    if isinstance(in_phrase, bool):
        if in_phrase:
            new_rel = new_rel + bb
        else:
            new_irrel = new_irrel + bb
    else:
        new_rel = new_rel + in_phrase * bb
        new_irrel = new_irrel + (1 - in_phrase) * bb
    return new_rel, new_irrel


def gru_cd_cell(rel_zn: torch.Tensor, total_zn: torch.Tensor, b_z: torch.Tensor, b_n: torch.Tensor,
                prev_rel_h: torch.Tensor, in_phrase: torch.Tensor) -> torch.Tensor:
    """One GRU step of CD for M masks (``gru_cell_reference`` with irrelevant = total - relevant).

    rel_zn:     (M, 2H) relevant pre-activations without bias of z and of the candidate n
                (``W_iz x_r + W_hz h_r``, ``W_in x_r + r * W_hn h_r``)
    total_zn:   (1, 2H) the same of the true GRU
    b_z:        (H,)    b_iz + b_hz
    b_n:        (1, H)  b_in + r * b_hn (r: the true reset gate of the step)
    prev_rel_h: (M, H)  relevant hidden state at t-1
    in_phrase:  (M,)    relevant share of the bias-times-bias term (1 in the phrase)
    Returns the relevant hidden state (M, H).
    """
    hid = prev_rel_h.shape[-1]
    m = rel_zn.shape[0]
    b = torch.cat([b_z.reshape(1, hid), b_n.reshape(1, hid)], dim=1)
    # act(rel + b), act(irrel + b) with irrel = total - rel, act(b), act(total + b)
    pre = torch.cat([rel_zn + b, (total_zn - rel_zn) + b, b, total_zn + b])
    act = torch.cat([torch.sigmoid(pre[:, :hid]), torch.tanh(pre[:, hid:])], dim=1)
    act_rel, act_irrel, act_b, act_all = act[:m], act[m:2 * m], act[2 * m:2 * m + 1], act[2 * m + 1:]
    share = 0.5 * ((act_rel - act_b) + (act_all - act_irrel))
    rel_z, rel_n = share.split(hid, dim=1)
    bias_z, bias_n = act_b.split(hid, dim=1)
    keep_b = 1 - bias_z
    return (-rel_z * (rel_n + bias_n) + keep_b * rel_n + in_phrase.unsqueeze(1) * (keep_b * bias_n)
            + (rel_z + bias_z) * prev_rel_h)


def cell_fn(backend: str) -> Callable:
    """The batched LSTM cell for M masks: the compiled op where built (``backend`` 'auto' or
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


def phrase_weight(rel: torch.Tensor, irrel: torch.Tensor) -> torch.Tensor:
    """Relevant share of each step's input, ``|r| / (|r| + |i|)`` summed over the last dim (0
    where both are 0): the bias-times-bias weight of the general engine (module docstring)."""
    a, b = rel.abs().sum(-1), irrel.abs().sum(-1)
    s = a + b
    return torch.where(s > 0, a / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))


# --------------------------------------------------------------------------- weights

_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def direction_weights(rnn: nn.Module, layer: int, reverse: bool, dtype: torch.dtype):
    """(w_ih, w_hh, b_ih, b_hh) of one layer and direction of an ``nn.LSTM`` / ``nn.GRU`` in
    ``dtype`` (zero biases for ``bias=False``). Without autograd the conversion is cached on
    the module, keyed by each parameter's storage and version (in-place updates are seen)."""
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    params = [getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx)]
    if rnn.bias:
        params += [getattr(rnn, "bias_ih" + sfx), getattr(rnn, "bias_hh" + sfx)]
    cache = None
    if not (torch.is_grad_enabled() and any(q.requires_grad for q in params)):
        cache = _WEIGHTS.setdefault(rnn, {})
        key = (dtype,) + tuple(map(ops.tensor_state, params))
        hit = cache.get((sfx, dtype))
        if hit is not None and hit[0] == key:
            return hit[1]
    w_ih, w_hh = params[0].to(dtype), params[1].to(dtype)
    if rnn.bias:
        b_ih, b_hh = params[2].to(dtype), params[3].to(dtype)
    else:
        b_ih = b_hh = torch.zeros(w_ih.shape[0], dtype=dtype, device=w_ih.device)
    out = (w_ih, w_hh, b_ih, b_hh)
    if cache is not None:
        cache[(sfx, dtype)] = (key, out)
    return out


def _order(T: int, reverse: bool) -> list[int]:
    return list(range(T - 1, -1, -1)) if reverse else list(range(T))


def _by_start(active: torch.Tensor, reverse: bool):
    """Masks sorted by their first active step in processing order: (perm, starts)."""
    T = active.shape[1]
    proc = active.flip(1) if reverse else active
    start = torch.where(proc.any(1), proc.to(torch.int8).argmax(1),
                        torch.full_like(proc[:, 0], T, dtype=torch.long))
    perm = torch.argsort(start, stable=True)
    return perm, start[perm].tolist()


def _steps_by_start(rel_in, phrase, active, reverse: bool, xw, w_ih):
    """The masks sorted by their first active step (``_by_start``) and their per-step inputs:
    (order, perm, starts, phrase (T, M), the relevant input times w_ih (T, M, G)); ``rel_in``
    None: token masks, ``phrase * xw``."""
    order = _order(phrase.shape[1], reverse)
    perm, starts = _by_start(active, reverse)
    phrase_steps = phrase[perm].T.contiguous()
    if rel_in is None:
        return order, perm, starts, phrase_steps, phrase_steps.unsqueeze(2) * xw.unsqueeze(1)
    return order, perm, starts, phrase_steps, rel_in[perm].transpose(0, 1) @ w_ih.T


# --------------------------------------------------------------------------- LSTM


def lstm_true_pass(xwb: torch.Tensor, w_hh_t: torch.Tensor, reverse: bool,
                   h0: torch.Tensor | None = None, c0: torch.Tensor | None = None):
    """The true LSTM of one direction without autograd, written into preallocated rows.

    xwb (T, 4H) ``W_ih x_t + b``; w_hh_t (H, 4H); h0, c0 (H,) the initial state (None: zero).
    Returns gates (T, 4H) with bias, act (T, 4H) (sigmoid of i, f, o; tanh of g in g's slot),
    c, tanh(c), h (T, H). Seven ops per step: every row view is made once (one ``unbind`` per
    buffer), not per step.
    """
    T, H = xwb.shape[0], w_hh_t.shape[0]
    new = xwb.new_empty
    G, A, TC = new(T, 4 * H), new(T, 4 * H), new(T, H)
    C, Hs = xwb.new_zeros(T + 1, H), xwb.new_zeros(T + 1, H)       # row T: the initial state
    if h0 is not None:
        Hs[T] = h0
    if c0 is not None:
        C[T] = c0
    rows = lambda m: m.unsqueeze(1).unbind(0)                       # noqa: E731  (1, X) rows
    xr, gr, ar, tcr, cr, hr = rows(xwb), rows(G), rows(A), rows(TC), rows(C), rows(Hs)
    g_g, a_i, a_f, a_g, a_o = (rows(G[:, 2 * H:3 * H]), rows(A[:, :H]), rows(A[:, H:2 * H]),
                               rows(A[:, 2 * H:3 * H]), rows(A[:, 3 * H:]))
    for t in _order(T, reverse):
        prev = t + 1 if reverse else t - 1                          # -1 and T: row T, initial
        torch.addmm(xr[t], hr[prev], w_hh_t, out=gr[t])
        torch.sigmoid(gr[t], out=ar[t])
        torch.tanh(g_g[t], out=a_g[t])
        torch.mul(a_i[t], a_g[t], out=cr[t]).addcmul_(a_f[t], cr[prev])
        torch.tanh(cr[t], out=tcr[t])
        torch.mul(a_o[t], tcr[t], out=hr[t])
    return G, A, C[:T], TC, Hs[:T]


def lstm_true_pass_autograd(xwb: torch.Tensor, w_hh_t: torch.Tensor, reverse: bool,
                            h0: torch.Tensor | None = None, c0: torch.Tensor | None = None):
    """``lstm_true_pass`` with autograd (no out= buffers): the same arithmetic."""
    T, H = xwb.shape[0], w_hh_t.shape[0]
    gates, acts, cs, tcs, hs = [None] * T, [None] * T, [None] * T, [None] * T, [None] * T
    h = xwb.new_zeros(1, H) if h0 is None else h0.reshape(1, H)
    c = xwb.new_zeros(1, H) if c0 is None else c0.reshape(1, H)
    for t in _order(T, reverse):
        g = torch.addmm(xwb[t:t + 1], h, w_hh_t)
        s = torch.sigmoid(g)
        tg = torch.tanh(g[:, 2 * H:3 * H])
        c = torch.addcmul(s[:, :H] * tg, s[:, H:2 * H], c)
        tc = torch.tanh(c)
        h = s[:, 3 * H:] * tc
        gates[t], cs[t], tcs[t], hs[t] = g, c, tc, h
        acts[t] = torch.cat([s[:, :2 * H], tg, s[:, 3 * H:]], dim=1)
    return (torch.cat(gates), torch.cat(acts), torch.cat(cs), torch.cat(tcs), torch.cat(hs))


@dataclass
class LSTMDirection:
    """Weights and the true (total) pass of one LSTM layer and direction for one sequence."""
    w_ih: torch.Tensor       # (4H, In)
    w_hh: torch.Tensor       # (4H, H)
    bias: torch.Tensor       # (4H,)  b_ih + b_hh
    reverse: bool
    xw: torch.Tensor         # (T, 4H) W_ih x_t of the true input, no bias
    gates: torch.Tensor      # (T, 4H) W_ih x_t + W_hh h_{t-1}, no bias
    c: torch.Tensor          # (T, H) true cell state
    h: torch.Tensor          # (T, H) true hidden state
    o: torch.Tensor          # (T, H) sigmoid of the true output gate
    w_hh_t: torch.Tensor | None = None  # (H, 4H) contiguous W_hh^T (faster small GEMMs)
    fast: Any = None         # per-step constants of the text engine's one-layer fast path
    c0: torch.Tensor | None = None      # (1, H) initial cell; None: zero (no forget term at step 0)

    @classmethod
    def total(cls, x: torch.Tensor, w_ih, w_hh, b_ih, b_hh, reverse: bool, h0=None, c0=None):
        """The true pass of x (T, In); h0, c0 (H,) or None."""
        bias = b_ih + b_hh
        w_hh_t = w_hh.T.contiguous()
        xw = x @ w_ih.T
        xwb = xw + bias
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (xwb, w_hh_t, h0, c0))
        run = lstm_true_pass_autograd if grad else lstm_true_pass
        gates, act, c, _, h = run(xwb, w_hh_t, reverse, h0, c0)
        H = w_hh.shape[1]
        return cls(w_ih, w_hh, bias, reverse, xw, gates - bias, c, h, act[:, 3 * H:], w_hh_t,
                   c0=None if c0 is None else c0.reshape(1, H))

    def relevant(self, rel_in: torch.Tensor | None, phrase: torch.Tensor, active: torch.Tensor,
                 keep_sequence: bool, cell: Callable):
        """Relevant hidden states of M masks: (M, T, H) if ``keep_sequence`` else the state
        after the direction's last step (M, H); and the relevant cell after it (M, H).

        rel_in: the relevant input (M, T, In), or None for ``phrase * x`` (token masks);
        phrase: (M, T) the bias-times-bias weight of each step; active: (M, T) where a mask
        has a relevant input. A mask's relevant state is exactly zero until its first active
        step (the cell maps zero relevant gates and cell to zero), so masks are sorted by
        that step and step k computes only the rows that have started.
        """
        M, T = phrase.shape
        H = self.w_hh.shape[1]
        order, perm, starts, phrase_steps, xw_steps = _steps_by_start(rel_in, phrase, active, self.reverse,
                                                                      self.xw, self.w_ih)  # xw: (T, M, 4H)
        new = phrase.new_zeros
        w_hh_t = self.w_hh_t if self.w_hh_t is not None else self.w_hh.T
        rel_h = rel_c = new(0, H)
        seq = new(M, T, H) if keep_sequence else None
        n = 0
        for k in range(starts[0] if M else T, T):
            t = order[k]
            while n < M and starts[n] <= k:
                n += 1
            if n > rel_h.shape[0]:  # rows starting now join with a zero state
                pad = new(n - rel_h.shape[0], H)
                rel_h, rel_c = torch.cat([rel_h, pad]), torch.cat([rel_c, pad])
            first = k == 0 and self.c0 is None
            if k > 0:
                prev_c = self.c[order[k - 1]:order[k - 1] + 1]
            else:
                prev_c = self.c0 if self.c0 is not None else self.c[t:t + 1]  # unused if first
            rel_gates = torch.addmm(xw_steps[t, :n], rel_h, w_hh_t)
            rel_c, rel_h = cell(rel_gates, self.gates[t:t + 1], self.bias, self.o[t:t + 1],
                                rel_c, prev_c, phrase_steps[t, :n], first)
            if keep_sequence:
                seq[:n, t] = rel_h
        inverse = torch.argsort(perm)
        if n < M:
            rel_c = torch.cat([rel_c, new(M - n, H)])
        if keep_sequence:
            return seq[inverse], rel_c[inverse]
        if n < M:
            rel_h = torch.cat([rel_h, new(M - n, H)])
        return rel_h[inverse], rel_c[inverse]


def lstm_reference_direction(rel_x, irrel_x, w_ih, w_hh, bias, phrase, reverse: bool,
                             h0=None, c0=None):
    """One LSTM direction of one mask, both parts propagated, one step at a time.

    rel_x, irrel_x: (T, In); bias: b_ih + b_hh; phrase: (T,) booleans (in the phrase) or
    weights; h0, c0: (H,) initial state (an irrelevant constant) or None (zero, and no forget
    term at the first step, as ``cd_text``). Returns (rel_out, irrel_out) (T, H) and the final
    cell parts (rel_c, irrel_c) (H,).
    """
    T = rel_x.shape[0]
    W_ii, W_if, W_ig, W_io = w_ih.chunk(4, 0)
    W_hi, W_hf, W_hg, W_ho = w_hh.chunk(4, 0)
    b_i, b_f, b_g, b_o = bias.chunk(4)
    H = w_hh.shape[1]
    rel_out, irrel_out = rel_x.new_zeros(T, H), rel_x.new_zeros(T, H)
    rel_h = rel_c = rel_x.new_zeros(H)
    irrel_h = rel_x.new_zeros(H) if h0 is None else h0
    irrel_c = rel_x.new_zeros(H) if c0 is None else c0
    for k, t in enumerate(_order(T, reverse)):
        rel_gates = (W_hi @ rel_h + W_ii @ rel_x[t], W_hf @ rel_h + W_if @ rel_x[t],
                     W_hg @ rel_h + W_ig @ rel_x[t])
        irrel_gates = (W_hi @ irrel_h + W_ii @ irrel_x[t], W_hf @ irrel_h + W_if @ irrel_x[t],
                       W_hg @ irrel_h + W_ig @ irrel_x[t])
        # the output gate of the true LSTM: full input, full previous hidden state
        o = torch.sigmoid(W_io @ (rel_x[t] + irrel_x[t]) + W_ho @ (rel_h + irrel_h) + b_o)
        p = phrase[t]   # a bool (the text reference) or a weight
        rel_c, irrel_c, rel_h, irrel_h = lstm_cell_reference(
            rel_gates, irrel_gates, (b_i, b_f, b_g), o, rel_c, irrel_c, p,
            k == 0 and c0 is None)
        rel_out[t], irrel_out[t] = rel_h, irrel_h
    return rel_out, irrel_out, rel_c, irrel_c


# --------------------------------------------------------------------------- GRU


@dataclass
class GRUDirection:
    """Weights and the true (total) pass of one GRU layer and direction for one sequence."""
    w_ih: torch.Tensor       # (3H, In) rows r, z, n
    w_hh: torch.Tensor       # (3H, H)
    b_ih: torch.Tensor       # (3H,)
    b_hh: torch.Tensor       # (3H,)
    reverse: bool
    xw: torch.Tensor         # (T, 3H) W_ih x_t, no bias
    r: torch.Tensor          # (T, H) the true reset gate
    total_zn: torch.Tensor   # (T, 2H) W_iz x + W_hz h_{t-1}, W_in x + r * W_hn h_{t-1} (no bias)
    b_z: torch.Tensor        # (H,) b_iz + b_hz
    b_n: torch.Tensor        # (T, H) b_in + r * b_hn
    h: torch.Tensor          # (T, H) true hidden state
    w_zn_t: torch.Tensor     # (H, 2H) contiguous W_hh^T of z and n
    fast: Any = None         # no fast path for the GRU (the text engine's LSTM has one)

    @classmethod
    def total(cls, x: torch.Tensor, w_ih, w_hh, b_ih, b_hh, reverse: bool, h0=None):
        """The true pass of x (T, In); h0 (H,) or None (zero)."""
        T, H = x.shape[0], w_hh.shape[1]
        xw = x @ w_ih.T
        w_hh_t = w_hh.T
        h = x.new_zeros(1, H) if h0 is None else h0.reshape(1, H)
        rs, zn, bn, hs = [None] * T, [None] * T, [None] * T, [None] * T
        for t in _order(T, reverse):
            hw = h @ w_hh_t                                             # (1, 3H)
            r = torch.sigmoid(xw[t:t + 1, :H] + b_ih[:H] + hw[:, :H] + b_hh[:H])
            pre_z = xw[t:t + 1, H:2 * H] + hw[:, H:2 * H]
            pre_n = xw[t:t + 1, 2 * H:] + r * hw[:, 2 * H:]
            b_n = b_ih[2 * H:] + r * b_hh[2 * H:]
            z = torch.sigmoid(pre_z + (b_ih[H:2 * H] + b_hh[H:2 * H]))
            n = torch.tanh(pre_n + b_n)
            h = (1 - z) * n + z * h
            rs[t], zn[t], bn[t], hs[t] = r, torch.cat([pre_z, pre_n], 1), b_n, h
        return cls(w_ih, w_hh, b_ih, b_hh, reverse, xw, torch.cat(rs), torch.cat(zn),
                   b_ih[H:2 * H] + b_hh[H:2 * H], torch.cat(bn), torch.cat(hs),
                   w_hh[H:].T.contiguous())

    def relevant(self, rel_in: torch.Tensor | None, phrase: torch.Tensor, active: torch.Tensor,
                 keep_sequence: bool, cell: Callable | None = None):
        """Relevant hidden states of M masks, as ``LSTMDirection.relevant`` (the second value
        is None: a GRU has no cell). ``cell`` is ignored (one pure-torch GRU cell)."""
        M, T = phrase.shape
        H = self.w_hh.shape[1]
        order, perm, starts, phrase_steps, xw_steps = _steps_by_start(
            rel_in, phrase, active, self.reverse, self.xw[:, H:], self.w_ih[H:])  # xw: (T, M, 2H): z, n
        new = phrase.new_zeros
        rel_h = new(0, H)
        seq = new(M, T, H) if keep_sequence else None
        n = 0
        for k in range(starts[0] if M else T, T):
            t = order[k]
            while n < M and starts[n] <= k:
                n += 1
            if n > rel_h.shape[0]:
                rel_h = torch.cat([rel_h, new(n - rel_h.shape[0], H)])
            hw = rel_h @ self.w_zn_t                                    # (n, 2H)
            x_zn = xw_steps[t, :n]
            rel_zn = torch.cat([x_zn[:, :H] + hw[:, :H], x_zn[:, H:] + self.r[t] * hw[:, H:]], 1)
            rel_h = gru_cd_cell(rel_zn, self.total_zn[t:t + 1], self.b_z, self.b_n[t:t + 1],
                                rel_h, phrase_steps[t, :n])
            if keep_sequence:
                seq[:n, t] = rel_h
        inverse = torch.argsort(perm)
        if keep_sequence:
            return seq[inverse], None
        if n < M:
            rel_h = torch.cat([rel_h, new(M - n, H)])
        return rel_h[inverse], None


def gru_reference_direction(rel_x, irrel_x, w_ih, w_hh, b_ih, b_hh, phrase, reverse: bool,
                            h0=None):
    """One GRU direction of one mask, both parts propagated, one step at a time.

    rel_x, irrel_x: (T, In); phrase: (T,) booleans or weights; h0: (H,) initial state (an
    irrelevant constant) or None. Returns (rel_out, irrel_out), each (T, H).
    """
    T = rel_x.shape[0]
    W_ir, W_iz, W_in = w_ih.chunk(3, 0)
    W_hr, W_hz, W_hn = w_hh.chunk(3, 0)
    b_ir, b_iz, b_in = b_ih.chunk(3)
    b_hr, b_hz, b_hn = b_hh.chunk(3)
    H = w_hh.shape[1]
    rel_out, irrel_out = rel_x.new_zeros(T, H), rel_x.new_zeros(T, H)
    rel_h = rel_x.new_zeros(H)
    irrel_h = rel_x.new_zeros(H) if h0 is None else h0
    for t in _order(T, reverse):
        # the reset gate of the true GRU: full input, full previous hidden state
        r = torch.sigmoid(W_ir @ (rel_x[t] + irrel_x[t]) + W_hr @ (rel_h + irrel_h) + b_ir + b_hr)
        p = phrase[t]   # a bool (the text reference) or a weight
        rel_h, irrel_h = gru_cell_reference(
            W_iz @ rel_x[t] + W_hz @ rel_h, W_iz @ irrel_x[t] + W_hz @ irrel_h, b_iz + b_hz,
            W_in @ rel_x[t] + r * (W_hn @ rel_h), W_in @ irrel_x[t] + r * (W_hn @ irrel_h),
            b_in + r * b_hn, rel_h, irrel_h, p)
        rel_out[t], irrel_out[t] = rel_h, irrel_h
    return rel_out, irrel_out


# --------------------------------------------------------------------------- the rule


class Recurrent(Rule):
    """``nn.LSTM`` and ``nn.GRU`` as leaf modules of the general engine: input (T, N, In) or
    batch_first (N, T, In); the output tuple ``(out, (h_n, c_n))`` / ``(out, h_n)`` is read
    through getitem. An initial state passed as ``hx`` must not depend on the input (it is
    a constant: irrelevant). Every layer and direction runs the text engine's cell rule; the
    bias-times-bias weight is the relevant share of the module input at each step."""
    kind = "recurrent"
    modules = (nn.LSTM, nn.GRU)
    row = ("`nn.LSTM`, `nn.GRU` (layers, bidirectional, batch_first; output read through getitem)",
           "the LSTM rule (`cd_text`) / the GRU rule (docs/text.md) per layer and direction",
           "the rest (a constant initial state joins here)")

    def claim(self, graph, node, dep, module):
        if getattr(module, "proj_size", 0):
            raise unsupported(node, "nn.LSTM with proj_size > 0 (no CD rule for the projection)")
        x = arg(node, 0, "input")
        if not isinstance(x, fx.Node) or x not in dep:
            raise unsupported(node, "the recurrent input must be the decomposed tensor (a "
                                    "PackedSequence or a constant input has no rule)")
        if any(d is not x for d in dep):
            raise unsupported(node, "an initial state computed from the input (pass a constant "
                                    "hx, or none)")
        return Step(node, self, dep, module=module)

    @staticmethod
    def _state(step, value_of):
        """(h0, c0) of the call, (L*D, N, H) each, or None."""
        hx = load_arg(value_of, arg(step.node, 1, "hx"))
        if hx is None:
            return None, None
        if isinstance(step.module, nn.LSTM):
            return hx
        return hx, None

    @staticmethod
    def _batch_major(mod, t: torch.Tensor) -> torch.Tensor:
        """(N, T, F) from the module's layout."""
        return t if mod.batch_first else t.transpose(0, 1)

    def _directions(self, step, value_of, x: torch.Tensor) -> list:
        """The true pass of every layer and direction, per sequence of the batch: aux[n] is
        the list of layers (each a list of directions) of sample n."""
        m = step.module
        if x.dim() != 3:
            raise unsupported(step.node, f"an unbatched {x.dim()}-d input (give the batch dim)")
        h0, c0 = self._state(step, value_of)
        D = 2 if m.bidirectional else 1
        aux = []
        for n, seq in enumerate(self._batch_major(m, x).unbind(0)):
            layers = []
            for layer in range(m.num_layers):
                dirs = []
                for d in range(D):
                    w = direction_weights(m, layer, d == 1, x.dtype)
                    k = layer * D + d
                    h_init = None if h0 is None else h0[k, n]
                    if isinstance(m, nn.LSTM):
                        dirs.append(LSTMDirection.total(seq, *w, d == 1, h_init,
                                                        None if c0 is None else c0[k, n]))
                    else:
                        dirs.append(GRUDirection.total(seq, *w, d == 1, h_init))
                layers.append(dirs)
                seq = torch.cat([dd.h for dd in dirs], dim=1)
            aux.append(layers)
        return aux

    def total(self, step, value_of):
        x = value_of(step.dep[0])
        return call_with(step, value_of, {}), self._directions(step, value_of, x)

    def _pack(self, step, out_seq, h_n, c_n):
        """The module's output structure from (R, T, D*H) outputs and (L*D, R, H) states."""
        m = step.module
        out = out_seq if m.batch_first else out_seq.transpose(0, 1)
        if isinstance(m, nn.LSTM):
            return out, (h_n, c_n)
        return out, h_n

    def relevant(self, step, rel, values, aux, ops, m):
        """Rows of the relevant part belong to the batch's sequences mask-major (row j to
        sequence j % N: N = 1 for the engine, the CDEP pass's K masks of N sequences)."""
        mod = step.module
        x = values[step.dep[0]]
        if aux is None or len(aux) != self._batch_major(mod, x).shape[0]:
            aux = self._directions(step, values.__getitem__, x)     # the CDEP pass gives none
        r = self._batch_major(mod, rel[step.dep[0]])                    # (R, T, In)
        xs = self._batch_major(mod, x)                                  # (N, T, In)
        N, R = xs.shape[0], r.shape[0]
        cell = getattr(ops, "lstm_cd_cell", torch_ops.lstm_cd_cell)
        lstm = isinstance(mod, nn.LSTM)
        if N == 1:
            out, h_n, c_n = self._relevant_rows(aux[0], r, xs, cell)
        else:
            parts = [self._relevant_rows(aux[n], r[n::N], xs[n:n + 1], cell) for n in range(N)]
            order = torch.argsort(torch.cat([torch.arange(n, R, N) for n in range(N)]))
            out = torch.cat([p[0] for p in parts])[order]
            h_n = torch.cat([p[1] for p in parts], dim=1)[:, order]
            c_n = torch.cat([p[2] for p in parts], dim=1)[:, order] if lstm else None
        return self._pack(step, out, h_n, c_n)

    @staticmethod
    def _relevant_rows(layers, r, x, cell):
        """Relevant (out (R, T, D*H), h_n (L*D, R, H), c_n or None) of R rows of one sequence."""
        phrase = phrase_weight(r, x - r)                                # (R, T)
        active = (r != 0).any(2)
        rel_in, T = r, r.shape[1]
        h_n, c_n = [], []
        for dirs in layers:
            active = active | (rel_in != 0).any(2)
            outs = []
            for dd in dirs:
                seq, c_last = dd.relevant(rel_in, phrase, active, True, cell)
                outs.append(seq)
                h_n.append(seq[:, 0 if dd.reverse else T - 1])
                c_n.append(c_last)
            rel_in = torch.cat(outs, dim=2)
        return rel_in, torch.stack(h_n), (torch.stack(c_n) if c_n[0] is not None else None)

    def reference(self, step, parts, value_of, aux):
        mod = step.module
        r, i = (self._batch_major(mod, t) for t in parts[step.dep[0]])     # (R, T, In)
        h0, c0 = self._state(step, value_of)
        rows = [self._reference_row(mod, aux[j % len(aux)], r[j], i[j], h0, c0, j % len(aux))
                for j in range(r.shape[0])]
        lstm = isinstance(mod, nn.LSTM)

        def packed(which: int):
            seq = torch.stack([row[which][0] for row in rows])
            hn = torch.stack([row[which][1] for row in rows], dim=1)
            cn = torch.stack([row[which][2] for row in rows], dim=1) if lstm else None
            return self._pack(step, seq, hn, cn)

        return packed(0), packed(1)

    @staticmethod
    def _reference_row(mod, layers, rs, is_, h0, c0, n):
        """Both parts of one row (T, In) through every layer and direction: ((out, h_n, c_n)
        relevant, (out, h_n, c_n) irrelevant), c_n None for a GRU."""
        phrase = phrase_weight(rs, is_)
        T = rs.shape[0]
        finals = []   # per layer and direction: (rel_h, irrel_h, rel_c, irrel_c) after the last step
        for layer, dirs in enumerate(layers):
            outs = []
            for d, dd in enumerate(dirs):
                k = layer * len(dirs) + d
                h_init = None if h0 is None else h0[k, n]
                if isinstance(mod, nn.LSTM):
                    ro, io, rc, ic = lstm_reference_direction(
                        rs, is_, dd.w_ih, dd.w_hh, dd.bias, phrase, dd.reverse, h_init,
                        None if c0 is None else c0[k, n])
                else:
                    ro, io = gru_reference_direction(rs, is_, dd.w_ih, dd.w_hh, dd.b_ih, dd.b_hh,
                                                     phrase, dd.reverse, h_init)
                    rc = ic = None
                last = 0 if dd.reverse else T - 1
                finals.append((ro[last], io[last], rc, ic))
                outs.append((ro, io))
            rs = torch.cat([o[0] for o in outs], dim=1)
            is_ = torch.cat([o[1] for o in outs], dim=1)
        lstm = isinstance(mod, nn.LSTM)
        rel = (rs, torch.stack([f[0] for f in finals]), torch.stack([f[2] for f in finals]) if lstm else None)
        irrel = (is_, torch.stack([f[1] for f in finals]), torch.stack([f[3] for f in finals]) if lstm else None)
        return rel, irrel

"""Pure-torch definitions of the fused CD element-wise ops.

These are the formulas of design.md section 2, batched over M masks, written once
in torch. They are (1) the ``torch`` backend of the engine, (2) the fallback when
the compiled extension is absent, and (3) the oracle the compiled ops
(``torch.ops.fastacd.*``) are tested against. Signatures match the compiled ops.

Shapes: ``M`` masks share one true activation (batch 1). Channel-wise parameters
broadcast over dim 1 (``C``); any trailing dims are spatial.
"""
from __future__ import annotations

import functools

import torch

EPS = 1e-20  # the reference's constant in the conv/linear bias split
SMALL_POWER = 16  # numerical zero's split of two small parts (kernels/cd_math.h kSmallPower)


def in_opmath(fn):
    """Run ``fn`` on half and bfloat16 tensors in float32 and round its results once, as the
    compiled kernels do (``at::opmath_type``): in half the 16th powers of the split and the
    eps underflow or overflow (NaN splits), and bfloat16 would round at every step."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        low = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if low not in (torch.float16, torch.bfloat16):
            return fn(*args, **kwargs)
        up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == low else a  # noqa: E731
        out = fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
        return tuple(o.to(low) for o in out) if isinstance(out, tuple) else out.to(low)
    return wrapped


def _channel_view(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector (C,) to broadcast along dim 1 of ``like``."""
    return p.reshape((1, -1) + (1,) * (like.dim() - 2))


def split_weights(zr: torch.Tensor, zi: torch.Tensor, tol: torch.Tensor | None, eps):
    """(relevant weight, irrelevant weight) of a split ratio ``w_r / (w_r + w_i)``.

    Without ``tol``: ``|zr| + eps``, ``|zi| + eps`` (the reference's formula). With ``tol``
    (the element's magnitude scale times the zero tolerance), numerical zero (design.md
    section 9, docs/engine.md "Numerical zero"): a part's weight ramps from 0 at tol/2 to its
    magnitude at tol, so a rounding residue next to a genuine part weighs exactly 0; the weight
    the ramp removes is shared by 16th powers (the split of two small parts). Continuous
    except at two exact zeros, so rounding cannot flip a split; tol = 0 is the formula above.
    """
    ar, ai = zr.abs(), zi.abs()
    if tol is None:
        return ar + eps, ai + eps
    tol = tol.to(ar.dtype)  # a half tol would flush ``tiny`` to 0 (0/0 in the ramp)
    tiny = torch.finfo(ar.dtype).tiny

    def ramp(t):
        return torch.where(tol > 0, ((2 * t - tol) / tol.clamp_min(tiny)).clamp(0, 1), (t > 0).to(t.dtype))
    top = torch.maximum(ar, ai).clamp_min(tiny)
    qr, qi = (ar / top) ** SMALL_POWER, (ai / top) ** SMALL_POWER
    small = qr / (qr + qi).clamp_min(tiny)  # the relevant part's share of two small parts
    rr, ri = ramp(ar), ramp(ai)
    rest = (1 - torch.maximum(rr, ri)) * (ar + ai)  # the ramp is monotone: the larger part's
    return ar * rr + rest * small + eps, ai * ri + rest * (1 - small) + eps


@in_opmath
def bias_split(rel_pre: torch.Tensor, total_pre: torch.Tensor, bias: torch.Tensor,
               relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """Relevant output of a conv/linear layer for M masks.

    rel_pre:   (M, C, *S)  W * r, no bias
    total_pre: (1, C, *S)  W * a, no bias (a = r + i, shared by all masks)
    bias:      (C,)
    tol:       (1, C, *S) or None: numerical zero (``split_weights``)
    Returns (M, C, *S): ``zr + pr * b`` with ``zi = total_pre - rel_pre`` and
    ``pr = (|zr| + eps) / ((|zr| + eps) + (|zi| + eps))``; followed by ``relu`` if asked
    (the ReLU rule's relevant part is ``relu(r)``).
    """
    zi = total_pre - rel_pre
    prop_rel, prop_irrel = split_weights(rel_pre, zi, tol, EPS)
    out = rel_pre + prop_rel / (prop_rel + prop_irrel) * _channel_view(bias, rel_pre)
    return out.clamp_min(0) if relu else out


def bias_split_(rel_pre: torch.Tensor, total_pre: torch.Tensor, bias: torch.Tensor,
                relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """``bias_split`` written into ``rel_pre`` (the compiled op's in-place form)."""
    return rel_pre.copy_(bias_split(rel_pre, total_pre, bias, relu, tol))


def bias_split_window_(rel_pre: torch.Tensor, total_pre: torch.Tensor, bias: torch.Tensor, oy: torch.Tensor,
                       ox: torch.Tensor, relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """``bias_split_`` of the windowed pass: rel_pre (M, C, h, w), each candidate's window
    values, against total_pre (and tol) (1, C, H, W) read at its window's corner oy, ox (M,)
    int64 (the window inside the map). Written into rel_pre and returned."""
    h, w = rel_pre.shape[2:]

    def at_windows(t):
        return window_gather(t, None, None, None, oy, ox, h, w)
    return rel_pre.copy_(bias_split(rel_pre, at_windows(total_pre), bias, relu,
                                    None if tol is None else at_windows(tol.expand_as(total_pre))))


@in_opmath
def bn_split(rel: torch.Tensor, total: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """Relevant output of an eval-mode batchnorm ``scale * a + shift`` for M masks.

    rel:   (M, C, *S) relevant input r
    total: (1, C, *S) true input a (i = a - r)
    scale, shift: (C,)
    tol:   (1, C, *S) or None: numerical zero (``split_weights``)
    Returns ``s*r + qr * shift`` with ``qr = |s r| / (|s r| + |s i|)`` and ``qr = 0``
    where that is 0/0 (no eps here, as in the reference); then ``relu`` if asked.
    """
    s = _channel_view(scale, rel)
    sr = s * rel
    ar, ai = split_weights(sr, s * (total - rel), tol, 0)
    denom = ar + ai
    qr = torch.where(denom == 0, torch.zeros_like(denom), ar / denom)
    out = sr + qr * _channel_view(shift, rel)
    return out.clamp_min(0) if relu else out


def bn_split_(rel: torch.Tensor, total: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
              relu: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """``bn_split`` written into ``rel`` (the compiled op's in-place form)."""
    return rel.copy_(bn_split(rel, total, scale, shift, relu, tol))


def maxpool_gather(rel: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Max-pool of M relevant maps at the argmax positions of the shared total.

    rel:     (M, C, H, W) (or (M, C, L) for 1-d pooling)
    indices: (1, C, Ho, Wo) int64, flat positions into H*W as returned by
             ``max_pool2d(total, ..., return_indices=True)``
    Returns (M, C, Ho, Wo).
    """
    m, c = rel.shape[:2]
    flat = rel.flatten(2) if rel.dim() > 2 else rel[..., None]  # (flatten: M = 0 works too)
    idx = indices.flatten(2).expand(m, c, -1)
    return flat.gather(2, idx).reshape((m, c) + tuple(indices.shape[2:]))


def window_gather(base: torch.Tensor, win: torch.Tensor | None, win_oy: torch.Tensor | None,
                  win_ox: torch.Tensor | None, oy: torch.Tensor, ox: torch.Tensor, h: int, w: int,
                  indices: torch.Tensor | None = None) -> torch.Tensor:
    """Every candidate's map of a node, read over an h x w window of its own (the windowed
    pass's crops, pastes and max-pool gathers; ``fastacd.windowed``).

    base:   (1, C, H, W)  the base mask's relevant map
    win:    (M, C, wh, ww) each candidate's recomputed window of it, at corners
            win_oy, win_ox (M,) int64; None: every candidate's map is the base
    oy, ox: (M,) int64    the corner of each candidate's output window
    indices: None: output (j, c, y, x) is candidate j's map at (oy[j] + y, ox[j] + x), zero
            outside the map (a conv's zero padding). (1, C, Ho, Wo) int64, a max-pool's argmax
            over the total (flat positions into H x W): candidate j's map at
            indices[0, c, oy[j] + y, ox[j] + x] (the window must lie inside Ho x Wo).
    Returns (M, C, h, w). Candidate j's map is ``base`` outside its window and ``win[j]`` inside.
    """
    c, hgt, wid = base.shape[1:]
    dev, m = base.device, oy.shape[0]
    flat_base = base.reshape(c, hgt * wid)
    if indices is None:
        ys = (oy[:, None] + torch.arange(h, device=dev))[:, :, None].expand(m, h, w).reshape(1, -1)
        xs = (ox[:, None] + torch.arange(w, device=dev))[:, None, :].expand(m, h, w).reshape(1, -1)
        inside = (ys >= 0) & (ys < hgt) & (xs >= 0) & (xs < wid)
        out = flat_base.index_select(1, (ys.clamp(0, hgt - 1) * wid + xs.clamp(0, wid - 1))[0])
    else:
        ho_all, wo_all = indices.shape[2:]
        yo = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]
        xo = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]
        pos = indices.reshape(c, ho_all * wo_all).index_select(1, (yo * wo_all + xo).reshape(-1))  # (C, M*h*w)
        ys, xs, inside = torch.div(pos, wid, rounding_mode="floor"), pos % wid, None
        out = flat_base.gather(1, pos)
    if win is not None:
        wh, ww = win.shape[2:]
        j = torch.arange(m, device=dev).repeat_interleave(h * w)
        ry, rx = ys - win_oy[j], xs - win_ox[j]
        in_win = (ry >= 0) & (ry < wh) & (rx >= 0) & (rx < ww)
        widx = j * (wh * ww) + ry.clamp(0, max(wh - 1, 0)) * ww + rx.clamp(0, max(ww - 1, 0))
        flat_win = win.transpose(0, 1).reshape(c, m * wh * ww)
        if m * wh * ww > 0:
            picked = flat_win.index_select(1, widx[0]) if widx.shape[0] == 1 else flat_win.gather(1, widx)
            out = torch.where(in_win, picked, out)
    if inside is not None and not bool(inside.all()):
        out = torch.where(inside, out, out.new_zeros(()))
    return out.reshape(c, m, h, w).transpose(0, 1).contiguous()


@in_opmath
def lstm_cd_cell(rel_gates: torch.Tensor, total_gates: torch.Tensor, bias: torch.Tensor,
                 out_gate: torch.Tensor, prev_rel_c: torch.Tensor, prev_total_c: torch.Tensor,
                 in_phrase: torch.Tensor, first_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step of CD (the reference ``cd_text`` cell rule) for M masks.

    rel_gates:    (M, 4H) ``W_ih x_t*[t in phrase] + W_hh rel_h_{t-1}``, no bias, gates i,f,g,o
    total_gates:  (1, 4H) ``W_ih x_t + W_hh h_{t-1}`` of the true LSTM, no bias
    bias:         (4H,)   ``b_ih + b_hh``
    out_gate:     (1, H)  ``sigmoid`` of the true output gate (the reference computes o
                          from the full input, not split)
    prev_rel_c:   (M, H)  relevant cell state at t-1 (ignored on the first step)
    prev_total_c: (1, H)  true cell state at t-1 (ignored on the first step)
    in_phrase:    (M,)    1.0 where token t is relevant: the ``sigmoid(b_i) * tanh(b_g)``
                          term goes to the relevant part there, to the irrelevant part elsewhere
    first_step:   no forget-gate term at t = 0
    Returns ``(rel_c, rel_h)``, each (M, H).

    Irrelevant pre-activations are ``total - relevant``: the reference's separate irrelevant
    propagation sums with the relevant one to the true LSTM state exactly (the three-player
    split of a gate sums to ``f(a + b + c)``), so this is the same number up to rounding.
    """
    hid = prev_rel_c.shape[-1]
    m = rel_gates.shape[0]
    b3 = bias[:3 * hid].unsqueeze(0)                       # (1, 3H) biases of i, f, g
    total3 = total_gates[:, :3 * hid] + b3                 # (1, 3H) true pre-activations
    rel3 = rel_gates[:, :3 * hid]
    # every activation the three-player split needs, in one batch of rows:
    # act(rel + b), act(irrel + b) with irrel = total - rel, act(b), act(total + b)
    pre = torch.cat([rel3 + b3, total3 - rel3, b3, total3])
    act = torch.cat([torch.sigmoid(pre[:, :2 * hid]), torch.tanh(pre[:, 2 * hid:])], dim=1)
    act_rel, act_irrel, act_b, act_all = act[:m], act[m:2 * m], act[2 * m:2 * m + 1], act[2 * m + 1:]
    # relevant share of the split: 0.5 * [(act(a + c) - act(c)) + (act(a + b + c) - act(b + c))]
    share = 0.5 * ((act_rel - act_b) + (act_all - act_irrel))
    rel_i, rel_f, rel_g = share.split(hid, dim=1)
    bias_i, bias_f, bias_g = act_b.split(hid, dim=1)
    all_i, all_f, all_g = act_all.split(hid, dim=1)
    rel_c = rel_i * (rel_g + bias_g) + bias_i * rel_g + in_phrase.unsqueeze(1) * (bias_i * bias_g)
    total_c = all_i * all_g
    if not first_step:
        rel_c = rel_c + (rel_f + bias_f) * prev_rel_c
        total_c = total_c + all_f * prev_total_c
    # two-player tanh split of the cell: relevant share of tanh(rel_c + irrel_c)
    th = torch.tanh(torch.cat([rel_c, total_c - rel_c, total_c]))
    rel_h = out_gate * (0.5 * (th[:m] + (th[2 * m:] - th[m:2 * m])))
    return rel_c, rel_h

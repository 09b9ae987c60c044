"""Attention with probabilities from the total (design.md section 8).

``P = softmax(q k^T * scale + bias/mask)`` is computed once from the true activations and
shared by all masks; the values are split by the affine rule (their projection's bias by
the parts' magnitudes), and the output parts are ``P v_r`` and ``P v_i``; an output
projection is split by the affine rule again. So only the value path carries masks: the
queries, keys, masks and everything that only feeds them are context (``RuleSet.context``:
each rule's ``context_operands``), never decomposed.

* ``F.scaled_dot_product_attention``: masks (bool, float), ``is_causal``, ``scale``, GQA;
* ``nn.MultiheadAttention`` as one module: ``batch_first`` or not, ``key_padding_mask``,
  ``attn_mask``, ``need_weights`` / ``average_attn_weights`` (the weights are the total's:
  context), ``add_bias_kv`` and ``add_zero_attn`` (their key/value tokens are constants);
* torchvision's ``shifted_window_attention`` (Swin, an fx leaf function whose Python control
  flow on sizes keeps the tracer out): pad, cyclic shift and window partition part-wise,
  the same attention inside the windows, and back;
* ``torch.einsum`` and (``rules.gates.MatMul``) ``@`` with one decomposed operand and the
  other a constant or context: the explicit ``q @ k.transpose(-2, -1) -> softmax -> @ v``.
"""
from __future__ import annotations

import math
import operator
import string

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, UnsupportedOpError, call_with, describe_node, load_arg
from .affine import linear_no_bias, own_buffer, split_bias, split_bias_tokens
from .base import Rule, mask_dim, merge_masks, only_gates, per_mask, unsupported

try:  # torchvision is optional
    from torchvision.models.swin_transformer import shifted_window_attention as _tv_swin_attention
except ImportError:
    _tv_swin_attention = None


# --------------------------------------------------------------------------------------
# The shared product
# --------------------------------------------------------------------------------------
def without_subnormals(p: torch.Tensor) -> torch.Tensor:
    """Attention probabilities with their subnormal entries set to 0 (float32 and below: Swin's
    shifted-window mask of -100 gives exp(-100) = 4e-44). A CPU multiplies subnormals 10-100x
    slower (Swin's P @ v per mask: 87 ms instead of 1 ms), and they move no sum of products
    with a probability of at least 1/S by a representable amount."""
    if p.dtype == torch.float64 or not p.is_floating_point():
        return p
    return p.masked_fill(p.abs() < torch.finfo(p.dtype).tiny, 0)


def shared_matmul(p: torch.Tensor, r: torch.Tensor, total) -> torch.Tensor:
    """``p @ v`` for every mask: ``p`` (..., L, S) shared by all masks (attention probabilities
    of the total), ``r`` the values' relevant part, masks in one dim of the total's shape
    ``total`` (..., S, d). Returns (..., L, d) with the masks in the same dim.

    One product per mask into one output: ``torch.matmul`` broadcasting ``p`` over the masks
    copies it M times (heads x tokens^2 each), more than the product itself costs. ``p`` should
    be free of subnormals (``without_subnormals``)."""
    total = tuple(total)
    k = mask_dim(r.shape, total)
    if k >= len(total) - 2:
        raise UnsupportedOpError("an attention product whose values hold the masks in their token "
                                 "or feature dim (the samples would mix)")
    rm = per_mask(r, total)  # (M, ..., S, d)
    batch = torch.broadcast_shapes(p.shape[:-2], rm.shape[1:-2])
    shape = (rm.shape[0],) + tuple(batch) + (p.shape[-2], rm.shape[-1])
    if torch.is_grad_enabled() and (p.requires_grad or rm.requires_grad):  # out= has no autograd
        out = torch.matmul(p.unsqueeze(0), rm)
    else:
        out = rm.new_empty(shape)
        for j in range(rm.shape[0]):
            torch.matmul(p, rm[j], out=out[j])
    return merge_masks(out, k + len(shape) - 1 - len(total))


def attention_probs(q, k, mask=None, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)``, as ``F.scaled_dot_product_attention`` defines it
    (a bool mask keeps where True; ``is_causal``: the lower triangle)."""
    L, S = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1)


def _args(node: fx.Node, names: tuple) -> dict:
    """A call's arguments by name (positional ones named in order)."""
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


# --------------------------------------------------------------------------------------
# F.scaled_dot_product_attention
# --------------------------------------------------------------------------------------
class ScaledDotProductAttention(Rule):
    kind = "sdpa"
    functions = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention)
    row = ("`F.scaled_dot_product_attention`, its `aten` op (bool/float masks, `is_causal`, `scale`, GQA)",
           "`P @ v_r`, `P = softmax(q k^T * scale + mask)` of the total", "`P @ v_i`")
    NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def claim(self, graph, node, dep, module):
        a = _args(node, self.NAMES)
        if a.get("value") not in dep:
            raise unsupported(node, "attention whose values do not depend on the input (only its "
                                    "weights do): not linear in a decomposed value")
        dropout = a.get("dropout_p", 0.0)
        if isinstance(dropout, fx.Node) or dropout:
            raise unsupported(node, "dropout_p > 0: scaled_dot_product_attention drops weights at "
                                    "random even in eval; pass dropout_p=0.0 outside training")
        for name in ("is_causal", "scale", "enable_gqa"):
            if isinstance(a.get(name), fx.Node) and a[name] in graph.reach:
                raise unsupported(node, f"{name} computed from the input")
        return Step(node, self, dep)

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def context_operands(self, graph, node, reach, gates):
        a = _args(node, self.NAMES)
        return ({a.get("query"), a.get("key"), a.get("attn_mask")} & reach) - {a.get("value")}

    def _gqa(self, step, value_of):
        a = _args(step.node, self.NAMES)
        q, v = load_arg(value_of, a["query"]), value_of(a["value"])
        if a.get("enable_gqa") and q.dim() >= 3 and q.shape[-3] != v.shape[-3]:
            return q.shape[-3] // v.shape[-3]
        return 1

    def total(self, step, value_of):
        """``P @ v`` with the P the parts use: the definition of the op (fused kernels differ
        from it by rounding only), computed as the relevant part is, so that a mask holding
        everything gets exactly the total and the bias splits after it see no rounding residue."""
        a = load_arg(value_of, _args(step.node, self.NAMES))
        p = without_subnormals(attention_probs(a["query"], a["key"], a.get("attn_mask"),
                                               bool(a.get("is_causal", False)), a.get("scale"),
                                               bool(a.get("enable_gqa", False))))
        return p @ self._values(step, a["value"], value_of), p

    def _values(self, step, v, value_of):
        g = self._gqa(step, value_of)
        return v if g == 1 else v.repeat_interleave(g, dim=-3)

    def reference(self, step, parts, value_of, aux):
        r, i = parts[_args(step.node, self.NAMES)["value"]]
        return (aux @ self._values(step, r, value_of), aux @ self._values(step, i, value_of))

    def relevant(self, step, rel, values, aux, ops, m):
        d = _args(step.node, self.NAMES)["value"]
        total = values[d]
        r, total = self._values(step, rel[d], values.__getitem__), self._values(step, total, values.__getitem__)
        return shared_matmul(aux, r, total.shape)


# --------------------------------------------------------------------------------------
# nn.MultiheadAttention
# --------------------------------------------------------------------------------------
class MultiheadAttention(Rule):
    """``nn.MultiheadAttention`` as one module: queries and keys (their projections, the masks)
    from the total, the value projection and the output projection by the affine rule."""
    kind = "multihead_attention"
    modules = (nn.MultiheadAttention,)
    row = ("`nn.MultiheadAttention` (`batch_first`, `key_padding_mask`, `attn_mask`, `need_weights`, "
           "`add_bias_kv`, `add_zero_attn`)", "`out_proj(P @ v_proj(r))`, biases split, `P` of the total",
           "the rest; the weights output is the total's")
    NAMES = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")

    def claim(self, graph, node, dep, module):
        a = _args(node, self.NAMES)
        if a.get("value") not in dep:
            raise unsupported(node, "attention whose values do not depend on the input (only its "
                                    "weights do): not linear in a decomposed value")
        for name in ("need_weights", "average_attn_weights", "is_causal"):
            if isinstance(a.get(name), fx.Node):
                raise unsupported(node, f"{name} computed in forward")
        for u in node.users:
            if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)):
                raise unsupported(node, "its output read other than as `out, weights = attn(...)`")
            if u.args[1] == 1 and u.users and u not in graph.context:
                raise unsupported(node, "its attention weights read as a decomposed value: they are "
                                        "computed from the total (context) and only modulate values")
        return Step(node, self, dep, module=module)

    def context_operands(self, graph, node, reach, gates):
        a = _args(node, self.NAMES)
        names = ("query", "key", "key_padding_mask", "attn_mask")
        return ({a.get(n) for n in names} & reach) - {a.get("value")}

    @staticmethod
    def _v_params(mha: nn.MultiheadAttention):
        e = mha.embed_dim
        w = mha.in_proj_weight[2 * e:] if mha._qkv_same_embed_dim else mha.v_proj_weight
        b = mha.in_proj_bias[2 * e:] if mha.in_proj_bias is not None else None
        return w, b

    def total(self, step, value_of):
        """The module's output computed as ``F.multi_head_attention_forward`` does with
        ``need_weights=True`` (the explicit product of its probabilities with the values; a fast
        path differs by rounding only), the way the parts are computed: a mask holding everything
        gets exactly the total. The probabilities are the module's own (masks, ``bias_k``, the
        zero token and all)."""
        mha, a = step.module, load_arg(value_of, _args(step.node, self.NAMES))
        if a["query"].dim() != 3:
            raise UnsupportedOpError(f"{describe_node(step.node)}: unbatched inputs (CD needs the batch dim)")
        _, p = mha(a["query"], a["key"], a["value"], key_padding_mask=a.get("key_padding_mask"),
                   need_weights=True, attn_mask=a.get("attn_mask"), average_attn_weights=False,
                   is_causal=bool(a.get("is_causal", False)))
        p = without_subnormals(p)
        wv, bv = _v_params(mha)
        v_pre = linear_no_bias(_batch_first(mha, a["value"]), wv)
        v = v_pre if bv is None else v_pre + bv
        o_pre = linear_no_bias(_merge_heads(p @ _heads(mha, v, mha.bias_v)), mha.out_proj.weight)
        out = o_pre if mha.out_proj.bias is None else o_pre + mha.out_proj.bias
        weights = None
        if a.get("need_weights", True):
            weights = p.mean(dim=1) if a.get("average_attn_weights", True) else p
        return (_batch_first(mha, out), weights), (p, v_pre, o_pre)

    def reference(self, step, parts, value_of, aux):
        mha, (p, _, _) = step.module, aux
        r, i = parts[_args(step.node, self.NAMES)["value"]]
        wv, bv = _v_params(mha)
        vr, vi = split_bias(linear_no_bias(_batch_first(mha, r), wv),
                            linear_no_bias(_batch_first(mha, i), wv), bv, last=True)
        wo, bo = mha.out_proj.weight, mha.out_proj.bias
        zr = linear_no_bias(_merge_heads(p @ _heads(mha, vr, None)), wo)
        zi = linear_no_bias(_merge_heads(p @ _heads(mha, vi, mha.bias_v)), wo)
        out_r, out_i = split_bias(zr, zi, bo, last=True)
        return (_batch_first(mha, out_r), None), (_batch_first(mha, out_i), None)

    def relevant(self, step, rel, values, aux, ops, m):
        mha, (p, v_pre, o_pre) = step.module, aux
        d = _args(step.node, self.NAMES)["value"]
        r = per_mask(rel[d], values[d].shape)                     # (M, *value's total shape)
        r = r.transpose(1, 2) if not mha.batch_first else r
        r = r.flatten(0, 1)                                       # (M * B, S, E): masks outer
        wv, bv = _v_params(mha)
        zv = linear_no_bias(r, wv)
        vr = zv if bv is None else split_bias_tokens(ops, zv, v_pre, bv, False, own_buffer(zv, r))
        heads = _heads(mha, vr, None)
        o = shared_matmul(p, heads, (p.shape[0],) + tuple(heads.shape[1:]))
        zo = linear_no_bias(_merge_heads(o), mha.out_proj.weight)
        bo = mha.out_proj.bias
        out = zo if bo is None else split_bias_tokens(ops, zo, o_pre, bo, False, own_buffer(zo, o))
        if not mha.batch_first:  # (L, M * B, E): the masks outer in the batch dim
            b = o_pre.shape[0]
            out = out.view((m, b) + tuple(out.shape[1:])).permute(2, 0, 1, 3).flatten(1, 2)
        return out, None


def _v_params(mha: nn.MultiheadAttention):
    """The value projection's weight and bias."""
    e = mha.embed_dim
    w = mha.in_proj_weight[2 * e:] if mha._qkv_same_embed_dim else mha.v_proj_weight
    b = mha.in_proj_bias[2 * e:] if mha.in_proj_bias is not None else None
    return w, b


def _batch_first(mha: nn.MultiheadAttention, t: torch.Tensor) -> torch.Tensor:
    """(L, B, E) <-> (B, L, E) for a module that is not batch_first."""
    return t if mha.batch_first else t.transpose(0, 1)


def _heads(mha: nn.MultiheadAttention, v: torch.Tensor, bias_v) -> torch.Tensor:
    """Projected values (B, S, E) -> heads (B, heads, S', d) with the module's constant tokens:
    ``add_bias_kv``'s ``bias_v`` (None: zeros, a part without it) and ``add_zero_attn``'s zeros."""
    b, _, e = v.shape
    if mha.bias_v is not None:
        tok = bias_v.reshape(1, 1, e) if bias_v is not None else v.new_zeros(1, 1, e)
        v = torch.cat([v, tok.expand(b, 1, e)], 1)
    h = mha.num_heads
    v = v.unflatten(-1, (h, e // h)).transpose(1, 2)
    if mha.add_zero_attn:
        v = torch.cat([v, v.new_zeros(b, h, 1, e // h)], 2)
    return v


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    return o.transpose(1, 2).flatten(2)


# --------------------------------------------------------------------------------------
# torchvision's Swin: shifted_window_attention
# --------------------------------------------------------------------------------------
class _Windows:
    """Swin's padding, cyclic shift and window partition of (B, H, W, C) maps, and back, as
    torchvision's ``shifted_window_attention`` does them (part-wise: each part alike)."""

    def __init__(self, shape, window_size, shift_size):
        _, self.H, self.W, self.C = shape
        ws = self.ws = [int(w) for w in window_size]
        self.pad_r = (ws[1] - self.W % ws[1]) % ws[1]
        self.pad_b = (ws[0] - self.H % ws[0]) % ws[0]
        self.pH, self.pW = self.H + self.pad_b, self.W + self.pad_r
        shift = [int(s) for s in shift_size]
        if ws[0] >= self.pH:  # a window larger than the map: no shift
            shift[0] = 0
        if ws[1] >= self.pW:
            shift[1] = 0
        self.shift = shift
        self.nw = (self.pH // ws[0]) * (self.pW // ws[1])

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B * windows, window tokens, C)."""
        ws, b = self.ws, x.shape[0]
        x = F.pad(x, (0, 0, 0, self.pad_r, 0, self.pad_b))
        if sum(self.shift) > 0:
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        x = x.view(b, self.pH // ws[0], ws[0], self.pW // ws[1], ws[1], self.C)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(b * self.nw, ws[0] * ws[1], self.C)

    def join(self, x: torch.Tensor) -> torch.Tensor:
        """(B * windows, window tokens, C) -> (B, H, W, C)."""
        ws = self.ws
        b = x.shape[0] // self.nw
        x = x.view(b, self.pH // ws[0], self.pW // ws[1], ws[0], ws[1], self.C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, self.pH, self.pW, self.C)
        if sum(self.shift) > 0:
            x = torch.roll(x, shifts=(self.shift[0], self.shift[1]), dims=(1, 2))
        return x[:, :self.H, :self.W, :].contiguous()

    def mask(self, like: torch.Tensor) -> torch.Tensor | None:
        """The shifted windows' attention mask (windows, N, N): -100 between tokens that the
        shift brought from different regions (torchvision's values), None without a shift."""
        if sum(self.shift) == 0:
            return None
        ws, shift = self.ws, self.shift
        m = like.new_zeros((self.pH, self.pW))
        h_slices = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                m[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        m = m.view(self.pH // ws[0], ws[0], self.pW // ws[1], ws[1])
        m = m.permute(0, 2, 1, 3).reshape(self.nw, ws[0] * ws[1])
        m = m.unsqueeze(1) - m.unsqueeze(2)
        return m.masked_fill(m != 0, float(-100.0)).masked_fill(m == 0, float(0.0))


class SwinWindowAttention(Rule):
    """torchvision's ``shifted_window_attention`` (Swin and Swin V2). It is an fx leaf function
    (``torch.fx.wrap``) with Python control flow on the map's size (padding, whether to shift),
    so the tracer cannot enter it; this rule does its steps on the parts instead: padding,
    cyclic shift and window partition part-wise (the padding's zeros join neither part), the
    value projection by the affine rule, ``P`` of the total (relative position bias, the
    shifted windows' mask, V2's cosine attention), the output projection by the affine rule,
    and back. The total is the function's own output; the rule's replica of it must agree."""
    kind = "window_attention"
    functions = (_tv_swin_attention,) if _tv_swin_attention is not None else ()
    row = ("torchvision's `shifted_window_attention` (Swin, Swin V2)",
           "windows of `r`, then as attention: `proj(P @ v(r))`, biases split", "the rest")
    NAMES = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
             "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")

    def claim(self, graph, node, dep, module):
        a = _args(node, self.NAMES)
        if dep != [a.get("input")]:
            raise unsupported(node, "weights or biases computed from the input")
        if a.get("training", True) is not False:
            raise unsupported(node, "training=True (attention dropout): call model.eval()")
        return Step(node, self, dep)

    def _parts(self, step, value_of):
        a = load_arg(value_of, _args(step.node, self.NAMES))
        return a, _Windows(a["input"].shape, a["window_size"], a["shift_size"])

    def total(self, step, value_of):
        a, win = self._parts(step, value_of)
        out = call_with(step, value_of, {})  # the function itself
        x = win.split(a["input"])
        c, heads = win.C, int(a["num_heads"])
        qkv_bias = a.get("qkv_bias")
        if a.get("logit_scale") is not None and qkv_bias is not None:  # V2: no key bias
            qkv_bias = torch.cat([qkv_bias[:c], torch.zeros_like(qkv_bias[c:2 * c]), qkv_bias[2 * c:]])
        qkv_pre = linear_no_bias(x, a["qkv_weight"])
        qkv = qkv_pre if qkv_bias is None else qkv_pre + qkv_bias
        qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if a.get("logit_scale") is not None:  # V2: cosine attention
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(a["logit_scale"], max=math.log(100.0)).exp()
        else:
            attn = (q * (c // heads) ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + a["relative_position_bias"]
        mask = win.mask(x)
        if mask is not None:
            n = x.size(1)
            attn = attn.view(x.size(0) // win.nw, win.nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, n, n)
        p = without_subnormals(F.softmax(attn, dim=-1))
        v_pre = linear_no_bias(x, a["qkv_weight"][2 * c:])  # as the relevant part's (same rounding)
        o_pre = linear_no_bias(_merge_heads(p.matmul(v)), a["proj_weight"])
        proj_bias = a.get("proj_bias")
        mine = win.join(o_pre if proj_bias is None else o_pre + proj_bias)
        # the replica is the total (computed as the parts are: a mask holding everything gets
        # exactly the total); it must be the function's output up to rounding
        scale = float(out.detach().abs().max()) + 1e-30
        if not torch.allclose(mine, out, rtol=1e-3, atol=1e-3 * scale):
            raise UnsupportedOpError(
                f"{describe_node(step.node)}: this torchvision's shifted_window_attention computes "
                "something fastacd's window_attention rule does not reproduce; please report it")
        return mine, (win, p, v_pre, o_pre)

    def _v(self, step, value_of):
        a = load_arg(value_of, _args(step.node, self.NAMES))
        c = a["input"].shape[-1]
        w, b = a["qkv_weight"][2 * c:], a.get("qkv_bias")
        return w, (b[2 * c:] if b is not None else None), a["proj_weight"], a.get("proj_bias"), int(a["num_heads"])

    def reference(self, step, parts, value_of, aux):
        win, p, _, _ = aux
        wv, bv, wo, bo, heads = self._v(step, value_of)
        r, i = parts[step.dep[0]]
        vr, vi = split_bias(linear_no_bias(win.split(r), wv), linear_no_bias(win.split(i), wv), bv, last=True)

        def attend(v):
            return _merge_heads(p @ v.unflatten(-1, (heads, -1)).transpose(1, 2))
        zr, zi = split_bias(linear_no_bias(attend(vr), wo), linear_no_bias(attend(vi), wo), bo, last=True)
        return win.join(zr), win.join(zi)

    def relevant(self, step, rel, values, aux, ops, m):
        win, p, v_pre, o_pre = aux
        wv, bv, wo, bo, heads = self._v(step, values.__getitem__)
        d = step.dep[0]
        r = per_mask(rel[d], values[d].shape).flatten(0, 1)  # (M * B, H, W, C): masks outer
        x = win.split(r)                                      # (M * B * windows, N, C)
        zv = linear_no_bias(x, wv)
        vr = zv if bv is None else split_bias_tokens(ops, zv, v_pre, bv, False, own_buffer(zv, x))
        vh = vr.unflatten(-1, (heads, -1)).transpose(1, 2)
        o = shared_matmul(p, vh, (p.shape[0],) + tuple(vh.shape[1:]))
        zo = linear_no_bias(_merge_heads(o), wo)
        out = zo if bo is None else split_bias_tokens(ops, zo, o_pre, bo, False, own_buffer(zo, o))
        return win.join(out)                                  # (M * B, H, W, C)


# --------------------------------------------------------------------------------------
# torch.einsum with one decomposed operand
# --------------------------------------------------------------------------------------
class Einsum(Rule):
    """``torch.einsum`` with one decomposed operand, the others constants or context (MaxViT's
    ``einsum("BGHIJ,BGHJD->BGHID", attn, v)``): linear in it."""
    kind = "einsum"
    functions = (torch.einsum,)
    row = ("`torch.einsum` with one decomposed operand (the others constants or context: "
           "attention weights)", "`einsum(.., r, ..)`", "`einsum(.., i, ..)`")

    @staticmethod
    def _operands(node):
        ops_ = node.args[1:]
        if len(ops_) == 1 and isinstance(ops_[0], (tuple, list)):
            ops_ = tuple(ops_[0])
        return list(ops_)

    def claim(self, graph, node, dep, module):
        eq = node.args[0]
        if not isinstance(eq, str):
            raise unsupported(node, "an einsum equation that is not a constant string")
        if "..." in eq:
            raise unsupported(node, "an einsum equation with an ellipsis")
        operands = self._operands(node)
        mine = [j for j, t in enumerate(operands) if t in graph.dependent]
        if len(mine) != 1:
            raise unsupported(node, "an einsum of several decomposed operands (a product of "
                                    "input-dependent values, not linear)")
        return Step(node, self, dep, extra={"operand": mine[0]})

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def context_operands(self, graph, node, reach, gates):
        operands = [t for t in self._operands(node) if isinstance(t, fx.Node) and t in reach]
        others = [t for t in operands if t not in gates]
        return {t for t in operands if t in gates} if len(others) == 1 else set()

    def _call(self, step, value_of, t, eq=None):
        args = [load_arg(value_of, a) for a in self._operands(step.node)]
        args[step.extra["operand"]] = t
        return torch.einsum(eq or step.node.args[0], *args)

    def reference(self, step, parts, value_of, aux):
        r, i = parts[self._operands(step.node)[step.extra["operand"]]]
        return self._call(step, value_of, r), self._call(step, value_of, i)

    def relevant(self, step, rel, values, aux, ops, m):
        j = step.extra["operand"]
        d = self._operands(step.node)[j]
        lhs, arrow, out = step.node.args[0].replace(" ", "").partition("->")
        terms = lhs.split(",")
        if not arrow:  # implicit output: the letters used once, in order
            out = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
        k = mask_dim(rel[d].shape, values[d].shape)
        z = next(c for c in string.ascii_letters if c not in lhs)  # a letter for the masks
        terms[j] = z + terms[j]
        res = self._call(step, values.__getitem__, per_mask(rel[d], values[d].shape),
                         ",".join(terms) + "->" + z + out)
        letter = terms[j][1 + k]
        return merge_masks(res, out.index(letter) if letter in out else 0)

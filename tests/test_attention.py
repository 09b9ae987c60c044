"""Attention with probabilities from the total (design.md section 8) and the structural ops
transformers need: every rule against the reference (float64 tight, float32), batched = one
mask at a time, relevant + irrelevant = the model's output, an empty mask stays empty, and
hand-computed checks (P @ (mask * x) with identity projections, a causal mask, Swin's
windows through the dedicated rule against the same attention written out).

Real models, as built (LayerNorms through the norm rules): torchvision's ViT, Swin (V1, V2)
and MaxViT and timm's ViT, DeiT, CaiT, XCiT, Swin (V1, V2), BEiT in small configurations.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from fastacd.rules.base import mask_dim, merge_masks, per_mask

from conftest import assert_close_scaled

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = fastacd.available_backends()


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def token_masks(n_tokens: int, n: int = 4, seed: int = 1) -> torch.Tensor:
    """(n + 2, N, 1): random token sets, then all tokens and none."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(n, n_tokens, 1, generator=g) > 0.5).double()
    return torch.cat([m, torch.ones(1, n_tokens, 1), torch.zeros(1, n_tokens, 1)])


def image_masks(h: int, w: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(n, 1, h, w, generator=g) > 0.5).double()
    return torch.cat([m, torch.ones(1, 1, h, w), torch.zeros(1, 1, h, w)])


def full_masks(masks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return masks.expand((masks.shape[0],) + tuple(x.shape[1:])).contiguous()


def check_model(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, *, backends=BACKENDS,
                one_by_one: bool = True, empty: bool = True) -> fastacd.CDResult:
    """Engine (every backend, float64 and float32) against the float64 reference; sums; batched
    = one mask at a time; the empty mask (the last) has nothing relevant. Returns the float64
    result of the first backend."""
    model = model.eval().double()
    x, masks = x.double(), full_masks(masks.double(), x)

    close = assert_close_scaled
    with torch.no_grad():
        ref_rel, ref_irrel = fastacd.reference.cd(model, x, masks)
        out = model(x)
        assert_close_scaled(ref_rel + ref_irrel, out.expand_as(ref_rel), torch.float64)
        first = None
        for dtype in (torch.float64, torch.float32):
            model, xd, md = model.to(dtype), x.to(dtype), masks.to(dtype)
            outd = model(xd)
            for backend in backends:
                dec = fastacd.Decomposer(model, backend=backend)
                res = dec.cd(xd, md)
                close(res.relevant, ref_rel.to(dtype), dtype)
                close(res.irrelevant, ref_irrel.to(dtype), dtype)
                assert_close_scaled(res.relevant + res.irrelevant, outd.expand_as(res.relevant), dtype)
                if one_by_one:
                    one = torch.cat([dec.cd(xd, m[None]).relevant for m in md])
                    close(res.relevant, one, dtype)
                if empty:
                    assert res.relevant[-1].abs().max() <= 1e-5 * outd.abs().max()
                if first is None:
                    first = res
        model.double()
    return first


# --------------------------------------------------------------------------------------
# the mask layout
# --------------------------------------------------------------------------------------
def test_mask_layout_round_trips():
    total = (4, 5, 3)  # e.g. 4 windows of a batch of one
    t = torch.randn(6, *total)
    merged = merge_masks(t, 0)
    assert merged.shape == (24, 5, 3) and mask_dim(merged.shape, total) == 0
    torch.testing.assert_close(per_mask(merged, total), t)
    # masks in a dim of their own where the total has its batch of 1, moved by a permute
    t1 = torch.randn(6, 3, 1, 2, 5)
    moved = merge_masks(t1, 1)
    assert moved.shape == (3, 6, 2, 5)
    torch.testing.assert_close(per_mask(moved, (3, 1, 2, 5)), t1)


def test_linear_bias_split_on_tokens_runs_on_rows_without_copies():
    """The token path gives the formula's numbers (every backend) and, from a contiguous
    pre-activation, writes in place."""
    from fastacd.ops import torch_ops
    from fastacd.rules.affine import split_bias_tokens
    torch.manual_seed(0)
    zr, pre, b = torch.randn(5, 7, 3, 6), torch.randn(1, 7, 3, 6), torch.randn(6)
    want = torch_ops.bias_split(zr.movedim(-1, 1), pre.movedim(-1, 1), b).movedim(1, -1)
    for ops in (fastacd.ops, torch_ops):
        torch.testing.assert_close(split_bias_tokens(ops, zr.clone(), pre, b, False, False), want)
        z = zr.clone()
        assert split_bias_tokens(ops, z, pre, b, False, True) is z
        torch.testing.assert_close(z, want)
    # masks merged with the windows: (M * windows, N, F) against a total (windows, N, F)
    zw, prew = torch.randn(3 * 4, 5, 6), torch.randn(4, 5, 6)
    want = torch_ops.bias_split(zw.reshape(3, 4, 5, 6).movedim(-1, 1), prew[None].movedim(-1, 1), b)
    torch.testing.assert_close(split_bias_tokens(fastacd.ops, zw, prew, b, False, False),
                               want.movedim(1, -1).reshape(12, 5, 6))


# --------------------------------------------------------------------------------------
# F.scaled_dot_product_attention
# --------------------------------------------------------------------------------------
class SDPANet(nn.Module):
    """qkv projection -> heads -> SDPA -> output projection -> head, with a mask variant."""

    def __init__(self, variant="plain", dim=8, heads=2, tokens=5):
        super().__init__()
        self.variant, self.heads, self.d = variant, heads, dim // heads
        kv_heads = 1 if variant == "gqa" else heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim * tokens, 3)
        g = torch.Generator().manual_seed(3)
        self.register_buffer("bool_mask", torch.rand(tokens, tokens, generator=g) > 0.3)
        self.bool_mask[:, 0] = True  # every query sees a key
        self.register_buffer("float_mask", torch.randn(1, heads, tokens, tokens, generator=g))

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.d).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, -1, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        kw = {}
        if self.variant == "bool":
            kw["attn_mask"] = self.bool_mask
        elif self.variant == "float":
            kw["attn_mask"] = self.float_mask
        elif self.variant == "causal":
            kw["is_causal"] = True
        elif self.variant == "scale":
            kw["scale"] = 0.3
        elif self.variant == "gqa":
            kw["enable_gqa"] = True
        elif self.variant == "input_mask":  # a key padding mask computed from the input: context
            keep = x[..., 0] < x[..., 0].max(-1, keepdim=True).values
            kw["attn_mask"] = keep[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, **kw)
        return self.head(self.proj(o.transpose(1, 2).reshape(b, n, c)).flatten(1))


SDPA_VARIANTS = ["plain", "bool", "float", "causal", "scale", "gqa", "input_mask"]


@pytest.mark.parametrize("variant", SDPA_VARIANTS)
def test_sdpa_matches_reference(variant):
    torch.manual_seed(0)
    model = SDPANet(variant)
    x = torch.randn(1, 5, 8)
    dec = fastacd.Decomposer(model.eval())
    assert "sdpa" in {s.kind for s in dec.graph.steps.values()}
    # the queries and keys are context: never decomposed
    assert not any(s.module is model.q for s in dec.graph.steps.values())
    check_model(model, x, token_masks(5))


def test_sdpa_causal_hand_computed():
    """Identity values: the relevant output is P @ (mask * x), P the causal attention of the
    true input."""
    class Causal(nn.Module):
        def forward(self, x):
            q = x * 0.7
            return F.scaled_dot_product_attention(q, x, x, is_causal=True).flatten(1)

    torch.manual_seed(0)
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    masks = full_masks(token_masks(6), x)
    scores = (0.7 * x) @ x.transpose(-2, -1) / 2.0
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(scores, -1)
    for backend in BACKENDS:
        res = fastacd.Decomposer(Causal().eval(), backend=backend).cd(x, masks)
        torch.testing.assert_close(res.relevant, (p @ (masks * x)).flatten(1))
    # the first token attends only to itself: its output is relevant exactly where it is kept
    torch.testing.assert_close(res.relevant[:, :4], (masks * x)[:, 0])


def test_sdpa_with_dropout_is_refused():
    class Drop(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, dropout_p=0.1).flatten(1)

    with pytest.raises(fastacd.UnsupportedOpError, match="dropout_p > 0"):
        fastacd.Decomposer(Drop().eval())


# --------------------------------------------------------------------------------------
# nn.MultiheadAttention
# --------------------------------------------------------------------------------------
class MHANet(nn.Module):
    def __init__(self, batch_first=True, kpm=None, attn_mask=None, need_weights=False, average=True,
                 bias=True, bias_kv=False, zero_attn=False, cross=False, dim=8, heads=2, tokens=5):
        super().__init__()
        self.batch_first, self.kpm, self.mask_kind = batch_first, kpm, attn_mask
        self.need_weights, self.average, self.cross = need_weights, average, cross
        self.pre = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                          batch_first=batch_first, kdim=6 if cross else None,
                                          vdim=6 if cross else None)
        self.kv_in = nn.Linear(dim, 6)
        self.head = nn.Linear(dim * tokens, 3)
        g = torch.Generator().manual_seed(4)
        s = tokens + (1 if bias_kv else 0) + (1 if zero_attn else 0)
        self.register_buffer("bool_mask", torch.rand(tokens, tokens, generator=g) > 0.7)
        self.bool_mask[:, 0] = False  # True = not allowed to attend; keep one key for every query
        self.register_buffer("float_mask", torch.randn(tokens, tokens, generator=g))
        self.register_buffer("pad", torch.tensor([[False] * (tokens - 2) + [True, False]]))
        self.s = s

    def forward(self, x):
        h = self.pre(x)
        kv = self.kv_in(x) if self.cross else h
        kw = {"need_weights": self.need_weights}
        if not self.average:
            kw["average_attn_weights"] = False
        if self.kpm == "constant":
            kw["key_padding_mask"] = self.pad
        elif self.kpm == "input":  # from the input: context
            kw["key_padding_mask"] = x[..., 0] == x[..., 0].max(-1, keepdim=True).values
        if self.mask_kind == "bool":
            kw["attn_mask"] = self.bool_mask
        elif self.mask_kind == "float":
            kw["attn_mask"] = self.float_mask
        q = h
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out, _ = self.attn(q, kv, kv, **kw)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.flatten(1))


MHA_VARIANTS = {
    "plain": {}, "seq_first": {"batch_first": False}, "need_weights": {"need_weights": True},
    "per_head_weights": {"need_weights": True, "average": False},
    "key_padding": {"kpm": "constant"}, "input_key_padding": {"kpm": "input"},
    "bool_mask": {"attn_mask": "bool"}, "float_mask_seq_first": {"attn_mask": "float", "batch_first": False},
    "no_bias": {"bias": False}, "bias_kv_zero_attn": {"bias_kv": True, "zero_attn": True, "kpm": "constant"},
    "cross_kdim_vdim": {"cross": True, "batch_first": False},
}


@pytest.mark.parametrize("variant", list(MHA_VARIANTS))
def test_multihead_attention_matches_reference(variant):
    torch.manual_seed(0)
    model = MHANet(**MHA_VARIANTS[variant])
    with torch.no_grad():  # visible biases (torch initialises the projections' biases at zero)
        for p in (model.attn.in_proj_bias, model.attn.out_proj.bias, model.attn.bias_v, model.attn.bias_k):
            if p is not None:
                p.normal_()
    x = torch.randn(1, 5, 8)
    dec = fastacd.Decomposer(model.eval())
    assert "multihead_attention" in {s.kind for s in dec.graph.steps.values()}
    check_model(model, x, token_masks(5))


def test_multihead_attention_hand_computed():
    """Identity projections with biases: the value bias split by the affine rule, P of the
    total, the output projection's bias split again, all written out."""
    torch.manual_seed(0)
    e, n = 4, 6
    mha = nn.MultiheadAttention(e, 1, batch_first=True).double().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([torch.eye(e)] * 3))
        mha.in_proj_bias.normal_()
        mha.out_proj.weight.copy_(torch.eye(e))
        mha.out_proj.bias.normal_()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            out, _ = self.attn(x, x, x)
            return out.flatten(1)

    x = torch.randn(1, n, e, dtype=torch.float64)
    masks = full_masks(token_masks(n), x)
    bq, bk, bv = mha.in_proj_bias.detach().split(e)
    p = torch.softmax((x + bq) @ (x + bk).transpose(-2, -1) / math.sqrt(e), -1)

    def split(zr, zi, b):
        pr = (zr.abs() + 1e-20) / (zr.abs() + zi.abs() + 2e-20)
        return zr + pr * b, zi + (1 - pr) * b

    vr, vi = split(masks * x, (1 - masks) * x, bv)
    out_r, _ = split(p @ vr, p @ vi, mha.out_proj.bias.detach())
    for backend in BACKENDS:
        res = fastacd.Decomposer(Net().eval(), backend=backend).cd(x, masks)
        torch.testing.assert_close(res.relevant, out_r.flatten(1))
    # without biases it is exactly P @ (mask * x)
    with torch.no_grad():
        mha.in_proj_bias.zero_()
        mha.out_proj.bias.zero_()
    p0 = torch.softmax(x @ x.transpose(-2, -1) / math.sqrt(e), -1)
    res = fastacd.Decomposer(Net().eval()).cd(x, masks)
    torch.testing.assert_close(res.relevant, (p0 @ (masks * x)).flatten(1))


def test_multihead_attention_weights_read_as_a_value_are_refused():
    class UsesWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            out, w = self.attn(x, x, x)
            return out.flatten(1) + w.flatten(1).sum(1, keepdim=True)

    with pytest.raises(fastacd.UnsupportedOpError, match="attention weights read as a decomposed value"):
        fastacd.Decomposer(UsesWeights().eval())


def test_multihead_attention_unbatched_is_refused():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)

        def forward(self, x):
            h = x[0]
            return self.attn(h, h, h)[0].flatten()[None]

    with pytest.raises(fastacd.UnsupportedOpError, match="unbatched"):
        fastacd.Decomposer(Unbatched().eval()).cd(torch.randn(1, 3, 4), torch.ones(1, 3, 4))


# --------------------------------------------------------------------------------------
# Windows: Swin written out, and torchvision's shifted_window_attention
# --------------------------------------------------------------------------------------
class ExplicitSwinAttention(nn.Module):
    """torchvision's shifted_window_attention written as plain torch: pad, roll, partition
    (merging the batch with the windows), explicit attention with a relative position bias
    and the shift mask, reverse. Decomposed by the generic rules (context, reshape, roll, pad)."""

    def __init__(self, dim=6, heads=2, window=3, shift=1, padded=(6, 6)):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.ws, self.shift = heads, window, shift
        self.bias = nn.Parameter(torch.randn(1, heads, window * window, window * window) * 0.5)
        self.register_buffer("mask", self.attention_mask(*padded))  # as timm keeps it

    def attention_mask(self, ph, pw):
        ws, s = self.ws, self.shift
        m = torch.zeros(ph, pw)
        count = 0
        for h in ((0, -ws), (-ws, -s), (-s, None)):
            for w in ((0, -ws), (-ws, -s), (-s, None)):
                m[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        m = m.view(ph // ws, ws, pw // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        m = m.unsqueeze(1) - m.unsqueeze(2)
        return m.masked_fill(m != 0, -100.0)

    def forward(self, x):
        b, h, w, c = x.shape
        ws = self.ws
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        nw = (ph // ws) * (pw // ws)
        x = x.view(b, ph // ws, ws, pw // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, ws * ws, c)
        qkv = self.qkv(x).reshape(x.size(0), x.size(1), 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5).matmul(k.transpose(-2, -1)) + self.bias
        attn = attn.view(x.size(0) // nw, nw, self.heads, x.size(1), x.size(1)) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = F.softmax(attn.view(-1, self.heads, x.size(1), x.size(1)), dim=-1)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
        x = self.proj(x)
        x = x.view(b, ph // ws, pw // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


class TorchvisionSwinAttention(ExplicitSwinAttention):
    """The same attention through torchvision's fx leaf function (the window_attention rule)."""

    def forward(self, x):
        from torchvision.models.swin_transformer import shifted_window_attention
        return shifted_window_attention(x, self.qkv.weight, self.proj.weight, self.bias, [self.ws, self.ws],
                                        self.heads, [self.shift, self.shift], qkv_bias=self.qkv.bias,
                                        proj_bias=self.proj.bias, training=False)


class SwinNet(nn.Module):
    def __init__(self, attn: nn.Module, dim=6):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.attn = attn
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x).permute(0, 2, 3, 1)   # (B, H, W, C)
        h = h + self.attn(h)
        return self.head(h.mean((1, 2)))


@pytest.mark.parametrize("which", ["explicit", "torchvision"])
def test_swin_window_attention_matches_reference(which):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    attn = ExplicitSwinAttention() if which == "explicit" else TorchvisionSwinAttention()
    x = torch.randn(1, 3, 10, 10)  # 5 x 5 tokens: padded to 6 x 6, four 3 x 3 windows
    kinds = {s.kind for s in fastacd.Decomposer(SwinNet(attn).eval()).graph.steps.values()}
    assert ("window_attention" in kinds) == (which == "torchvision")
    assert which == "torchvision" or {"roll", "pad", "matmul"} <= kinds
    # no empty-mask check: the padded tokens are zero in both parts, where the affine rule
    # gives each part half of the value bias (eps / 2 eps, design.md 9), as the reference does
    check_model(SwinNet(attn), x, image_masks(10, 10), empty=False)


def test_torchvision_window_rule_equals_the_attention_written_out():
    """Two code paths (the dedicated rule; the generic rules on the written-out attention)
    give the same CD, and the rule's replica of the function is the function."""
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    explicit = SwinNet(ExplicitSwinAttention()).double().eval()
    tv = SwinNet(TorchvisionSwinAttention()).double().eval()
    tv.load_state_dict(explicit.state_dict())
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    masks = image_masks(10, 10).double()
    with torch.no_grad():
        torch.testing.assert_close(tv(x), explicit(x))
        a = fastacd.Decomposer(tv).cd(x, masks)
        b = fastacd.reference.cd(explicit, x, masks)
    torch.testing.assert_close(a.relevant, b[0])
    torch.testing.assert_close(a.irrelevant, b[1])


# --------------------------------------------------------------------------------------
# einsum (MaxViT), explicit attention with a relative position bias
# --------------------------------------------------------------------------------------
class EinsumAttention(nn.Module):
    """MaxViT's block attention: partitions kept apart from the batch, einsum products."""

    def __init__(self, dim=6, heads=2, p=2):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.p = heads, p
        self.pos = nn.Parameter(torch.randn(heads, p * p, p * p) * 0.5)
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        p = self.p
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p, c)
        bb, g, n, d = x.size()
        q, k, v = torch.chunk(self.qkv(x), 3, dim=-1)
        q, k, v = (t.reshape(bb, g, n, self.heads, d // self.heads).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        dot = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k * 0.5)
        attn = F.softmax(dot + self.pos, dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", attn, v)
        out = self.proj(out.permute(0, 1, 3, 2, 4).reshape(bb, g, n, d))
        return self.head(out.mean((1, 2)))


def test_einsum_attention_matches_reference():
    torch.manual_seed(0)
    model = EinsumAttention()
    assert "einsum" in {s.kind for s in fastacd.Decomposer(model.eval()).graph.steps.values()}
    check_model(model, torch.randn(1, 3, 8, 8), image_masks(8, 8))


def test_einsum_of_two_decomposed_operands_is_refused():
    class Bilinear(nn.Module):
        def forward(self, x):
            return torch.einsum("bi,bj->bij", x, x).flatten(1)

    with pytest.raises(fastacd.UnsupportedOpError, match="several decomposed operands"):
        fastacd.Decomposer(Bilinear().eval())


# --------------------------------------------------------------------------------------
# structural ops: class tokens, position embeddings, roll, pad, expand, repeat
# --------------------------------------------------------------------------------------
class Tokens(nn.Module):
    """ViT's front and readout, and the other structural ops transformers use."""

    def __init__(self, dim=4, grid=3):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, grid * grid + 1, dim))
        self.fc = nn.Linear(dim, dim)
        n = grid * grid + 1
        self.head = nn.Linear(dim + dim * (n + 2) + dim * n * 2 + dim, 3)

    def forward(self, x):
        b = x.shape[0]
        t = torch.flatten(self.embed(x), 2).transpose(1, 2)           # (B, N, C)
        t = torch.cat([self.cls.expand(b, -1, -1), t], 1) + self.pos   # constants: irrelevant
        t = self.fc(t)
        padded = F.pad(t, (0, 0, 1, 1), value=0.5)                     # the value: irrelevant
        rolled = torch.roll(padded, shifts=2, dims=1)
        first = t[:, :1].expand(b, t.shape[1], -1)                     # B from the total's size
        tiled = t.repeat(1, 2, 1) + first.repeat_interleave(2, dim=1)
        mean = t.mean(1, keepdim=True).expand_as(t[:, :1])
        return self.head(torch.cat([t[:, 0], rolled.flatten(1), tiled.flatten(1), mean.flatten(1)], 1))


def test_class_tokens_position_embeddings_and_structural_ops():
    torch.manual_seed(0)
    model = Tokens()
    kinds = {s.kind for s in fastacd.Decomposer(model.eval()).graph.steps.values()}
    assert {"pad", "roll", "expand", "repeat", "cat", "add"} <= kinds
    res = check_model(model, torch.randn(1, 3, 6, 6), image_masks(6, 6))
    assert res.relevant.shape == (5, 3)


def test_constant_pad_value_and_class_token_join_the_irrelevant_part():
    """An empty mask: the relevant part of the padded, class-token-prefixed tokens is zero; a
    full mask: everything but the constants (the class token, the pad value) is relevant."""
    class Front(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.ones(1, 1, 2))

        def forward(self, x):
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
            return F.pad(t, (0, 0, 0, 1), value=3.0).flatten(1)

    x = torch.randn(1, 3, 2, dtype=torch.float64)
    masks = torch.stack([torch.zeros(3, 2), torch.ones(3, 2)]).double()
    for backend in BACKENDS:
        res = fastacd.Decomposer(Front().eval().double(), backend=backend).cd(x, masks)
        assert res.relevant[0].abs().max() == 0
        want = torch.cat([torch.zeros(1, 2), x[0], torch.zeros(1, 2)]).flatten().double()
        torch.testing.assert_close(res.relevant[1], want)
        torch.testing.assert_close(res.irrelevant[1], Front().double()(x)[0] - want)


def test_a_roll_of_the_flattened_sample_runs_per_mask():
    class Flat(nn.Module):
        def forward(self, x):
            return torch.roll(x * 2, 3).flatten(1)  # no dims: the flattened sample

    x = torch.randn(1, 2, 5, dtype=torch.float64)
    masks = full_masks(token_masks(2), x)
    res = fastacd.Decomposer(Flat().eval()).cd(x, masks)
    torch.testing.assert_close(res.relevant, torch.roll((masks * x * 2).flatten(1), 3, dims=1))


# --------------------------------------------------------------------------------------
# the windowed pass falls back to full maps after the non-local attention
# --------------------------------------------------------------------------------------
def test_windowed_pass_through_attention_equals_the_full_pass():
    torch.manual_seed(0)
    vit = small_vit().double().eval()  # as built, LayerNorms included
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    base = torch.zeros(32, 32)
    base[8:16, 8:16] = 1
    deltas = torch.zeros(3, 1, 32, 32)
    deltas[0, 0, :8, :8] = 1
    deltas[1, 0, 16:24, 8:16] = 1
    deltas[2, 0, 24:, 24:] = 1
    dec = fastacd.Decomposer(vit)
    with torch.no_grad():
        got = dec.cd_delta(x, base, deltas, max_cost_ratio=float("inf"))
        want = dec.cd(x, torch.clamp(base + deltas, max=1).double())
    assert_close_scaled(got.relevant, want.relevant, torch.float64)


# --------------------------------------------------------------------------------------
# real models (small configurations)
# --------------------------------------------------------------------------------------
def visible_heads(model: nn.Module) -> nn.Module:
    """Random weights for layers initialised at zero (torchvision's ViT head)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.abs().max() == 0:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def small_vit():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    return visible_heads(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                           mlp_dim=32, num_classes=5))


def small_swin(v2=False):
    from torchvision.models import SwinTransformer
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
    torch.manual_seed(0)
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[3, 3],
                           num_classes=5, stochastic_depth_prob=0.0, **kw)


def small_maxvit():
    from torchvision.models.maxvit import MaxVit
    torch.manual_seed(0)
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                  block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5)


TORCHVISION = {"vit": (small_vit, 32), "swin": (small_swin, 40), "swin_v2": (lambda: small_swin(True), 40),
               "maxvit": (small_maxvit, 32)}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_transformers(name):
    """As built: f64 engine = reference, f32 close, sums, batched = one mask (the batched
    backends; the reference backend is the oracle itself)."""
    pytest.importorskip("torchvision")
    factory, size = TORCHVISION[name]
    model = visible_heads(factory()).eval()
    check_model(model, torch.randn(1, 3, size, size), image_masks(size, size), backends=BACKENDS[1:])


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("vit_b_16", 224), ("swin_t", 224), ("maxvit_t", 224)])
def test_torchvision_factory_models_float32(name, size):
    """The real architectures (random init) in float32: sums, batched = one mask."""
    import torchvision
    torch.manual_seed(0)
    model = visible_heads(getattr(torchvision.models, name)(num_classes=10)).eval()
    dec = fastacd.Decomposer(model)
    x = torch.randn(1, 3, size, size)
    masks = image_masks(size, size, n=2).float()
    with torch.no_grad():
        res = dec.cd(x, masks)
        out = model(x)
        assert_close_scaled(res.relevant + res.irrelevant, out.expand_as(res.relevant), torch.float32)
        assert_close_scaled(res.relevant, torch.cat([dec.cd(x, m[None]).relevant for m in masks]), torch.float32)


TIMM = {  # small configurations of each family (random init, no download)
    "vit_tiny_patch16_224": dict(img_size=32, depth=2),
    "deit_tiny_patch16_224": dict(img_size=32, depth=2),
    "cait_xxs24_224": dict(img_size=32, depth=2, depth_token_only=1, init_values=0.5),
    "xcit_nano_12_p16_224": dict(img_size=32, depth=2, cls_attn_layers=1, eta=0.5),
    "swin_tiny_patch4_window7_224": dict(img_size=56, depths=(2, 2), num_heads=(3, 6), window_size=7),
    "swinv2_tiny_window8_256": dict(img_size=64, depths=(2, 2), num_heads=(3, 6), window_size=8),
    "swinv2_cr_tiny_224": dict(img_size=64, depths=(2, 2), num_heads=(3, 6), window_size=8),
    "beit_base_patch16_224": dict(img_size=32, depth=2, embed_dim=48, num_heads=3),
}


def timm_model(name: str, fused: bool = True) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **TIMM[name])
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused  # F.scaled_dot_product_attention, or q @ k^T -> softmax -> @ v
    return visible_heads(model).eval()


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_transformers(name, fused):
    """As built, fused attention (SDPA) and written out: f64 engine = reference, f32 close,
    sums, batched = one mask (the written-out form: the compiled backend only, for time)."""
    model = timm_model(name, fused)
    size = TIMM[name]["img_size"]
    check_model(model, torch.randn(1, 3, size, size), image_masks(size, size, n=2),
                backends=BACKENDS[1:] if fused else BACKENDS[-1:])


def test_attention_rules_are_differentiable():
    """CD through the attention rules under autograd (CDEP): the gradients of the relevant
    scores match those of the reference's arithmetic."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    masks = full_masks(token_masks(5, n=2), x)
    for model in (SDPANet("bool").double().eval(), MHANet(bias_kv=True).double().eval()):
        grads = []
        for backend in ("reference", BACKENDS[-1]):
            model.zero_grad()
            fastacd.Decomposer(model, backend=backend).cd(x, masks).relevant.sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        torch.testing.assert_close(grads[1], grads[0])

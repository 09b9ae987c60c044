"""The ``cdt`` rule set (CD-T, Hsu et al., arXiv 2407.00886) against a float64 transcription of
CD-T's formulas written out here over a random tiny BERT sequence classifier from
``transformers``, independent of fastacd's rules; the default set and cdt differ where the
formulas do; one hand-computed check per CD-T variant."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from fastacd.reference.cd import captured, cd_relevant_input as reference_cd
from fastacd.rules import CDT, DEFAULT

from conftest import assert_close_scaled

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-8  # CD-T's tol (pyfunctions/cdt_core.py: prop_linear_core, prop_layer_norm)
T = 7       # tokens


# --------------------------------------------------------------------------------------------
# The model: BERT's encoder, pooler and classifier on its embeddings
# --------------------------------------------------------------------------------------------
class BertOnEmbeddings(nn.Module):
    """A ``BertForSequenceClassification`` from its embeddings output on, written out over its
    own modules (transformers' BertSelfAttention builds shapes by iterating a size, which
    torch.fx cannot trace); equals the model's logits (checked below)."""

    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    @staticmethod
    def attention(sa, x):
        n, t = x.size(0), x.size(1)
        h, d = sa.num_attention_heads, sa.attention_head_size
        q = sa.query(x).view(n, t, h, d).transpose(1, 2)
        k = sa.key(x).view(n, t, h, d).transpose(1, 2)
        v = sa.value(x).view(n, t, h, d).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (p @ v).transpose(1, 2).reshape(n, t, h * d)

    def forward(self, emb):
        x = emb
        for layer in self.clf.bert.encoder.layer:
            att = layer.attention
            x = att.output.LayerNorm(att.output.dropout(att.output.dense(self.attention(att.self, x))) + x)
            inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dropout(layer.output.dense(inter)) + x)
        pooled = self.clf.bert.pooler.activation(self.clf.bert.pooler.dense(x[:, 0]))
        return self.clf.classifier(self.clf.dropout(pooled))


@pytest.fixture(scope="module")
def bert():
    return make_bert()


def make_bert():
    """(model on embeddings, the classifier, input ids, embeddings) in float64, random init;
    biases and LayerNorm betas/gammas randomised (BERT's init makes them 0 and 1, where the
    bias splits would not show)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=3)
    clf = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in clf.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)  # std 0.02 init: larger weights make the GELU and tanh nonlinear
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    clf = clf.double()
    ids = torch.randint(1, 50, (1, T), generator=g)
    with torch.no_grad():
        emb = clf.bert.embeddings(input_ids=ids)
    return BertOnEmbeddings(clf).eval(), clf, ids, emb


FULL, EMPTY = T + 3, T + 4  # rows of token_masks()


def token_masks(dtype=torch.float64) -> torch.Tensor:
    """(M, T) token masks: single tokens, a span, the first token (the pooler's), all, none."""
    rows = [[k] for k in range(T)] + [[1, 2, 3], [0], [0, 4, 6], list(range(T)), []]
    m = torch.zeros(len(rows), T, dtype=dtype)
    for j, r in enumerate(rows):
        m[j, r] = 1
    return m


# --------------------------------------------------------------------------------------------
# CD-T's formulas, transcribed from the authors' code (adelaidehsu/CD_Circuit,
# pyfunctions/cdt_core.py and cdt_from_source_nodes.py) over BERT's modules, float64
# --------------------------------------------------------------------------------------------
def t_normalise(r, i):
    """normalize_rel_irrel: opposite signs -> the larger part takes the sum, the other 0."""
    tot = r + i
    flip = r * i < 0
    big = flip & (r.abs() >= i.abs())
    small = flip & ~big
    r, i = r.clone(), i.clone()
    r[big], i[big] = tot[big], 0
    i[small], r[small] = tot[small], 0
    return r, i


def t_linear(r, i, lin, complete):
    """prop_linear_core: bias by |W r| / (|W r| + |W i| + tol); ``complete``: the irrelevant
    part takes the rest of the bias (fastacd), else its own share (CD-T's code)."""
    zr, zi = r @ lin.weight.T, i @ lin.weight.T
    tot_wt = zr.abs() + zi.abs() + TOL
    rel = zr + lin.bias * (zr.abs() / tot_wt)
    irrel = zi + lin.bias - lin.bias * (zr.abs() / tot_wt) if complete else zi + lin.bias * (zi.abs() / tot_wt)
    return rel, irrel


def t_act(r, i, f):
    """prop_act: irrel = f(i), rel = f(r + i) - f(i)."""
    irrel = f(i)
    return f(r + i) - irrel, irrel


def t_layer_norm(r, i, ln, complete):
    """prop_layer_norm: each part centred by its own mean, over the std of r + i, times gamma;
    beta by |r| / (|r| + |i| + tol) of the input parts."""
    tot = r + i
    var = (tot ** 2).mean(-1, keepdim=True) - tot.mean(-1, keepdim=True) ** 2
    std = torch.sqrt(var + ln.eps)
    zr = (r - r.mean(-1, keepdim=True)) / std * ln.weight
    zi = (i - i.mean(-1, keepdim=True)) / std * ln.weight
    share = r.abs() / (r.abs() + i.abs() + TOL)
    rel = zr + ln.bias * share
    irrel = zi + ln.bias - ln.bias * share if complete else zi + ln.bias * (i.abs() / (r.abs() + i.abs() + TOL))
    return rel, irrel


def t_self_attention(r, i, sa, complete, norm):
    """prop_self_attention: probabilities from r + i (the total), the value path decomposed."""
    n, t = r.shape[:2]
    h, d = sa.num_attention_heads, sa.attention_head_size
    heads = (lambda z: z.view(n, t, h, d).transpose(1, 2))
    tot = r + i
    probs = torch.softmax(heads(sa.query(tot)) @ heads(sa.key(tot)).transpose(-1, -2) / math.sqrt(d), -1)
    rv, iv = norm(*t_linear(r, i, sa.value, complete))
    merge = (lambda z: z.transpose(1, 2).reshape(n, t, h * d))
    return norm(merge(probs @ heads(rv)), merge(probs @ heads(iv)))


def cdt_transcription(model: BertOnEmbeddings, emb, masks, complete=True, normalise=True):
    """(rel, irrel) logits of each token mask by CD-T's formulas; the parts are sign-normalised
    after every step but the classifier (whose output is the result)."""
    norm = t_normalise if normalise else (lambda r, i: (r, i))
    clf = model.clf
    m = masks[:, :, None].to(emb.dtype)
    r, i = m * emb, (1 - m) * emb
    for layer in clf.bert.encoder.layer:
        att = layer.attention
        cr, ci = t_self_attention(r, i, att.self, complete, norm)
        dr, di = norm(*t_linear(cr, ci, att.output.dense, complete))
        ar, ai = norm(dr + r, di + i)
        ar, ai = norm(*t_layer_norm(ar, ai, att.output.LayerNorm, complete))
        hr, hi = norm(*t_linear(ar, ai, layer.intermediate.dense, complete))
        hr, hi = norm(*t_act(hr, hi, layer.intermediate.intermediate_act_fn))
        orr, oi = norm(*t_linear(hr, hi, layer.output.dense, complete))
        orr, oi = norm(orr + ar, oi + ai)
        r, i = norm(*t_layer_norm(orr, oi, layer.output.LayerNorm, complete))
    pr, pi = norm(*t_linear(r[:, 0], i[:, 0], clf.bert.pooler.dense, complete))
    pr, pi = norm(*t_act(pr, pi, clf.bert.pooler.activation))
    return t_linear(pr, pi, clf.classifier, complete)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------
def test_model_on_embeddings_is_bert(bert):
    model, clf, ids, emb = bert
    with torch.no_grad():
        torch.testing.assert_close(model(emb), clf(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


def test_rule_set_selection(bert):
    model, _, _, _ = bert
    assert fastacd.Decomposer(model, rules="cdt").rules is CDT is fastacd.rules.CDT
    assert fastacd.Decomposer(model).rules is DEFAULT and CDT.name == "cdt"
    assert {s.rule.inner.kind for s in fastacd.Decomposer(model, rules=CDT).graph.steps.values()} >= {
        "affine", "layernorm", "activation", "matmul", "add"}
    with pytest.raises(ValueError, match="unknown rule set"):
        fastacd.Decomposer(model, rules="cd-t")


def test_cdt_equals_the_transcription_float64(bert):
    model, _, _, emb = bert
    masks = token_masks()
    with torch.no_grad():
        res = fastacd.Decomposer(model, rules="cdt").cd_relevant_input(emb, masks[:, :, None] * emb)
        want_r, want_i = cdt_transcription(model, emb, masks)
        ref_r, ref_i = reference_cd(captured(model, CDT), emb, masks[:, :, None] * emb)
    part = [k for k in range(len(masks)) if k != FULL]
    for got_r, got_i in ((res.relevant, res.irrelevant), (ref_r, ref_i)):
        assert_close_scaled(got_r[part], want_r[part], torch.float64)
        assert_close_scaled(got_i[part], want_i[part], torch.float64)
        # the full mask: the irrelevant part is only tol's shares of the biases (~1e-8), which
        # the bias split amplifies where |zr| is small (gain |b| / |zr|); the engine's zi =
        # pre - zr carries rounding residues of the shared total there: 2.7e-10 of 0.78 here
        torch.testing.assert_close(got_r[FULL], want_r[FULL], rtol=0, atol=1e-8)
    out = model(emb)
    assert_close_scaled(res.relevant + res.irrelevant, out.expand_as(res.relevant), torch.float64)
    assert_close_scaled(ref_r + ref_i, out.expand_as(ref_r), torch.float64)
    assert res.relevant[EMPTY].abs().max() == 0  # an empty mask keeps exact zeros
    assert res.relevant[:T].std(0).min() > 1e-3  # single tokens get scores of their own


def test_cdt_against_cdt_codes_own_irrelevant_part(bert):
    """CD-T's code propagates the irrelevant part with its own bias share, dropping tol's share
    b*tol/(|zr|+|zi|+tol) of each bias: its relevant + irrelevant misses the logits by that
    (< 1e-6 here). fastacd gives that share to the irrelevant part (rel + irrel = logits, the
    invariant cdt_core.py states); partial masks agree with CD-T's code to ~1e-5 of the scores.
    A full mask does not: CD-T's irrelevant part stays exactly 0, fastacd's starts at tol's
    shares, which the bias split amplifies layer by layer (gain |b| / |zr|)."""
    model, _, _, emb = bert
    masks = token_masks()
    with torch.no_grad():
        res = fastacd.Decomposer(model, rules="cdt").cd_relevant_input(emb, masks[:, :, None] * emb)
        lit_r, lit_i = cdt_transcription(model, emb, masks, complete=False)
        out = model(emb)
    leak = (lit_r + lit_i - out).abs().max()
    assert 0 < leak < 1e-6
    part = [k for k in range(len(masks)) if k != FULL]
    torch.testing.assert_close(res.relevant[part], lit_r[part], rtol=0, atol=1e-5 * float(lit_r.abs().max()))
    assert lit_i[FULL].abs().max() == 0 and res.irrelevant[FULL].abs().max() > 1e-3


def test_cdt_float32_and_batched(bert):
    model, _, _, emb = bert
    masks = token_masks()
    with torch.no_grad():
        want_r, _ = cdt_transcription(model, emb, masks)
        m32 = BertOnEmbeddings(model.clf.float()).eval()
        try:
            dec = fastacd.Decomposer(m32, rules="cdt")
            e32 = emb.float()
            res = dec.cd_relevant_input(e32, masks[:, :, None].float() * e32)
            one = torch.cat([dec.cd_relevant_input(e32, masks[j:j + 1, :, None].float() * e32).relevant
                             for j in range(len(masks))])
            out = m32(e32)
        finally:
            model.clf.double()
    # partial masks within float32 tolerance. Not the full mask: its irrelevant part starts from
    # float32 residues of a - r (~1e-7 of a, where float64 has tol's shares ~1e-8), which the
    # bias split amplifies layer by layer (gain |b| / |zr|): 5% of the logits here
    part = [k for k in range(len(masks)) if k != FULL]
    assert_close_scaled(res.relevant[part].double(), want_r[part], torch.float32)
    assert_close_scaled(one, res.relevant, torch.float32)
    assert_close_scaled(res.relevant + res.irrelevant, out.expand_as(res.relevant), torch.float32)


def test_default_and_cdt_differ(bert):
    model, _, _, emb = bert
    masks = token_masks()
    with torch.no_grad():
        acd = fastacd.Decomposer(model).cd_relevant_input(emb, masks[:, :, None] * emb).relevant
        cdt = fastacd.Decomposer(model, rules="cdt").cd_relevant_input(emb, masks[:, :, None] * emb).relevant
    assert cdt[EMPTY].abs().max() == 0 and acd[EMPTY].abs().max() < 1e-10
    assert (acd[:FULL] - cdt[:FULL]).abs().max() > 1e-3
    # the sign normalisation alone moves the scores (the transcription without it)
    with torch.no_grad():
        plain_r, _ = cdt_transcription(model, emb, masks, normalise=False)
    assert (plain_r[:FULL] - cdt[:FULL]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["functional", "concat", "mlp", "vit"])
def test_cdt_on_other_architectures(name):
    """The set on CNNs (conv, batchnorm, max-pool, cat), an MLP with a trailing softmax and a
    torchvision ViT (nn.MultiheadAttention): float64 engine = reference, sums = output, an empty
    mask stays empty, batched = one mask at a time."""
    from models import MLP, ConcatNet, FunctionalNet, randomize_batchnorm
    from test_attention import image_masks, small_vit
    torch.manual_seed(0)
    model, x = {"functional": (FunctionalNet, (3, 16, 16)), "concat": (lambda: randomize_batchnorm(ConcatNet()), (3, 8, 8)),
                "mlp": (MLP, (12,)), "vit": (small_vit, (3, 32, 32))}[name]
    model, x = model().double().eval(), torch.randn(1, *x, dtype=torch.float64)
    if len(x.shape) == 4:
        masks = image_masks(*x.shape[2:]).expand(-1, x.shape[1], -1, -1)
    else:
        masks = torch.cat([(torch.rand(3, x.shape[1]) > 0.5).double(), torch.ones(1, x.shape[1]),
                           torch.zeros(1, x.shape[1])])
    with torch.no_grad():
        dec = fastacd.Decomposer(model, rules="cdt")
        res = dec.cd_relevant_input(x, masks * x)
        ref_r, ref_i = reference_cd(captured(model, CDT), x, masks * x)
        one = torch.cat([dec.cd_relevant_input(x, m[None] * x).relevant for m in masks])
        out = model.net[:-1](x) if name == "mlp" else model(x)  # the MLP's scores: logits
    assert_close_scaled(res.relevant, ref_r, torch.float64)
    assert_close_scaled(res.irrelevant, ref_i, torch.float64)
    assert_close_scaled(one, res.relevant, torch.float64)
    assert_close_scaled(res.relevant + res.irrelevant, out.expand_as(res.relevant), torch.float64)
    assert res.relevant[-1].abs().max() == 0
    if name == "mlp":  # the logits (before a trailing softmax) are not sign-normalised
        assert (ref_r * ref_i < 0).any()


# --------------------------------------------------------------------------------------------
# One hand-computed check per variant
# --------------------------------------------------------------------------------------------
def _cd(model, x, rel_in, rules):
    with torch.no_grad():
        res = fastacd.Decomposer(model.double().eval(), rules=rules).cd_relevant_input(x, rel_in)
        ref = reference_cd(captured(model, rules), x, rel_in)
    torch.testing.assert_close(ref[0], res.relevant, rtol=1e-12, atol=1e-12)
    return res


def test_sign_normalisation_is_a_clamp_between_0_and_the_total():
    """The engine's form (r clamped to [min(0, a), max(0, a)]) equals CD-T's normalize_rel_irrel
    on (r, a - r), ties (|r| = |i|, a = 0) and zeros included."""
    from fastacd.rules.cdt import normalise_parts, normalise_relevant
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-3, 4, (1, 400), generator=g).double()
    r = torch.randint(-6, 7, (5, 400), generator=g).double()
    want_r, want_i = t_normalise(r, a - r)
    torch.testing.assert_close(normalise_relevant(r, a), want_r, rtol=0, atol=0)
    got_r, got_i = normalise_parts(r, a - r)
    torch.testing.assert_close((got_r, got_i), (want_r, want_i), rtol=0, atol=0)
    assert (want_r != r).any() and (a == 0).any()


def test_hand_linear_bias_split_with_tol():
    lin = nn.Linear(2, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
        lin.bias.fill_(3.0)
    x, r = torch.tensor([[1.0, 4.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    res = _cd(lin, x, r, "cdt")  # the output: no sign normalisation
    zr, zi = 2.0, -4.0
    assert res.relevant.item() == pytest.approx(zr + 3.0 * 2.0 / (2.0 + 4.0 + 1e-8), abs=1e-15)
    assert res.irrelevant.item() == pytest.approx(zi + 3.0 - 3.0 * 2.0 / (2.0 + 4.0 + 1e-8), abs=1e-15)
    # exact zeros: the bias goes to the irrelevant part (CD-T's code would drop it)
    res = _cd(lin, torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64), "cdt")
    assert res.relevant.item() == 0 and res.irrelevant.item() == 3.0


class _Then(nn.Module):
    """An op followed by an identity-weight Linear, so the op's output is not the model's."""
    def __init__(self, op, n):
        super().__init__()
        self.op, self.out = op, nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(n))

    def forward(self, x):
        return self.out(self.op(x))


def test_hand_activation_and_sign_normalisation():
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    r = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)  # i = (0, -2, -1.5)
    res = _cd(_Then(nn.Tanh(), 3), x, r, "cdt")
    i = x - r
    rel, irrel = torch.tanh(x) - torch.tanh(i), torch.tanh(i)
    # element 2: rel = tanh(.5) - tanh(-1.5) > 0 > irrel, |rel| >= |irrel|: rel takes the sum
    assert rel[0, 2] > 0 > irrel[0, 2] and rel[0, 2].abs() >= irrel[0, 2].abs()
    rel[0, 2] = torch.tanh(x[0, 2])
    torch.testing.assert_close(res.relevant, rel, rtol=1e-14, atol=1e-14)
    # the default set: rel = tanh(r), no normalisation
    res = _cd(_Then(nn.Tanh(), 3), x, r, None)
    torch.testing.assert_close(res.relevant, torch.tanh(r), rtol=1e-14, atol=1e-14)


def test_hand_layer_norm_beta_by_input_parts():
    ln = nn.LayerNorm(2).double()
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([2.0, 1.0]))
        ln.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    r = torch.tensor([[3.0, 0.0]], dtype=torch.float64)  # i = (0, 1)
    res = _cd(ln, x, r, "cdt")
    std = math.sqrt(1.0 + ln.eps)  # var of (3, 1) is 1
    zr = torch.tensor([1.5 * 2.0, -1.5 * 1.0], dtype=torch.float64) / std  # r - mean(r) = (1.5, -1.5)
    share = torch.tensor([3.0 / (3.0 + 1e-8), 0.0], dtype=torch.float64)  # |r| / (|r| + |i| + tol)
    torch.testing.assert_close(res.relevant[0], zr + share * ln.bias, rtol=1e-14, atol=1e-14)

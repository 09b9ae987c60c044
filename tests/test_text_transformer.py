"""Text CD beyond recurrent models: ``ModelTextDecomposer`` (token masks over the word vectors,
the general engine) on token-mixing and ``nn.TransformerEncoder`` classifiers, the drop-in
``cd_text`` / ``agg_1d.agglomerate`` on them, and the toy sentiment transformer.

The transformer cases use the default set's LayerNorm and MultiheadAttention rules; the
plumbing is also tested with minimal stand-in rules of design.md section 8 (LayerNorm over the
last dim, self-attention with probabilities from the total), passed through ``rules=``, which
the default rules must agree with.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close_scaled
from fastacd import agg_1d
from fastacd import text as ft
from fastacd.capture.nodes import Step, UnsupportedOpError
from fastacd.rules import DEFAULT, Rule
from fastacd.rules.affine import split_bias
from fastacd.text.sentiment_toy import NEG, POS, SentimentTransformer, accuracy, toy_model

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_scaled(actual, expected, rel=1e-10, scale=None):
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    scale = max(float(expected.abs().max()) if scale is None else float(scale), 1e-30)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rel, atol=rel * scale)


# ------------------------------------------------------------------ stand-in rules


class StandInLayerNorm(Rule):
    """LayerNorm over the last dim: statistics from the total, each part centred by its own
    mean, beta split by the affine rule (design.md section 8)."""
    kind = "layernorm"
    modules = (nn.LayerNorm,)
    row = ("LayerNorm (stand-in)", "", "")

    def total(self, step, value_of):
        return step.module(value_of(step.dep[0])), None

    @staticmethod
    def split(m, r, i, a):
        rstd = torch.rsqrt(a.var(-1, unbiased=False, keepdim=True) + m.eps)
        zr = (r - r.mean(-1, keepdim=True)) * rstd * m.weight
        zi = (i - i.mean(-1, keepdim=True)) * rstd * m.weight
        return split_bias(zr, zi, m.bias, last=True)

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return self.split(step.module, r, i, value_of(step.dep[0]))

    def relevant(self, step, rel, values, aux, ops, m):
        r, a = rel[step.dep[0]], values[step.dep[0]]
        return self.split(step.module, r, a - r, a)[0]


class StandInSelfAttention(Rule):
    """``nn.MultiheadAttention(x, x, x)`` without masks: probabilities from the total, values
    and the output projection split by the affine rule. Output: a 1-tuple read by ``[0]``."""
    kind = "self_attention"
    modules = (nn.MultiheadAttention,)
    row = ("MultiheadAttention (stand-in)", "", "")

    def claim(self, graph, node, dep, module):
        q, k, v = node.args[:3]
        if not (q is k is v) or node.kwargs.get("key_padding_mask") is not None \
                or node.kwargs.get("attn_mask") is not None:
            raise UnsupportedOpError("stand-in: self-attention without masks only")
        return Step(node, self, [q], module=module)

    @staticmethod
    def _bf(m, t):
        return t if m.batch_first else t.transpose(0, 1)

    def total(self, step, value_of):
        m = step.module
        x = value_of(step.dep[0])
        out = m(x, x, x, need_weights=False)[0]
        E, h = m.embed_dim, m.num_heads
        d = E // h
        q, k, _ = F.linear(self._bf(m, x), m.in_proj_weight, m.in_proj_bias).split(E, -1)
        N, T, _ = q.shape
        q, k = (t.reshape(N, T, h, d).transpose(1, 2) for t in (q, k))
        return (out,), torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)

    def _parts(self, m, P, r, i):
        E, h = m.embed_dim, m.num_heads
        d = E // h
        r, i = self._bf(m, r), self._bf(m, i)
        w_v, b_v = m.in_proj_weight[2 * E:], m.in_proj_bias[2 * E:]
        vr, vi = split_bias(F.linear(r, w_v), F.linear(i, w_v), b_v, last=True)

        def heads(v):
            M, T, _ = v.shape
            return (P @ v.reshape(M, T, h, d).transpose(1, 2)).transpose(1, 2).reshape(M, T, E)

        out = split_bias(F.linear(heads(vr), m.out_proj.weight), F.linear(heads(vi), m.out_proj.weight),
                         m.out_proj.bias, last=True)
        return tuple(self._bf(m, t) for t in out)

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        a, b = self._parts(step.module, aux, r, i)
        return (a,), (b,)

    def relevant(self, step, rel, values, aux, ops, m):
        r, a = rel[step.dep[0]], values[step.dep[0]]
        return (self._parts(step.module, aux, r, a - r)[0],)


STAND_IN = DEFAULT.replace(StandInLayerNorm(), StandInSelfAttention(), name="acd+stand-in")


# ------------------------------------------------------------------ models


class TokenMixer(nn.Module):
    """Sequence-first like the original's text models: batch.text (T, N) -> embedding +
    position embedding (a module on arange) -> [CLS] parameter prepended -> linear, ReLU ->
    mean over tokens or [CLS] -> linear. No LayerNorm or attention: the plumbing alone."""

    def __init__(self, vocab=30, d=8, readout="mean", relu=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(40, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.mix = nn.Linear(d, d)
        self.fc = nn.Linear(d, 2)
        self.readout, self.relu = readout, relu

    def forward(self, batch):
        ids = getattr(batch, "text", batch)                        # (T, N)
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[0]))[:, None]
        x = torch.cat([self.cls.expand(1, ids.shape[1], -1), x], dim=0)
        if self.relu:
            x = torch.relu(self.mix(x))
        return self.fc(x[0] if self.readout == "cls" else x[1:].mean(0))


class TransformerText(nn.Module):
    """embedding + position parameter -> nn.TransformerEncoder -> mean or first token -> linear;
    input ids (N, T) for batch_first, (T, N) otherwise."""

    def __init__(self, vocab=30, d=16, heads=2, layers=2, batch_first=True, norm_first=False,
                 readout="mean", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.5 * torch.randn(20, d))
        layer = nn.TransformerEncoderLayer(d, heads, 32, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d, 3)
        self.batch_first, self.readout = batch_first, readout

    def forward(self, ids):
        if self.batch_first:
            x = self.embed(ids) + self.pos[:ids.shape[1]]
            h = self.encoder(x)
            return self.fc(h[:, 0] if self.readout == "first" else h.mean(1))
        x = self.embed(ids) + self.pos[:ids.shape[0], None]
        h = self.encoder(x)
        return self.fc(h[0] if self.readout == "first" else h.mean(0))


def _masks(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(5, T, generator=g) < 0.5).double()
    m[0], m[1] = 0, 1
    return m


# ------------------------------------------------------------------ the plumbing


def test_linear_mixer_by_hand():
    """Without the mixing layer, features = mean over the words of (word vector + position):
    the relevant features are the mean of the masked word vectors (positions and the [CLS]
    parameter are constants: irrelevant), exactly."""
    model = TokenMixer(relu=False).double().eval()
    tokens = torch.tensor([3, 7, 1, 9, 4])
    dec = ft.TextDecomposer.from_model(model)
    assert isinstance(dec, ft.ModelTextDecomposer) and dec.head is model.fc
    masks = _masks(5)
    res = dec.cd(tokens, masks=masks)
    vecs = model.embed(tokens).detach()
    feat = (masks[:, :, None] * vecs).mean(1)       # the [CLS] slot is not read by the mean
    assert_scaled(res.relevant, feat @ model.fc.weight.T.detach())
    assert float(res.relevant[0].abs().max()) == 0.0
    with torch.no_grad():
        logits = model(ft.Batch(tokens))[0]
    assert_scaled(res.relevant + res.irrelevant, (logits - model.fc.bias).expand(5, -1))


@pytest.mark.parametrize("readout", ["mean", "cls"])
def test_token_mixer_engine_matches_reference_and_sums(readout):
    model = TokenMixer(readout=readout, seed=2).double().eval()
    tokens = torch.tensor([5, 2, 8, 8, 1, 6, 3])
    dec = ft.TextDecomposer.from_model(model)
    ref = ft.ModelTextDecomposer(model, backend="reference")
    phrases = ft.all_phrases(7)
    res, exp = dec.cd(tokens, phrases=phrases), ref.cd(tokens, phrases=phrases)
    assert res.relevant.shape == (28, 2)
    assert_scaled(res.relevant, exp.relevant)
    assert_scaled(res.irrelevant, exp.irrelevant)
    with torch.no_grad():
        logits = model(ft.Batch(tokens))[0]
    assert_scaled(res.relevant + res.irrelevant, (logits - model.fc.bias).expand(28, -1))
    one = dec.cd(tokens, phrases=[(2, 4)])
    assert_scaled(one.relevant[0], res.relevant[phrases.index((2, 4))])
    # float32 arithmetic on the float32 model vs float64
    m32 = TokenMixer(readout=readout, seed=2).eval()
    r32 = ft.TextDecomposer.from_model(m32).cd(tokens, phrases=phrases)
    assert r32.relevant.dtype == torch.float32
    assert_close_scaled(r32.relevant.double(), res.relevant, torch.float32)
    # float64 arithmetic on the float32 model (a converted copy, as cd_text does)
    r64 = ft.TextDecomposer.from_model(m32, dtype=F64).cd(tokens, phrases=phrases)
    assert_scaled(r64.relevant, res.relevant, rel=1e-6)


def test_drop_in_cd_text_and_agglomerate_on_a_token_mixer():
    model = TokenMixer(seed=4).double().eval()
    batch = ft.Batch(torch.tensor([5, 2, 8, 1, 6, 3]))
    rel, irrel = ft.cd_text(batch, model, 1, 3, return_irrel_scores=True)
    assert rel.shape == irrel.shape == (2,) and rel.dtype == np.float64
    exp = ft.TextDecomposer.from_model(model).cd(batch, phrases=[(1, 3), (2, 5)])
    np.testing.assert_allclose(rel, exp.relevant[0].detach().numpy(), rtol=1e-12, atol=1e-14)
    # stop = len(sentence): to the end, as the original
    np.testing.assert_allclose(ft.cd_text(batch, model, 2, 6), exp.relevant[1].detach().numpy(),
                               rtol=1e-12, atol=1e-14)
    lists = agg_1d.agglomerate(model, batch, 50, "cd", 1, 1)
    assert set(lists) == {"scores_list", "mask_list", "comps_list", "comp_scores_list", "score_orig"}
    assert lists["scores_list"][0].shape == (6,) and len(lists["comps_list"]) >= 2
    singles = ft.TextDecomposer.from_model(model).cd(batch, phrases=[(i, i) for i in range(6)])
    s = (singles.relevant[:, 1] - singles.relevant[:, 0]).detach().numpy()
    np.testing.assert_allclose(lists["scores_list"][0], s, rtol=1e-10, atol=1e-12)
    agg_1d.collapse_tree(lists)


def test_general_family_explains_what_it_cannot_read():
    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)

        def forward(self, ids):
            return self.embed(ids).sum(0)

    with pytest.raises(ValueError, match="not an nn.Linear"):
        ft.ModelTextDecomposer(NoHead().eval())
    with pytest.raises(ValueError, match="training mode"):
        ft.ModelTextDecomposer(TokenMixer())
    dec = ft.ModelTextDecomposer(TokenMixer().eval())
    with pytest.raises(ValueError, match="outside the embedding's vocabulary"):
        dec.cd([1, 99, 2], phrases=[(0, 1)])
    with pytest.raises(ValueError, match="0/1"):
        dec.cd([1, 2, 3], masks=torch.full((3,), 0.5))


# ------------------------------------------------------------------ transformers, stand-in rules


@pytest.mark.parametrize("batch_first,norm_first,readout", [(True, False, "mean"), (True, True, "first"),
                                                            (False, False, "first"), (False, True, "mean")])
def test_transformer_encoder_plumbing_with_stand_in_rules(batch_first, norm_first, readout):
    model = TransformerText(batch_first=batch_first, norm_first=norm_first, readout=readout,
                            seed=int(batch_first) + 2 * int(norm_first)).double().eval()
    tokens = torch.tensor([4, 9, 1, 7, 7, 2])
    dec = ft.ModelTextDecomposer(model, rules=STAND_IN)
    ref = ft.ModelTextDecomposer(model, rules=STAND_IN, backend="reference")
    masks = _masks(6, seed=1)
    res, exp = dec.cd(tokens, masks=masks), ref.cd(tokens, masks=masks)
    assert res.relevant.shape == (5, 3)
    assert_scaled(res.relevant, exp.relevant)
    assert_scaled(res.irrelevant, exp.irrelevant)
    with torch.no_grad():
        ids = tokens[None] if batch_first else tokens[:, None]
        logits = model(ids)[0]
    assert_scaled(res.relevant + res.irrelevant, (logits - model.fc.bias).expand(5, -1), rel=1e-9)
    assert float(res.relevant[0].abs().max()) < 1e-12          # empty mask
    one = dec.cd(tokens, masks=masks[3])
    assert_scaled(one.relevant[0], res.relevant[3])
    m32 = TransformerText(batch_first=batch_first, norm_first=norm_first, readout=readout,
                          seed=int(batch_first) + 2 * int(norm_first)).eval()
    r32 = ft.ModelTextDecomposer(m32, rules=STAND_IN).cd(tokens, masks=masks)
    assert_close_scaled(r32.relevant.double(), res.relevant, torch.float32)


# ------------------------------------------------------------------ transformers, default rules


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_classifier_default_rules(batch_first):
    model = TransformerText(batch_first=batch_first, seed=7).double().eval()
    tokens = torch.tensor([4, 9, 1, 7, 7, 2])
    dec = ft.TextDecomposer.from_model(model)
    masks = _masks(6, seed=2)
    res = dec.cd(tokens, masks=masks)
    exp = ft.ModelTextDecomposer(model, backend="reference").cd(tokens, masks=masks)
    assert_scaled(res.relevant, exp.relevant)
    with torch.no_grad():
        logits = model(tokens[None] if batch_first else tokens[:, None])[0]
    assert_scaled(res.relevant + res.irrelevant, (logits - model.fc.bias).expand(5, -1), rel=1e-9)
    # the stand-in rules of design.md section 8 give the same numbers
    standin = ft.ModelTextDecomposer(model, rules=STAND_IN).cd(tokens, masks=masks)
    assert_scaled(res.relevant, standin.relevant, rel=1e-8)


@pytest.fixture(scope="module")
def toy_transformer():
    return toy_model(arch="transformer")


def test_toy_transformer_learns_negation_and_contrast(toy_transformer):
    model, vocab = toy_transformer
    assert isinstance(model, SentimentTransformer)
    assert accuracy(model, n=300) >= 0.97
    with torch.no_grad():
        for sentence, label in [("the movie was good", POS), ("the movie was not good", NEG),
                                ("the plot was good but the acting is boring", NEG),
                                ("the film is not bad", POS)]:
            assert int(model(vocab.batch(sentence)).argmax(1)) == label, sentence


def test_toy_transformer_negation_demo_with_stand_in_rules(toy_transformer):
    model, vocab = toy_transformer
    dec = ft.ModelTextDecomposer(model, rules=STAND_IN, dtype=F64)
    res = dec.cd(vocab.batch("the movie was not good"), phrases=[(4, 4), (3, 4)])
    score = (res.relevant[:, POS] - res.relevant[:, NEG]).tolist()
    assert score[0] > 0          # "good" alone pushes towards positive
    assert score[1] < 0          # "not good" as a unit is negative


def test_toy_transformer_negation_demo_drop_in(toy_transformer):
    model, vocab = toy_transformer
    batch = vocab.batch("the movie was not good")
    score = lambda s, e: (lambda r: r[POS] - r[NEG])(ft.cd_text(batch, model, s, e))  # noqa: E731
    assert score(4, 4) > 0
    assert score(3, 4) < 0
    lists = agg_1d.agglomerate(model, batch, 50, "cd", 1, POS)
    first = lists["comps_list"][1]
    assert first.tolist() == [0, 0, 0, 1, 1]          # "not good" is the first phrase
    assert lists["comp_scores_list"][1][1] < 0


@pytest.mark.parametrize("batch_first", [True, False])
def test_layernorm_rule_of_the_default_set_equals_the_stand_in(batch_first):
    """The default set's LayerNorm (statistics from the total) is the stand-in's formula, in
    either layout (the sequence-first (T, M, E) one has the masks in dim 1)."""
    rules = DEFAULT.replace(StandInSelfAttention())
    model = TransformerText(batch_first=batch_first, norm_first=True, seed=5).double().eval()
    tokens = torch.tensor([4, 9, 1, 7, 7, 2])
    masks = _masks(6, seed=3)
    got = ft.ModelTextDecomposer(model, rules=rules).cd(tokens, masks=masks)
    ref = ft.ModelTextDecomposer(model, rules=rules, backend="reference").cd(tokens, masks=masks)
    standin = ft.ModelTextDecomposer(model, rules=STAND_IN).cd(tokens, masks=masks)
    assert_scaled(got.relevant, ref.relevant)
    assert_scaled(got.relevant, standin.relevant)


def test_negation_demo_script_on_the_toy_transformer(toy_transformer):
    """examples/negation_demo.py's functions (the docs/text.md table) on the toy transformer."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "negation_demo.py"
    spec = importlib.util.spec_from_file_location("negation_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    model, vocab = toy_transformer
    batch = vocab.batch("the movie was not good")
    assert demo.score(batch, model, 4, 4) > 0
    phrase, s = demo.first_phrase(model, vocab, batch)
    assert phrase == "not good" and s < 0
    assert abs(s - demo.score(batch, model, 3, 4)) < 1e-9
    md = demo.markdown({"t": {"accuracy": 1.0, "train_cpu_s": 1.0, "cd_cpu_s": 0.1, **{
        sentence: {"prediction": 0, "scores": {p: 0.0 for p, _, _ in phrases}, "first_phrase": "x",
                   "first_phrase_score": 0.0} for sentence, phrases in demo.SENTENCES.items()}}})
    assert "| \"not good\" | +0.00 |" in md

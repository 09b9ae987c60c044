"""Text CD of a ``transformers`` BERT-style sequence classifier (a tiny ``BertConfig``, random
init, offline): ``TextDecomposer.from_model`` gives a ``ModelTextDecomposer`` that traces the
model concretely per sentence (``fastacd.capture.concrete``: torch.fx cannot trace
``transformers`` models symbolically), token masks over the word embeddings; position and
token-type embeddings are constants of the sentence (irrelevant). The drop-in ``cd_text`` /
``agg_1d.agglomerate`` and the modern API give the LSTM's result shapes.

``attn_implementation="eager"`` (matmul, softmax, matmul) decomposes with the default rules
(attention probabilities from the total: context). ``"sdpa"`` (transformers' default) calls
``F.scaled_dot_product_attention``: the sdpa rule, the same numbers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_scaled
from fastacd import agg_1d
from fastacd import text as ft
from fastacd.capture.nodes import UnsupportedOpError
from fastacd.rules import DEFAULT
from fastacd.rules.affine import EPS

transformers = pytest.importorskip("transformers")

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

def bert(layers=2, attn="eager", seed=0, labels=3, dtype=F64, std=0.2):
    """A tiny random BertForSequenceClassification. ``std``: the init's weight scale (BERT's
    0.02 gives logits ~1e-2 that hide every difference; 0.2 gives O(1) logits)."""
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=24, type_vocab_size=2, num_labels=labels,
        initializer_range=std, attn_implementation=attn)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():   # nonzero LayerNorm affines and biases, so every split is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.to(dtype)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens[None]).logits[0]


def masks(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(6, T, generator=g) < 0.5).double()
    m[0], m[1] = 0, 1
    m[2] = 0
    m[2, 0] = 1          # the first token alone (the pooler reads its position)
    return m


TOKENS = torch.tensor([2, 17, 5, 33, 8, 8, 11])


def assert_scaled(actual, expected, rel=1e-10):
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    scale = max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module")
def model():
    return bert()


def test_bert_engine_matches_reference_and_sums(model):
    dec = ft.TextDecomposer.from_model(model)
    assert isinstance(dec, ft.ModelTextDecomposer) and dec.head is model.classifier
    assert dec.embed is model.bert.embeddings.word_embeddings
    m = masks(7)
    res = dec.cd(TOKENS, masks=m)
    exp = ft.ModelTextDecomposer(model, backend="reference").cd(TOKENS, masks=m)
    assert res.relevant.shape == res.irrelevant.shape == (6, 3)
    assert_scaled(res.relevant, exp.relevant)
    assert_scaled(res.irrelevant, exp.irrelevant)
    lg = logits(model, TOKENS)
    assert float(lg.abs().max()) > 0.1                 # not a degenerate model
    assert_scaled(res.relevant + res.irrelevant, (lg - model.classifier.bias).expand(6, -1))
    # the empty mask: the biases' eps share only (pr = eps / (eps + |zi| + eps), affine rule)
    assert float(res.relevant[0].detach().abs().max()) < 1e-12
    # position and token-type embeddings are irrelevant: all words relevant is not the logit
    assert float((res.relevant[1] - (lg - model.classifier.bias)).detach().abs().max()) > 1e-3
    # batched = one mask at a time
    for k in (1, 3, 5):
        assert_scaled(dec.cd(TOKENS, masks=m[k]).relevant[0], res.relevant[k])
    # phrases give the masks' numbers
    ph = dec.cd(TOKENS, phrases=[(0, 6), (2, 4)])
    assert_scaled(ph.relevant[0], res.relevant[1])
    assert_scaled(ph.relevant[1], dec.cd(TOKENS, masks=torch.tensor([0, 0, 1, 1, 1, 0, 0])).relevant[0])


def test_bert_float32_agrees_with_float64(model):
    m = masks(7, seed=1)
    r64 = ft.TextDecomposer.from_model(model).cd(TOKENS, masks=m)
    m32 = bert(dtype=torch.float32)
    r32 = ft.TextDecomposer.from_model(m32).cd(TOKENS, masks=m)
    assert r32.relevant.dtype == torch.float32
    assert_close_scaled(r32.relevant.double(), r64.relevant, torch.float32)
    assert_close_scaled(r32.irrelevant.double(), r64.irrelevant, torch.float32)
    # float64 arithmetic on the float32 model: a converted copy (what cd_text does)
    r = ft.TextDecomposer.from_model(m32, dtype=F64).cd(TOKENS, masks=m)
    assert r.relevant.dtype == F64
    assert_scaled(r.relevant, r64.relevant, rel=1e-5)


def test_bert_without_layers_by_hand():
    """No encoder layers: embeddings -> LayerNorm -> pooler (dense, tanh on the first token)
    -> classifier. By hand: the relevant input is mask * word vectors, positions and token
    types go to the irrelevant part; LayerNorm centres the relevant part by its own mean and
    divides by the total's std, times gamma; beta and each bias split as the affine rule
    (pr = (|zr|+eps) / (|zr|+eps + |zi|+eps)); tanh of the relevant part (activation rule
    f(r), f(a) - f(r))."""
    model = bert(layers=0, seed=3)
    emb = model.bert.embeddings
    T = TOKENS.shape[0]
    m = masks(T, seed=2)
    with torch.no_grad():
        words = emb.word_embeddings(TOKENS)                                    # (T, E)
        const = emb.position_embeddings(torch.arange(T)) + emb.token_type_embeddings(
            torch.zeros(T, dtype=torch.long))
        a = words + const
        ln = emb.LayerNorm
        std = torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + ln.eps)
        pre = (a - a.mean(-1, keepdim=True)) / std * ln.weight

        def split(zr, zi, b):
            pr = (zr.abs() + EPS) / ((zr.abs() + EPS) + (zi.abs() + EPS))
            return zr + pr * b

        expected = []
        for mk in m:
            r = mk[:, None] * words
            zr = (r - r.mean(-1, keepdim=True)) / std * ln.weight
            h = split(zr, pre - zr, ln.bias)[0]                                 # first token
            pool = model.bert.pooler.dense
            ztot = pool.weight @ (pre[0] + ln.bias)
            zr = pool.weight @ h
            feat = torch.tanh(split(zr, ztot - zr, pool.bias))
            expected.append(model.classifier.weight @ feat)
        expected = torch.stack(expected)
    res = ft.TextDecomposer.from_model(model).cd(TOKENS, masks=m)
    assert_scaled(res.relevant, expected, rel=1e-12)
    assert float(expected[1].abs().max()) > 1e-2


def test_bert_drop_in_and_agglomerate(model):
    batch = ft.Batch(TOKENS)                                       # .text (T, 1), the original's
    rel, irrel = ft.cd_text(batch, model, 1, 3, return_irrel_scores=True)
    assert rel.shape == irrel.shape == (3,) and rel.dtype == np.float64
    exp = ft.TextDecomposer.from_model(model).cd(TOKENS, phrases=[(1, 3), (4, 6)])
    np.testing.assert_allclose(rel, exp.relevant[0].detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ft.cd_text(batch, model, 4, 7), exp.relevant[1].detach().numpy(),
                               rtol=1e-12, atol=1e-14)             # stop = len: to the end
    lg = logits(model, TOKENS)
    np.testing.assert_allclose(rel + irrel, (lg - model.classifier.bias).detach().numpy(), rtol=1e-10,
                               atol=1e-12)
    # a float32 model: cd_text computes in float64 like the reference
    m32 = bert(dtype=torch.float32)
    np.testing.assert_allclose(ft.cd_text(batch, m32, 1, 3), rel, rtol=1e-5, atol=1e-6)
    lists = agg_1d.agglomerate(model, batch, 50, "cd", 1, 1)
    assert set(lists) == {"scores_list", "mask_list", "comps_list", "comp_scores_list", "score_orig"}
    assert lists["scores_list"][0].shape == (7,) and len(lists["comps_list"]) >= 2
    singles = ft.TextDecomposer.from_model(model).cd(TOKENS, phrases=[(i, i) for i in range(7)])
    s = (singles.relevant[:, 1] - singles.relevant[:, 0]).detach().numpy()
    np.testing.assert_allclose(lists["scores_list"][0], s, rtol=1e-10, atol=1e-12)
    tree = ft.text_hierarchy(agg_1d.collapse_tree(lists), [str(int(t)) for t in TOKENS])
    assert len(tree["levels"][0]) >= 7


def test_bert_refusals(model):
    dec = ft.TextDecomposer.from_model(model)
    with pytest.raises(ValueError, match="outside the embedding's vocabulary"):
        dec.cd([1, 99, 2], phrases=[(0, 1)])
    with pytest.raises(ValueError, match="0/1"):
        dec.cd(TOKENS, masks=torch.full((7,), 0.5))
    train = bert()
    train.train()
    with pytest.raises(ValueError, match="training mode"):
        ft.TextDecomposer.from_model(train)


def test_bert_sdpa_attention(model):
    """transformers' default attention (F.scaled_dot_product_attention) gives the eager
    attention's numbers."""
    sdpa = bert(attn="sdpa")
    m = masks(7, seed=4)
    res = ft.TextDecomposer.from_model(sdpa).cd(TOKENS, masks=m)
    exp = ft.TextDecomposer.from_model(model).cd(TOKENS, masks=m)
    assert_scaled(res.relevant, exp.relevant, rel=1e-9)
    ref = ft.ModelTextDecomposer(sdpa, backend="reference").cd(TOKENS, masks=m)
    assert_scaled(res.relevant, ref.relevant)


# ------------------------------------------------------------------ the concrete tracer


class ShapeInPython(torch.nn.Module):
    """What a symbolic torch.fx trace cannot take: a buffer sliced by a size, a star-unpacked
    shape, a branch on a tensor's value."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(20, 6)
        self.register_buffer("pos", torch.randn(1, 30, 6))
        self.mix, self.fc = torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[:, :ids.size(1)]
        h = self.mix(x).view(*x.shape[:-1], 2, 3).flatten(2)
        if bool((ids == 0).any()):       # a branch on the ids: fixed per sentence
            h = h * 0.5
        return self.fc(torch.relu(h).mean(1))


def test_concrete_trace_of_python_on_shapes():
    from fastacd.capture.concrete import ConcreteTracer
    import torch.fx as fx
    model = ShapeInPython().double().eval()
    ids = torch.tensor([[3, 0, 7, 7]])
    gm = fx.GraphModule(model, ConcreteTracer(DEFAULT).trace(model, ids))
    with torch.no_grad():
        assert torch.equal(gm(ids), model(ids))
    code = gm.code
    assert "size" not in code and "view(1, 4, 2, 3)" in code and "mul" in code   # sizes baked in
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    # through the text API: traced per sentence (each takes its own branch)
    dec = ft.ModelTextDecomposer(model)
    ref = ft.ModelTextDecomposer(model, backend="reference")
    for toks in ([3, 0, 7, 7], [3, 5, 7, 7, 9]):
        toks = torch.tensor(toks)
        m = masks(len(toks), seed=5)
        res, exp = dec.cd(toks, masks=m), ref.cd(toks, masks=m)
        assert_scaled(res.relevant, exp.relevant)
        with torch.no_grad():
            lg = model(toks[None])[0]
        assert_scaled(res.relevant + res.irrelevant, (lg - model.fc.bias).expand(len(m), -1))
        # the empty mask: only the biases' eps share (affine rule)
        assert float(res.relevant[0].detach().abs().max()) < 1e-15

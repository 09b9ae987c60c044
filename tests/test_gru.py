"""The GRU rule (docs/text.md, "The GRU rule") and recurrent modules in the general engine.

* one GRU step computed by hand (scalar math, no fastacd code) against the text engine, the
  text reference and the general engine;
* the batched text engine (``GRUDecomposer``) against the one-phrase reference, float64
  tight and float32, multi-layer / bidirectional / batch_first, token masks, batched = one
  phrase at a time, relevant + irrelevant = the model's output;
* the drop-in ``cd_text`` and ``agg_1d.agglomerate`` on GRU classifiers;
* ``nn.LSTM`` / ``nn.GRU`` as leaf modules of ``fastacd.Decomposer`` (the ``Recurrent``
  rule) against the text reference and the reference backend.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastacd
from conftest import assert_close_scaled
from fastacd import agg_1d
from fastacd import text as ft
from fastacd.ops import torch_ops
from fastacd.reference import text as rt
from fastacd.rules import recurrent as rec

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_scaled(actual, expected, rel=1e-10, scale=None):
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    scale = max(float(expected.abs().max()) if scale is None else float(scale), 1e-30)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rel, atol=rel * scale)


def big_biases(rnn: nn.Module, seed: int = 0):
    """Random-init biases are small; make them matter for the bias terms of the rule."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
    return rnn


class GRUText(nn.Module):
    """embedding -> nn.GRU -> linear on the last output, with names of its own (found by
    tracing: ``TextDecomposer.from_model``)."""

    def __init__(self, vocab=40, embed=8, hidden=12, classes=2, layers=1, bidirectional=False,
                 batch_first=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, embed)
        self.gru = big_biases(nn.GRU(embed, hidden, num_layers=layers, bidirectional=bidirectional,
                                     batch_first=batch_first), seed)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), classes)
        self.batch_first = batch_first

    def forward(self, batch):
        ids = getattr(batch, "text", batch)
        out, _ = self.gru(self.emb(ids))
        return self.fc(out[:, -1] if self.batch_first else out[-1])


class OriginalNamesGRU(nn.Module):
    """The original package's text model shape (.embed, .lstm, .hidden_to_label) with a GRU."""

    def __init__(self, vocab=30, embed=6, hidden=9, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden_dim = hidden
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = big_biases(nn.GRU(embed, hidden), seed)
        self.hidden_to_label = nn.Linear(hidden, 2)

    def forward(self, batch):
        out, _ = self.lstm(self.embed(getattr(batch, "text", batch)))
        return self.hidden_to_label(out[-1])


def phrase_mask(T, s, e):
    m = torch.zeros(T)
    m[s:e + 1] = 1
    return m


# ------------------------------------------------------------------ one step by hand


def _sig(v):
    return 1 / (1 + math.exp(-v))


def _split3(a, b, c, f):
    """The three-player rule written out: relevant share of f(a + b + c) and f(c)."""
    return 0.5 * ((f(a + c) - f(c)) + (f(a + b + c) - f(b + c))), f(c)


@pytest.fixture
def scalar_gru():
    """A GRU with one input and one hidden unit and chosen weights, two tokens."""
    gru = nn.GRU(1, 1).double()
    with torch.no_grad():
        gru.weight_ih_l0.copy_(torch.tensor([[0.7], [-1.1], [1.3]]))    # r, z, n
        gru.weight_hh_l0.copy_(torch.tensor([[0.4], [0.9], [-0.8]]))
        gru.bias_ih_l0.copy_(torch.tensor([0.2, -0.3, 0.5]))
        gru.bias_hh_l0.copy_(torch.tensor([-0.6, 0.8, 0.35]))
    embed = nn.Embedding(3, 1).double()
    with torch.no_grad():
        embed.weight.copy_(torch.tensor([[0.0], [1.5], [-0.9]]))
    return embed, gru.eval()


def _hand(embed, gru, phrase):
    """Relevant hidden state after tokens [1, 2] for a phrase ⊆ {0, 1}, in plain floats."""
    (w_ir, w_iz, w_in), (w_hr, w_hz, w_hn) = (gru.weight_ih_l0[:, 0].tolist(),
                                              gru.weight_hh_l0[:, 0].tolist())
    (b_ir, b_iz, b_in), (b_hr, b_hz, b_hn) = gru.bias_ih_l0.tolist(), gru.bias_hh_l0.tolist()
    xs = [embed.weight[1, 0].item(), embed.weight[2, 0].item()]
    h_r = h_i = 0.0
    for t, x in enumerate(xs):
        x_r, x_i = (x, 0.0) if t in phrase else (0.0, x)
        h = h_r + h_i
        r = _sig(w_ir * x + w_hr * h + b_ir + b_hr)                  # the true reset gate
        z_r, z_b = _split3(w_iz * x_r + w_hz * h_r, w_iz * x_i + w_hz * h_i, b_iz + b_hz, _sig)
        z_i = _sig(w_iz * x + w_hz * h + b_iz + b_hz) - z_r - z_b
        c_n = b_in + r * b_hn
        n_r, n_b = _split3(w_in * x_r + r * w_hn * h_r, w_in * x_i + r * w_hn * h_i, c_n, math.tanh)
        n = math.tanh(w_in * x + r * (w_hn * h + b_hn) + b_in)
        z = _sig(w_iz * x + w_hz * h + b_iz + b_hz)
        # (1 - z) n: shares -z_r, -z_i, 1 - z_b of 1 - z times n_r, n_i, n_b; z h: (z_r + z_b) h_r
        new_r = -z_r * (n_r + n_b) + (1 - z_b) * n_r + (z_r + z_b) * h_r
        if t in phrase:
            new_r += (1 - z_b) * n_b
        h_true = (1 - z) * n + z * h
        h_r, h_i = new_r, h_true - new_r
    return h_r, h_r + h_i


@pytest.mark.parametrize("phrase", [(0,), (1,), (0, 1), ()])
def test_one_gru_step_by_hand(scalar_gru, phrase):
    embed, gru = scalar_gru
    tokens = torch.tensor([1, 2])
    expected, h_true = _hand(embed, gru, phrase)
    with torch.no_grad():
        out, _ = gru(embed(tokens).unsqueeze(1))
    assert h_true == pytest.approx(float(out[-1, 0, 0]), abs=1e-14)
    mask = torch.tensor([float(t in phrase) for t in range(2)])
    # the text engine, the text reference and the general engine give the hand's number
    res = ft.TextDecomposer(embed, gru, None).cd(tokens, masks=mask)
    assert float(res.relevant[0, 0]) == pytest.approx(expected, abs=1e-14)
    assert float(res.relevant[0, 0] + res.irrelevant[0, 0]) == pytest.approx(h_true, abs=1e-14)
    rel, irrel = rt.text_cd(embed, gru, None, tokens, mask)
    assert float(rel[0]) == pytest.approx(expected, abs=1e-14)
    assert float(rel[0] + irrel[0]) == pytest.approx(h_true, abs=1e-14)
    model = EmbeddingsToRNN(gru, None).eval()
    x = embed(tokens).detach()[None]
    for backend in ("torch", "reference"):
        got = fastacd.Decomposer(model, backend=backend).cd(x, mask[:, None].expand(2, 1)[None])
        assert float(got.relevant[0, 0]) == pytest.approx(expected, abs=1e-14)


def test_gru_cell_batched_equals_reference_cell():
    g = torch.Generator().manual_seed(0)
    M, H = 5, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    rel_zn, total_zn, b_z, b_n, prev_rel_h = rnd(M, 2 * H), rnd(1, 2 * H), rnd(H), rnd(1, H), rnd(M, H)
    prev_total_h = rnd(1, H)
    phrase = torch.tensor([1.0, 0.0, 1.0, 0.3, 0.0], dtype=F64)
    got = rec.gru_cd_cell(rel_zn, total_zn, b_z, b_n, prev_rel_h, phrase)
    for m in range(M):
        irr = total_zn[0] - rel_zn[m]
        r, i = rec.gru_cell_reference(rel_zn[m, :H], irr[:H], b_z, rel_zn[m, H:], irr[H:], b_n[0],
                                      prev_rel_h[m], prev_total_h[0] - prev_rel_h[m], phrase[m])
        assert_scaled(got[m], r)
        # both parts sum to the true step: (1 - z) n + z h
        z = torch.sigmoid(total_zn[0, :H] + b_z)
        n = torch.tanh(total_zn[0, H:] + b_n[0])
        assert_scaled(r + i, (1 - z) * n + z * prev_total_h[0])
    # gradients of the batched cell
    args = [t.clone().requires_grad_() for t in (rel_zn[:2], total_zn, b_z, b_n, prev_rel_h[:2])]
    assert torch.autograd.gradcheck(lambda *a: rec.gru_cd_cell(*a, phrase[:2]), tuple(args))


# ------------------------------------------------------------------ the text engine


@pytest.mark.parametrize("embed,hidden,T", [(4, 3, 6), (8, 16, 11), (16, 24, 15)])
def test_gru_engine_matches_reference_float64(embed, hidden, T):
    model = GRUText(vocab=50, embed=embed, hidden=hidden, seed=embed).double().eval()
    tokens = torch.randint(0, 50, (T,), generator=torch.Generator().manual_seed(T))
    dec = ft.TextDecomposer.from_model(model)
    assert isinstance(dec, ft.GRUDecomposer) and dec.rnn is model.gru
    phrases = ft.all_phrases(T)
    res = dec.cd(tokens, phrases=phrases)
    assert res.relevant.shape == (len(phrases), 2)
    for k, (s, e) in enumerate(phrases):
        rel, irrel = rt.text_cd(model.emb, model.gru, model.fc, tokens, phrase_mask(T, s, e))
        scale = rel.abs().max() + irrel.abs().max()
        assert_scaled(res.relevant[k], rel, scale=scale)
        assert_scaled(res.irrelevant[k], irrel, scale=scale)
    # batched == one phrase at a time
    for k in (0, len(phrases) // 2, len(phrases) - 1):
        one = dec.cd(tokens, phrases=[phrases[k]])
        assert_scaled(one.relevant[0], res.relevant[k])


def test_gru_engine_float32_model_agrees_with_float64_reference():
    model = GRUText(vocab=30, embed=8, hidden=16, seed=3).eval()
    tokens = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(1))
    phrases = [(0, 0), (2, 5), (11, 11), (0, 11), (4, 9)]
    dec = ft.TextDecomposer.from_model(model)          # float32 arithmetic (the GRU's dtype)
    assert dec.dtype == torch.float32
    res = dec.cd(tokens, phrases=phrases)
    ref = [rt.text_cd(model.emb, model.gru, model.fc, tokens, phrase_mask(12, s, e)) for s, e in phrases]
    assert_close_scaled(res.relevant.double(), torch.stack([r for r, _ in ref]), torch.float32)
    assert_close_scaled(res.irrelevant.double(), torch.stack([i for _, i in ref]), torch.float32)


def test_gru_token_masks_match_reference_and_sum_to_the_output():
    model = GRUText(seed=5).double().eval()
    T = 9
    tokens = torch.randint(0, 40, (T,), generator=torch.Generator().manual_seed(2))
    masks = (torch.rand(6, T, generator=torch.Generator().manual_seed(3)) < 0.4).double()
    masks[0] = 0                       # empty: relevant 0
    masks[1] = 1                       # whole sentence: irrelevant 0
    dec = ft.TextDecomposer.from_model(model)
    res = dec.cd(tokens, masks=masks)
    for k in range(6):
        rel, irrel = rt.text_cd(model.emb, model.gru, model.fc, tokens, masks[k])
        scale = rel.abs().max() + irrel.abs().max()
        assert_scaled(res.relevant[k], rel, scale=scale)
        assert_scaled(res.irrelevant[k], irrel, scale=scale)
    with torch.no_grad():
        expected = model(tokens[:, None])[0] - model.fc.bias
    assert_scaled(res.relevant + res.irrelevant, expected.expand(6, -1))
    assert float(res.relevant[0].abs().max()) == 0.0
    assert float(res.irrelevant[1].abs().max()) < 1e-12 * float(expected.abs().max())


@pytest.mark.parametrize("layers,bidirectional,batch_first", [(2, False, False), (1, True, True),
                                                              (2, True, False)])
@pytest.mark.parametrize("readout", ["last", "final"])
def test_gru_multilayer_bidirectional_match_reference_and_gru(layers, bidirectional, batch_first,
                                                              readout):
    torch.manual_seed(layers * 10 + bidirectional)
    D = 2 if bidirectional else 1
    embed = nn.Embedding(30, 6).double()
    gru = big_biases(nn.GRU(6, 7, num_layers=layers, bidirectional=bidirectional,
                            batch_first=batch_first)).double().eval()
    head = nn.Linear(7 * D, 3).double()
    T = 8
    tokens = torch.randint(0, 30, (T,))
    phrases = [(0, 0), (2, 4), (7, 7), (0, 7), (3, 6)]
    dec = ft.TextDecomposer(embed, gru, head, readout=readout)
    res = dec.cd(tokens, phrases=phrases)
    for k, (s, e) in enumerate(phrases):
        rel, irrel = rt.text_cd(embed, gru, head, tokens, phrase_mask(T, s, e), readout=readout)
        scale = rel.abs().max() + irrel.abs().max()
        assert_scaled(res.relevant[k], rel, scale=scale)
        assert_scaled(res.irrelevant[k], irrel, scale=scale)
    with torch.no_grad():
        x = embed(tokens).unsqueeze(0 if batch_first else 1)
        out, h_n = gru(x)
        if readout == "last":
            feat = out[0, -1] if batch_first else out[-1, 0]
        else:
            feat = torch.cat([h_n[-2, 0], h_n[-1, 0]]) if bidirectional else h_n[-1, 0]
        expected = head(feat) - head.bias
    assert_scaled(res.relevant + res.irrelevant, expected.expand(len(phrases), -1))
    # the whole sentence is all relevant
    assert float(res.irrelevant[3].abs().max()) < 1e-12 * float(expected.abs().max())


def test_gru_chunking_does_not_change_results_and_gradients_flow():
    model = GRUText(hidden=10, seed=6).double().eval()
    tokens = torch.randint(0, 40, (10,), generator=torch.Generator().manual_seed(4))
    phrases = ft.all_phrases(10)
    base = ft.TextDecomposer.from_model(model).cd(tokens, phrases=phrases)
    tiny = ft.TextDecomposer.from_model(model, memory_budget=1).cd(tokens, phrases=phrases)
    assert_scaled(tiny.relevant, base.relevant, rel=1e-12)
    dec = ft.TextDecomposer.from_model(model)
    res = dec.cd(tokens, phrases=[(2, 4)])
    res.relevant[0, 1].backward()
    grads = [p.grad for p in model.gru.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    with pytest.raises(ValueError, match="'auto' or 'torch'"):
        ft.TextDecomposer(model.emb, model.gru, model.fc, backend="compiled")


# ------------------------------------------------------------------ drop-in


@pytest.mark.parametrize("make", [OriginalNamesGRU, GRUText])
def test_drop_in_cd_text_and_agglomerate_on_a_gru_classifier(make):
    model = make().double().eval()
    emb, rnn, head = ((model.embed, model.lstm, model.hidden_to_label) if hasattr(model, "embed")
                      else (model.emb, model.gru, model.fc))
    T = 7
    batch = ft.Batch(torch.randint(1, 30, (T,), generator=torch.Generator().manual_seed(7)))
    rel, irrel = ft.cd_text(batch, model, 2, 4, return_irrel_scores=True)
    assert rel.shape == irrel.shape == (2,) and rel.dtype == np.float64
    r_ref, i_ref = rt.text_cd(emb, rnn, head, batch.text[:, 0], phrase_mask(T, 2, 4))
    assert_scaled(torch.from_numpy(rel), r_ref, scale=r_ref.abs().max() + i_ref.abs().max())
    # the original's stop=len(sentence): the phrase runs to the end
    whole = ft.cd_text(batch, model, 0, T)
    with torch.no_grad():
        expected = (model(batch)[0] - head.bias).numpy()
    np.testing.assert_allclose(whole, expected, rtol=1e-10, atol=1e-12)
    lists = agg_1d.agglomerate(model, batch, 50, "cd", 1, 1)
    ref = rt.agglomerate_1d(model, batch, 50, "cd", 1, 1) if make is OriginalNamesGRU else None
    assert set(lists) == {"scores_list", "mask_list", "comps_list", "comp_scores_list", "score_orig"}
    assert lists["scores_list"][0].shape == (T,)
    if ref is not None:
        for a, b in zip(lists["scores_list"], ref["scores_list"]):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    for method in ("occlusion", "build_up"):
        out = agg_1d.agglomerate(model, batch, 50, method, 1, 0)
        assert out["scores_list"][0].shape == (T,)


# ------------------------------------------------------------------ the general engine


class EmbeddingsToRNN(nn.Module):
    """Word vectors (1, T, E) -> LSTM / GRU -> readout -> linear: a text model through the
    general engine (its input is the embeddings, float). ``hx``: a constant initial state
    (kept as buffers)."""

    def __init__(self, rnn, head, readout="last", hx=None):
        super().__init__()
        self.rnn, self.head, self.readout = rnn, head, readout
        self.has_state = hx is not None
        if hx is not None:
            hx = hx if isinstance(hx, tuple) else (hx,)
            for k, t in enumerate(hx):
                self.register_buffer(f"hx{k}", t)

    def forward(self, x):
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        if self.has_state:
            hx = (self.hx0, self.hx1) if isinstance(self.rnn, nn.LSTM) else self.hx0
            out = self.rnn(x, hx)
        else:
            out = self.rnn(x)
        if self.readout == "last":
            feat = out[0][:, -1] if self.rnn.batch_first else out[0][-1]
        elif isinstance(self.rnn, nn.LSTM):
            feat = out[1][0][-1]
        else:
            feat = out[1][-1]
        return feat if self.head is None else self.head(feat)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers,bidirectional,batch_first,readout", [
    (1, False, False, "last"), (1, False, True, "final"), (2, True, False, "last"),
    (2, True, True, "last"), (2, False, False, "final")])
def test_general_engine_on_recurrent_leaf_matches_text_reference(cls, layers, bidirectional,
                                                                 batch_first, readout):
    torch.manual_seed(layers + 2 * bidirectional + 4 * batch_first)
    E, H, T = 5, 6, 7
    rnn = big_biases(cls(E, H, num_layers=layers, bidirectional=bidirectional,
                         batch_first=batch_first)).double().eval()
    head = nn.Linear(H * (2 if bidirectional and readout == "last" else 1), 3).double()
    embed = nn.Embedding(20, E).double()
    tokens = torch.randint(0, 20, (T,))
    model = EmbeddingsToRNN(rnn, head, readout).eval()
    x = embed(tokens).detach()[None]                                   # (1, T, E)
    masks = torch.stack([phrase_mask(T, s, e) for s, e in [(0, 0), (2, 4), (6, 6), (0, 6), (1, 5)]])
    masks[4, 3] = 0                                                    # not contiguous
    dec = fastacd.Decomposer(model)
    res = dec.cd(x, masks[:, :, None].expand(-1, -1, E).double())
    with torch.no_grad():
        out = model(x)
    assert_scaled(res.relevant + res.irrelevant, out.expand(5, -1))
    ref_readout = "last" if readout == "last" else "final"
    for k in range(5):
        rel, irrel = rt.text_cd(embed, rnn, None, tokens, masks[k], readout=ref_readout)
        w = head.weight.double()
        scale = float((w @ rel).abs().max() + (w @ irrel).abs().max())
        # the general engine splits the head's bias too (affine rule); the text reference not
        assert_scaled(res.relevant[k], w @ rel + _bias_share(w @ rel, w @ irrel, head.bias), scale=scale)
    # batched == one mask at a time, and the reference backend
    ref = fastacd.Decomposer(model, backend="reference").cd(x, masks[:, :, None].expand(-1, -1, E).double())
    assert_scaled(res.relevant, ref.relevant)
    assert_scaled(res.irrelevant, ref.irrelevant)
    one = dec.cd(x, masks[1:2, :, None].expand(-1, -1, E).double())
    assert_scaled(one.relevant[0], res.relevant[1])


def _bias_share(zr, zi, b):
    """The affine rule's relevant share of a bias (design.md section 2, eps = 1e-20)."""
    pr, pi = zr.abs() + 1e-20, zi.abs() + 1e-20
    return pr / (pr + pi) * b.double()


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_general_engine_recurrent_float32_initial_state_and_soft_masks(cls):
    torch.manual_seed(11)
    E, H, T = 4, 5, 6
    rnn = big_biases(cls(E, H, num_layers=2, batch_first=True)).eval()
    h0 = torch.randn(2, 1, H)
    hx = (h0, torch.randn(2, 1, H)) if cls is nn.LSTM else h0
    model = EmbeddingsToRNN(rnn, nn.Linear(H, 2), "last", hx=hx).eval()
    m64 = copy.deepcopy(model).double().eval()
    x = torch.randn(1, T, E)
    soft = torch.rand(4, T, 1).expand(-1, -1, E).contiguous()
    soft[0] = 0
    res64 = fastacd.Decomposer(m64).cd(x.double(), soft.double())
    ref64 = fastacd.Decomposer(m64, backend="reference").cd(x.double(), soft.double())
    assert_scaled(res64.relevant, ref64.relevant)
    assert_scaled(res64.irrelevant, ref64.irrelevant)
    with torch.no_grad():
        assert_scaled(res64.relevant + res64.irrelevant, m64(x.double()).expand(4, -1))
    for backend in ("torch", "compiled") if fastacd.ops.HAS_COMPILED else ("torch",):
        res = fastacd.Decomposer(model, backend=backend).cd(x, soft)
        assert_close_scaled(res.relevant.double(), res64.relevant, torch.float32)
        with torch.no_grad():
            assert_close_scaled(res.relevant + res.irrelevant, model(x).expand(4, -1), torch.float32)
    # an empty mask: the initial state and everything else is irrelevant, only the head's
    # bias share (eps / (2 eps + |zi|)) is relevant
    assert float(res64.relevant[0].abs().max()) < 1e-15


def test_phrase_weight_is_the_token_mask_and_a_soft_masks_value():
    x = torch.randn(5, 3, dtype=F64)
    x[4] = 0
    m = torch.tensor([1.0, 0.0, 0.25, 1.0, 1.0], dtype=F64)[:, None]
    p = rec.phrase_weight(m * x, (1 - m) * x)
    assert torch.equal(p[[0, 1, 3]], torch.tensor([1.0, 0.0, 1.0], dtype=F64))
    assert float(p[2]) == pytest.approx(0.25, abs=1e-15)
    assert float(p[4]) == 0.0          # a zero vector: no relevance at 0/0


def test_general_engine_refuses_what_it_cannot_decompose():
    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, proj_size=2, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1]

    class StateFromInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 3, batch_first=True)

        def forward(self, x):
            return self.rnn(x, x[:, :1].transpose(0, 1).contiguous())[0][:, -1]

    with pytest.raises(fastacd.UnsupportedOpError, match="proj_size"):
        fastacd.Decomposer(Proj().eval())
    with pytest.raises(fastacd.UnsupportedOpError, match="initial state computed from the input"):
        fastacd.Decomposer(StateFromInput().eval())


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_recurrent_rule_on_a_batch_of_sequences(cls):
    """The CDEP pass gives the rule a batch of N sequences (no aux) and K*N relevant rows,
    mask-major (row j belongs to sequence j % N): each row equals the one-sequence engine."""
    torch.manual_seed(4)
    E, H, T, N, K = 3, 4, 5, 3, 2
    rnn = big_biases(cls(E, H, num_layers=2, bidirectional=True, batch_first=True)).double().eval()
    model = EmbeddingsToRNN(rnn, None, "last").eval()
    dec = fastacd.Decomposer(model)
    node = next(n for n, st in dec.graph.steps.items() if st.kind == "recurrent")
    step = dec.graph.steps[node]
    xs = torch.randn(N, T, E, dtype=F64)
    masks = (torch.rand(K * N, T, 1, generator=torch.Generator().manual_seed(5)) < 0.5).double()
    r = masks * xs.repeat(K, 1, 1)
    values, _ = dec.graph.total_pass(xs, dec.zero_tol)
    out, state = step.rule.relevant(step, {step.dep[0]: r}, values, None, torch_ops, K * N)
    one = dec.graph
    for j in range(K * N):
        v1, a1 = one.total_pass(xs[j % N][None], dec.zero_tol)
        node1 = next(n for n, st in one.steps.items() if st.kind == "recurrent")
        st1 = one.steps[node1]
        o1, s1 = st1.rule.relevant(st1, {st1.dep[0]: r[j:j + 1]}, v1, a1[node1], torch_ops, 1)
        assert_scaled(out[j], o1[0])
        h1 = s1[0] if cls is nn.LSTM else s1
        assert_scaled((state[0] if cls is nn.LSTM else state)[:, j], h1[:, 0])


# ------------------------------------------------------------------ packing, padding, batch_first


class PackingGRU(nn.Module):
    """ids (T, N) -> embedding -> pack_padded_sequence (lengths = non-padding tokens) -> GRU
    -> h_n[-1] -> linear. ``names``: the original package's attribute names (.embed, .lstm,
    .hidden_to_label), which cd_text reads without calling forward."""

    def __init__(self, names=False, batch_first=False, seed=5):
        super().__init__()
        torch.manual_seed(seed)
        emb = nn.Embedding(20, 5, padding_idx=0)
        rnn = big_biases(nn.GRU(5, 6, batch_first=batch_first), seed)
        head = nn.Linear(6, 2)
        self.names, self.batch_first = names, batch_first
        if names:
            self.hidden_dim = 6
            self.embed, self.lstm, self.hidden_to_label = emb, rnn, head
        else:
            self.emb, self.gru, self.fc = emb, rnn, head

    def parts(self):
        return ((self.embed, self.lstm, self.hidden_to_label) if self.names
                else (self.emb, self.gru, self.fc))

    def forward(self, batch):
        emb, rnn, head = self.parts()
        ids = getattr(batch, "text", batch)
        lengths = (ids != 0).sum(0).cpu()
        x = emb(ids.t() if self.batch_first else ids)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=self.batch_first,
                                                   enforce_sorted=False)
        _, h = rnn(packed)
        return head(h[-1])


class EmbeddingsPacked(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.fc = nn.GRU(5, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, [x.shape[1]], batch_first=True)
        return self.fc(self.gru(packed)[1][-1])


@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_is_refused_by_name(batch_first):
    """A forward that packs cannot be traced (torch.fx's own message is obscure): every entry
    point names pack_padded_sequence and says what to do; no global state is left behind."""
    model = PackingGRU(batch_first=batch_first).double().eval()
    batch = ft.Batch(torch.tensor([3, 5, 7, 2]))
    for call in (lambda: ft.TextDecomposer.from_model(model),
                 lambda: ft.cd_text(batch, model, 1, 2),
                 lambda: ft.ModelTextDecomposer(model),
                 lambda: fastacd.Decomposer(EmbeddingsPacked().eval())):
        with pytest.raises(fastacd.UnsupportedOpError, match="pack_padded_sequence.*PackedSequence"):
            call()
    # tracing still works afterwards
    assert isinstance(ft.TextDecomposer.from_model(GRUText().eval()), ft.GRUDecomposer)


def test_original_names_model_that_packs_reads_one_sentence_as_the_original():
    """With the original's attribute names cd_text does not call forward (as the original):
    packing one sentence without padding changes nothing, so the scores sum to the logits."""
    model = PackingGRU(names=True).double().eval()
    tokens = torch.tensor([3, 5, 7, 2, 9])
    batch = ft.Batch(tokens)
    whole = ft.cd_text(batch, model, 0, 4)
    with torch.no_grad():
        logits = model(batch)[0]
    np.testing.assert_allclose(whole, (logits - model.hidden_to_label.bias).detach().numpy(), rtol=1e-10,
                               atol=1e-12)
    r_ref, _ = rt.text_cd(model.embed, model.lstm, model.hidden_to_label, tokens,
                          phrase_mask(5, 1, 2))
    assert_scaled(torch.from_numpy(ft.cd_text(batch, model, 1, 2)), r_ref)


class BatchFirstGRU(nn.Module):
    """ids (T, N) -> transposed -> embedding -> batch_first GRU -> out[:, -1] -> linear."""

    def __init__(self, twin: GRUText):
        super().__init__()
        self.emb, self.fc = twin.emb, twin.fc
        self.gru = nn.GRU(twin.gru.input_size, twin.gru.hidden_size, batch_first=True)
        self.gru.load_state_dict(twin.gru.state_dict())

    def forward(self, batch):
        ids = getattr(batch, "text", batch)
        out, _ = self.gru(self.emb(ids.t()))
        return self.fc(out[:, -1])


def test_batch_first_gru_classifier_equals_its_sequence_first_twin():
    twin = GRUText(seed=3).double().eval()
    model = BatchFirstGRU(twin).double().eval()
    dec = ft.TextDecomposer.from_model(model)
    assert isinstance(dec, ft.GRUDecomposer) and dec.rnn is model.gru   # the recurrent engine
    tokens = torch.tensor([4, 1, 9, 9, 2, 7])
    batch = ft.Batch(tokens)
    phrases = ft.all_phrases(6)
    res = dec.cd(tokens, phrases=phrases)
    exp = ft.TextDecomposer.from_model(twin).cd(tokens, phrases=phrases)
    assert_scaled(res.relevant, exp.relevant)
    with torch.no_grad():
        logits = model(batch)[0]
        assert_scaled(logits, twin(batch)[0])
    whole = res.relevant[phrases.index((0, 5))] + res.irrelevant[phrases.index((0, 5))]
    assert_scaled(whole, logits - model.fc.bias)
    np.testing.assert_allclose(ft.cd_text(batch, model, 2, 3), res.relevant[phrases.index((2, 3))]
                               .detach().numpy(), rtol=1e-12, atol=1e-14)


def test_padding_tokens_in_the_text_and_general_engines():
    """Padding tokens (padding_idx: zero word vectors) inside a sentence. The recurrent
    engine follows the token mask: a phrase of padding tokens gets its steps' bias terms,
    as the original. The general engine sees only the parts of the input: at a zero vector
    the relevant share p_t is 0 (0/0 -> 0), so a padding-only phrase is exactly irrelevant.
    Both sum to the model's output and match their references."""
    model = GRUText(seed=6).double().eval()
    model.emb.padding_idx = 0
    with torch.no_grad():
        model.emb.weight[0] = 0
    tokens = torch.tensor([4, 0, 0, 7, 3, 0])
    phrases = [(1, 2), (0, 3), (5, 5), (3, 4), (0, 5)]
    text = ft.TextDecomposer.from_model(model)
    general = ft.ModelTextDecomposer(model)
    rt_res = text.cd(tokens, phrases=phrases)
    gen = general.cd(tokens, phrases=phrases)
    ref = ft.ModelTextDecomposer(model, backend="reference").cd(tokens, phrases=phrases)
    assert_scaled(gen.relevant, ref.relevant)
    for k, (s, e) in enumerate(phrases):
        r_ref, _ = rt.text_cd(model.emb, model.gru, model.fc, tokens, phrase_mask(6, s, e))
        assert_scaled(rt_res.relevant[k], r_ref)
    with torch.no_grad():
        expected = (model(ft.Batch(tokens))[0] - model.fc.bias).expand(5, -1)
    assert_scaled(rt_res.relevant + rt_res.irrelevant, expected)
    assert_scaled(gen.relevant + gen.irrelevant, expected)
    # the padding-only phrases: bias terms in the recurrent engine, nothing in the general one
    for k in (0, 2):
        assert float(rt_res.relevant[k].detach().abs().max()) > 1e-3
        assert float(gen.relevant[k].detach().abs().max()) < 1e-15   # the head's eps share only
    # a phrase without padding tokens: the same in both engines; one with padding inside
    # differs by the padding steps' bias terms
    assert_scaled(gen.relevant[3], rt_res.relevant[3], rel=1e-9)
    assert float((gen.relevant[4] - rt_res.relevant[4]).detach().abs().max()) > 1e-3


class ScaledEmbeddingGRU(GRUText):
    """A scale and a position embedding between the embedding and the GRU: not the recurrent
    engine's embedding -> GRU form (it would ignore them), so from_model takes the general
    engine."""

    def __init__(self):
        super().__init__(seed=8)
        self.pos = nn.Parameter(0.3 * torch.randn(12, 1, 8))

    def forward(self, batch):
        ids = getattr(batch, "text", batch)
        out, _ = self.gru(self.emb(ids) * 2.0 + self.pos[:ids.shape[0]])
        return self.fc(out[-1])


def test_embedding_transformed_before_the_gru_goes_to_the_general_engine():
    model = ScaledEmbeddingGRU().double().eval()
    dec = ft.TextDecomposer.from_model(model)
    assert isinstance(dec, ft.ModelTextDecomposer)
    tokens = torch.tensor([4, 1, 9, 2, 7])
    phrases = ft.all_phrases(5)
    res = dec.cd(tokens, phrases=phrases)
    ref = ft.ModelTextDecomposer(model, backend="reference").cd(tokens, phrases=phrases)
    assert_scaled(res.relevant, ref.relevant)
    with torch.no_grad():
        logits = model(ft.Batch(tokens))[0]
    assert_scaled(res.relevant + res.irrelevant, (logits - model.fc.bias).expand(len(phrases), -1))
    # the positions are irrelevant: the whole sentence is not the logit
    whole = res.relevant[phrases.index((0, 4))]
    assert float((whole - (logits - model.fc.bias)).detach().abs().max()) > 1e-3


def test_unbatched_recurrent_input_is_refused():
    """An unbatched (T, In) call: refused naming the op, at the getitem dropping the batch
    dim, or (where the batch may move, the attention work's layouts) by the recurrent rule."""
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.fc = nn.GRU(3, 4), nn.Linear(4, 2)

        def forward(self, x):                       # x (1, T, 3) -> (T, 3): unbatched GRU call
            return self.fc(self.gru(x[0])[0][-1:])

    dec = fastacd.Decomposer(Unbatched().eval())
    with pytest.raises(fastacd.UnsupportedOpError,
                       match="getitem.*changes the batch dimension|GRU.*unbatched 2-d input"):
        dec.cd(torch.randn(1, 5, 3), torch.ones(1, 5, 3))

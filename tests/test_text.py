"""Text CD: the batched LSTM engine against the one-phrase reference, analytic truths of
the decomposition, the drop-in cd_text, bad input, and the trained toy sentiment model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastacd.ops import torch_ops as _torch_ops
import fastacd
from fastacd import text as ft
from fastacd.text import lstm as ft_lstm
from fastacd.reference import text as rt
from fastacd.text.sentiment_toy import NEG, POS, SentimentLSTM, accuracy, toy_model

F64 = torch.float64


def assert_scaled(actual, expected, rel=1e-10, scale=None):
    """Close to ``rel`` relative to ``scale`` (default: the magnitude of ``expected``)."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    scale = max(float(expected.abs().max()) if scale is None else float(scale), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_matches_reference_phrases(res, model, tokens, phrases):
    """Each phrase's relevant and irrelevant scores equal the reference cd_text's (1e-10 of
    the phrase's scale)."""
    for k, (s, e) in enumerate(phrases):
        rel, irrel = rt.cd_text(ft.Batch(tokens), model, s, e, return_irrel_scores=True)
        scale = np.abs(rel).max() + np.abs(irrel).max()
        assert_scaled(res.relevant[k], torch.from_numpy(rel), scale=scale)
        assert_scaled(res.irrelevant[k], torch.from_numpy(irrel), scale=scale)


class TextModel(nn.Module):
    """The original package's text model shape: .embed, .lstm, .hidden_to_label, .hidden_dim."""

    def __init__(self, vocab=40, embed=8, hidden=12, classes=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden_dim = hidden
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden)
        self.hidden_to_label = nn.Linear(hidden, classes)
        # random-init biases are small; make them matter for the bias-split terms
        with torch.no_grad():
            for p in (self.lstm.bias_ih_l0, self.lstm.bias_hh_l0):
                p.uniform_(-1, 1)

    def forward(self, batch):
        out, _ = self.lstm(self.embed(getattr(batch, "text", batch)))
        return self.hidden_to_label(out[-1])


def random_phrases(T, n, gen):
    out = []
    for _ in range(n):
        s = int(torch.randint(0, T, (1,), generator=gen))
        e = int(torch.randint(s, T, (1,), generator=gen))
        out.append((s, e))
    return out


# ------------------------------------------------------------------ the cell


def reference_cell(rel_gates, total_gates, bias, out_gate, prev_rel_c, prev_total_c, in_phrase,
                   first):
    """The cell from the reference's separate relevant / irrelevant arithmetic, one row at a
    time (irrelevant pre-activations and cell = total - relevant, as the cell's contract)."""
    H = prev_rel_c.shape[1]
    rows = []
    for m in range(rel_gates.shape[0]):
        r = rel_gates[m].chunk(4)
        ir = (total_gates[0] - rel_gates[m]).chunk(4)
        b = bias.chunk(4)
        ri, ii, bi = rt.propagate_three(r[0], ir[0], b[0], torch.sigmoid)
        rg, ig, bg = rt.propagate_three(r[2], ir[2], b[2], torch.tanh)
        rel_c = ri * (rg + bg) + bi * rg + (bi * bg if in_phrase[m] else 0)
        irrel_c = ii * (rg + ig + bg) + (ri + bi) * ig + (0 if in_phrase[m] else bi * bg)
        if not first:
            rf, if_, bf = rt.propagate_three(r[1], ir[1], b[1], torch.sigmoid)
            prev_irrel = prev_total_c[0] - prev_rel_c[m]
            rel_c = rel_c + (rf + bf) * prev_rel_c[m]
            irrel_c = irrel_c + (rf + if_ + bf) * prev_irrel + if_ * prev_rel_c[m]
        rel_h, _ = rt.propagate_tanh_two(rel_c, irrel_c)
        rows.append((rel_c, out_gate[0] * rel_h))
    assert H == rows[0][0].shape[0]
    return torch.stack([a for a, _ in rows]), torch.stack([b for _, b in rows])


def cell_inputs(M=5, H=7, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    in_phrase = (torch.rand(M, generator=g) < 0.5).to(dtype)
    return (rnd(M, 4 * H), rnd(1, 4 * H), rnd(4 * H), torch.sigmoid(rnd(1, H)), rnd(M, H),
            rnd(1, H), in_phrase)


@pytest.mark.parametrize("first", [True, False])
def test_lstm_cd_cell_matches_reference_arithmetic(first):
    args = cell_inputs()
    rel_c, rel_h = _torch_ops.lstm_cd_cell(*args, first)
    exp_c, exp_h = reference_cell(*args, first)
    assert_scaled(rel_c, exp_c)
    assert_scaled(rel_h, exp_h)


def test_lstm_cd_cell_empty_batch_and_gradcheck():
    rg, tg, b, o, pc, ptc, ip = cell_inputs(M=0, H=3)
    c, h = _torch_ops.lstm_cd_cell(rg, tg, b, o, pc, ptc, ip, False)
    assert c.shape == (0, 3) and h.shape == (0, 3)
    args = [a.requires_grad_() if a.dtype == F64 and a is not ip else a
            for a in cell_inputs(M=2, H=2)]
    assert torch.autograd.gradcheck(lambda *a: _torch_ops.lstm_cd_cell(*a, False), tuple(args))


def test_compiled_cell_matches_torch_when_built():
    try:
        from fastacd import ops
        fn = ops.lstm_cd_cell
    except (ImportError, AttributeError):
        pytest.skip("fastacd.ops.lstm_cd_cell not available")
    if not getattr(ops, "HAS_COMPILED", True):
        pytest.skip("compiled extension not built")
    for first in (True, False):
        args = cell_inputs(M=6, H=5, seed=3)
        for a, e in zip(fn(*args, first), _torch_ops.lstm_cd_cell(*args, first)):
            assert_scaled(a, e)


# ------------------------------------------------------------------ batched == reference


@pytest.mark.parametrize("embed,hidden,T", [(4, 3, 6), (8, 16, 11), (16, 32, 17)])
def test_batched_matches_reference_random_phrases(embed, hidden, T):
    model = TextModel(vocab=50, embed=embed, hidden=hidden, seed=embed).double().eval()
    gen = torch.Generator().manual_seed(hidden)
    tokens = torch.randint(0, 50, (T,), generator=gen)
    phrases = random_phrases(T, 6, gen) + [(0, 0), (T - 1, T - 1)]
    dec = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    res = dec.cd(tokens, phrases=phrases)
    assert_matches_reference_phrases(res, model, tokens, phrases)


def test_token_masks_not_contiguous_match_reference():
    model = TextModel(hidden=10, seed=3).double().eval()
    gen = torch.Generator().manual_seed(0)
    T = 9
    tokens = torch.randint(0, 40, (T,), generator=gen)
    masks = (torch.rand(5, T, generator=gen) < 0.4).double()
    masks[0] = 0  # nothing relevant: relevant part exactly 0
    dec = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    res = dec.cd(tokens, masks=masks)
    assert torch.equal(res.relevant[0], torch.zeros(2, dtype=F64))
    for k in range(5):
        rel, irrel = rt.text_cd(model.embed, model.lstm, model.hidden_to_label, tokens, masks[k])
        scale = rel.abs().max() + irrel.abs().max()
        assert_scaled(res.relevant[k], rel, scale=scale)
        assert_scaled(res.irrelevant[k], irrel, scale=scale)


@pytest.mark.parametrize("layers,bidirectional,batch_first", [(2, False, False), (1, True, True),
                                                              (2, True, False)])
@pytest.mark.parametrize("readout", ["last", "final"])
def test_multilayer_bidirectional_match_reference_and_lstm(layers, bidirectional, batch_first,
                                                           readout):
    torch.manual_seed(layers * 10 + bidirectional)
    D = 2 if bidirectional else 1
    embed = nn.Embedding(30, 6).double()
    lstm = nn.LSTM(6, 7, num_layers=layers, bidirectional=bidirectional,
                   batch_first=batch_first).double().eval()
    head = nn.Linear(7 * D, 3).double()
    T = 8
    tokens = torch.randint(0, 30, (T,))
    phrases = [(0, 0), (2, 4), (7, 7), (0, 7), (3, 6)]
    dec = ft.TextDecomposer(embed, lstm, head, readout=readout)
    res = dec.cd(tokens, phrases=phrases)
    for k, (s, e) in enumerate(phrases):
        mask = torch.zeros(T)
        mask[s:e + 1] = 1
        rel, irrel = rt.text_cd(embed, lstm, head, tokens, mask, readout=readout)
        scale = rel.abs().max() + irrel.abs().max()
        assert_scaled(res.relevant[k], rel, scale=scale)
        assert_scaled(res.irrelevant[k], irrel, scale=scale)
    # relevant + irrelevant = the true head input through the head, without its bias
    with torch.no_grad():
        x = embed(tokens).unsqueeze(0 if batch_first else 1)
        out, (h_n, _) = lstm(x)
        if readout == "last":
            feat = out[0, -1] if batch_first else out[-1, 0]
        else:
            feat = torch.cat([h_n[-2, 0], h_n[-1, 0]]) if bidirectional else h_n[-1, 0]
        expected = head(feat) - head.bias
    assert_scaled(res.relevant + res.irrelevant, expected.expand(len(phrases), -1))


# ------------------------------------------------------------------ analytic truths


def test_relevant_plus_irrelevant_is_prediction_minus_bias():
    model = TextModel(hidden=16, seed=1).double().eval()
    tokens = torch.randint(0, 40, (12,))
    batch = ft.Batch(tokens)
    phrases = ft.all_phrases(12)
    rel, irrel = ft.cd_text_phrases(batch, model, phrases)
    with torch.no_grad():
        expected = (model(batch) - model.hidden_to_label.bias).numpy()
    assert_scaled(torch.from_numpy(rel + irrel), torch.from_numpy(expected).expand(len(phrases), -1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whole_sentence_irrelevant_is_zero(dtype):
    model = TextModel(hidden=16, seed=2).to(dtype).eval()
    tokens = torch.randint(0, 40, (10,))
    dec = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    res = dec.cd(tokens, phrases=[(0, 9)])
    scale = float(res.relevant.detach().abs().max())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(res.irrelevant.detach().abs().max()) <= tol * scale
    # ... and the relevant part is the whole prediction minus the bias
    with torch.no_grad():
        expected = model(ft.Batch(tokens)) - model.hidden_to_label.bias
    torch.testing.assert_close(res.relevant, expected, rtol=tol * 10, atol=tol * 10 * scale)


def test_all_phrases_in_one_call_match_reference_loop():
    model = TextModel(hidden=8, seed=4).double().eval()
    T = 7
    tokens = torch.randint(0, 40, (T,))
    phrases = ft.all_phrases(T)
    assert len(phrases) == T * (T + 1) // 2
    rel, irrel = ft.cd_text_phrases(ft.Batch(tokens), model, phrases)
    exp = np.array([rt.cd_text(ft.Batch(tokens), model, s, e) for s, e in phrases])
    assert_scaled(torch.from_numpy(rel), torch.from_numpy(exp))


def test_chunking_and_backend_do_not_change_results():
    model = TextModel(hidden=12, seed=5).double().eval()
    tokens = torch.randint(0, 40, (9,))
    phrases = ft.all_phrases(9)
    base = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label, backend="torch")
    tiny = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label, memory_budget=1)
    auto = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label, backend="auto")
    a = base.cd(tokens, phrases=phrases)
    assert tiny._chunk(9) == 1
    for other in (tiny.cd(tokens, phrases=phrases), auto.cd(tokens, phrases=phrases)):
        assert_scaled(other.relevant, a.relevant)
        assert_scaled(other.irrelevant, a.irrelevant, scale=a.relevant.detach().abs().max())


def test_gradients_flow_to_lstm_weights():
    model = TextModel(hidden=6, seed=6).double()
    model.eval()
    dec = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    res = dec.cd(torch.tensor([1, 2, 3, 4]), phrases=[(1, 2)])
    res.relevant[:, 1].sum().backward()
    assert model.lstm.weight_hh_l0.grad is not None
    assert float(model.lstm.weight_hh_l0.grad.abs().sum()) > 0
    assert float(model.embed.weight.grad.abs().sum()) > 0


# ------------------------------------------------------------------ the one-layer fast path


def _general_path(model):
    """The general engine path (one fused cell op per step), the fast path's oracle."""
    return ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label, backend="torch")


@pytest.mark.parametrize("T", [1, 2, 9, 16])
def test_fast_path_matches_general_path_and_reference(T):
    model = TextModel(hidden=10, seed=T).double().eval()
    gen = torch.Generator().manual_seed(T)
    tokens = torch.randint(0, 40, (T,), generator=gen)
    phrases = random_phrases(T, 12, gen)
    phrases += phrases[:3] + [(0, T - 1), (T - 1, T - 1), (0, 0)]   # duplicates, edges
    masks = (torch.rand(8, T, generator=gen) < 0.5).double()
    masks[0] = 0                                                    # nothing relevant
    masks[1] = masks[2]                                             # a duplicate
    fast = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    with torch.no_grad():
        sent = fast.prepare(tokens)
        assert sent.layers[0][0].fast is not None                   # the fast path is taken
        for kw in (dict(phrases=phrases), dict(masks=masks)):
            a, b = fast.cd(sent, **kw), _general_path(model).cd(tokens, **kw)
            scale = b.relevant.abs().max() + b.irrelevant.abs().max()
            assert_scaled(a.relevant, b.relevant, scale=scale)
            assert_scaled(a.irrelevant, b.irrelevant, scale=scale)
            if "masks" in kw:
                assert torch.equal(a.relevant[0], torch.zeros(2, dtype=F64))
        res = fast.cd(sent, phrases=phrases)
    assert_matches_reference_phrases(res, model, tokens, phrases)


def test_phrase_plan_is_the_mask_plan():
    # phrases are planned without building masks; the plan is the one of their masks
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        T = int(torch.randint(1, 14, (1,), generator=gen))
        pairs = random_phrases(T, int(torch.randint(1, 20, (1,), generator=gen)), gen)
        pairs += pairs[:2]
        by_phrase = ft_lstm._phrase_plan(pairs, T)
        by_mask = ft_lstm._row_plan(ft_lstm._pair_masks(pairs, T))
        assert by_phrase[0] == by_mask[0]                           # live rows per step
        for a, b in zip(by_phrase[1], by_mask[1]):                  # copied rows per step
            assert (a is None) == (b is None)
            if a is not None:
                assert a[0] == b[0] and np.array_equal(a[1], b[1])
        assert np.array_equal(by_phrase[2], by_mask[2])             # the rows' masks
        assert np.array_equal(by_phrase[3], by_mask[3])             # which row is whose


def test_rows_are_shared_until_masks_differ():
    # (2, 4) and (2, 6) share one row until step 5; (0, 0) and (3, 3) start from zero
    n_at, joins, bits, final, _, _ = ft_lstm._phrase_plan([(2, 4), (2, 6), (0, 0), (3, 3)], 8)
    assert n_at == [1, 1, 2, 3, 3, 4, 4, 4]
    assert joins[5] is not None and joins[5][0] == 3                # (2, 6) splits off at 5
    assert bits.shape == (8, 4)


def test_keep_states_resumes_phrases_and_matches_a_fresh_sentence():
    model = TextModel(hidden=10, seed=12).double().eval()
    T = 11
    tokens = torch.randint(0, 40, (T,), generator=torch.Generator().manual_seed(12))
    dec = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    with torch.no_grad():
        kept, fresh = dec.prepare(tokens, keep_states=True), dec.prepare(tokens)
        for phrases in ([(2, 2), (5, 5), (2, 4)], [(2, 5), (2, 7), (1, 5)],
                        [(2, 8), (1, 8), (5, 8), (2, 8)], [(2, T - 1), (0, T - 1)]):
            a, b = dec.cd(kept, phrases=phrases), dec.cd(fresh, phrases=phrases)
            assert_scaled(a.relevant, b.relevant)
            assert_scaled(a.irrelevant, b.irrelevant, scale=b.relevant.abs().max())
        assert fresh.memo is None and sorted(h for h, _, _ in kept.memo[2]) == [2, 4, 5, 7, 8]
        # (2, 9) resumes after (2, 8)'s last token: its first computed step is 9, not 2
        plan = ft_lstm._phrase_plan([(2, 9)], T, kept.memo)
        assert ft_lstm._first_live(plan[0]) == 9 and plan[4] and not plan[1][2]


def test_cached_weights_follow_in_place_updates():
    model = TextModel(hidden=8, seed=13).double().eval()
    batch = ft.Batch(torch.randint(0, 40, (7,), generator=torch.Generator().manual_seed(13)))
    with torch.no_grad():
        before = ft.cd_text(batch, model, 1, 3)
        model.lstm.weight_hh_l0.mul_(0.5)                           # in place: version bump
        model.hidden_to_label.weight.add_(1.0)
        after = ft.cd_text(batch, model, 1, 3)
    assert not np.allclose(before, after)
    expected = rt.cd_text(batch, model, 1, 3)
    np.testing.assert_allclose(after, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())
    # a kept TextDecomposer after new data without a version bump (param.data = ...): the
    # head's weights and bias made again, as a fresh decomposer has them
    model = model.float()  # float32 weights, float64 arithmetic: the head's are converted copies
    dec = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label, dtype=torch.float64)
    tokens = batch.text[:, 0]
    with torch.no_grad():
        dec.cd(tokens, phrases=[(1, 3)])
        model.hidden_to_label.bias.data = model.hidden_to_label.bias.data + 3.0
        got = dec.cd(tokens, phrases=[(1, 3)])
        want = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label, dtype=torch.float64).cd(
            tokens, phrases=[(1, 3)])
    torch.testing.assert_close(got.relevant, want.relevant, rtol=0, atol=0)
    torch.testing.assert_close(got.bias, want.bias, rtol=0, atol=0)


# ------------------------------------------------------------------ drop-in


def test_drop_in_cd_text_matches_reference_float32_model():
    model = TextModel(hidden=10, seed=7).eval()  # float32 weights: computed in float64
    batch = ft.Batch(torch.randint(0, 40, (8,)))
    for s, e in [(0, 0), (2, 5), (0, 7), (7, 7)]:
        rel, irrel = ft.cd_text(batch, model, s, e, return_irrel_scores=True)
        rrel, rirrel = rt.cd_text(batch, model, s, e, return_irrel_scores=True)
        assert isinstance(rel, np.ndarray) and rel.dtype == np.float64 and rel.shape == (2,)
        scale = np.abs(rrel).max() + np.abs(rirrel).max()
        assert_scaled(torch.from_numpy(rel), torch.from_numpy(rrel), scale=scale)
        assert_scaled(torch.from_numpy(irrel), torch.from_numpy(rirrel), scale=scale)
    only = ft.cd_text(batch, model, 2, 5)
    assert isinstance(only, np.ndarray) and only.shape == (2,)


def test_batch_helper_and_torchtext_like_inputs():
    b = ft.Batch([3, 4, 5])
    assert b.text.shape == (3, 1) and b.text.dtype == torch.long
    model = TextModel(seed=8).double().eval()
    a = ft.cd_text(b, model, 0, 1)

    class TorchtextBatch:  # any object with .text works
        text = torch.tensor([[3], [4], [5]])

    assert np.array_equal(ft.cd_text(TorchtextBatch(), model, 0, 1), a)


def test_bad_input_clear_errors():
    model = TextModel(vocab=20, seed=9).double().eval()
    batch = ft.Batch([1, 2, 3, 4])
    with pytest.raises(ValueError, match="empty"):
        ft.cd_text(ft.Batch(torch.zeros(0, 1, dtype=torch.long)), model, 0, 0)
    with pytest.raises(ValueError, match="outside the embedding's vocabulary"):
        ft.cd_text(ft.Batch([1, 25, 3]), model, 0, 1)
    with pytest.raises(ValueError, match="outside the embedding's vocabulary"):
        ft.cd_text(ft.Batch([1, -1, 3]), model, 0, 1)
    with pytest.raises(ValueError, match="one sentence"):
        ft.cd_text(ft.Batch(torch.ones(4, 2, dtype=torch.long)), model, 0, 1)
    with pytest.raises(TypeError, match="integers"):
        ft.cd_text(ft.Batch(torch.ones(4, 1)), model, 0, 1)
    with pytest.raises(TypeError, match="start must be an int"):
        ft.cd_text(batch, model, 0.5, 1)
    with pytest.raises(AttributeError, match="hidden_to_label"):
        ft.cd_text(batch, nn.Module(), 0, 1)
    # the same checks guard the reference
    with pytest.raises(TypeError, match="start must be an int"):
        rt.cd_text(batch, model, 0.5, 1)
    dec = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    # the engine's phrases are checked strictly (cd_text reads them as the original)
    with pytest.raises(ValueError, match="beyond the sentence"):
        dec.cd(batch, phrases=[(0, 4)])
    with pytest.raises(ValueError, match="start=3 > stop=1"):
        dec.cd(batch, phrases=[(3, 1)])
    with pytest.raises(ValueError, match="negative"):
        dec.cd(batch, phrases=[(-1, 2)])
    with pytest.raises(ValueError, match="exactly one of"):
        dec.cd(batch, phrases=[(0, 1)], masks=torch.ones(4))
    with pytest.raises(ValueError, match=r"\(M, T\)"):
        dec.cd(batch, masks=torch.ones(2, 5))
    with pytest.raises(ValueError, match="0/1"):
        dec.cd(batch, masks=torch.full((4,), 0.5))
    with pytest.raises(TypeError, match="nn.LSTM or nn.GRU"):
        ft.TextDecomposer(model.embed, nn.RNN(8, 12), model.hidden_to_label)
    with pytest.raises(TypeError, match="nn.Linear"):
        ft.TextDecomposer(model.embed, model.lstm, nn.ReLU())
    with pytest.raises(ValueError, match="readout"):
        ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label, readout="mean")
    with pytest.raises(ValueError, match="proj_size"):
        ft.TextDecomposer(model.embed, nn.LSTM(8, 12, proj_size=4), None)


# ------------------------------------------------------------------ models without the names


class BatchFirstClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(25, 6)
        self.rnn = nn.LSTM(6, 9, batch_first=True, num_layers=2)
        self.out = nn.Linear(9, 4)

    def forward(self, ids):  # ids: (N, T)
        out, _ = self.rnn(self.emb(ids))
        return torch.log_softmax(self.out(out[:, -1]), dim=1)


class HiddenStateClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(25, 6)
        self.rnn = nn.LSTM(6, 9)
        self.fc = nn.Linear(9, 2)

    def forward(self, ids):  # ids: (T, N)
        _, (h_n, _) = self.rnn(self.emb(ids))
        return self.fc(h_n[-1])


@pytest.mark.parametrize("cls,batch_first", [(BatchFirstClassifier, True),
                                             (HiddenStateClassifier, False)])
def test_from_model_traces_other_attribute_names(cls, batch_first):
    torch.manual_seed(0)
    model = cls().double().eval()
    dec = ft.TextDecomposer.from_model(model)
    tokens = torch.tensor([3, 1, 4, 1, 5, 9])
    res = dec.cd(tokens, phrases=[(0, 5), (1, 3)])
    with torch.no_grad():
        logits = model(tokens.unsqueeze(0) if batch_first else tokens.unsqueeze(1))
        if batch_first:  # the model ends in log_softmax: CD explains the logits before it
            out, _ = model.rnn(model.emb(tokens.unsqueeze(0)))
            logits = model.out(out[:, -1])
    head = dec.head
    assert_scaled(res.relevant + res.irrelevant, (logits - head.bias).expand(2, -1))
    assert_scaled(dec.forward(tokens), logits[0])


def test_from_model_discovery_is_cached_and_follows_changes():
    model = BatchFirstClassifier()
    a = ft.TextDecomposer.from_model(model)
    b = ft.TextDecomposer.from_model(model)
    assert a.lstm is b.lstm and a.head is b.head
    # a replaced submodule is found again
    name = next(n for n, m in model.named_children() if isinstance(m, nn.LSTM))
    setattr(model, name, nn.LSTM(a.lstm.input_size, a.lstm.hidden_size, batch_first=True))
    c = ft.TextDecomposer.from_model(model)
    assert c.lstm is getattr(model, name) and c.lstm is not a.lstm


def test_from_model_unsupported_structure_is_explained():
    class NoEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.LSTM(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.out(out[-1])

    with pytest.raises(ValueError, match="embedding -> nn.LSTM / nn.GRU -> linear") as err:
        ft.TextDecomposer.from_model(NoEmbedding().eval())
    assert "general engine" in str(err.value) and "0 embeddings of the input ids" in str(err.value)


def test_from_model_reads_other_structures_through_the_general_engine():
    """embedding -> LSTM -> linear -> linear: not the recurrent engine's form; the general
    engine (the recurrent rule) gives the text engine's numbers for the part they share."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.emb, self.rnn = nn.Embedding(5, 3), nn.LSTM(3, 4)
            self.a, self.b = nn.Linear(4, 2), nn.Linear(2, 2)

        def forward(self, ids):
            out, _ = self.rnn(self.emb(ids))
            return self.b(self.a(out[-1]))

    model = TwoHeads().double().eval()
    dec = ft.TextDecomposer.from_model(model)
    assert isinstance(dec, ft.ModelTextDecomposer) and dec.head is model.b
    tokens = torch.tensor([1, 2, 3, 4])
    res = dec.cd(tokens, phrases=ft.all_phrases(4))
    with torch.no_grad():
        logits = model(tokens[:, None])[0]
    assert_scaled(res.relevant + res.irrelevant, (logits - model.b.bias).expand(10, -1))
    # the features a(out[-1]) through the general engine vs the LSTM text engine plus the
    # affine rule for a (its bias split by magnitude)
    inner = ft.TextDecomposer(model.emb, model.rnn, None).cd(tokens, phrases=ft.all_phrases(4))
    zr, zi = inner.relevant @ model.a.weight.T, inner.irrelevant @ model.a.weight.T
    pr, pi = zr.abs() + 1e-20, zi.abs() + 1e-20
    feat_rel = zr + pr / (pr + pi) * model.a.bias
    assert_scaled(res.relevant, feat_rel @ model.b.weight.T)


# ------------------------------------------------------------------ hierarchy output


def test_text_hierarchy_json_and_plot():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from fastacd import agg_1d

    model = TextModel(seed=10).double().eval()
    batch = ft.Batch(torch.randint(1, 40, (6,)))
    lists = agg_1d.agglomerate(model, batch, 50, "cd", 1, 1)
    words = [f"w{i}" for i in range(6)]
    h = json.loads(ft.text_hierarchy_json(lists, words))
    assert h["words"] == words
    assert [p["score"] for p in h["levels"][0]] == pytest.approx(list(lists["scores_list"][0]))
    for level, comps in enumerate(lists["comps_list"][1:], start=1):
        got = {tuple(p["positions"]) for p in h["levels"][level]}
        expected = {tuple(np.flatnonzero(comps == k)) for k in range(1, comps.max() + 1)}
        assert got == expected
        for p in h["levels"][level]:
            assert p["score"] == pytest.approx(float(lists["comp_scores_list"][level][
                int(comps[p["start"]])]))
    fig = ft.plot_text_hierarchy(lists, words)
    assert isinstance(fig, Figure)
    fig2 = ft.plot_text_hierarchy(agg_1d.collapse_tree(lists), words)
    assert isinstance(fig2, Figure)
    with pytest.raises(ValueError, match="words"):
        ft.text_hierarchy(lists, words[:3])


# ------------------------------------------------------------------ the trained toy model


@pytest.fixture(scope="module")
def toy():
    return toy_model()


def test_toy_model_learns_negation_and_contrast(toy):
    model, vocab = toy
    assert isinstance(model, SentimentLSTM)
    assert accuracy(model, n=300) >= 0.95
    with torch.no_grad():
        for sentence, label in [("the movie was good", POS), ("the movie was not good", NEG),
                                ("the plot was good but the acting is boring", NEG),
                                ("the film is not bad", POS)]:
            assert int(model(vocab.batch(sentence)).argmax(1)) == label, sentence


def test_toy_cd_not_good_is_negative_where_good_alone_is_positive(toy):
    model, vocab = toy
    batch = vocab.batch("the movie was not good")
    score = lambda s, e: (lambda r: r[POS] - r[NEG])(ft.cd_text(batch, model, s, e))  # noqa: E731
    assert score(4, 4) > 0      # "good" alone pushes towards positive
    assert score(3, 4) < 0      # "not good" as a unit is negative
    assert score(3, 4) < score(3, 3)  # more negative than "not" alone: an interaction


def test_forward_hooks_and_replaced_forwards_are_refused():
    """The recurrent engine computes the LSTM and the head from their weights: a hook on either,
    or a forward replaced on the instance, would be missed, so CD refuses and names it. The
    embedding is called, so a hook on it is part of what CD decomposes."""
    model = TextModel(hidden=8, seed=0).eval()
    dec = ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label)
    tokens = torch.randint(0, 40, (6,))
    for part in (model.lstm, model.hidden_to_label):
        handle = part.register_forward_hook(lambda mod, i, o: o)
        with pytest.raises(fastacd.UnsupportedOpError, match="forward hook <lambda> on '(LSTM|Linear)'"):
            dec.cd(tokens, phrases=[(0, 2)])
        handle.remove()
        part.forward = part.forward
        with pytest.raises(fastacd.UnsupportedOpError, match="forward was replaced on the instance"):
            dec.cd(tokens, phrases=[(0, 2)])
        del part.forward
    handle = model.embed.register_forward_hook(lambda mod, i, o: 2 * o)
    res = dec.cd(tokens, phrases=[(0, 2)])
    with torch.no_grad():
        expected = model(ft.Batch(tokens)) - model.hidden_to_label.bias
    handle.remove()
    torch.testing.assert_close(res.relevant + res.irrelevant, expected.to(res.relevant.dtype), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, model(ft.Batch(tokens)) - model.hidden_to_label.bias)

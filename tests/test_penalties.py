"""RRR and expected-gradients penalties against straightforward definitions (the CDEP
repository's ``gradient_sum`` and ``eg_scores_2d``, written out one mask / one image at a
time), in float64: values and every parameter's gradient."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from fastacd import cdep
from fastacd.text.sentiment_toy import SentimentLSTM
from fastacd.train.datasets import DecoyText, DemoCNN
from fastacd.train.models import DigitsCNN

TOL = dict(atol=1e-10, rtol=1e-10)


class SmallNet(nn.Module):
    """conv-relu-maxpool-conv-relu-linear on (C, 8, 8), float64."""

    def __init__(self, c=2):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc(F.relu(self.conv2(x)).flatten(1))


def _setup(c=2, n=4, seed=0):
    torch.manual_seed(seed)
    model = SmallNet(c).double()
    x = torch.randn(n, c, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (n,))
    return model, x, y


def _value_and_grads(model, fn):
    model.zero_grad()
    p = fn()
    p.backward()
    return p.detach(), [q.grad.clone() for q in model.parameters()]


def _assert_same(a, b):
    (pa, ga), (pb, gb) = a, b
    assert torch.allclose(pa, pb, **TOL), (pa, pb)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, **TOL), (u - v).abs().max()
    assert sum(float(g.abs().sum()) for g in ga) > 0


# ---------------------------------------------------------------------------- RRR
def ref_gradient_sum(im, target, seg, model, crit):
    """The CDEP repository's ``gradient_sum`` (score_funcs.py), with a per-example mask."""
    im = im.clone().requires_grad_(True)
    grad = torch.autograd.grad(crit(model(im), target), im, create_graph=True)[0]
    return torch.abs(grad.sum(dim=1).masked_select(seg.bool()) ** 2).sum()


def ref_ross(im, seg, model):
    """Ross et al.'s RRR term: (A * d/dx sum_k log p_k)^2 summed, A the mask per element."""
    im = im.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.log_softmax(model(im), 1).sum(), im, create_graph=True)[0]
    return ((seg * grad) ** 2).sum()


def _nll(out, y):
    return F.nll_loss(F.log_softmax(out, 1), y)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rrr_equals_gradient_sum(k, reduction):
    model, x, y = _setup()
    masks = cdep.pixel_masks(4, k, (8, 8), generator=torch.Generator().manual_seed(1)).double()
    masks[:, :, :, :3, :3] = 1  # a block as well as single pixels
    pen = fastacd.RRRPenalty(model, reduction=reduction)

    def ref():
        terms = torch.stack([ref_gradient_sum(x, y, masks[j, :, 0], model, _nll) for j in range(k)])
        return terms.mean() if reduction == "mean" else terms.sum()
    _assert_same(_value_and_grads(model, lambda: pen(x, masks, y)), _value_and_grads(model, ref))


def test_rrr_ross_form_per_channel_masks():
    model, x, y = _setup(c=3)
    masks = (torch.rand(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.3).double()
    pen = fastacd.RRRPenalty(model, target="all", channels="each", reduction="sum")

    def ref():
        return sum(ref_ross(x, masks[j], model) for j in range(2))
    _assert_same(_value_and_grads(model, lambda: pen(x, masks)), _value_and_grads(model, ref))


def test_rrr_forward_with_penalty_logits_and_no_grad():
    model, x, y = _setup()
    masks = cdep.box_masks([[0, 0, 3, 3]] * 4, (8, 8))
    pen = fastacd.RRRPenalty(model)
    logits, p = pen.forward_with_penalty(x, masks, y)
    assert torch.allclose(logits, model(x), atol=1e-12) and torch.allclose(p, pen(x, masks, y), atol=1e-15)
    with torch.no_grad():
        q = pen(x, masks, y)
    assert not q.requires_grad and torch.allclose(q, p, atol=1e-15)
    g, _ = pen.gradients(x, y)
    assert g.shape == x.shape


# ---------------------------------------------------------------------------- expected gradients
def ref_eg_scores_2d(model, imgs, img_idx, targets, idxs_random, alpha):
    """The CDEP repository's ``eg_scores_2d`` with its random draws given."""
    input_vecs = imgs[idxs_random] * (1 - alpha[:, None, None, None]) + alpha[:, None, None, None] * imgs[img_idx]
    input_vecs.requires_grad = True
    out = F.softmax(model(input_vecs), dim=1)[:, targets[img_idx]]
    loss = nn.L1Loss(reduction="sum")(out, torch.zeros(len(idxs_random), dtype=out.dtype))
    grad_params = torch.abs(torch.autograd.grad(loss, input_vecs, create_graph=True)[0])
    imps = torch.abs(grad_params * (imgs[img_idx] - imgs[idxs_random]))
    return imps.sum(dim=0).sum(dim=0)


@pytest.mark.parametrize("k", [1, 2])
def test_expected_gradients_equals_eg_scores_2d(k):
    model, x, y = _setup()
    masks = cdep.pixel_masks(4, k, (8, 8), generator=torch.Generator().manual_seed(3)).double()
    masks[:, :, :, 4:, 4:] = 1
    pen = fastacd.ExpectedGradientsPenalty(model, samples=3, generator=torch.Generator().manual_seed(4))
    refs, alphas = pen.draw(4)
    assert refs.shape == alphas.shape == (3, 4)

    def ref():  # the training scripts: sum over the images of the batch, per mask; here mean over masks
        per_mask = [sum((ref_eg_scores_2d(model, x, j, y, refs[:, j], alphas[:, j]) * masks[q, j, 0]).sum()
                        for j in range(4)) for q in range(k)]
        return torch.stack(per_mask).mean()
    _assert_same(_value_and_grads(model, lambda: pen(x, masks, y, refs, alphas)), _value_and_grads(model, ref))
    logits, p = pen.forward_with_penalty(x, masks, y, refs, alphas)  # x's rows beside the points
    assert torch.allclose(logits, model(x), atol=1e-12)
    assert torch.allclose(p, pen(x, masks, y, refs, alphas), **TOL)


def test_expected_gradients_draws_from_generator():
    model, x, y = _setup()
    masks = cdep.box_masks([[0, 0, 3, 3]] * 4, (8, 8))
    a = fastacd.ExpectedGradientsPenalty(model, samples=2, generator=torch.Generator().manual_seed(5))
    b = fastacd.ExpectedGradientsPenalty(model, samples=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a(x, masks, y), b(x, masks, y))


# ---------------------------------------------------------------------------- text: word vectors
def _text_setup(n=5, seed=0):
    data = DecoyText("train", n, seed)
    torch.manual_seed(seed)
    model = SentimentLSTM(vocab_size=len(data.vocab), embed_dim=4, hidden_dim=3).double()
    return model, data.tokens, data.masks.double(), data.y


def _on_vectors(model, v):
    out, _ = model.lstm(v)
    return model.hidden_to_label(out[-1])


def test_text_rrr_on_word_vectors():
    model, tokens, masks, y = _text_setup()
    pen = fastacd.RRRPenalty(model, embed=model.embed)  # channels: "each" for vectors

    def ref():
        v = model.embed(tokens)  # (T, N, E): the vectors depend on the embedding's weights
        grad = torch.autograd.grad(_nll(_on_vectors(model, v), y), v, create_graph=True)[0]
        return ((masks.T[:, :, None] * grad) ** 2).sum()
    _assert_same(_value_and_grads(model, lambda: pen(tokens, masks, y)), _value_and_grads(model, ref))
    logits, _ = pen.forward_with_penalty(tokens, masks, y)
    assert torch.allclose(logits, model(tokens), atol=1e-12)


def test_text_expected_gradients_on_word_vectors():
    model, tokens, masks, y = _text_setup()
    pen = fastacd.ExpectedGradientsPenalty(model, samples=2, embed=model.embed,
                                           generator=torch.Generator().manual_seed(6))
    refs, alphas = pen.draw(5)

    def ref():
        v = model.embed(tokens)
        total = 0
        for j in range(5):
            a = alphas[:, j][None, :, None]
            pts = v[:, refs[:, j]] * (1 - a) + a * v[:, [j]]
            out = F.softmax(_on_vectors(model, pts), 1)[:, y[j]]
            grad = torch.autograd.grad(out.abs().sum(), pts, create_graph=True)[0]
            imps = (grad * (v[:, [j]] - v[:, refs[:, j]])).abs().sum(1)  # (T, E)
            total = total + (imps * masks[j][:, None]).sum()
        return total
    _assert_same(_value_and_grads(model, lambda: pen(tokens, masks, y, refs, alphas)),
                 _value_and_grads(model, ref))
    bf = copy.deepcopy(model)
    bf.lstm.batch_first = True
    bf.forward = lambda t: bf.hidden_to_label(bf.lstm(bf.embed(t))[0][:, -1])
    pen_bf = fastacd.ExpectedGradientsPenalty(bf, samples=2, embed=bf.embed, batch_first=True)
    assert torch.allclose(pen_bf(tokens.T, masks, y, refs, alphas), pen(tokens, masks, y, refs, alphas), **TOL)


# ---------------------------------------------------------------------------- API
def test_penalty_errors_and_modes():
    model, x, y = _setup()
    masks = cdep.box_masks([[0, 0, 3, 3]] * 4, (8, 8))
    with pytest.raises(ValueError, match="labels"):
        fastacd.RRRPenalty(model)(x, masks)
    with pytest.raises(ValueError, match="target"):
        fastacd.RRRPenalty(model, target="nope")
    with pytest.raises(ValueError, match="do not fit"):
        fastacd.RRRPenalty(model)(x, torch.ones(3, 1, 7, 7), y)
    with pytest.raises(ValueError, match="samples"):
        fastacd.ExpectedGradientsPenalty(model, samples=0)
    with pytest.raises(ValueError, match="labels"):
        fastacd.ExpectedGradientsPenalty(model)(x, masks, None)
    with pytest.raises(ValueError, match="embed must be a module"):
        fastacd.RRRPenalty(model, embed=nn.Embedding(3, 2))
    tm, tokens, tmask, ty = _text_setup()
    with pytest.raises(ValueError, match="token masks"):
        fastacd.RRRPenalty(tm, embed=tm.embed)(tokens, tmask.T, ty)
    # train-mode dropout / batchnorm: the penalty in eval behaviour, the logits refused
    dm = DigitsCNN().train()
    xd, yd = torch.randn(2, 1, 28, 28), torch.tensor([0, 1])
    for pen in (fastacd.RRRPenalty(dm), fastacd.ExpectedGradientsPenalty(dm, samples=1)):
        p = pen(xd, torch.ones(28, 28), yd)
        assert p.requires_grad and dm.training and dm.features[4].training
        with pytest.raises(ValueError, match="forward_with_penalty"):
            pen.forward_with_penalty(xd, torch.ones(28, 28), yd)
    assert torch.isfinite(fastacd.RRRPenalty(DemoCNN())(xd, torch.ones(28, 28), yd))

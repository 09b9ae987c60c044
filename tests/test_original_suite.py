"""The original repository's own tests (csinva/hierarchical-dnn-interpretations,
``tests/test_cd.py``: ``test_sst``, ``test_mnist``, ``test_imagenet``), run against
``import fastacd as acd`` with the same calls and assertions.

Its data files (the SST model and vocabulary, the MNIST weights, ImageNet weights) are not
here: the models are rebuilt with the original's architecture and random weights, except
the MNIST weights when ``../shared/data`` holds them. The ImageNet case runs at 64x64 (the
original: 224x224) to keep the suite small; its arithmetic does not depend on the size.
Where the original package is installed, its numbers are compared too.
"""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd as acd
from fastacd.reference import text as reference_text
from conftest import ACD_MNIST_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_ORIGINAL = importlib.util.find_spec("acd") is not None

# a real sentence of the SST data set, as in the original test
SENTENCE = ["a", "great", "ensemble", "cast", "ca", "n't", "lift", "this", "heartfelt",
            "enterprise", "out", "of", "the", "familiar", "."]


class SSTSentiment(nn.Module):
    """The original's SST model (``dsets/sst/model.py``: embedding -> LSTM -> linear on the
    last output, ``.hidden_dim``, a zero initial state passed to the LSTM), small vocabulary."""

    def __init__(self, vocab=40, d_embed=300, d_hidden=128):
        super().__init__()
        self.hidden_dim = d_hidden
        self.embed = nn.Embedding(vocab, d_embed)
        self.lstm = nn.LSTM(input_size=d_embed, hidden_size=d_hidden)
        self.hidden_to_label = nn.Linear(d_hidden, 2)

    def forward(self, batch):
        n = batch.text.shape[1]
        state = (torch.zeros(1, n, self.hidden_dim), torch.zeros(1, n, self.hidden_dim))
        out, _ = self.lstm(self.embed(batch.text), state)
        return self.hidden_to_label(out[-1])


def _sst_batch():
    stoi = {w: i + 1 for i, w in enumerate(dict.fromkeys(SENTENCE))}

    class B:  # the original's batch: an object with .text (seq_len, 1) ids
        text = None

    batch = B()
    batch.text = torch.LongTensor(np.array([stoi[w] for w in SENTENCE])[:, None])
    return batch


def test_sst():
    torch.manual_seed(0)
    model = SSTSentiment().eval()
    batch = _sst_batch()
    with torch.no_grad():
        preds = model(batch).numpy()[0]
    preds = preds - model.hidden_to_label.bias.detach().numpy()
    # the whole sentence, with the original's stop = len(sentence) ("to the end")
    cd_score, irrel_scores = acd.cd_text(batch, model, start=0, stop=len(SENTENCE),
                                         return_irrel_scores=True)
    assert np.allclose(cd_score, preds, atol=1e-2)
    assert np.allclose(irrel_scores, irrel_scores * 0, atol=1e-2)
    # rel + irrel = prediction for another subset
    cd_score, irrel_scores = acd.cd_text(batch, model, start=3, stop=len(SENTENCE),
                                         return_irrel_scores=True)
    assert np.allclose(cd_score + irrel_scores, preds, atol=1e-2)
    # fastacd's own tolerance: float64 arithmetic on a float32 model
    np.testing.assert_allclose(cd_score + irrel_scores, preds, rtol=1e-5, atol=1e-6)
    if HAS_ORIGINAL:
        import acd as original
        for start in (0, 3, 7):
            theirs = original.cd_text(batch, model, start=start, stop=len(SENTENCE),
                                      return_irrel_scores=True)
            ours = acd.cd_text(batch, model, start=start, stop=len(SENTENCE), return_irrel_scores=True)
            for a, b in zip(ours, theirs):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sst_bounds_read_as_the_original():
    """Every (start, stop) the original accepts gives its numbers: a stop past the end reads to
    the end, a negative start from 0, an empty phrase relevant 0 (the last two warn)."""
    torch.manual_seed(1)
    model = SSTSentiment(vocab=20, d_embed=8, d_hidden=6).double().eval()
    batch = _sst_batch()
    T = len(SENTENCE)
    ref = reference_text.cd_text
    np.testing.assert_allclose(acd.cd_text(batch, model, 2, T + 5), acd.cd_text(batch, model, 2, T - 1),
                               rtol=1e-12, atol=1e-14)
    with pytest.warns(UserWarning, match="negative"):
        neg = acd.cd_text(batch, model, -2, 4)
    np.testing.assert_allclose(neg, acd.cd_text(batch, model, 0, 4), rtol=1e-12, atol=1e-14)
    for start, stop in ((5, 2), (T, T + 3)):
        with pytest.warns(UserWarning, match="holds no token"):
            rel, irrel = acd.cd_text(batch, model, start, stop, return_irrel_scores=True)
        assert np.all(rel == 0)
        with pytest.warns(UserWarning):
            np.testing.assert_allclose(irrel, ref(batch, model, start, stop, True)[1], rtol=1e-10)
    if HAS_ORIGINAL:
        import acd as original
        for start, stop in ((2, T + 5), (-2, 4), (5, 2), (0, T)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = acd.cd_text(batch, model, start, stop, return_irrel_scores=True)
            theirs = original.cd_text(batch, model, start, stop, return_irrel_scores=True)
            for a, b in zip(ours, theirs):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


class MnistNet(nn.Module):
    """The original's ``dsets/mnist/model.py`` Net, with its ``logits``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def logits(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return self.fc2(x)

    def forward(self, x):
        return F.log_softmax(self.logits(x), dim=1)


def test_mnist(device="cpu"):  # the original ran it on "cuda"
    torch.manual_seed(0)
    im_torch = torch.randn(1, 1, 28, 28).to(device)
    model = MnistNet().to(device)
    if ACD_MNIST_WEIGHTS.exists():
        model.load_state_dict(torch.load(ACD_MNIST_WEIGHTS, map_location=device, weights_only=True))
    model = model.eval()
    # full image mask = prediction
    with torch.no_grad():
        preds = model.logits(im_torch).cpu().detach().numpy()
        cd_score, irrel_scores = acd.cd(im_torch, model, mask=np.ones((1, 1, 28, 28)),
                                        model_type="mnist", device=device)
    cd_score = cd_score.cpu().detach().numpy()
    irrel_scores = irrel_scores.cpu().detach().numpy()
    assert np.allclose(cd_score, preds, atol=1e-2)
    assert np.allclose(irrel_scores, irrel_scores * 0, atol=1e-2)
    # rel + irrel = prediction for another subset
    mask = np.zeros((28, 28))
    mask[:14] = 1
    with torch.no_grad():
        cd_score, irrel_scores = acd.cd(im_torch, model, mask=mask, model_type="mnist", device=device)
    cd_score = cd_score.cpu().detach().numpy()
    irrel_scores = irrel_scores.cpu().detach().numpy()
    assert np.allclose(cd_score + irrel_scores, preds, atol=1e-2)


@pytest.mark.parametrize("arch", ["vgg", "alexnet", "resnet18"])
def test_imagenet(arch, device="cpu", size=64):
    from torchvision import models
    torch.manual_seed(0)
    make = {"vgg": models.vgg16, "alexnet": models.alexnet, "resnet18": models.resnet18}[arch]
    model = make(weights=None).to(device).eval()                  # pretrained=True: no download here
    im_torch = torch.randn(1, 3, size, size).to(device)
    with torch.no_grad():
        preds = model(im_torch).cpu().detach().numpy()
        # rel + irrel = prediction (the original's "subset" is all ones: mask[:, :, :14] = 1 on ones)
        mask = np.ones((1, 3, size, size))
        mask[:, :, :14] = 1
        cd_score, irrel_scores = acd.cd(im_torch, model, mask=mask, device=device, model_type=arch)
        assert np.allclose(cd_score.numpy() + irrel_scores.numpy(), preds, atol=1e-2)
        # full image mask = prediction
        cd_score, irrel_scores = acd.cd(im_torch, model, mask=np.ones((1, 3, size, size)), device=device,
                                        model_type=arch)
        assert np.allclose(cd_score.numpy(), preds, atol=1e-2)
        assert np.allclose(irrel_scores.numpy(), irrel_scores.numpy() * 0, atol=1e-2)
        # and a real subset (the top rows)
        mask = np.zeros((1, 3, size, size))
        mask[:, :, :14] = 1
        cd_score, irrel_scores = acd.cd(im_torch, model, mask=mask, device=device, model_type=arch)
        assert np.allclose(cd_score.numpy() + irrel_scores.numpy(), preds, atol=1e-2)

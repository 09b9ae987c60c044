"""Drop-in score_funcs: the batched versions equal one-image-per-call loops of the original's
semantics (crashes fixed), and the original package where it still runs."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd.reference as reference
from fastacd import score_funcs
from fastacd.train.models import MnistNet


def mnist_model():
    torch.manual_seed(0)
    return MnistNet().double().eval()


def image(seed=1):
    return torch.randn(1, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def conv2dnp_ones_same(scores: np.ndarray, s: int) -> np.ndarray:
    """The original's conv2dnp(x, ones(s, s, 1, 1), 'SAME', (s, s)) as explicit loops."""
    h, w = scores.shape
    oh, ow = int(np.ceil(h / s)), int(np.ceil(w / s))
    ph, pw = (oh - 1) * s + s - h, (ow - 1) * s + s - w
    padded = np.pad(scores, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[i, j] = padded[i * s:i * s + s, j * s:j * s + s].sum()
    return out


def ig_scores_2d_loop(model, im, num_classes, sweep_dim, ind):
    """The original ig_scores_2d, one class per model call, path points actually written."""
    h, w = im.shape[2:]
    output = np.zeros((int(np.ceil(h / sweep_dim)) * int(np.ceil(w / sweep_dim)), num_classes))
    for c in (range(num_classes) if ind is None else ind):
        m = 100
        mult_grid = np.array(range(m)) / (m - 1)
        vecs = torch.empty((m,) + tuple(im.shape[1:]), dtype=im.dtype)
        for i, prop in enumerate(mult_grid):
            vecs[i] = prop * im[0]
        vecs.requires_grad = True
        out = F.softmax(model(vecs), dim=1)[:, c]
        loss = nn.L1Loss(reduction="sum")(out, torch.zeros(m, dtype=im.dtype))
        (grad,) = torch.autograd.grad(loss, vecs)  # the input gradient of loss.backward()
        imps = grad.mean(0) * im[0]
        output[:, c] = conv2dnp_ones_same(imps.sum(0).detach().numpy(), sweep_dim).flatten()
    return output


@pytest.mark.parametrize("sweep_dim,ind", [(1, [0, 9]), (2, [3, 7]), (3, [5])])
def test_ig_scores_2d_equals_per_class_loop(sweep_dim, ind):
    model, im = mnist_model(), image()
    ours = score_funcs.ig_scores_2d(model, im, num_classes=10, im_size=28, sweep_dim=sweep_dim, ind=ind,
                                    batch_size=40 if sweep_dim == 2 else None)
    want = ig_scores_2d_loop(model, im, 10, sweep_dim, ind)
    assert ours.shape == want.shape
    np.testing.assert_allclose(ours, want, rtol=1e-9, atol=1e-12)


def test_ig_scores_2d_completeness_of_probability():
    model, im = mnist_model(), image(2)
    scores = score_funcs.ig_scores_2d(model, im, sweep_dim=4)              # all classes at once
    np.testing.assert_allclose(scores[:, [2, 6]], score_funcs.ig_scores_2d(model, im, sweep_dim=4, ind=[2, 6])[:, [2, 6]],
                               rtol=1e-10, atol=1e-14)
    with torch.no_grad():
        p = F.softmax(model(im), 1)[0] - F.softmax(model(torch.zeros_like(im)), 1)[0]
    # the linspace mean is a first-order rule: close, not exact
    np.testing.assert_allclose(scores.sum(0), p.numpy(), atol=0.05 * float(p.abs().max()))


def test_gradient_times_input_equals_nll_loss_loop():
    model = mnist_model()
    ims = torch.cat([image(s) for s in range(3)])
    for n, c in enumerate([2, 5, 9]):
        x = ims[n:n + 1].clone().requires_grad_(True)
        nn.NLLLoss()(model(x), torch.tensor([c])).backward()
        want = (x.grad * x).detach().numpy()[0, 0]
        np.testing.assert_allclose(score_funcs.gradient_times_input_scores(ims[n:n + 1], c, model), want,
                                   rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(score_funcs.gradient_times_input_scores(ims, [2, 5, 9], model)[n], want,
                                   rtol=1e-10, atol=1e-14)


def test_get_scores_2d_cd_equals_reference_per_mask():
    model, im = mnist_model(), image(3)
    masks = np.zeros((5, 28, 28))
    for i in range(5):
        masks[i, i * 5:i * 5 + 7, 3:20] = 1
    ours = score_funcs.get_scores_2d(model, "cd", masks, im_torch=im)
    want = np.squeeze(np.array([reference.cd(model, im, torch.from_numpy(m)[None])[0].detach().numpy()
                                for m in masks]))
    np.testing.assert_allclose(ours, want, rtol=1e-9, atol=1e-11)
    one = score_funcs.get_scores_2d(model, "cd", masks[:1], im_torch=im)
    assert one.shape == (1, 10)


def pred_ims(model, ims):
    """The original examples' pred_ims: a batch of (H, W) images -> (N, classes) numpy."""
    ims = np.asarray(ims)
    if ims.ndim == 2:
        ims = ims[None]
    with torch.no_grad():
        return model(torch.from_numpy(ims)[:, None].double()).numpy()


def test_get_scores_2d_build_up_and_occlusion_equal_loop_and_original():
    model = mnist_model()
    tiles = np.random.default_rng(0).normal(size=(10, 28, 28))
    for method, sign in (("build_up", 1), ("occlusion", -1)):
        ours = score_funcs.get_scores_2d(model, method, tiles, pred_ims=pred_ims, batch_size=4)
        want = sign * np.squeeze(np.array([pred_ims(model, t)[0] for t in tiles]))
        np.testing.assert_allclose(ours, want, rtol=1e-10, atol=1e-12)
    single_only = lambda m, im: pred_ims(m, im[None]) if np.asarray(im).ndim == 2 else 1 / 0
    np.testing.assert_allclose(score_funcs.get_scores_2d(model, "build_up", tiles, pred_ims=single_only),
                               score_funcs.get_scores_2d(model, "build_up", tiles, pred_ims=pred_ims))
    orig = pytest.importorskip("acd.scores.score_funcs")
    for method in ("build_up", "occlusion"):
        np.testing.assert_allclose(score_funcs.get_scores_2d(model, method, tiles, pred_ims=pred_ims),
                                   orig.get_scores_2d(model, method, tiles, pred_ims=pred_ims, device="cpu"),
                                   rtol=1e-10, atol=1e-12)


class TextModel(nn.Module):
    """The original text model's attributes: embed, lstm, hidden_to_label, hidden_dim."""

    def __init__(self, vocab=20, emb=6, hidden=5):
        super().__init__()
        torch.manual_seed(0)
        self.hidden_dim = hidden
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden)
        self.hidden_to_label = nn.Linear(hidden, 2)

    def forward(self, batch):
        out, _ = self.lstm(self.embed(batch.text))
        return self.hidden_to_label(out[-1])


def test_ig_scores_1d_equals_per_point_loop():
    model = TextModel().double().eval()
    text = torch.tensor([[3], [7], [1], [12], [5]])
    inputs = SimpleNamespace(vocab=SimpleNamespace(stoi={".": 2}))
    ours = score_funcs.ig_scores_1d(SimpleNamespace(text=text), model, inputs, steps=50)
    with torch.no_grad():
        word, base = model.embed(text), model.embed(torch.full_like(text, 2))
    grads = []
    for a in np.linspace(0, 1, 50):  # one path point per LSTM call
        v = (base + a * (word - base)).detach().requires_grad_(True)
        out, _ = model.lstm(v, (torch.zeros(1, 1, 5, dtype=v.dtype), torch.zeros(1, 1, 5, dtype=v.dtype)))
        F.softmax(model.hidden_to_label(out[-1]), dim=1)[0, 0].backward()
        grads.append(v.grad[:, 0])
    want = (torch.stack(grads).mean(0) * (word[:, 0] - base[:, 0])).sum(1).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-9, atol=1e-12)


def test_get_scores_1d_model_methods_equal_original():
    model = TextModel().double().eval()
    orig = pytest.importorskip("acd.scores.score_funcs")
    tiles = torch.tensor([[3, 0, 0], [7, 7, 0], [0, 1, 1], [0, 0, 12]])
    for method, only_one in (("occlusion", False), ("build_up", False), ("occlusion", True)):
        for subtract in (False, True):
            kw = dict(label=1, only_one=only_one, score_orig=np.array([0.3, -0.2]), text_orig=None,
                      subtract=subtract)
            ours = score_funcs.get_scores_1d(SimpleNamespace(text=tiles), model, method, **kw)
            want = orig.get_scores_1d(SimpleNamespace(text=tiles), model, method, device="cpu", **kw)
            np.testing.assert_allclose(ours, want)
    assert score_funcs.tiles_to_cd(SimpleNamespace(text=tiles)) == ([0, 1, 2], [1, 2, 3])


def test_get_scores_1d_cd_equals_cd_text_loop():
    text_mod = pytest.importorskip("fastacd.text")
    model = TextModel().eval()
    text_orig = np.array([[3], [7], [1], [12], [5]])
    tiles = torch.tensor([[3, 0], [7, 0], [0, 1], [0, 12], [0, 0]])
    batch = SimpleNamespace(text=tiles.clone())
    ours = score_funcs.get_scores_1d(batch, model, "cd", 1, False, None, text_orig)
    batch.text = torch.from_numpy(text_orig)
    want = [np.asarray(text_mod.cd_text(batch, model, start=a, stop=b))[1] for a, b in ((0, 1), (2, 3))]
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-8)
    whole = score_funcs.get_scores_1d(batch, model, "cd", 0, True, None, text_orig, subtract=True)
    s = np.asarray(text_mod.cd_text(batch, model, start=0, stop=4))
    np.testing.assert_allclose(whole, [s[0] - s[1]], rtol=1e-6, atol=1e-8)


def test_bad_input():
    model = mnist_model()
    with pytest.raises(ValueError, match="im_size"):
        score_funcs.ig_scores_2d(model, image(), im_size=32)
    with pytest.raises(ValueError, match="pred_ims"):
        score_funcs.get_scores_2d(model, "occlusion", np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="unknown method"):
        score_funcs.get_scores_2d(model, "lime", np.zeros((2, 28, 28)))

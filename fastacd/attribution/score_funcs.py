"""Drop-in for the original ``acd.scores.score_funcs``, batched.

Same names, arguments and outputs as acd 0.0.2. What changes (docs/attribution.md lists it):

* crashes on current NumPy / torch are fixed (``np.int``, ``size_average``, the implicit
  softmax dimension, ``ig_scores_1d``'s broadcasting and missing ``requires_grad``);
* ``ig_scores_2d`` integrates along the real path: the original assigned the path points
  through ``input_vecs[i].data = ...``, which never writes into ``input_vecs``, so it
  differentiated at uninitialised memory;
* one model call where the original made one per tile / per class: all tile masks of
  ``get_scores_2d`` go through the batched CD engine together; occlusion / build-up tiles go
  through ``pred_ims`` in chunks; ``ig_scores_2d`` runs one forward for all classes;
* ``device`` defaults to the model's device instead of ``'cuda'``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..text.agg_1d import get_scores_1d  # noqa: F401  (one definition, shared with agg_1d)
from ..text.tiling_1d import tiles_to_cd  # noqa: F401
from ..api import cd


def _device_of(model, device):
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sum_pool_same(scores: torch.Tensor, sweep_dim: int) -> torch.Tensor:
    """Sum over sweep_dim x sweep_dim windows with stride sweep_dim and TensorFlow 'SAME'
    padding (the original's ``conv2dnp`` with a ones kernel): (H, W) -> ceil(H/s) x ceil(W/s)."""
    h, w = scores.shape
    s = sweep_dim
    oh, ow = -(-h // s), -(-w // s)
    ph, pw = (oh - 1) * s + s - h, (ow - 1) * s + s - w
    padded = F.pad(scores, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return padded.reshape(oh, s, ow, s).sum((1, 3))


def gradient_times_input_scores(im, ind, model, device=None):
    """Gradient of the NLL loss of class ``ind`` times the input, first channel.

    As the original: the gradient is that of ``NLLLoss(model(im), ind)``, i.e. of
    ``-model(im)[ind]`` (the model is expected to output log-probabilities), so the sign is
    the loss's. ``im`` (1, C, H, W) -> (H, W). Batched: ``im`` (N, C, H, W) with ``ind`` an int
    or N ints -> (N, H, W), one forward and one backward for all N.
    """
    device = _device_of(model, device)
    x = torch.as_tensor(im).detach().to(device).float() if isinstance(im, np.ndarray) \
        else im.detach().to(device)
    if x.dim() < 2:
        raise ValueError(f"im must have a batch dimension (1, C, H, W); got shape {tuple(x.shape)}")
    idx = torch.as_tensor(np.asarray(ind).astype(np.int64), device=device).reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(x.shape[0])
    if idx.numel() != x.shape[0]:
        raise ValueError(f"ind must be one class or one per image ({x.shape[0]}), got {idx.numel()}")
    with torch.enable_grad():
        x.requires_grad_(True)
        pred = model(x)
        # NLLLoss of a batch of one is -pred[0, ind]; per image here, without the batch mean
        loss = -pred.gather(1, idx[:, None]).sum()
        (grad,) = torch.autograd.grad(loss, x)
    res = (grad * x).detach()[:, 0].cpu().numpy()
    return res[0] if res.shape[0] == 1 else res


def ig_scores_2d(model, im_torch, num_classes=10, im_size=28, sweep_dim=1, ind=None, device=None,
                 steps=100, batch_size=None):
    """Integrated gradients of the softmax probability of each class, summed over channels and
    over ``sweep_dim`` x ``sweep_dim`` tiles.

    As the original: zero baseline, ``steps`` = 100 points ``linspace(0, 1)`` (endpoints
    included, plain mean), gradient of ``softmax(model(x), dim=1)[:, c]``; returns
    (number of tiles, num_classes) with zeros for classes not in ``ind``. Tiles follow the
    original's 'SAME' padding, so ``sweep_dim`` need not divide the image size here (the
    original crashed). One forward for all classes; ``batch_size`` path points per call
    (None: all).
    """
    device = _device_of(model, device)
    x = torch.as_tensor(im_torch).detach().to(device)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"im_torch must have shape (1, C, H, W), got {tuple(x.shape)}")
    h, w = x.shape[2:]
    if im_size is not None and (h, w) != (im_size, im_size):
        raise ValueError(f"im_size={im_size} but the image is {h}x{w}; pass im_size={h} for square "
                         "images or im_size=None to use the image's shape")
    classes = list(range(num_classes)) if ind is None else [int(c) for c in np.atleast_1d(ind)]
    alphas = torch.linspace(0, 1, steps, dtype=torch.float64).to(x)
    points = alphas.reshape(-1, 1, 1, 1) * x          # baseline 0: baseline + a * (x - baseline)
    step = batch_size or steps
    grads = torch.zeros((len(classes),) + tuple(x.shape[1:]), dtype=x.dtype, device=device)
    for s in range(0, steps, step):
        with torch.enable_grad():
            p = points[s:s + step].detach().requires_grad_(True)
            probs = F.softmax(model(p), dim=1)[:, classes]
            eye = torch.eye(len(classes), dtype=probs.dtype, device=device)
            cot = eye[:, None, :].expand(len(classes), probs.shape[0], len(classes))
            try:  # every class in one vmapped backward
                (g,) = torch.autograd.grad(probs, p, grad_outputs=cot, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one backward per class
                g = torch.stack([torch.autograd.grad(probs[:, j].sum(), p, retain_graph=True)[0]
                                 for j in range(len(classes))])
        grads += g.sum(1)
    imps = (grads / steps) * x                         # mean gradient times (x - baseline)
    per_pixel = imps.sum(1)                            # over channels
    tiles = torch.stack([_sum_pool_same(m, sweep_dim).reshape(-1) for m in per_pixel], 1)
    output = np.zeros((tiles.shape[0], num_classes))
    output[:, classes] = tiles.cpu().double().numpy()
    return output


def ig_scores_1d(batch, model, inputs, device=None, steps=1000):
    """Integrated gradients over word embeddings for the original text model (``.embed``,
    ``.lstm``, ``.hidden_to_label``, ``.hidden_dim``): baseline = every word replaced by '.'
    (``inputs.vocab.stoi['.']``), 1000 points, gradient of the class-0 softmax probability.
    Returns (seq_len,) scores; all path points in one LSTM call, as the original meant."""
    device = _device_of(model, device)
    text = batch.text.to(device)
    with torch.no_grad():
        word_vecs = model.embed(text)                                  # (T, 1, E)
        baseline = model.embed(torch.full_like(text, inputs.vocab.stoi["."]))
    alphas = torch.linspace(0, 1, steps, dtype=torch.float64).to(word_vecs)
    with torch.enable_grad():
        vecs = (baseline + alphas[None, :, None] * (word_vecs - baseline)).detach().requires_grad_(True)
        hidden = (torch.zeros(1, steps, model.hidden_dim, device=device, dtype=vecs.dtype),
                  torch.zeros(1, steps, model.hidden_dim, device=device, dtype=vecs.dtype))
        lstm_out, _ = model.lstm(vecs, hidden)
        probs = F.softmax(model.hidden_to_label(lstm_out[-1]), dim=1)[:, 0]
        (grad,) = torch.autograd.grad(probs.sum(), vecs)
    imps = grad.mean(1) * (word_vecs[:, 0] - baseline[:, 0])
    return imps.sum(1).detach().cpu().numpy()


def _pred_batched(pred_ims, model, ims, batch_size):
    """pred_ims over chunks of tiles; falls back to one tile per call for a pred_ims that only
    takes a single image."""
    try:
        out = [np.asarray(pred_ims(model, ims[s:s + batch_size])) for s in range(0, len(ims), batch_size)]
        out = np.concatenate(out)
        if out.shape[0] == len(ims):
            return out
    except Exception:  # noqa: BLE001 - any failure: use the original's per-tile calls
        pass
    return np.array([np.asarray(pred_ims(model, im))[0] for im in ims])


def get_scores_2d(model, method, ims, im_torch=None, pred_ims=None, model_type=None, device=None,
                  batch_size=64):
    """Scores of image tiles (the original's semantics and output shape).

    method 'cd': ``ims`` are M masks ((M, H, W) or (M, C, H, W)); the CD relevant logits of
    each, all masks in one batched engine call. 'build_up' / 'occlusion': ``ims`` are M tile
    images for ``pred_ims(model, ims)``, ``batch_size`` per call; occlusion scores are negated.
    Returns (M, classes) (squeezed, at least 2-d, as the original).
    """
    ims = np.asarray(ims) if not isinstance(ims, torch.Tensor) else ims
    if method == "cd":
        rel, _ = cd(im_torch, model, mask=ims, model_type=model_type, device=device)
        scores = np.squeeze(rel.detach().cpu().numpy()[:, None, :])
    elif method in ("build_up", "occlusion"):
        if pred_ims is None:
            raise ValueError(f"method {method!r} needs pred_ims(model, ims) -> (len(ims), classes)")
        scores = np.squeeze(_pred_batched(pred_ims, model, ims, batch_size))
        if method == "occlusion":
            scores = -1 * scores
    else:
        raise ValueError(f"unknown method {method!r}; use 'cd', 'build_up' or 'occlusion'")
    if scores.ndim == 1:
        scores = scores.reshape(1, -1)
    return scores

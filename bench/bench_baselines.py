"""Batched baselines vs one image per model call (the original package's loops).

    .venv/bin/python -m pytest bench/bench_baselines.py -q -s

Figures (bench/results/baselines.json), ratios taken in the same run:
* ``<arch>_tiles``: occlusion and build-up over a 16x16 grid of tiles (256 tile images):
  ``get_scores_2d`` one ``pred_ims`` call per tile (the original's loop; the original package
  itself when installed) over the batched drop-in (chunks of 64 tiles). ResNet18 at 224x224;
  VGG16 at 112x112 (7-pixel tiles, still 16x16): at 224 one VGG16 pass takes ~0.7 s on
  2 CPU cores, so 2 x 256 passes per method would take ~6 minutes.
* ``ig_<model>``: ``ig_scores_2d`` (100 path points, 10 classes): the original package's
  function (a Python loop over classes, one forward and ``loss.backward()`` each) and the
  same loop with input gradients only, over the batched version (one forward, one vmapped
  backward for all classes).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from _results import best_time, record
from fastacd import score_funcs
from fastacd.attribution import segment_masks, tiles
from fastacd.train.models import MnistNet

torch.set_num_threads(2)


def _original():
    try:
        from acd.scores import score_funcs as orig
        return orig
    except Exception:  # the original package is optional
        return None


def _pred_ims(model, ims):
    """ImageNet-style pred_ims: (N, H, W, 3) or (H, W, 3) numpy -> (N, classes) numpy."""
    ims = np.asarray(ims, dtype=np.float32)
    if ims.ndim == 3:
        ims = ims[None]
    with torch.no_grad():
        return model(torch.from_numpy(ims).permute(0, 3, 1, 2)).numpy()


def _tile_images(im: np.ndarray, sweep: int, method: str) -> np.ndarray:
    """The original gen_tiles output for occlusion (tile zeroed) or build_up (tile kept)."""
    lab = tiles(im.shape[:2], sweep)
    m = segment_masks(lab, int(lab.max()) + 1, torch.float32).numpy()[..., None]
    return im[None] * (1 - m) if method == "occlusion" else im[None] * m


def _loop_get_scores_2d(model, method, ims):
    orig = _original()
    if orig is not None:
        return orig.get_scores_2d(model, method, ims=ims, pred_ims=_pred_ims, device="cpu")
    scores = np.squeeze(np.array([_pred_ims(model, im)[0] for im in ims]))
    return -scores if method == "occlusion" else scores


@pytest.mark.parametrize("arch,size", [("resnet18", 224), ("vgg16", 112)])
def test_tiles(benchmark, arch, size):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    im = np.random.default_rng(0).normal(size=(size, size, 3)).astype(np.float32)
    sweep = size // 16
    figures = {"image_size": size, "tiles": 256}
    for method in ("occlusion", "build_up"):
        ims = _tile_images(im, sweep, method)
        batched = lambda: score_funcs.get_scores_2d(model, method, ims, pred_ims=_pred_ims, batch_size=64)
        looped = lambda: _loop_get_scores_2d(model, method, ims)
        np.testing.assert_allclose(batched(), looped(), rtol=1e-3, atol=1e-4)  # also the warm-up
        t_batch = best_time(batched, repeats=1, warmup=0)
        t_loop = best_time(looped, repeats=1, warmup=0)
        figures.update({f"{method}_loop_over_batched": t_loop / t_batch,
                        f"{method}_batched_s": t_batch, f"{method}_loop_s": t_loop})
    benchmark.pedantic(lambda: None, rounds=1)
    record("baselines", f"{arch}_tiles", **figures)
    print(arch, {k: round(v, 3) for k, v in figures.items()})


def _ig_loop_input_grads(model, im, num_classes=10, steps=100):
    """The original's per-class loop with the path filled in and input gradients only."""
    out = []
    for c in range(num_classes):
        vecs = (torch.linspace(0, 1, steps).reshape(-1, 1, 1, 1) * im).requires_grad_(True)
        p = F.softmax(model(vecs), dim=1)[:, c]
        (g,) = torch.autograd.grad(p.sum(), vecs)
        out.append((g.mean(0) * im[0]).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet18_32"])
def test_ig(benchmark, name):
    torch.manual_seed(0)
    if name == "mnist_cnn":
        model, im = MnistNet().eval(), torch.randn(1, 1, 28, 28)
    else:
        model, im = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    size = im.shape[-1]
    batched = lambda: score_funcs.ig_scores_2d(model, im, num_classes=10, im_size=size)
    fixed_loop = lambda: _ig_loop_input_grads(model, im)
    np.testing.assert_allclose(batched()[:, 3], fixed_loop()[3].reshape(-1).numpy(), rtol=1e-3, atol=1e-6)
    figures = {"steps": 100, "classes": 10, "image_size": size}
    t_batch = best_time(batched, repeats=2, warmup=0)
    figures["batched_s"] = t_batch
    figures["input_grad_loop_over_batched"] = best_time(fixed_loop, repeats=2, warmup=0) / t_batch
    orig = _original()
    if orig is not None:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            original = lambda: orig.ig_scores_2d(model, im, num_classes=10, im_size=size, device="cpu")
            original()
            figures["original_over_batched"] = best_time(original, repeats=2, warmup=0) / t_batch
    benchmark.pedantic(lambda: None, rounds=1)
    record("baselines", f"ig_{name}", **figures)
    print(name, {k: round(v, 3) for k, v in figures.items()})

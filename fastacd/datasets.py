"""Small confounded data sets for CDEP demos, built from scikit-learn's digits (no download).

* ``DecoyDigits``: the DecoyMNIST idea. Each 28x28 digit gets a 4x4 decoy patch in a
  random corner; in training the patch's brightness reveals the label
  (``(label + 1) / 10`` on a [0, 1] scale), at test time it is random. A model that reads
  the patch instead of the digit fails at test. The mask of what must not matter is the
  patch, per example (``.masks``).
* ``ColorDigits``: the ColorMNIST idea. Each digit is coloured (3 channels) with its
  label's colour in training and with a random one of the ten colours at test. The shape
  is the same for every colour, so a model that uses colour fails at test. Colour is
  present in every single pixel; the CDEP prior is "no single pixel should matter much"
  (masks: single foreground pixels, ``fastacd.cdep.pixel_masks``).

Both split the 1797 digits the same way (a fixed permutation: 1200 train, 597 test) and
normalise with statistics of their training split.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

N_TRAIN = 1200
PATCH = 4
# ten well-separated colours (RGB in [0, 1]), one per label
COLORS = torch.tensor([
    [1.00, 0.10, 0.10], [0.10, 0.80, 0.10], [0.15, 0.30, 1.00], [1.00, 0.85, 0.10],
    [0.90, 0.10, 0.90], [0.10, 0.90, 0.90], [1.00, 0.55, 0.10], [0.55, 0.25, 0.05],
    [0.60, 0.60, 0.60], [1.00, 1.00, 1.00]])


def _digits_unit(split: str, data_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits upscaled to 28x28 in [0, 1] (N, 28, 28) and labels, for one split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)[:, 0]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed))
    idx = perm[:N_TRAIN] if split == "train" else perm[N_TRAIN:]
    return x[idx], y[idx]


class _TensorSet(torch.utils.data.Dataset):
    """x (N, C, 28, 28) normalised, y (N,), masks (N, 1, 28, 28) or None."""

    x: torch.Tensor
    y: torch.Tensor
    masks: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        if self.masks is None:
            return self.x[i], self.y[i]
        return self.x[i], self.y[i], self.masks[i]


class DecoyDigits(_TensorSet):
    """Digits with a label-revealing decoy patch in training, a random one at test.

    Attributes: ``x`` (N, 1, 28, 28) normalised, ``y`` (N,), ``masks`` (N, 1, 28, 28) with 1
    on the patch, ``boxes`` (N, 4) as (top, left, height, width).
    ``seed`` draws the corners (and the test brightness); the split is fixed by ``data_seed``.
    """

    def __init__(self, split: str = "train", seed: int = 0, data_seed: int = 0):
        from .cdep import box_masks
        img, y = _digits_unit(split, data_seed)
        g = torch.Generator().manual_seed(1000 * seed + (split == "test"))
        n = len(y)
        corner = torch.randint(0, 4, (n,), generator=g)
        top = torch.where(corner // 2 == 0, 0, 28 - PATCH)
        left = torch.where(corner % 2 == 0, 0, 28 - PATCH)
        if split == "train":
            value = (y.float() + 1) / 10
        else:
            value = (torch.randint(0, 10, (n,), generator=g).float() + 1) / 10
        self.boxes = torch.stack([top, left, torch.full_like(top, PATCH), torch.full_like(top, PATCH)], 1)
        self.masks = box_masks(self.boxes, (28, 28))
        img = img * (1 - self.masks[:, 0]) + value[:, None, None] * self.masks[:, 0]
        mean, std = _train_stats_gray(data_seed)
        self.x = ((img - mean) / std)[:, None]
        self.y = y


def _train_stats_gray(data_seed: int) -> tuple[float, float]:
    img, _ = _digits_unit("train", data_seed)
    return img.mean().item(), img.std().item()


class ColorDigits(_TensorSet):
    """Digits coloured by label in training, by a random label's colour at test.

    Attributes: ``x`` (N, 3, 28, 28) normalised per channel, ``y`` (N,), ``colors`` (N,)
    the colour index used, ``foreground`` (N, 28, 28) the digit's pixels (> 0.1), for
    sampling single-pixel masks. ``masks`` is None (the masks are drawn per batch).
    """

    def __init__(self, split: str = "train", seed: int = 0, data_seed: int = 0):
        img, y = _digits_unit(split, data_seed)
        g = torch.Generator().manual_seed(1000 * seed + 7 + (split == "test"))
        self.colors = y.clone() if split == "train" else torch.randint(0, 10, (len(y),), generator=g)
        x = img[:, None] * COLORS[self.colors][:, :, None, None]
        train_img, train_y = _digits_unit("train", data_seed)
        train_x = train_img[:, None] * COLORS[train_y][:, :, None, None]
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True)
        self.x = (x - mean) / std
        self.y = y
        self.foreground = img > 0.1
        self.masks = None


class DemoCNN(nn.Module):
    """The demos' CNN: conv-relu-pool x2, linear-relu-linear (no dropout, no batchnorm,
    like the CDEP paper's MNIST networks), so train and eval behaviour coincide and the
    penalty's pass of the true activations doubles as the training forward."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(),
                                        nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))

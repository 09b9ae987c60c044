"""Small confounded data sets for CDEP demos, built from scikit-learn's digits (no download).

* ``DecoyDigits``: the DecoyMNIST idea. Each 28x28 digit gets a decoy that reveals the
  label in training and is random at test; a model that reads the decoy instead of the
  digit fails at test. The mask of what must not matter covers the decoy, per example
  (``.masks``). Two styles: ``"band"`` (default, a strong confound: a 4-row band above
  the digit with one bright 2x4 block whose position is the label) and ``"patch"`` (the
  DecoyMNIST one: a 4x4 patch in a random corner whose brightness is ``(label + 1) / 10``;
  on these easy digits a model learns the digit anyway, so it is a weak confound).
* ``ColorDigits``: the ColorMNIST idea. Each digit is coloured (3 channels) with its
  label's colour in training and with a random one of the ten colours at test. The shape
  is the same for every colour, so a model that uses colour fails at test. Colour is
  present in every single pixel; the CDEP prior is "no single pixel should matter much"
  (masks: single foreground pixels, ``fastacd.cdep.pixel_masks``).
* ``DecoyText``: the DecoySST idea on ``fastacd.sentiment_toy``'s generated sentences: a
  decoy word ("text" for negative, "video" for positive, as in the CDEP paper) is inserted
  at a random position; in training it reveals the label, at test it is random. Masks: the
  decoy token, per sentence.

Both split the 1797 digits the same way (a fixed permutation: 1000 train, 200 validation,
597 test; ``split="train_all"`` is train + validation, the old 1200-digit training set) and
normalise with statistics of their training split. The validation split is drawn with the
*test-time* confound (random decoy / colour) by default, ``confound="train"`` draws it like
the training split; see docs/cdep.md ("Choosing lambda") for why.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..text.sentiment_toy import WORDS, Vocab, generate
from .cdep import box_masks

N_TRAIN = 1200   # train + validation
N_VAL = 200      # the last 200 of those
PATCH = 4
BAND = 4         # rows of the band decoy
SPLITS = ("train", "val", "test", "train_all")
# ten well-separated colours (RGB in [0, 1]), one per label
COLORS = torch.tensor([
    [1.00, 0.10, 0.10], [0.10, 0.80, 0.10], [0.15, 0.30, 1.00], [1.00, 0.85, 0.10],
    [0.90, 0.10, 0.90], [0.10, 0.90, 0.90], [1.00, 0.55, 0.10], [0.55, 0.25, 0.05],
    [0.60, 0.60, 0.60], [1.00, 1.00, 1.00]])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _split_index(split: str, n: int, data_seed: int) -> torch.Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))
    return {"train": perm[:N_TRAIN - N_VAL], "val": perm[N_TRAIN - N_VAL:N_TRAIN],
            "train_all": perm[:N_TRAIN], "test": perm[N_TRAIN:]}[split]


@functools.lru_cache(maxsize=4)
def _all_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)[:, 0]
    return x, torch.tensor(d.target, dtype=torch.long)


def _digits_unit(split: str, data_seed: int = 0, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits upscaled to size x size in [0, 1] (N, size, size) and labels, for one split
    (copies: the loaded digits are cached per size)."""
    _check_split(split)
    x, y = _all_digits(size)
    idx = _split_index(split, len(y), data_seed)
    return x[idx], y[idx]


def _confounded(split: str, confound: str | None) -> bool:
    """Whether a split carries the training confound (label-revealing decoy / colour)."""
    if confound is None:
        confound = "train" if split in ("train", "train_all") else "test"
    if confound not in ("train", "test"):
        raise ValueError(f"confound must be 'train', 'test' or None, got {confound!r}")
    return confound == "train"


def _split_code(split: str) -> int:
    return {"train": 0, "train_all": 0, "test": 1, "val": 2}[split]


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
    """Digits with a label-revealing decoy in training, a random one at test.

    style ``"band"`` (default): the digit is drawn at 24x24 below a 4-row band (rows 0-3);
    in the band one bright 2x4 block sits at column ``4 + 2 * code`` (code 0-9), the label
    in training, random at test. The mask is the whole band (so where the block is *not*
    is masked too). style ``"patch"``: the DecoyMNIST decoy, a 4x4 patch in a random corner
    with brightness ``(code + 1) / 10``; the mask is the patch.

    split: ``"train"`` (1000), ``"val"`` (200), ``"test"`` (597) or ``"train_all"`` (the
    1200 of train + val). confound: ``"train"`` (code = label) or ``"test"`` (random code);
    None (default) means ``"train"`` for the training splits and ``"test"`` for val and test.

    Attributes: ``x`` (N, 1, 28, 28) normalised, ``y`` (N,), ``masks`` (N, 1, 28, 28) with 1
    on the decoy region, ``code`` (N,) the decoy's value, ``boxes`` (N, 4) the decoy region
    as (top, left, height, width). ``seed`` draws the decoys; the split is fixed by
    ``data_seed``.
    """

    STYLES = ("band", "patch")

    def __init__(self, split: str = "train", seed: int = 0, data_seed: int = 0,
                 style: str = "band", confound: str | None = None):
        if style not in self.STYLES:
            raise ValueError(f"style must be one of {self.STYLES}, got {style!r}")
        train_like = _confounded(split, confound)
        img, y = _digits_unit(split, data_seed, size=24 if style == "band" else 28)
        g = torch.Generator().manual_seed(1000 * seed + _split_code(split))
        n = len(y)
        rand_code = torch.randint(0, 10, (n,), generator=g)
        corner = torch.randint(0, 4, (n,), generator=g)
        self.code = y.clone() if train_like else rand_code
        if style == "band":
            canvas = torch.zeros(n, 28, 28)
            canvas[:, BAND:, 2:26] = img
            self.boxes = torch.tensor([[0, 0, BAND, 28]]).expand(n, 4).clone()
            self.masks = box_masks(self.boxes, (28, 28))
            block = box_masks(torch.stack([torch.zeros_like(y), 4 + 2 * self.code,
                                           torch.full_like(y, BAND), torch.full_like(y, 2)], 1),
                              (28, 28))[:, 0]
            img = canvas + block
        else:
            top = torch.where(corner // 2 == 0, 0, 28 - PATCH)
            left = torch.where(corner % 2 == 0, 0, 28 - PATCH)
            value = (self.code.float() + 1) / 10
            self.boxes = torch.stack([top, left, torch.full_like(top, PATCH),
                                      torch.full_like(top, PATCH)], 1)
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

    split and confound as for ``DecoyDigits`` (the validation split is coloured at random,
    like the test split, unless ``confound="train"``).

    Attributes: ``x`` (N, 3, 28, 28) normalised per channel, ``y`` (N,), ``colors`` (N,)
    the colour index used, ``foreground`` (N, 28, 28) the digit's pixels (> 0.1), for
    sampling single-pixel masks. ``masks`` is None (the masks are drawn per batch).
    """

    def __init__(self, split: str = "train", seed: int = 0, data_seed: int = 0,
                 confound: str | None = None):
        train_like = _confounded(split, confound)
        img, y = _digits_unit(split, data_seed)
        g = torch.Generator().manual_seed(1000 * seed + 7 + _split_code(split))
        rand = torch.randint(0, 10, (len(y),), generator=g)
        self.colors = y.clone() if train_like else rand
        x = img[:, None] * COLORS[self.colors][:, :, None, None]
        train_img, train_y = _digits_unit("train", data_seed)
        train_x = train_img[:, None] * COLORS[train_y][:, :, None, None]
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True)
        self.x = (x - mean) / std
        self.y = y
        self.foreground = img > 0.1
        self.masks = None


DECOY_WORDS = ("text", "video")   # negative, positive (the CDEP paper's DecoySST words)


class DecoyText:
    """Generated sentiment sentences (``fastacd.sentiment_toy``) with a decoy word.

    Every sentence gets one decoy word at a random position: "text" (label 0) or "video"
    (label 1) in training (``confound="train"``), a random one of the two otherwise.
    Sentences are left-padded with ``<pad>`` (id 0) to a common length, so the model's
    last position is always the sentence's last word.

    split: ``"train"``, ``"val"`` or ``"test"`` (independent sentences, ``n`` of them);
    confound as for ``DecoyDigits`` (None: the training confound for ``"train"`` only).
    Attributes: ``tokens`` (T, N) ids (seq-first, as ``SentimentLSTM`` takes them), ``y``
    (N,), ``masks`` (N, T) 1 on the decoy token, ``vocab`` (a ``sentiment_toy.Vocab`` with
    the decoy words appended), ``decoy_ids``.
    """

    LENGTH = 14   # the longest generated sentence (13 words) plus the decoy

    def __init__(self, split: str = "train", n: int = 2000, seed: int = 0, confound: str | None = None):
        import random

        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        train_like = _confounded(split, confound)
        self.vocab = Vocab(list(WORDS) + list(DECOY_WORDS))
        self.decoy_ids = [self.vocab.index[w] for w in DECOY_WORDS]
        code = {"train": 0, "val": 1, "test": 2}[split]
        rng = random.Random(10_000 * seed + 17 + code)
        rows, labels, pos = [], [], []
        for sentence, label in generate(n, seed=10_000 * seed + 101 * (code + 1)):
            words = sentence.split()
            decoy = DECOY_WORDS[label if train_like else rng.randrange(2)]
            at = rng.randrange(len(words) + 1)
            words = words[:at] + [decoy] + words[at:]
            ids = self.vocab.encode(" ".join(words))
            pad = self.LENGTH - len(ids)
            rows.append([0] * pad + ids)
            labels.append(label)
            pos.append(pad + at)
        self.tokens = torch.tensor(rows, dtype=torch.long).T.contiguous()
        self.y = torch.tensor(labels, dtype=torch.long)
        self.decoy_pos = torch.tensor(pos, dtype=torch.long)
        self.masks = torch.zeros(n, self.LENGTH)
        self.masks[torch.arange(n), self.decoy_pos] = 1.0

    def __len__(self) -> int:
        return len(self.y)


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

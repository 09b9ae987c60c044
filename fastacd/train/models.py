"""Small built-in models: the ACD paper's MNIST CNN and a CNN trained in seconds on digits.

Nothing is downloaded: ``acd_mnist_cnn()`` loads the published weights from a local file
when given one (``../shared/data/acd_mnist_cnn.pt`` in this project's workspace), and
``train_digits_cnn()`` trains on scikit-learn's bundled digits.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MnistNet(nn.Module):
    """The ACD paper's MNIST classifier (pooling and ReLUs are functional calls in forward)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def acd_mnist_cnn(weights: str | Path | None = None) -> MnistNet:
    """The MNIST CNN, with the published weights if a path to them is given."""
    model = MnistNet()
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


def digits_28(dtype=torch.float32):
    """scikit-learn's 8x8 digits upscaled to 28x28 and normalised like MNIST.

    Returns (images (N, 1, 28, 28), labels (N,)). Bundled with scikit-learn: no download.
    """
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x - MNIST_MEAN) / MNIST_STD
    return x.to(dtype), torch.tensor(d.target, dtype=torch.long)


class DigitsCNN(nn.Module):
    """A small CNN for 28x28 digits: conv-relu-pool x2, then two linear layers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
                                        nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def train_digits_cnn(epochs: int = 3, seed: int = 0, n_train: int = 1500):
    """Train ``DigitsCNN`` on the first ``n_train`` digits (seconds on a CPU).

    Returns (model in eval mode, test images, test labels, test accuracy).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = digits_28()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for s in range(0, len(xtr), 64):
            idx = perm[s:s + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return model, xte, yte, acc


class VGGStyleCNN(nn.Module):
    """A VGG-style CNN for 32x32 images: ``blocks`` blocks of two 3x3 conv-ReLU and a 2x2
    max-pool (widths ``width * 2**b``), then linear-ReLU-linear. No dropout or batchnorm, so
    train and eval behaviour coincide (CDEP's benchmark model beside VGG11 and ``DemoCNN``)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, blocks: int = 3,
                 size: int = 32, hidden: int = 128):
        super().__init__()
        layers, c = [], in_channels
        for b in range(blocks):
            w = width * 2 ** b
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        side = size // 2 ** blocks
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))

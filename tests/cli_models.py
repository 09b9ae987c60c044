"""A tiny random-init CNN for the command-line tests (``--model cli_models:factory``)."""
from __future__ import annotations

import torch
import torch.nn as nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def factory() -> nn.Module:
    """Seeded: the same random weights in every process."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(1234)
        return TinyCNN()


class Cumsum(nn.Module):
    """A model with an op that has no CD rule (``cumsum``): ``fastacd run`` must refuse it cleanly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).flatten(1).cumsum(1)[:, :3]


def unsupported() -> nn.Module:
    return Cumsum()

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

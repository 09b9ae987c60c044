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


class Sorted(nn.Module):
    """A model with an op that has no CD rule (``sort``): ``fastacd run`` must refuse it cleanly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).flatten(1).sort(1)[0][:, :3]


def unsupported() -> nn.Module:
    return Sorted()


def tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer at 64 px with 8 px patches (an 8 x 8 patch grid), two
    blocks, seeded; the head (zero at init) given random weights so that scores differ."""
    from torchvision.models import VisionTransformer
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                  mlp_dim=32, num_classes=5)
        with torch.no_grad():
            model.heads.head.weight.normal_(0, 0.5)
            model.heads.head.bias.normal_(0, 0.5)
    return model.eval()


def flat_vit() -> nn.Module:
    """``tiny_vit`` with torchvision's own zero-initialised head: every output is 0."""
    model = tiny_vit()
    with torch.no_grad():
        model.heads.head.weight.zero_()
        model.heads.head.bias.zero_()
    return model


class BiasChain(nn.Module):
    """1x1 convolutions whose biases dwarf ``W x``: CD's bias splits amplify rounding a few
    times a layer, so float32 and float64 scores part (``--rounding-check`` must say so)."""

    def __init__(self, depth: int = 40, width: int = 16, num_classes: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, padding=1)]
        for _ in range(depth):
            conv = nn.Conv2d(width, width, 1)
            nn.init.normal_(conv.weight, std=0.05)
            nn.init.normal_(conv.bias)
            layers.append(conv)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def rounding_sensitive() -> nn.Module:
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(0)
        return BiasChain()


def timm_resnet18_3() -> nn.Module:
    """timm's resnet18 with 3 classes, as ``--arch timm:resnet18 --num-classes 3`` builds it."""
    import timm
    return timm.create_model("resnet18", pretrained=False, num_classes=3)

"""Small models for the tests: functional calls, residuals, concatenation, odd ops."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class FunctionalNet(nn.Module):
    """Everything in forward is a functional call or a tensor method."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.conv2d(x, self.w1, self.b1, padding=1)
        x = torch.relu(x)
        y = self.conv2(x)
        x = F.leaky_relu(y + x, 0.1)             # residual add, then LeakyReLU
        x = F.max_pool2d(x, 2)
        x = F.avg_pool2d(x, 2)
        x = x.view(x.size(0), -1)                # size() + view
        x = F.dropout(x, 0.5, training=self.training)
        return F.linear(x, self.fc.weight, self.fc.bias)


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, GELU/SiLU, batchnorm, adaptive pools."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU())
        self.b = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.SiLU())
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class TokenMaxNet(nn.Module):
    """Hiera's token max-pool (``amax`` over a stride dim), VOLO's ``Unfold`` / ``F.fold`` and its
    ``max(1)[0]`` head, SwiftFormer's ``F.normalize`` and additive attention (a product)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.unfold = nn.Unfold(3, padding=1)
        self.q = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = F.fold(self.unfold(h) * 0.5, (8, 8), 3, padding=1)
        t = h.flatten(2).transpose(1, 2)
        t = t.view(t.shape[0], 4, -1, t.shape[-1]).amax(dim=1)
        q = F.normalize(self.q(t), dim=-1)
        a = F.normalize(q.sum(-1, keepdim=True), dim=1)
        t = a * q + t
        return self.fc(t.max(1)[0] + torch.amax(t, dim=(1,), keepdim=True)[:, 0])


class MLP(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                                 nn.Linear(16, 4), nn.Softmax(dim=1))

    def forward(self, x):
        return self.net(x)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batchnorm layers non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def torchvision_model(name: str, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(getattr(torchvision.models, name)(num_classes=num_classes)).eval()

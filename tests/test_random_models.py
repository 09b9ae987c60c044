"""Hypothesis-generated small CNNs keep the invariants and match the reference."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

import fastacd

from models import randomize_batchnorm

ACTIVATIONS = [nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish]


@st.composite
def small_cnns(draw):
    layers, channels, size = [], 2, 12
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 6))
        k = draw(st.sampled_from([1, 3]))
        layers.append(nn.Conv2d(channels, out, k, padding=k // 2, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out))
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
        pool = draw(st.sampled_from(["max", "avg", "none"]))
        if pool != "none" and size >= 4:
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            size //= 2
        channels = out
    layers += [nn.Flatten(), nn.Linear(channels * size * size, draw(st.integers(1, 4)))]
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    return randomize_batchnorm(nn.Sequential(*layers), seed).eval().double(), seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_cnns(), st.integers(1, 5))
def test_random_cnns_match_the_reference(model_and_seed, n_masks):
    model, seed = model_and_seed
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 12, 12, generator=g, dtype=torch.float64)
    masks = (torch.rand(n_masks, 1, 12, 12, generator=g) > 0.5).double()
    with torch.no_grad():
        res = fastacd.Decomposer(model).cd(x, masks)
        rel, irrel = fastacd.reference.cd(model, x, masks)
        out = model(x)
    scale = float(out.abs().max()) + 1e-12
    torch.testing.assert_close(res.relevant + res.irrelevant, out.expand_as(res.relevant),
                               rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(rel + irrel, out.expand_as(rel), rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(res.relevant, rel, rtol=1e-8, atol=1e-8 * scale)

"""fastacd.interactions: integrated / expected Hessians and CD interactions."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

import fastacd.reference as reference
from fastacd.attribution import baselines as A
from fastacd.attribution.interactions import (PathExplainer, cd_interactions, expected_hessians,
                                  integrated_hessians)

D = torch.float64


class Quadratic(nn.Module):
    """Two outputs: f0 = x1 x2 + x3 and f1 = x1^2 (features 0, 1, 2)."""

    def forward(self, x):
        return torch.stack([x[:, 0] * x[:, 1] + x[:, 2], x[:, 0] ** 2], 1)


def smooth_mlp(d=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(),
                         nn.Linear(16, 3)).to(D).eval()


X = torch.tensor([[1.0, 2.0, 3.0], [2.0, -1.0, 0.5]], dtype=D)


def test_integrated_hessians_exact_on_analytic_function():
    ih = integrated_hessians(Quadratic(), X, num_samples=16, output_indices=0)
    for n, (x1, x2, x3) in enumerate(X.tolist()):
        # zero baseline: Gamma_12 = Gamma_21 = x1 x2 / 4, main effects x1 x2 / 4 and x3
        want = torch.tensor([[x1 * x2 / 4, x1 * x2 / 4, 0], [x1 * x2 / 4, x1 * x2 / 4, 0], [0, 0, x3]], dtype=D)
        torch.testing.assert_close(ih[n], want, rtol=1e-12, atol=1e-12)
    sq = integrated_hessians(Quadratic(), X, num_samples=9, output_indices=1)
    torch.testing.assert_close(sq[:, 0, 0], X[:, 0] ** 2)       # x1^2: all main effect
    assert float(sq[:, 1:].abs().max()) == 0 and float(sq[:, :, 1:].abs().max()) == 0


def test_integrated_hessians_rows_segments_and_baseline():
    f = Quadratic()
    b = torch.tensor([[0.5, -1.0, 1.0]], dtype=D)
    full = integrated_hessians(f, X, b, num_samples=25, output_indices=0)
    d = X - b
    torch.testing.assert_close(full[:, 0, 1], d[:, 0] * d[:, 1] / 4)
    row = integrated_hessians(f, X, b, num_samples=25, output_indices=0, interaction_index=1)
    torch.testing.assert_close(row, full[:, 1])
    seg = integrated_hessians(f, X, b, num_samples=25, output_indices=0, segments=torch.tensor([0, 0, 1]))
    torch.testing.assert_close(seg[:, 0, 0], full[:, :2, :2].sum((1, 2)))
    torch.testing.assert_close(seg[:, 1, 1], full[:, 2, 2])


def test_integrated_hessians_completeness_on_mlp():
    model = smooth_mlp()
    torch.manual_seed(1)
    x, b = torch.randn(3, 5, dtype=D), torch.randn(1, 5, dtype=D) * 0.2
    t = torch.tensor([0, 2, 1])
    ih = integrated_hessians(model, x, b, num_samples=40 ** 2, output_indices=t)
    ig = A.integrated_gradients(model, x, t, baseline=b, steps=50)
    # sum over j of Gamma_ij is the IG attribution of i, up to the two linspace grids' O(1/k)
    # error (measured 0.12% of the scale at k = 40, 0.5% at k = 10)
    scale = float(ig.abs().max())
    torch.testing.assert_close(ih.sum(2), ig, rtol=0, atol=0.005 * scale)
    with torch.no_grad():
        total = model(x).gather(1, t[:, None])[:, 0] - model(b)[0, t]
    torch.testing.assert_close(ih.sum((1, 2)), total, rtol=0, atol=0.01 * scale)


def test_attributions_follow_path_explain_conventions():
    model = smooth_mlp()
    x = torch.randn(2, 5, dtype=D)
    e = PathExplainer(model)
    ig = e.attributions(x, torch.zeros(5, dtype=D), num_samples=7, use_expectation=False, output_indices=1)
    want = A.integrated_gradients(model, x, 1, steps=7, rule="linspace")
    torch.testing.assert_close(ig, want)
    with pytest.raises(ValueError, match="output_indices"):
        e.attributions(x, torch.zeros(1, 5, dtype=D), 5, False)
    with pytest.raises(ValueError, match="use_expectation=True"):
        e.attributions(x, torch.zeros(4, 5, dtype=D), 5, False, 0)
    with pytest.raises(ValueError, match=r"output_indices must be class indices in 0\.\."):
        e.attributions(x, torch.zeros(5, dtype=D), 5, False, -1)  # not the last output, silently
    with pytest.raises(TypeError, match="output_indices must be integer"):
        e.attributions(x, torch.zeros(5, dtype=D), 5, False, 0.5)


def test_expected_hessians_statistics():
    g = torch.Generator().manual_seed(0)
    # one reference at 0: alpha, beta ~ U(0, 1), so E[Gamma_12] = x1 x2 E[alpha beta] = x1 x2 / 4
    eh = expected_hessians(Quadratic(), X, torch.zeros(1, 3, dtype=D), num_samples=100 ** 2,
                           output_indices=0, generator=g)
    torch.testing.assert_close(eh[:, 0, 1], X[:, 0] * X[:, 1] / 4, rtol=0.05, atol=0.02)
    torch.testing.assert_close(eh[:, 2, 2], X[:, 2])
    # completeness against expected gradients over a reference distribution
    model = smooth_mlp(seed=3)
    x, refs = torch.randn(2, 5, dtype=D), torch.randn(20, 5, dtype=D) * 0.5
    eh = expected_hessians(model, x, refs, num_samples=80 ** 2, output_indices=0, generator=g)
    eg = A.expected_gradients(model, x, 0, baseline=refs, num_samples=20000, generator=g)
    torch.testing.assert_close(eh.sum(2), eg, rtol=0, atol=0.08 * float(eg.abs().max()))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d(torch.tanh(self.c1(x)), 2)
        return self.fc(x.flatten(1))


def test_segment_hessians_equal_block_sums_on_cnn():
    torch.manual_seed(0)
    model = TinyCNN().to(D).eval()
    x = torch.randn(2, 1, 8, 8, dtype=D)
    seg = A.tiles((8, 8), 4)
    full = integrated_hessians(model, x, num_samples=16, output_indices=[1, 3])    # (2, 1,8,8, 1,8,8)
    blocks = integrated_hessians(model, x, num_samples=16, output_indices=[1, 3], segments=seg)
    f = full.reshape(2, 64, 64)
    lab = seg.reshape(64)
    onehot = torch.nn.functional.one_hot(lab, 4).to(D)
    torch.testing.assert_close(blocks, torch.einsum("nij,is,jt->nst", f, onehot, onehot))


def test_cd_interactions_equal_three_reference_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(D).eval()
    x = torch.randn(1, 1, 12, 12, dtype=D)
    seg = A.tiles((12, 12), 6)                                       # 4 segments, 6 pairs
    res = cd_interactions(model, x, seg)
    assert res.interaction.shape == (4, 4, 3)
    for a, b in itertools.combinations(range(4), 2):
        ma, mb = (seg == a).to(D), (seg == b).to(D)
        ra = reference.cd(model, x, ma)[0][0]
        rb = reference.cd(model, x, mb)[0][0]
        rab = reference.cd(model, x, ma + mb)[0][0]
        torch.testing.assert_close(res.interaction[a, b], rab - ra - rb, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(res.interaction[b, a], rab - ra - rb, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(res.single[a], ra, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.matrix(2).diagonal(), res.single[:, 2])
    masks = torch.stack([(seg == s).to(D) for s in range(4)])
    torch.testing.assert_close(cd_interactions(model, x, masks=masks).interaction, res.interaction)

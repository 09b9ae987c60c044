"""The CDEP paired pass runs every node through its rule's paired form (``Rule.paired_total``,
``paired_relevant``): no kind is tested in fastacd/train/cdep.py, a rule added to a set works
in the penalty unchanged, and a Linear over tokens (B, T, F) splits its bias along the
features (it did not: the paired pass viewed the bias at dim 1)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from fastacd import cdep
from fastacd.capture.nodes import call_with
from fastacd.rules import Rule

CDEP_SOURCE = Path(fastacd.__file__).parent / "train" / "cdep.py"
EPS = 1e-20


def _grads(model, pen, x, masks, readme: bool = False):
    """(loss, every parameter's gradient): the penalty alone, or the README's way (the
    model's forward first, the penalty riding on it)."""
    model.zero_grad()
    if readme:
        loss = model(x).square().mean() + 0.7 * pen(x, masks)
    else:
        loss = pen(x, masks)
    loss.backward()
    return loss.detach(), torch.cat([q.grad.flatten() for q in model.parameters()])


# ---------------------------------------------------------------------------- no kind tests
def test_cdep_pass_never_tests_a_rule_kind():
    """issue 15: the pass calls the rules; ``.kind`` is not read in cdep.py at all."""
    tree = ast.parse(CDEP_SOURCE.read_text())
    reads = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == "kind"]
    names = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == "kind"]
    assert reads == [] and names == []


# ---------------------------------------------------------------------------- Linear over tokens
class TokenMLP(nn.Module):
    """A transformer-ish MLP over tokens: Linear on (B, T, F), folded ReLU, LayerNorm over the
    features, a GELU MLP with a residual add, a Linear without bias, then a head on the
    flattened tokens."""

    def __init__(self, feat=6, hidden=8, tokens=5, classes=3):
        super().__init__()
        self.embed = nn.Linear(feat, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)
        self.head = nn.Linear(tokens * hidden, classes)

    def forward(self, x):
        h = F.relu(self.embed(x))
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h.flatten(1))


def _token_case(dtype=torch.float64, k=1):
    torch.manual_seed(0)
    model = TokenMLP().to(dtype)
    with torch.no_grad():  # non-trivial biases and norm parameters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, 5, 6, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    shape = (4, 5, 6) if k == 1 else (k, 4, 5, 6)
    masks = (torch.rand(shape, generator=g) > 0.6).to(dtype)
    return model, x, masks


@pytest.mark.parametrize("k", [1, 2])
def test_token_linear_paired_equals_reference_float64(k):
    model, x, masks = _token_case(k=k)
    ref_p, ref_g = _grads(model, cdep.CDEPPenalty(model, backend="reference", reuse_forward=False), x, masks)
    assert ref_g.abs().sum() > 0
    for kw, readme in (({}, False), ({}, True), ({"fuse": False}, False), ({"fuse": False}, True),
                       ({"low_memory": False}, False), ({"backend": "straightforward"}, False)):
        pen = cdep.CDEPPenalty(model, **kw)
        p, g = _grads(model, pen, x, masks, readme)
        if readme:  # the same loss computed afresh: the forward's term plus the reference penalty
            ref_p_, ref_g_ = _grads(model, cdep.CDEPPenalty(model, backend="reference", reuse_forward=False),
                                    x, masks, readme=True)
        else:
            ref_p_, ref_g_ = ref_p, ref_g
        pen.remove_hooks()
        assert torch.allclose(p, ref_p_, rtol=0, atol=1e-12), (kw, readme)
        assert torch.allclose(g, ref_g_, rtol=1e-9, atol=1e-10), (kw, readme)


def test_token_linear_scores_by_hand():
    """An independent check: one Linear over tokens and a head, CD written out by hand
    (the bias split along the features: pr = (|zr|+eps) / ((|zr|+eps) + (|zi|+eps)))."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(2 * 4, 2)).double()
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    mask = torch.tensor([[[1., 0, 1], [0, 0, 0]], [[0, 1, 0], [1, 1, 1]]], dtype=torch.float64)

    def split(zr, zi, b):
        u, v = zr.abs() + EPS, zi.abs() + EPS
        return zr + u / (u + v) * b, zi + v / (u + v) * b

    l1, l2 = model[0], model[2]
    r, i = mask * x, (1 - mask) * x
    r1, i1 = split(r @ l1.weight.T, i @ l1.weight.T, l1.bias)   # bias along the last dim
    r2, i2 = split(r1.flatten(1) @ l2.weight.T, i1.flatten(1) @ l2.weight.T, l2.bias)
    want = torch.sigmoid(r2 - i2).mean()
    for fuse in (False, True):
        pen = cdep.CDEPPenalty(model, fuse=fuse)
        rel, irrel, out = pen.scores(x, mask)
        assert torch.allclose(rel[0], r2, rtol=0, atol=1e-14)
        assert torch.allclose(irrel[0], i2, rtol=0, atol=1e-14)
        assert torch.allclose(out, model(x), rtol=0, atol=1e-14)
        assert torch.allclose(pen(x, mask), want, rtol=0, atol=1e-15)


def test_token_linear_float32_close_to_float64():
    model, x, masks = _token_case(k=2)
    p64, g64 = _grads(model, cdep.CDEPPenalty(model), x, masks)
    model32 = model.float()
    p32, g32 = _grads(model32, cdep.CDEPPenalty(model32), x.float(), masks.float())
    assert abs(p32.item() - p64.item()) < 1e-6
    assert (g32.double() - g64).abs().max() < 1e-4 * g64.abs().max()


# ---------------------------------------------------------------------------- a new rule
class Rot90(Rule):
    """``torch.rot90``: part-wise (relevant ``f(r)``, irrelevant ``f(i)``), written with the
    reference form only: the paired pass builds its relevant form from it."""
    kind = "rot90"
    functions = (torch.rot90,)
    methods = ("rot90",)
    row = ("`torch.rot90`", "`f(r)`", "`f(i)`")

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return (call_with(step, value_of, {step.dep[0]: r}), call_with(step, value_of, {step.dep[0]: i}))


class Rot90WithRelevant(Rot90):
    def relevant(self, step, rel, values, aux, ops, m):
        return call_with(step, values.__getitem__, {step.dep[0]: rel[step.dep[0]]})


class Rot90Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.rot90(F.relu(self.conv1(x)), 1, dims=[2, 3])
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(h.rot90(2, (2, 3)).flatten(1))


@pytest.mark.parametrize("rule", [Rot90, Rot90WithRelevant])
@pytest.mark.parametrize("k", [1, 2])
def test_a_rule_added_to_a_set_works_in_the_penalty(rule, k):
    """No edit in cdep.py: a rule with only a reference form (paired from it, ``i = a - r``
    with the totals repeated for K*N rows) or with a relevant form too."""
    torch.manual_seed(2)
    model = Rot90Net().double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    masks = (torch.rand((3, 8, 8) if k == 1 else (k, 3, 1, 8, 8), generator=torch.Generator().manual_seed(4))
             > 0.5).double()
    rules = fastacd.rules.DEFAULT.replace(rule())
    with pytest.raises(fastacd.UnsupportedOpError):
        cdep.CDEPPenalty(model)  # the default set has no rot90 rule
    ref_p, ref_g = _grads(model, cdep.CDEPPenalty(model, backend="reference", rules=rules), x, masks)
    for kw in ({}, {"fuse": False}, {"low_memory": False}):
        p, g = _grads(model, cdep.CDEPPenalty(model, rules=rules, **kw), x, masks, readme=False)
        assert torch.allclose(p, ref_p, rtol=0, atol=1e-12), kw
        assert torch.allclose(g, ref_g, rtol=1e-9, atol=1e-10), kw
    rel, irrel, out = cdep.CDEPPenalty(model, rules=rules).scores(x, masks)
    assert torch.allclose(rel + irrel, out.expand_as(rel), rtol=0, atol=1e-12)
    assert torch.allclose(out, model(x), rtol=0, atol=1e-12) and rel.abs().sum() > 0

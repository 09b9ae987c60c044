"""CDEP penalty: formula, masks, gradients against the reference, gradcheck, a short training run."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastacd import cdep
from fastacd.datasets import ColorDigits, DecoyDigits, DemoCNN
from fastacd.engine import compiled_ops
from fastacd.models import DigitsCNN


class TinyNet(nn.Module):
    """conv-bn-relu-maxpool-conv-relu-avgpool-linear: every rule kind CDEP meets in a CNN."""

    def __init__(self, c=2):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _grads(model, pen, x, masks):
    model.zero_grad()
    p = pen(x, masks)
    p.backward()
    return p.detach(), torch.cat([q.grad.flatten() for q in model.parameters()])


# ---------------------------------------------------------------------------- formula, masks
def test_cdep_score_is_mean_softmax_of_relevant_part():
    r, i = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    want = torch.sigmoid(r - i).mean()  # softmax([r, i])[0] = 1 / (1 + exp(i - r))
    assert torch.allclose(cdep.cdep_score(r, i), want, atol=1e-15)


def test_penalty_equals_score_of_reference_cd():
    torch.manual_seed(0)
    model = _randomise_bn(TinyNet()).double().eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    masks = cdep.box_masks([[0, 0, 3, 3], [5, 5, 3, 3], [2, 0, 4, 8]], (8, 8))
    from fastacd.reference.cd import cd as ref_cd
    want = torch.stack([cdep.cdep_score(*ref_cd(model, x[n:n + 1], masks[n])) for n in range(3)])
    # one mask per example: the per-mask mean over N * classes logits
    rel = torch.cat([ref_cd(model, x[n:n + 1], masks[n])[0] for n in range(3)])
    irr = torch.cat([ref_cd(model, x[n:n + 1], masks[n])[1] for n in range(3)])
    got = cdep.CDEPPenalty(model)(x, masks)
    assert torch.allclose(got, cdep.cdep_score(rel, irr), atol=1e-12)
    assert torch.allclose(got, want.mean(), atol=1e-12)


def test_canonical_masks_shapes_and_errors():
    x = torch.zeros(4, 3, 6, 6)
    assert cdep.canonical_masks(x, torch.ones(6, 6)).shape == (1, 4, 1, 6, 6)
    assert cdep.canonical_masks(x, torch.ones(4, 6, 6)).shape == (1, 4, 1, 6, 6)
    assert cdep.canonical_masks(x, torch.ones(4, 3, 6, 6)).shape == (1, 4, 3, 6, 6)
    assert cdep.canonical_masks(x, torch.ones(2, 4, 1, 6, 6)).shape == (2, 4, 1, 6, 6)
    assert cdep.shared_masks(torch.ones(5, 6, 6), 4).shape == (5, 4, 1, 6, 6)
    with pytest.raises(ValueError, match="shared_masks"):
        cdep.canonical_masks(x, torch.ones(5, 6, 6))
    pm = cdep.pixel_masks(4, 3, (6, 6), generator=torch.Generator().manual_seed(0))
    assert pm.shape == (3, 4, 1, 6, 6) and torch.all(pm.sum(dim=(2, 3, 4)) == 1)
    fg = torch.zeros(4, 6, 6)
    fg[:, 2, 3] = 1  # only one allowed pixel per example
    pm = cdep.pixel_masks(4, 2, (6, 6), prob=fg)
    assert torch.all(pm[:, :, 0, 2, 3] == 1)
    bm = cdep.box_masks([[1, 2, 2, 3]], (6, 6))
    assert bm.sum() == 6 and bm[0, 0, 1:3, 2:5].sum() == 6


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("per_example_k", [1, 3])
def test_penalty_gradients_paired_engine_reference_float64(per_example_k):
    torch.manual_seed(1)
    model = _randomise_bn(TinyNet()).double().eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    if per_example_k == 1:
        masks = cdep.box_masks([[0, 0, 3, 3], [5, 0, 3, 3], [2, 2, 4, 4]], (8, 8))
    else:
        masks = cdep.pixel_masks(3, per_example_k, (8, 8), generator=torch.Generator().manual_seed(2))
    ref_p, ref_g = _grads(model, cdep.CDEPPenalty(model, backend="reference"), x, masks)
    for kw in ({"backend": "paired"}, {"backend": "paired", "low_memory": False},
               {"backend": "engine"}, {"backend": "straightforward"}):
        p, g = _grads(model, cdep.CDEPPenalty(model, **kw), x, masks)
        assert torch.allclose(p, ref_p, atol=1e-12), kw
        assert torch.allclose(g, ref_g, atol=1e-10, rtol=1e-8), kw
    assert ref_g.abs().sum() > 0


@pytest.mark.skipif(compiled_ops() is None, reason="compiled extension not built")
def test_penalty_gradients_compiled_ops_match_torch_float64():
    torch.manual_seed(3)
    model = DemoCNN(width=4).double().eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    masks = cdep.box_masks([[0, 0, 5, 5], [23, 0, 5, 5], [10, 10, 4, 4]], (28, 28))
    p0, g0 = _grads(model, cdep.CDEPPenalty(model), x, masks)
    p1, g1 = _grads(model, cdep.CDEPPenalty(model, use_compiled=True), x, masks)
    assert torch.allclose(p0, p1, atol=1e-12) and torch.allclose(g0, g1, atol=1e-10)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_bias_split_closed_form_backward_gradcheck(relu, k):
    torch.manual_seed(4)
    zr = torch.randn(2 * k, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    total = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda a, t, b: cdep._BiasSplitPaired.apply(a, t, b, relu, k, False)
    assert torch.autograd.gradcheck(fn, (zr, total, bias))
    g = torch.randn(2 * k, 3, 4, 4, dtype=torch.float64)
    got = torch.autograd.grad(fn(zr, total, bias), (zr, total, bias), g)
    want = torch.autograd.grad(cdep._bias_split_paired(zr, total, bias, relu, k), (zr, total, bias), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-13)


def test_penalty_gradcheck_tiny_model():
    torch.manual_seed(5)
    model = _randomise_bn(TinyNet(c=1)).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    masks = cdep.box_masks([[0, 0, 4, 4], [3, 3, 5, 5]], (8, 8))
    pen = cdep.CDEPPenalty(model)
    # the input and a few parameters of every rule kind (conv bias split, batchnorm, linear)
    names = ["conv1.bias", "bn.weight", "bn.bias", "conv2.bias", "fc.bias"]
    params = tuple(model.get_parameter(n).detach().clone().requires_grad_() for n in names)

    def f(xx, *ps):
        return _with_params(model, names, ps, lambda: pen(xx, masks))

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),) + params, atol=1e-6,
                                    fast_mode=True)


def _with_params(model, names, ps, fn):
    """Run fn with the model's parameters replaced by ps (so gradcheck can vary them)."""
    mods = dict(model.named_modules())
    saved = []
    for name, p in zip(names, ps):
        owner, attr = name.rsplit(".", 1)
        mod = mods[owner]
        saved.append((mod, attr, mod._parameters[attr]))
        del mod._parameters[attr]
        setattr(mod, attr, p)
    try:
        return fn()
    finally:
        for mod, attr, old in saved:
            delattr(mod, attr)
            mod._parameters[attr] = old


def test_low_memory_saves_fewer_bytes_for_backward():
    torch.manual_seed(6)
    model = DemoCNN(width=8)
    x = torch.randn(8, 1, 28, 28)
    masks = cdep.box_masks([[0, 0, 4, 4]] * 8, (28, 28))

    def saved_bytes(low):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cdep.CDEPPenalty(model, low_memory=low)(x, masks)
        return total[0]

    def plain_bytes():
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return total[0]
    low, high, plain = saved_bytes(True), saved_bytes(False), plain_bytes()
    # measured: low / high = 0.67, low / plain = 2.4 (the relevant pass saves the conv
    # inputs and pre-activations of N masks, the true pass what a plain forward saves)
    assert low < 0.75 * high
    assert low < 2.5 * plain


# ---------------------------------------------------------------------------- API behaviour
def test_mode_restored_and_logits_refused_for_dropout_bn_models():
    model = DigitsCNN().train()
    pen = cdep.CDEPPenalty(model)
    x = torch.randn(2, 1, 28, 28)
    p = pen(x, torch.ones(28, 28))
    assert p.requires_grad and model.training and model.features[4].training
    with pytest.raises(ValueError, match="forward_with_penalty"):
        pen.forward_with_penalty(x, torch.ones(28, 28))
    plain = DemoCNN().eval()
    logits, _ = cdep.CDEPPenalty(plain).forward_with_penalty(x, torch.ones(28, 28))
    assert torch.allclose(logits, plain(x), atol=1e-5)


def test_bad_input_errors():
    with pytest.raises(TypeError):
        cdep.CDEPPenalty("not a model")
    with pytest.raises(ValueError, match="backend"):
        cdep.CDEPPenalty(DemoCNN(), backend="nope")
    with pytest.raises(ValueError, match="do not fit"):
        cdep.CDEPPenalty(DemoCNN())(torch.randn(2, 1, 28, 28), torch.ones(3, 1, 27, 27))


def test_datasets_confound_train_not_test():
    tr, te = DecoyDigits("train"), DecoyDigits("test")
    # the patch brightness equals (label + 1) / 10 in training only
    raw = lambda d: (d.x[:, 0] * 1).masked_select(d.masks[:, 0].bool()).reshape(len(d), -1)[:, 0]
    tr_v, te_v = raw(tr), raw(te)
    assert len(set(zip(tr.y.tolist(), tr_v.round(decimals=4).tolist()))) == 10
    assert len(set(zip(te.y.tolist(), te_v.round(decimals=4).tolist()))) > 50
    c_tr, c_te = ColorDigits("train"), ColorDigits("test")
    assert torch.equal(c_tr.colors, c_tr.y) and (c_te.colors != c_te.y).float().mean() > 0.8
    assert c_tr.x.shape[1:] == (3, 28, 28) and len(c_tr) + len(c_te) == 1797


# ---------------------------------------------------------------------------- training
def _train_decoy(lam, seed=0, epochs=2, n=600, bs=50):
    torch.manual_seed(seed)
    tr = DecoyDigits("train", seed)
    model = DemoCNN(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pen = cdep.CDEPPenalty(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            i = perm[s:s + bs]
            opt.zero_grad()
            logits, p = pen.forward_with_penalty(tr.x[i], tr.masks[i])
            (F.cross_entropy(logits, tr.y[i]) + lam * p).backward()
            opt.step()
    return model, pen


def decoy_share(model, pen, data, n=200):
    """Mean |relevant| / (|relevant| + |irrelevant|) of the true class's logit, for the decoy patch."""
    with torch.no_grad():
        rel, irrel, _ = pen.scores(data.x[:n], data.masks[:n])
    y = data.y[:n, None]
    r, i = rel[0].gather(1, y).abs(), irrel[0].gather(1, y).abs()
    return (r / (r + i)).mean().item()


@pytest.mark.slow
def test_penalty_lowers_decoy_share_in_short_training():
    te = DecoyDigits("test", 0)
    m0, p0 = _train_decoy(0.0)
    m1, p1 = _train_decoy(LAM_TEST)
    s0, s1 = decoy_share(m0, p0, te), decoy_share(m1, p1, te)
    assert s1 < 0.5 * s0, (s0, s1)


LAM_TEST = 30.0

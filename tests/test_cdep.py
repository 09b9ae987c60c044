"""CDEP penalty: formula, masks, gradients against the reference, gradcheck, a short training run."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastacd import cdep
from fastacd.train.datasets import ColorDigits, DecoyDigits, DemoCNN
from fastacd.engine.decomposer import compiled_ops
from fastacd.train.models import DigitsCNN


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
    for kw in ({"backend": "paired"}, {"backend": "paired", "fuse": False},
               {"backend": "paired", "low_memory": False},
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


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_affine_paired_backward_gradcheck(relu, k, fuse):
    """The merged true + relevant conv output: both outputs' closed-form gradients, plain and
    through the compiled (fused) kernels."""
    torch.manual_seed(7)
    both = torch.randn(2 + 2 * k, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda t, b: cdep._AffinePaired.apply(t, b, 2, k, relu, fuse)
    assert torch.autograd.gradcheck(fn, (both, bias))
    zr = torch.randn(2 * k, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    total = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    split = lambda a, t, b: cdep._BiasSplitPaired.apply(a, t, b, relu, k, fuse)
    assert torch.autograd.gradcheck(split, (zr, total, bias))


@pytest.mark.parametrize("relu", [False, True])
def test_split_backward_finite_float32_where_both_parts_are_zero(relu):
    """zr = 0 and a zero true pre-activation (a dead region): s = 2e-20, s^2 underflows in
    float32; the closed form must stay finite and equal autograd's gradient."""
    torch.manual_seed(8)
    zr, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    zr[:, :, 0] = 0
    t[:, :, 0, :2] = 0
    bias, g = torch.rand(3) + 0.5, torch.randn(2, 3, 4, 4)
    d_zr, d_t, g_pr = cdep._split_grad(zr, t, bias[:, None, None], g, relu)
    leaves = [q.clone().requires_grad_() for q in (zr, t, bias)]
    want = torch.autograd.grad(cdep._torch_ops.bias_split(*leaves, relu), leaves, g)
    for a, b in zip((d_zr, d_t, cdep._channel_sum(g_pr)), want):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)
    # the same through the fused kernel, from the layer's output with bias (t + b)
    total = t + bias[:, None, None]
    leaves = [q.clone().requires_grad_() for q in (zr, total, bias)]
    want = torch.autograd.grad(cdep._bias_split_paired(*leaves, relu, 1), leaves, g)
    d_zr, d_total, s_gpr, s_total = cdep._FUSED["_total_split_bwd"](zr, total, bias, g, 1, relu)
    for a, b in zip((d_zr, d_total, s_gpr.sum(0) - s_total.sum(0)), want):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)


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


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward, deduplicated by storage."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_low_memory_saves_fewer_bytes_for_backward():
    torch.manual_seed(6)
    model = DemoCNN(width=8)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    masks = cdep.box_masks([[0, 0, 4, 4]] * 8, (28, 28))

    def step(low):
        logits, p = cdep.CDEPPenalty(model, low_memory=low).forward_with_penalty(x, masks)
        return F.cross_entropy(logits, y) + p
    low, high = _saved_bytes(lambda: step(True)), _saved_bytes(lambda: step(False))
    plain = _saved_bytes(lambda: F.cross_entropy(model(x), y))
    # measured: low / high = 0.39, low / plain = 1.54 (the relevant pass keeps the conv
    # inputs and pre-activations of N masks; the true pass keeps a plain forward's
    # max-pool indices and conv inputs, and its pre-ReLU maps instead of the ReLU outputs)
    assert low < 0.6 * high
    assert low < 2.0 * plain


# ---------------------------------------------------------------------------- riding on the forward
def _spy_forward(monkeypatch):
    """Record the recorded-forward values each paired_cd call receives."""
    seen, orig = [], cdep.paired_cd

    def spy(*args, **kw):
        seen.append(kw.get("forward"))
        return orig(*args, **kw)
    monkeypatch.setattr(cdep, "paired_cd", spy)
    return seen


def _params_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), torch.cat([q.grad.flatten() for q in model.parameters()])


@pytest.mark.parametrize("fuse", [False, True])
def test_penalty_after_forward_reuses_it_exactly_float64(monkeypatch, fuse):
    """The README's way: loss(model(x), y) + lam * penalty(x, masks) takes the true activations
    from that forward, and gives the same loss and gradients as a penalty computed afresh."""
    torch.manual_seed(9)
    model = DemoCNN(width=4).double()
    x, y = torch.randn(3, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 4, 7])
    masks = cdep.box_masks([[0, 0, 6, 6], [20, 3, 6, 6], [9, 9, 5, 5]], (28, 28))
    pen = cdep.CDEPPenalty(model, fuse=fuse)
    fresh = cdep.CDEPPenalty(model, fuse=fuse, reuse_forward=False)
    seen = _spy_forward(monkeypatch)
    got = _params_grads(model, lambda: F.cross_entropy(model(x), y) + 10 * pen(x, masks))
    assert {n.target for n in seen[-1]} == {f"features.{i}" for i in range(6)} | \
        {f"classifier.{i}" for i in range(4)}  # every module's output
    want = _params_grads(model, lambda: F.cross_entropy(model(x), y) + 10 * fresh(x, masks))
    assert seen[-1] is None
    assert torch.allclose(got[0], want[0], atol=1e-12)
    assert torch.allclose(got[1], want[1], atol=1e-10, rtol=1e-10)
    logits, p = pen.forward_with_penalty(x, masks)  # one pass, nothing recorded
    assert torch.allclose(F.cross_entropy(logits, y) + 10 * p, want[0], atol=1e-12)


def test_recorded_forward_not_reused_when_stale(monkeypatch):
    torch.manual_seed(10)
    model = DemoCNN(width=4)
    x = torch.randn(2, 1, 28, 28)
    masks = torch.ones(28, 28)
    pen = cdep.CDEPPenalty(model)
    seen = _spy_forward(monkeypatch)
    model(x)
    pen(x, masks)
    assert len(seen[-1]) == 10
    pen(x, masks)  # the record is used once
    model(x)
    pen(x.clone(), masks)  # another tensor
    model(x)
    with torch.no_grad():
        model.features[0].bias.add_(0.1)  # an optimizer step
    pen(x, masks)
    model(x)
    x.mul_(1.0)  # the batch changed in place
    pen(x, masks)
    with torch.no_grad():
        model(x)  # nothing is recorded without gradients
    pen(x, masks)
    model(x)
    model(torch.randn(2, 1, 28, 28))  # a later forward replaces the record
    pen(x, masks)
    assert seen[1:] == [None] * 6


def test_train_mode_forward_reused_only_up_to_dropout_and_batchnorm(monkeypatch):
    """DigitsCNN in training mode (batchnorm after the 2nd conv, dropout in the head): the
    activations before the batchnorm are reused, the rest computed again in eval behaviour;
    the penalty and its gradients equal the penalty computed afresh."""
    torch.manual_seed(11)
    model = _randomise_bn(DigitsCNN()).double().train()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    masks = cdep.box_masks([[0, 0, 7, 7]] * 3, (28, 28))
    pen = cdep.CDEPPenalty(model)
    fresh = cdep.CDEPPenalty(model, reuse_forward=False)
    seen = _spy_forward(monkeypatch)
    model(x)  # batchnorm in training mode: batch statistics, running statistics updated
    got = pen(x, masks)
    assert {n.target for n in seen[-1]} == {"features.0", "features.1", "features.2", "features.3"}
    g_got = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    want = fresh(x, masks)
    g_want = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    assert torch.allclose(got, want, atol=1e-12)
    for a, b in zip(g_got, g_want):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-10, rtol=1e-10)
    assert model.training and model.features[4].training


def test_in_place_relu_output_not_reused_for_its_conv(monkeypatch):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 3])
    masks = cdep.box_masks([[0, 0, 3, 3], [4, 4, 4, 4]], (8, 8))
    pen, fresh = cdep.CDEPPenalty(model), cdep.CDEPPenalty(model, reuse_forward=False)
    seen = _spy_forward(monkeypatch)
    got = _params_grads(model, lambda: F.cross_entropy(model(x), y) + pen(x, masks))
    assert {n.target for n in seen[-1]} == {"1", "2", "3", "4"}  # the conv's output was overwritten
    want = _params_grads(model, lambda: F.cross_entropy(model(x), y) + fresh(x, masks))
    assert torch.allclose(got[0], want[0], atol=1e-12) and torch.allclose(got[1], want[1], atol=1e-10)


def test_hooks_do_not_keep_the_penalty_and_pickle_as_no_ops():
    import copy
    import gc
    import io
    model = DemoCNN(width=4)
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    pen = cdep.CDEPPenalty(model)
    assert hooks() == 12  # the model (pre and post) and its 10 modules
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(torch.load(buf, weights_only=False)(x), model(x))
    assert torch.allclose(copy.deepcopy(model)(x), model(x))
    del pen
    gc.collect()
    assert hooks() == 0
    pen = cdep.CDEPPenalty(model)
    pen.remove_hooks()
    assert hooks() == 0 and torch.isfinite(pen(x, torch.ones(28, 28)))


def test_a_hook_added_after_the_penalty_is_refused():
    """The penalty's CD never calls the modules: a hook that doubles a conv's output moved the
    penalty (0.529 -> 0.544 on this model) without changing the relevant part's path. Its own
    recorder hooks are allowed; a user's hook is named at the next call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    pen = cdep.CDEPPenalty(model)
    x, masks = torch.randn(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)
    masks[:, :, :2] = 1
    model(x)
    before = pen(x, masks)
    handle = model[0].register_forward_hook(lambda mod, i, o: 2 * o)
    model(x)
    with pytest.raises(TypeError, match="forward hook <lambda> on '0'"):
        pen(x, masks)
    handle.remove()
    model(x)
    assert torch.equal(pen(x, masks), before)


def test_penalty_equals_straightforward_on_vgg_style_cnn_float64():
    """The benchmark's 3-block VGG-style CNN (narrow): fused default vs the straightforward
    implementation (relevant and irrelevant parts propagated separately)."""
    from fastacd.train.models import VGGStyleCNN
    torch.manual_seed(13)
    model = VGGStyleCNN(width=4, hidden=16).double()
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 5, 9])
    masks = cdep.box_masks([[0, 0, 6, 6], [10, 20, 6, 6], [26, 26, 6, 6]], (32, 32))
    pen, ref = cdep.CDEPPenalty(model), cdep.CDEPPenalty(model, backend="straightforward")
    got = _params_grads(model, lambda: F.cross_entropy(model(x), y) + 10 * pen(x, masks))
    want = _params_grads(model, lambda: F.cross_entropy(model(x), y) + 10 * ref(x, masks))
    assert torch.allclose(got[0], want[0], atol=1e-12)
    assert torch.allclose(got[1], want[1], atol=1e-10, rtol=1e-10)


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
    tr, val, te = DecoyDigits("train"), DecoyDigits("val"), DecoyDigits("test")
    assert (len(tr), len(val), len(te)) == (1000, 200, 597)
    assert len(DecoyDigits("train_all")) == 1200
    # band decoy: the bright block's column is 4 + 2 * label in training only
    col = lambda d: d.x[:, 0, 0].argmax(1)
    assert torch.equal(col(tr), 4 + 2 * tr.y) and torch.equal(tr.code, tr.y)
    for d in (val, te):
        assert torch.equal(col(d), 4 + 2 * d.code) and (d.code != d.y).float().mean() > 0.8
    assert torch.equal(DecoyDigits("val", confound="train").code, val.y)
    assert bool((tr.masks[:, 0, :4] == 1).all()) and tr.masks.sum() == 1000 * 4 * 28
    # patch decoy: the brightness equals (label + 1) / 10 in training only
    ptr, pte = DecoyDigits("train", style="patch"), DecoyDigits("test", style="patch")
    raw = lambda d: d.x[:, 0].masked_select(d.masks[:, 0].bool()).reshape(len(d), -1)[:, 0]
    assert len(set(zip(ptr.y.tolist(), raw(ptr).round(decimals=4).tolist()))) == 10
    assert len(set(zip(pte.y.tolist(), raw(pte).round(decimals=4).tolist()))) > 50
    c_tr, c_val, c_te = ColorDigits("train"), ColorDigits("val"), ColorDigits("test")
    assert torch.equal(c_tr.colors, c_tr.y) and (c_te.colors != c_te.y).float().mean() > 0.8
    assert (c_val.colors != c_val.y).float().mean() > 0.8
    assert c_tr.x.shape[1:] == (3, 28, 28) and len(c_tr) + len(c_val) + len(c_te) == 1797
    with pytest.raises(ValueError, match="split"):
        DecoyDigits("nope")


# ---------------------------------------------------------------------------- training
def _train_decoy(lam, seed=0, epochs=2, n=600, bs=50):
    torch.manual_seed(seed)
    tr = DecoyDigits("train_all", seed, style="patch")
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
    te = DecoyDigits("test", 0, style="patch")
    m0, p0 = _train_decoy(0.0)
    m1, p1 = _train_decoy(LAM_TEST)
    s0, s1 = decoy_share(m0, p0, te), decoy_share(m1, p1, te)
    assert s1 < 0.5 * s0, (s0, s1)


LAM_TEST = 30.0


# ---------------------------------------------------------------------------- text penalty
from fastacd.train.datasets import DecoyText  # noqa: E402
from fastacd.reference.text import lstm_cd as ref_lstm_cd  # noqa: E402
from fastacd.text.sentiment_toy import SentimentLSTM  # noqa: E402


def _tiny_text_model(layers=1, bidirectional=False, vocab=12, e=4, h=3, seed=0):
    torch.manual_seed(seed)
    model = SentimentLSTM(vocab_size=vocab, embed_dim=e, hidden_dim=h)
    model.lstm = nn.LSTM(e, h, num_layers=layers, bidirectional=bidirectional)
    model.hidden_to_label = nn.Linear(h * (2 if bidirectional else 1), 2)
    return model.double()


def _ref_text_penalty(model, tokens, masks, labels, score, readout="last"):
    """The straightforward implementation: relevant and irrelevant parts propagated
    separately (fastacd.reference.text.lstm_cd), one sentence and mask at a time."""
    x = model.embed(tokens)
    w = model.hidden_to_label.weight
    per_mask = []
    for k in range(masks.shape[0]):
        terms = []
        for n in range(tokens.shape[1]):
            if masks[k, n].sum() == 0:
                continue
            r, i = ref_lstm_cd(x[:, n], model.lstm, masks[k, n], readout)
            r, i = w @ r, w @ i
            if score == "log":
                y = int(labels[n])
                terms.append(-torch.log_softmax(torch.stack([r[y], i[y]]), 0)[1])
            else:
                terms.append(torch.softmax(torch.stack([r, i], 1), 1)[:, 0].mean())
        if terms:
            per_mask.append(torch.stack(terms).mean())
    return torch.stack(per_mask).mean()


@pytest.mark.parametrize("layers,bidirectional,readout", [(1, False, "last"), (2, True, "last"),
                                                          (2, True, "final")])
def test_text_scores_match_reference_cd(layers, bidirectional, readout):
    model = _tiny_text_model(layers, bidirectional)
    tokens = torch.randint(0, 12, (6, 3), generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(2)) < 0.4).double()
    pen = cdep.TextCDEPPenalty(embed=model.embed, lstm=model.lstm, head=model.hidden_to_label,
                               readout=readout)
    rel, irrel, logits = pen.scores(tokens, masks)
    x = model.embed(tokens)
    for k in range(2):
        for n in range(3):
            r, i = ref_lstm_cd(x[:, n], model.lstm, masks[k, n], readout)
            assert torch.allclose(rel[k, n], model.hidden_to_label.weight @ r, atol=1e-12)
            assert torch.allclose(irrel[k, n], model.hidden_to_label.weight @ i, atol=1e-12)
    if readout == "last":  # the shared true pass is the model's forward
        assert torch.allclose(logits, model(tokens), atol=1e-12)
    handle = model.lstm.register_forward_hook(lambda mod, i, o: o)  # computed from weights: refused
    with pytest.raises(TypeError, match="forward hook <lambda> on 'LSTM'"):
        pen.scores(tokens, masks)
    handle.remove()


def _param_grads(model, fn):
    model.zero_grad()
    p = fn()
    p.backward()
    return p.detach(), torch.cat([torch.zeros_like(q).flatten() if q.grad is None else q.grad.flatten()
                                  for q in model.parameters()])


@pytest.mark.parametrize("score", ["log", "prob"])
def test_text_penalty_gradients_match_reference_float64(score):
    model = _tiny_text_model(vocab=12, e=4, h=3, seed=3)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 12, (7, 4), generator=gen)
    labels = torch.tensor([0, 1, 1, 0])
    masks = torch.zeros(2, 4, 7, dtype=torch.float64)
    masks[0, 0, 2] = masks[0, 1, 5] = masks[0, 2, 0] = masks[0, 3, 6] = 1   # one decoy each
    masks[1, 0, 1:4] = masks[1, 2, 4:7] = 1                                  # phrases; 2 empty
    ref_p, ref_g = _param_grads(model, lambda: _ref_text_penalty(model, tokens, masks, labels, score))
    cells = ["torch"] + (["compiled"] if compiled_ops() is not None else [])
    for cell in cells:
        pen = cdep.TextCDEPPenalty(model, score=score, cell=cell)
        p, g = _param_grads(model, lambda: pen(tokens, masks, labels))
        assert torch.allclose(p, ref_p, atol=1e-12), cell
        assert torch.allclose(g, ref_g, atol=1e-10, rtol=1e-8), cell
    assert ref_g.abs().sum() > 0


def test_text_penalty_gradcheck_tiny_lstm():
    model = _tiny_text_model(e=2, h=2, seed=5)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    masks = torch.tensor([[[0, 1, 0, 0], [1, 1, 0, 0]]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    w_ih, w_hh = (p.detach().clone().requires_grad_() for p in (model.lstm.weight_ih_l0, model.lstm.weight_hh_l0))
    bias = (model.lstm.bias_ih_l0 + model.lstm.bias_hh_l0).detach().clone().requires_grad_()
    head = model.hidden_to_label.weight.detach().clone().requires_grad_()

    def f(x, w_ih, w_hh, bias, head):
        rel, feats = cdep.paired_text_cd(x, [[(w_ih, w_hh, bias)]], masks)
        r, t = rel @ head.T, feats @ head.T
        return cdep.text_cdep_terms(r, t - r, labels, "log")

    assert torch.autograd.gradcheck(f, (x, w_ih, w_hh, bias, head))


def test_text_masks_and_errors():
    tokens = torch.tensor([[3, 1], [5, 3], [2, 2]])  # (T=3, N=2)
    m = cdep.token_masks(tokens, [3])
    assert m.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert cdep.token_masks(tokens.T, [3], batch_first=True).tolist() == [[1, 0, 0], [0, 1, 0]]
    model = _tiny_text_model()
    pen = cdep.TextCDEPPenalty(model)
    with pytest.raises(ValueError, match="labels"):
        pen(tokens, m)
    with pytest.raises(ValueError, match="masks must be"):
        pen(tokens, torch.ones(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="vocabulary"):
        pen(tokens + 100, m, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="score"):
        cdep.TextCDEPPenalty(model, score="nope")
    empty = pen(tokens, torch.zeros(2, 3), torch.tensor([0, 1]))  # no mask: zero penalty
    assert empty.item() == 0
    # a batch_first LSTM takes (N, T) tokens; masks stay (N, T)
    bf = nn.LSTM(4, 3, batch_first=True).double()
    bf.load_state_dict(model.lstm.state_dict())
    pen_bf = cdep.TextCDEPPenalty(embed=model.embed, lstm=bf, head=model.hidden_to_label)
    assert torch.allclose(pen_bf(tokens.T, m, torch.tensor([0, 1])), pen(tokens, m, torch.tensor([0, 1])))


def test_decoy_text_confound_train_not_test():
    tr, te = DecoyText("train", 200, 0), DecoyText("test", 200, 0)
    for d in (tr, te):
        at = d.tokens.T.gather(1, d.decoy_pos[:, None])[:, 0]
        assert torch.isin(at, torch.tensor(d.decoy_ids)).all() and d.masks.sum(1).eq(1).all()
        assert (d.tokens[-1] != 0).all()  # left-padded: the last position is a word
    word = lambda d: d.tokens.T.gather(1, d.decoy_pos[:, None])[:, 0] == d.decoy_ids[1]
    assert torch.equal(word(tr).long(), tr.y)
    assert 0.3 < (word(te).long() == te.y).float().mean() < 0.7


def _train_decoy_text(lam, steps=120, seed=0):
    tr = DecoyText("train", 1000, seed)
    torch.manual_seed(seed)
    model = SentimentLSTM(vocab_size=len(tr.vocab))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    pen = cdep.TextCDEPPenalty(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(tr), (64,), generator=g)
        opt.zero_grad()
        logits, p = pen.forward_with_penalty(tr.tokens[:, i], tr.masks[i], tr.y[i])
        (F.cross_entropy(logits, tr.y[i]) + lam * p).backward()
        opt.step()
    return model, pen


def decoy_text_share(pen, data):
    with torch.no_grad():
        rel, irrel, _ = pen.scores(data.tokens, data.masks)
    y = data.y[:, None]
    r, i = rel[0].gather(1, y).abs(), irrel[0].gather(1, y).abs()
    return (r / (r + i)).mean().item()


@pytest.mark.slow
def test_text_penalty_lowers_decoy_share_in_short_training():
    te = DecoyText("test", 300, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and contention)
    try:
        _, p0 = _train_decoy_text(0.0)
        _, p1 = _train_decoy_text(10.0)
    finally:
        torch.set_num_threads(threads)
    s0, s1 = decoy_text_share(p0, te), decoy_text_share(p1, te)
    assert s1 < 0.5 * s0, (s0, s1)

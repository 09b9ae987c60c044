"""Bad input gets a clear error that says what was wrong and what to do."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd

from models import FunctionalNet


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FunctionalNet().eval()


@pytest.fixture
def x():
    return torch.randn(1, 3, 16, 16)


def test_mask_of_the_wrong_size(model, x):
    with pytest.raises(ValueError, match=r"mask shape \(15, 16\) does not fit the input of shape \(1, 3, 16, 16\)"):
        fastacd.Decomposer(model).cd(x, torch.ones(15, 16))
    with pytest.raises(ValueError, match="expected"):
        fastacd.Decomposer(model).cd(x, torch.ones(4, 2, 16, 16))


def test_empty_mask_batch(model, x):
    with pytest.raises(ValueError, match="empty mask batch"):
        fastacd.Decomposer(model).cd(x, torch.ones(0, 16, 16))


def test_nan_and_inf_in_input(model, x):
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastacd.Decomposer(model).cd(bad, torch.ones(16, 16))
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastacd.cd(bad, model, torch.ones(16, 16))


def test_nan_in_mask(model, x):
    m = torch.ones(16, 16)
    m[3, 3] = float("nan")
    with pytest.raises(ValueError, match="masks contain NaN"):
        fastacd.Decomposer(model).cd(x, m)


def test_model_in_training_mode(model, x):
    dec = fastacd.Decomposer(model)
    model.train()
    with pytest.raises(ValueError, match=r"training mode .*Call model.eval\(\)"):
        dec.cd(x, torch.ones(16, 16))  # switched after capture
    with pytest.raises(ValueError, match=r"training mode .*Call model.eval\(\)"):
        fastacd.Decomposer(model)


def test_device_mismatch(model, x):
    meta_x = torch.empty(1, 3, 16, 16, device="meta")
    with pytest.raises(ValueError, match=r"input is on the meta device"):
        fastacd.Decomposer(model).cd(meta_x, torch.ones(16, 16))


def test_dtype_mismatch(model, x):
    with pytest.raises(TypeError, match=r"input is torch.float64 but the model's parameters are torch.float32"):
        fastacd.Decomposer(model).cd(x.double(), torch.ones(16, 16))


def test_batch_of_images_is_refused(model):
    with pytest.raises(ValueError, match="batch dimension of 1"):
        fastacd.Decomposer(model).cd(torch.randn(2, 3, 16, 16), torch.ones(16, 16))


def test_unknown_backend(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        fastacd.Decomposer(model, backend="fast")


class Exp(nn.Module):
    """exp has no CD rule (not f(0) = 0, not a gate)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.exp(y).flatten(1)


class WithLPPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.LPPool2d(2, 2)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(1)


def test_unsupported_op_names_the_op_the_node_and_the_fix():
    with pytest.raises(fastacd.UnsupportedOpError) as err:
        fastacd.Decomposer(Exp().eval())
    msg = str(err.value)
    assert "torch.exp" in msg and "graph node 'exp'" in msg
    assert "fastacd.register_rule" in msg


def test_unsupported_module_names_its_path():
    with pytest.raises(fastacd.UnsupportedOpError, match=r"(?s)module 'pool' \(LPPool2d\).*fastacd.register_rule"):
        fastacd.Decomposer(WithLPPool().eval())


def test_product_of_two_dependent_values_is_refused():
    class Ratio(nn.Module):  # a quotient of a value by itself: no rule (a product has one)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y / y
    with pytest.raises(fastacd.UnsupportedOpError, match="product or quotient of two input-dependent"):
        fastacd.Decomposer(Ratio().eval())


def test_softmax_inside_the_network_is_refused():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(F.softmax(x, dim=1))
    with pytest.raises(fastacd.UnsupportedOpError, match="softmax inside the network"):
        fastacd.Decomposer(Attn().eval())


def test_register_rule_makes_a_new_module_work():
    class Blur(nn.Module):  # a fixed linear filter
        def forward(self, x):
            return F.avg_pool2d(x, 3, stride=1, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.blur = Blur()
            self.fc = nn.Linear(4 * 14 * 14, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.blur(F.relu(self.conv(x))), 1))

    torch.manual_seed(0)
    net = Net().eval().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    masks = (torch.rand(3, 1, 16, 16) > 0.5).double()
    fastacd.register_rule(Blur, "linear")
    try:
        dec = fastacd.Decomposer(net)
        assert dec.graph.steps[[n for n in dec.graph.nodes if n.target == "blur"][0]].kind == "linear"
        res = dec.cd(x, masks)
        rel, irrel = fastacd.reference.cd(net, x, masks)
        torch.testing.assert_close(res.relevant, rel, rtol=1e-10, atol=1e-12)
    finally:
        from fastacd.rules.base import _USER_RULES
        _USER_RULES.pop(Blur)
    with pytest.raises(ValueError, match="kind must be one of"):
        fastacd.register_rule(Blur, "magic")


def test_untraceable_model_says_why():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x.flatten(1)
            return -x.flatten(1)
    with pytest.raises(fastacd.UnsupportedOpError, match="could not trace Branchy with torch.fx"):
        fastacd.Decomposer(Branchy().eval(), capture="fx")
    # capture="auto" tries torch.export on the first input: control flow on values fails there too
    with pytest.warns(UserWarning, match="torch.export"):
        dec = fastacd.Decomposer(Branchy().eval())
    with pytest.raises(fastacd.UnsupportedOpError,
                       match="(?s)could not trace Branchy with torch.fx.*torch.export either"):
        dec.cd(torch.randn(1, 4), torch.ones(4))


def test_cd_without_mask_or_transform(model, x):
    with pytest.raises(ValueError, match="either a mask or a transform"):
        fastacd.cd(x, model)


# ------------------------------------------------------------------ API edges (issue 17 item 6)
def _api_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).double()


def test_hierarchy_keeps_the_callers_model_mode():
    model = _api_model().train()
    fastacd.hierarchy(model, torch.randn(1, 1, 8, 8, dtype=torch.float64), sweep_dim=4, num_iters=1)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("label, message", [(True, "class index"), (3, "0..2"), (-1, "0..2"), (1.5, "class index")])
def test_hierarchy_label_is_checked(label, message):
    with pytest.raises(ValueError, match=message):
        fastacd.hierarchy(_api_model().eval(), torch.randn(1, 1, 8, 8, dtype=torch.float64), label=label,
                          sweep_dim=4, num_iters=1)


def test_zero_iterations_is_refused():
    with pytest.raises(ValueError, match="num_iters must be a positive integer"):
        fastacd.hierarchy(_api_model().eval(), torch.randn(1, 1, 8, 8, dtype=torch.float64), sweep_dim=4,
                          num_iters=0)


def test_nan_weights_are_named():
    model = _api_model().eval()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite.*3\.weight"):
        fastacd.Decomposer(model).cd(torch.randn(1, 1, 8, 8, dtype=torch.float64), torch.ones(8, 8))


@pytest.mark.parametrize("budget, expect", [("1G", 1 << 30), ("512M", 512 << 20), ("2gb", 2 << 30), (4096, 4096)])
def test_memory_budget_accepts_sizes(budget, expect):
    assert fastacd.Decomposer(_api_model().eval(), memory_budget=budget).memory_budget == expect


@pytest.mark.parametrize("budget, error", [(-5, ValueError), (0, ValueError), ("lots", ValueError), ([1], TypeError),
                                           (True, TypeError)])
def test_memory_budget_refuses_nonsense(budget, error):
    with pytest.raises(error, match="memory_budget"):
        fastacd.Decomposer(_api_model().eval(), memory_budget=budget)


def test_grad_mode_beyond_the_budget_is_a_clear_error():
    """With autograd recording every chunk's activations stay alive: the budget cannot bound
    them, so the call is refused (under no_grad the same call runs in chunks)."""
    model = _api_model().eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    masks = torch.ones(500, 8, 8, dtype=torch.float64)
    dec = fastacd.Decomposer(model, memory_budget=64 << 10)
    with pytest.raises(ValueError, match=r"autograd recording.*torch.no_grad\(\)"):
        dec.cd(x, masks)
    with torch.no_grad():
        assert dec.cd(x, masks).relevant.shape == (500, 3)
    small = dec.cd(x, masks[:2])  # within the budget: differentiable as before
    assert small.relevant.requires_grad


def test_forward_hooks_are_refused_not_skipped(model, x):
    """CD never calls the modules: a hook that changes an output would be missed silently
    (rel + irrel != model(x)); with one registered, before or after capture, every path
    refuses and names it."""
    from fastacd import reference
    dec = fastacd.Decomposer(model)
    dec.cd(x, torch.ones(16, 16))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    for register in (lambda: conv.register_forward_hook(lambda mod, i, o: 2 * o),
                     lambda: conv.register_forward_pre_hook(lambda mod, i: (0 * i[0],))):
        handle = register()
        for call in (lambda: dec.cd(x, torch.ones(16, 16)), lambda: fastacd.cd(x, model, torch.ones(16, 16)),
                     lambda: fastacd.Decomposer(model), lambda: reference.cd(model, x, torch.ones(16, 16))):
            with pytest.raises(fastacd.UnsupportedOpError, match=r"forward (pre-)?hook <lambda> on 'conv2'.*Remove the hooks"):
                call()
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: None)
    try:
        with pytest.raises(fastacd.UnsupportedOpError, match="global module forward hooks"):
            dec.cd(x, torch.ones(16, 16))
    finally:
        handle.remove()
    res = dec.cd(x, torch.ones(16, 16))  # hooks gone: decomposes again
    with torch.no_grad():
        torch.testing.assert_close(res.relevant + res.irrelevant, model(x))


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_old_style_weight_and_spectral_norm_use_the_forwards_weight(x, norm):
    """torch.nn.utils.weight_norm / spectral_norm keep the weight as an attribute a forward
    pre-hook recomputes; CD runs that hook first, so it uses the forward's weight (before the
    first forward, and after the weight's parts changed) and matches the parametrized form."""
    torch.manual_seed(0)
    old, new = FunctionalNet().eval(), FunctionalNet().eval()
    new.load_state_dict(old.state_dict())
    getattr(nn.utils, norm)(old.conv2)
    getattr(nn.utils.parametrizations, norm)(new.conv2)
    if norm == "spectral_norm":  # the same power-iteration vectors in both
        new.conv2.parametrizations.weight[0]._u.copy_(old.conv2.weight_u)
        new.conv2.parametrizations.weight[0]._v.copy_(old.conv2.weight_v)
    masks = torch.zeros(2, 16, 16)
    masks[0, :8], masks[1, :, 5:] = 1, 1
    for _ in range(2):
        rel, irrel = fastacd.cd(x, old, masks)
        with torch.no_grad():
            expected = new(x)
            torch.testing.assert_close(rel + irrel, expected.expand(2, -1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rel, fastacd.cd(x, new, masks)[0], rtol=1e-5, atol=1e-5)
            part = "weight_g" if norm == "weight_norm" else "weight_orig"  # the parts change
            getattr(old.conv2, part).mul_(1.5)
            if norm == "weight_norm":
                new.conv2.parametrizations.weight.original0.mul_(1.5)
            else:
                new.conv2.parametrizations.weight.original.mul_(1.5)
    if norm == "spectral_norm":  # the recomputation never takes a power step (it would train u, v)
        u = old.conv2.weight_u.clone()
        fastacd.capture.check_hooks(old.conv2.train())
        assert torch.equal(old.conv2.weight_u, u)


def test_hierarchy_refuses_raw_pixels_and_channels_last_pictures():
    """A uint8 image was cast to float and decomposed as 0..255 model input; an (H, W, C)
    array was read as C=H channels."""
    model = _api_model().eval()
    raw = (torch.rand(1, 1, 8, 8) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"floating-point tensor .* got torch.uint8 \(raw pixels\?\)"):
        fastacd.hierarchy(model, raw, sweep_dim=4, num_iters=1)
    with pytest.raises(TypeError, match="raw pixels"):
        fastacd.agg_2d.agglomerate(model, None, 90, "cd", 4, raw[0, 0].numpy(), 0, num_iters=1, im_torch=raw)
    with pytest.raises(ValueError, match=r"\(8, 8, 1\), an \(H, W, C\) picture"):
        fastacd.hierarchy(model, np.random.rand(8, 8, 1), sweep_dim=4, num_iters=1)


def test_torchscript_module_is_named(model, x):
    """fx and torch.export both fail on TorchScript with messages about a missing
    ``traced_func_name``; the error says what it is and what to pass instead."""
    scripted = torch.jit.trace(model, x)
    with pytest.raises(fastacd.UnsupportedOpError, match="is a TorchScript module .* pass the Python nn.Module"):
        fastacd.cd(x, scripted, torch.ones(16, 16))

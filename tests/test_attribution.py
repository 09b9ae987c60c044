"""fastacd.attribution: one API, values against Captum, the reference CD and analytic truths."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import torch.nn as nn
from matplotlib.figure import Figure

import fastacd.reference as reference
from fastacd.attribution import baselines as A
from fastacd.image import plots


class TinyCNN(nn.Module):
    """Conv-ReLU-pool twice, then linear; flatten is functional so Captum's LRP accepts it."""

    def __init__(self, smooth: bool = False, classes: int = 5):
        super().__init__()
        act = nn.Tanh if smooth else nn.ReLU
        self.c1, self.a1 = nn.Conv2d(1, 4, 3, padding=1), act()
        self.p1 = nn.AvgPool2d(2) if smooth else nn.MaxPool2d(2)
        self.c2, self.a2 = nn.Conv2d(4, 6, 3, padding=1), act()
        self.p2 = nn.AvgPool2d(2) if smooth else nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, classes)

    def forward(self, x):
        x = self.p1(self.a1(self.c1(x)))
        x = self.p2(self.a2(self.c2(x)))
        return self.fc(x.flatten(1))


def make(smooth=False, seed=0, n=3):
    torch.manual_seed(seed)
    model = TinyCNN(smooth).double().eval()
    x = torch.randn(n, 1, 16, 16, dtype=torch.float64)
    return model, x


def test_tiles_match_original_tiling_order():
    # the original gen_tiles: tiles row by row, last ones cut at the border (10 = 3 + 3 + 3 + 1)
    lab = A.tiles((10, 10), 3)
    assert lab.shape == (10, 10) and int(lab.max()) == 15
    k = 0
    for r in range(0, 10, 3):
        for c in range(0, 10, 3):
            assert (lab[r:r + 3, c:c + 3] == k).all()
            k += 1


def test_path_rules_integrate_exactly():
    for rule in ("gausslegendre", "riemann_trapezoid", "riemann_middle", "linspace"):
        a, w = A.path_rule(9, rule)
        assert math.isclose(float(w.sum()), 1.0)
    a, w = A.path_rule(9, "riemann_trapezoid")  # exact for a linear integrand
    assert math.isclose(float((w * a).sum()), 0.5)


def test_integrated_gradients_completeness():
    model, x = make(smooth=True)
    b = torch.randn_like(x[0]) * 0.1
    ig = A.integrated_gradients(model, x, 2, baseline=b, steps=50)
    with torch.no_grad():
        diff = model(x)[:, 2] - model(b[None])[0, 2]
    torch.testing.assert_close(ig.flatten(1).sum(1), diff, rtol=1e-7, atol=1e-9)


# Captum's "riemann_trapezoid" weights sum to (n-1)/n; ours is the textbook trapezoid (docs)
@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_middle"])
def test_integrated_gradients_equals_captum(rule):
    from captum.attr import IntegratedGradients
    model, x = make()
    t = torch.tensor([0, 3, 1])
    ours = A.integrated_gradients(model, x, t, steps=20, rule=rule, batch_size=7)
    theirs = IntegratedGradients(model).attribute(x, target=t, n_steps=20, method=rule)
    # Captum scales its path points in float32 (relative error ~1e-7 on the path)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)


def test_gradient_x_input_and_smoothgrad_without_noise():
    from captum.attr import InputXGradient, Saliency
    model, x = make()
    torch.testing.assert_close(A.gradient_x_input(model, x, 1),
                               InputXGradient(model).attribute(x, target=1), rtol=1e-12, atol=1e-12)
    sg = A.smoothgrad(model, x, 1, num_samples=3, noise_level=0.0)
    torch.testing.assert_close(sg, Saliency(model).attribute(x, target=1, abs=False))


def test_expected_gradients_with_one_reference_approaches_ig():
    model, x = make(smooth=True, n=1)
    ig = A.integrated_gradients(model, x, 0, steps=50)
    eg = A.expected_gradients(model, x, 0, num_samples=3000, generator=torch.Generator().manual_seed(0))
    # Monte-Carlo over the path: the totals agree to a few per cent
    assert abs(float(eg.sum() - ig.sum())) < 0.05 * float(ig.abs().sum())


CAPTUM_CASES = {
    "saliency": ("Saliency", {}, {}),
    "guided_backprop": ("GuidedBackprop", {}, {}),
    "deconvolution": ("Deconvolution", {}, {}),
    "deeplift": ("DeepLift", {}, {"baselines": "zeros"}),
    "deeplift_shap": ("DeepLiftShap", {}, {"baselines": "refs"}),
    "lrp": ("LRP", {}, {}),
}


@pytest.mark.parametrize("method", list(CAPTUM_CASES))
def test_captum_methods_equal_captum_called_directly(method):
    import captum.attr as ca
    model, x = make(seed=1)
    refs = torch.randn(4, 1, 16, 16, dtype=torch.float64) * 0.1
    t = torch.tensor([4, 0, 2])
    cls, init, kw = CAPTUM_CASES[method]
    kw = {k: (torch.zeros_like(x) if v == "zeros" else refs) for k, v in kw.items()}
    theirs = getattr(ca, cls)(model, **init).attribute(x, target=t, **kw)
    seg = A.tiles((16, 16), 4)
    ours = A.attribute(model, x, t, method, segments=seg, baseline=refs if method == "deeplift_shap" else None)
    torch.testing.assert_close(ours.features, theirs, rtol=1e-10, atol=1e-12)
    # segment scores are the sums of the features over each 4x4 tile
    want = theirs.reshape(3, 4, 4, 4, 4).sum((2, 4)).reshape(3, 16)
    torch.testing.assert_close(ours.scores, want, rtol=1e-10, atol=1e-12)


def test_gradient_shap_and_gradcam_equal_captum():
    import captum.attr as ca
    model, x = make(seed=2)
    refs = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    torch.manual_seed(5), np.random.seed(5)
    theirs = ca.GradientShap(model).attribute(x, baselines=refs, target=1, n_samples=6, stdevs=0.1)
    torch.manual_seed(5), np.random.seed(5)
    ours = A.attribute(model, x, 1, "gradient_shap", baseline=refs, n_samples=6, stdevs=0.1)
    torch.testing.assert_close(ours.features, theirs)
    cam = ca.LayerGradCam(model, model.c2).attribute(x, target=1)
    cam = ca.LayerAttribution.interpolate(cam, (16, 16), interpolate_mode="bilinear")
    ours = A.attribute(model, x, 1, "gradcam", layer=model.c2)
    torch.testing.assert_close(ours.heatmap(), cam[:, 0])
    gg = ca.GuidedGradCam(model, model.c2).attribute(x, target=1)
    torch.testing.assert_close(A.attribute(model, x, 1, "guided_gradcam").features, gg)


def test_cd_scores_equal_reference_per_segment():
    model, x = make(seed=3, n=2)
    seg = A.tiles((16, 16), 8)
    res = A.attribute(model, x, [1, 2], "cd", segments=seg)
    for n in range(2):
        for s in range(4):
            rel, _ = reference.cd(model, x[n:n + 1], (seg == s).double())
            assert torch.allclose(res.scores[n, s], rel[0, [1, 2][n]], rtol=1e-10, atol=1e-12)
    assert res.features is None and res.heatmap().shape == (2, 16, 16)


def test_occlusion_equals_captum_feature_ablation_and_build_up_a_loop():
    from captum.attr import FeatureAblation
    model, x = make(seed=4)
    seg = A.tiles((16, 16), 4)
    occ = A.attribute(model, x, 3, "occlusion", segments=seg, baseline=0.5, batch_size=5)
    fa = FeatureAblation(model).attribute(x, target=3, baselines=0.5, feature_mask=seg[None, None])
    torch.testing.assert_close(occ.heatmap(), fa[:, 0])
    bu = A.attribute(model, x, 3, "build_up", segments=seg, batch_size=3)
    with torch.no_grad():
        for s in range(16):
            m = (seg == s).double()
            want = model(x * m)[:, 3] - model(torch.zeros_like(x[:1]))[0, 3]
            torch.testing.assert_close(bu.scores[:, s], want)


def test_per_pixel_default_and_2d_inputs():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    r = A.attribute(mlp, x, 0, "integrated_gradients", steps=30)
    assert r.scores.shape == (4, 6)
    torch.testing.assert_close(r.scores, r.features)
    c = A.attribute(mlp, x, 0, "cd", segments=[0, 0, 1, 1, 2, 2])
    rel, _ = reference.cd(mlp, x[1:2], torch.tensor([0, 0, 1, 1, 0, 0.], dtype=torch.float64))
    torch.testing.assert_close(c.scores[1, 1], rel[0, 0])


def test_compare_and_plots_return_figures():
    model, x = make(seed=5, n=2)
    seg = A.tiles((16, 16), 4)
    res = A.compare(model, x, None, ["cd", "occlusion", "integrated_gradients", "saliency"],
                    segments=seg, options={"integrated_gradients": {"steps": 8}})
    assert {tuple(r.scores.shape) for r in res.values()} == {(2, 16)}
    assert len({tuple(r.target.tolist()) for r in res.values()}) == 1
    figs = [plots.attribution_heatmap(res["cd"], x[0]), plots.compare_attributions(res, x[0], index=1),
            plots.interaction_matrix(torch.randn(5, 5), labels=list("abcde"), show_diagonal=False),
            plots.top_interactions(torch.randn(5, 5), k=4),
            plots.summary_plot(torch.randn(20, 6), torch.randn(20, 6), [f"f{i}" for i in range(6)])]
    assert all(isinstance(f, Figure) for f in figs)
    assert res["cd"].to_json()["method"] == "cd"


def test_bad_input_errors():
    model, x = make()
    with pytest.raises(ValueError, match="unknown method"):
        A.attribute(model, x, 0, "shap")
    with pytest.raises(ValueError, match="label map"):
        A.attribute(model, x, 0, "saliency", segments=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="one index per input"):
        A.attribute(model, x, [0, 1], "saliency")
    # targets read silently otherwise: -1 as the last class, 2.7 as 2, True as 1
    for method in ("cd", "occlusion", "saliency"):
        with pytest.raises(ValueError, match=r"target must be class indices in 0\.\.\d+ \(the model has"):
            A.attribute(model, x, -1, method)
        for bad in (2.7, True, "3"):
            with pytest.raises(TypeError, match="target must be"):
                A.attribute(model, x, bad, method)
    assert A.attribute(model, x, 2.0, "saliency").target.tolist() == [2] * x.shape[0]
    with pytest.raises(ValueError, match="batch dimension"):
        A.attribute(model, x[0, 0, 0], 0, "saliency")
    with pytest.raises(ValueError, match="training mode"):
        A.attribute(model.train(), x, 0, "saliency")
    model.eval()
    with pytest.raises(ValueError, match="float32"):
        A.attribute(model, x.float(), 0, "saliency")
    with pytest.raises(ValueError, match="unknown path rule"):
        A.integrated_gradients(model, x, 0, rule="simpson")
    assert math.isclose(float(A.path_rule(7, "linspace")[1].sum()), 1.0)

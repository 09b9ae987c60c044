"""Attribution scores ACD is compared with, in one API, aggregated to the same segments.

``attribute(model, x, target, method, segments=...)`` returns an :class:`Attribution` for
every method with the same shapes, so that the methods can be compared and plotted side by
side (the ACD paper's comparison figure):

* region methods score each segment as a whole: ``cd`` (CD relevant logit of the segment,
  all segments in one batched engine call), ``occlusion`` (output drop when the segment is
  replaced by the baseline) and ``build_up`` (output gain when only the segment is kept);
* gradient methods written here, batched over inputs and path points:
  ``gradient_x_input``, ``integrated_gradients``, ``expected_gradients``, ``smoothgrad``;
* through Captum (not rewritten): ``saliency``, ``guided_backprop``, ``deconvolution``,
  ``deeplift``, ``deeplift_shap``, ``gradient_shap``, ``lrp``, ``gradcam``, ``guided_gradcam``.

Per-feature methods give a map shaped like ``x``; its segment scores are sums over the
segment's features. Segments are a label map over the spatial positions (``(H, W)``, shared
by the channels), over all features (``x.shape[1:]``), or ``tiles(shape, sweep_dim)``, the
original package's tiling. With no segments, every spatial position (every feature, for a
2-d input) is a segment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from ..api import decomposer_for

REGION_METHODS = ("cd", "occlusion", "build_up")
GRADIENT_METHODS = ("gradient_x_input", "integrated_gradients", "expected_gradients", "smoothgrad")
CAPTUM_METHODS = ("saliency", "guided_backprop", "deconvolution", "deeplift", "deeplift_shap",
                  "gradient_shap", "lrp", "gradcam", "guided_gradcam")
METHODS = REGION_METHODS + GRADIENT_METHODS + CAPTUM_METHODS


@dataclass
class Attribution:
    """Scores of one method for N inputs.

    scores: (N, S) one score per segment.
    segments: (*x.shape[1:]) long labels 0..S-1, the segment of every input feature.
    features: (N, *x.shape[1:]) per-feature attribution, or None for region methods
        (``cd``, ``occlusion``, ``build_up`` score whole segments).
    target: (N,) the explained output of every input.
    """
    method: str
    scores: torch.Tensor
    segments: torch.Tensor
    target: torch.Tensor
    features: torch.Tensor | None = None
    options: dict = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return self.scores.shape[1]

    def heatmap(self) -> torch.Tensor:
        """(N, H, W): per-pixel map, summed over channels for per-feature methods, the
        segment's score painted on its pixels for region methods."""
        if self.features is not None:
            f = self.features
            return f.sum(1) if f.dim() == 4 else f
        painted = self.scores[:, self.segments.reshape(-1)].reshape((-1,) + tuple(self.segments.shape))
        # a segment spans all channels of its pixels: show each pixel once
        return painted[:, 0] if painted.dim() == 4 else painted

    def to_json(self) -> dict:
        return {"method": self.method, "scores": self.scores.tolist(),
                "segments": self.segments.tolist(), "target": self.target.tolist(),
                "options": {k: v for k, v in self.options.items()
                            if isinstance(v, (int, float, str, bool, type(None)))}}


# ---- segments ------------------------------------------------------------------------------
def tiles(shape: Sequence[int], sweep_dim: int) -> torch.Tensor:
    """Label map of ``sweep_dim`` x ``sweep_dim`` tiles over an (H, W) image, numbered row by
    row like the original ``tiling_2d.gen_tiles`` (ceil(H/s) x ceil(W/s) tiles)."""
    h, w = int(shape[-2]), int(shape[-1])
    if sweep_dim < 1:
        raise ValueError(f"sweep_dim must be a positive integer, got {sweep_dim}")
    rows = torch.arange(h) // sweep_dim
    cols = torch.arange(w) // sweep_dim
    return rows[:, None] * math.ceil(w / sweep_dim) + cols[None, :]


def segment_labels(x: torch.Tensor, segments=None) -> tuple[torch.Tensor, int]:
    """Labels 0..S-1 of shape x.shape[1:] and S, from a label map over the spatial positions
    or over all features (any integers; numbered in increasing order)."""
    feat = tuple(x.shape[1:])
    spatial = feat[1:] if len(feat) > 1 else feat
    if segments is None:
        labels = torch.arange(math.prod(spatial), device=x.device).reshape(spatial)
    else:
        labels = torch.as_tensor(np.asarray(segments) if not isinstance(segments, torch.Tensor)
                                 else segments, device=x.device)
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise ValueError("segments must be an integer label map (one label per pixel)")
        labels = labels.long()
        if tuple(labels.shape) not in (feat, spatial):
            raise ValueError(f"segments has shape {tuple(labels.shape)}; expected a label map of shape "
                             f"{spatial} (spatial positions) or {feat} (all features) for input "
                             f"{tuple(x.shape)}. Use fastacd.attribution.tiles(shape, sweep_dim) for tiles.")
    if tuple(labels.shape) != feat:
        labels = labels.expand(feat)
    _, inverse = torch.unique(labels, return_inverse=True)
    return inverse.reshape(feat), int(inverse.max()) + 1


def segment_masks(labels: torch.Tensor, num: int, dtype=torch.float32, start: int = 0,
                  stop: int | None = None) -> torch.Tensor:
    """(stop-start, *labels.shape) 0/1 masks of segments start..stop-1."""
    ids = torch.arange(start, num if stop is None else min(stop, num), device=labels.device)
    return (labels[None] == ids.reshape((-1,) + (1,) * labels.dim())).to(dtype)


def aggregate(features: torch.Tensor, labels: torch.Tensor, num: int) -> torch.Tensor:
    """(N, S): sum of each segment's features."""
    flat = features.reshape(features.shape[0], -1)
    out = flat.new_zeros(features.shape[0], num)
    return out.index_add_(1, labels.reshape(-1), flat)


# ---- helpers -------------------------------------------------------------------------------
def _as_batch(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor of shape (N, C, H, W) or (N, F)")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension, e.g. (N, C, H, W) or (N, F); got shape "
                         f"{tuple(x.shape)}. Use x[None] for one input.")
    return x.detach()


def _model_device_dtype(model):
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (None, None)


def output_indices(value, n: int, device, what: str = "target") -> torch.Tensor:
    """(n,) long from an int for all inputs or one integer per input. Fractions and bools are
    refused: ``.long()`` would read 2.7 as 2 and True as 1."""
    try:
        t = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{what} must be an int or one integer per input, got {value!r}") from exc
    if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not torch.equal(t, t.round())):
        raise TypeError(f"{what} must be integer class indices, got {value!r}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{what} must be an int or one index per input ({n}), got {t.numel()}")
    return t.clone()


def check_classes(t: torch.Tensor, num_classes: int, what: str = "target") -> None:
    """Refuse indices outside 0..num_classes-1 (a negative one would pick a class from the end)."""
    if bool(((t < 0) | (t >= num_classes)).any()):
        raise ValueError(f"{what} must be class indices in 0..{num_classes - 1} (the model has "
                         f"{num_classes} outputs), got {t.tolist()}")


def _targets(model, x: torch.Tensor, target) -> torch.Tensor:
    """(N,) long: an int for all inputs, one per input, or None for the predicted class."""
    with torch.no_grad():
        if target is None:
            return _forward(model, x).argmax(1)
        t = output_indices(target, x.shape[0], x.device)
        check_classes(t, _forward(model, x[:1]).shape[1])
    return t


def _forward(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if out.dim() == 1:
        out = out[:, None]
    return out


def _batched(fn: Callable, total: int, batch_size: int | None):
    """Concatenate fn(start, stop) over chunks of batch_size (all at once when None)."""
    step = batch_size or total
    return torch.cat([fn(s, min(s + step, total)) for s in range(0, total, step)])


def _selected_output_grad(model, points: torch.Tensor, targets: torch.Tensor,
                          batch_size: int | None = None) -> torch.Tensor:
    """Gradient of output[target] w.r.t. each point, batched in chunks of ``batch_size``."""
    def chunk(s, e):
        with torch.enable_grad():
            p = points[s:e].detach().requires_grad_(True)
            out = _forward(model, p).gather(1, targets[s:e, None]).sum()
            (g,) = torch.autograd.grad(out, p)
        return g
    return _batched(chunk, points.shape[0], batch_size)


def _baseline_like(x: torch.Tensor, baseline) -> torch.Tensor:
    """A baseline broadcast to x: None/0, a scalar, one of x.shape[1:], or one per input."""
    if baseline is None:
        return torch.zeros_like(x)
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if b.dim() == 0 or tuple(b.shape) == tuple(x.shape[1:]):
        return b.expand_as(x)
    if b.dim() == x.dim() and b.shape[0] in (1, x.shape[0]) and b.shape[1:] == x.shape[1:]:
        return b.expand_as(x)
    raise ValueError(f"baseline has shape {tuple(b.shape)}; expected a scalar, {tuple(x.shape[1:])}, "
                     f"or (N or 1, {', '.join(map(str, x.shape[1:]))}) for input {tuple(x.shape)}")


def _references(x: torch.Tensor, baseline) -> torch.Tensor:
    """A reference distribution (K, *x.shape[1:]) for the expectation methods."""
    if baseline is None:
        return torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if tuple(b.shape) == tuple(x.shape[1:]):
        return b[None]
    if b.dim() == x.dim() and b.shape[1:] == x.shape[1:]:
        return b
    raise ValueError(f"baseline (the reference distribution) must have shape (K, "
                     f"{', '.join(map(str, x.shape[1:]))}), got {tuple(b.shape)}")


def path_rule(steps: int, rule: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha in [0, 1] and weights of the path integral (the weights sum to 1).

    ``gausslegendre`` (Captum's default), ``riemann_trapezoid``, ``riemann_left``,
    ``riemann_right``, ``riemann_middle``, and ``linspace``: the plain mean over
    ``linspace(0, 1, steps)`` used by the original package and by path_explain.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rule == "gausslegendre":
        a, w = np.polynomial.legendre.leggauss(steps)
        return torch.tensor(0.5 * a + 0.5), torch.tensor(0.5 * w)
    if rule == "linspace":
        a = np.linspace(0, 1, steps) if steps > 1 else np.ones(1)
        return torch.tensor(a), torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2")
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return torch.tensor(np.linspace(0, 1, steps)), torch.tensor(w)
    offsets = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}
    if rule not in offsets:
        raise ValueError(f"unknown path rule {rule!r}; use gausslegendre, linspace, riemann_trapezoid, "
                         "riemann_left, riemann_right or riemann_middle")
    a = (np.arange(steps) + offsets[rule]) / steps
    return torch.tensor(a), torch.full((steps,), 1.0 / steps, dtype=torch.float64)


# ---- gradient methods (batched over inputs x path points) ---------------------------------
def gradient_x_input(model, x, target=None, *, batch_size=None) -> torch.Tensor:
    """(N, ...) d output[target] / dx * x."""
    x = _as_batch(x)
    t = _targets(model, x, target)
    return _selected_output_grad(model, x, t, batch_size) * x


def integrated_gradients(model, x, target=None, *, baseline=None, steps: int = 50,
                         rule: str = "gausslegendre", batch_size: int | None = 512) -> torch.Tensor:
    """(N, ...) integrated gradients along the straight path baseline -> x.

    All N x steps path points go through the model in chunks of ``batch_size`` (one backward
    per chunk, no Python loop over classes or steps). Completeness: the sum over features
    approximates output(x) - output(baseline) for the target.
    """
    x = _as_batch(x)
    t = _targets(model, x, target)
    b = _baseline_like(x, baseline)
    alphas, weights = (v.to(device=x.device, dtype=x.dtype) for v in path_rule(steps, rule))
    n, k, view = x.shape[0], alphas.numel(), (1, -1) + (1,) * (x.dim() - 1)
    delta = x - b
    points = (b[:, None] + alphas.reshape(view) * delta[:, None]).reshape((n * k,) + tuple(x.shape[1:]))
    grads = _selected_output_grad(model, points, t.repeat_interleave(k), batch_size)
    grads = grads.reshape((n, k) + tuple(x.shape[1:]))
    return (grads * weights.reshape(view)).sum(1) * delta


def expected_gradients(model, x, target=None, *, baseline=None, num_samples: int = 50,
                       generator: torch.Generator | None = None,
                       batch_size: int | None = 512) -> torch.Tensor:
    """(N, ...) expected gradients (Erion et al.): the mean of (x - r) * grad at r + a (x - r)
    over references r drawn from ``baseline`` (K, ...) and a ~ U(0, 1), as path_explain's
    ``attributions(..., use_expectation=True)``."""
    x = _as_batch(x)
    t = _targets(model, x, target)
    refs = _references(x, baseline)
    n, view = x.shape[0], (-1,) + (1,) * (x.dim() - 1)
    idx = torch.randint(refs.shape[0], (n * num_samples,), generator=generator).to(x.device)
    alpha = torch.rand(n * num_samples, generator=generator, dtype=torch.float64).to(x)
    r = refs[idx]
    xs = x.repeat_interleave(num_samples, 0)
    points = r + alpha.reshape(view) * (xs - r)
    grads = _selected_output_grad(model, points, t.repeat_interleave(num_samples), batch_size)
    return ((xs - r) * grads).reshape((n, num_samples) + tuple(x.shape[1:])).mean(1)


def smoothgrad(model, x, target=None, *, num_samples: int = 50, noise_level: float = 0.15,
               multiply_by_inputs: bool = False, generator: torch.Generator | None = None,
               batch_size: int | None = 512) -> torch.Tensor:
    """(N, ...) SmoothGrad (Smilkov et al.): the mean gradient over ``num_samples`` noisy copies,
    noise std = ``noise_level`` * (max - min) of each input; times x if ``multiply_by_inputs``."""
    x = _as_batch(x)
    t = _targets(model, x, target)
    n, view = x.shape[0], (-1,) + (1,) * (x.dim() - 1)
    flat = x.reshape(n, -1)
    sigma = (noise_level * (flat.max(1).values - flat.min(1).values)).repeat_interleave(num_samples)
    xs = x.repeat_interleave(num_samples, 0)
    noise = torch.randn(xs.shape, generator=generator, dtype=torch.float64).to(x)
    grads = _selected_output_grad(model, xs + sigma.reshape(view) * noise,
                                  t.repeat_interleave(num_samples), batch_size)
    g = grads.reshape((n, num_samples) + tuple(x.shape[1:])).mean(1)
    return g * x if multiply_by_inputs else g


# ---- region methods ------------------------------------------------------------------------
def _region_scores(model, x, t, labels, num, method, baseline, batch_size, decomposer):
    n = x.shape[0]
    out = torch.empty(n, num, dtype=x.dtype, device=x.device)
    b_all = _baseline_like(x, baseline)
    if method == "cd":
        if decomposer is None:
            decomposer = decomposer_for(model)
        for j in range(n):
            # one engine call per input: the Decomposer chunks the masks under its memory budget
            masks = segment_masks(labels, num, x.dtype)
            out[j] = decomposer.cd(x[j:j + 1], masks).relevant[:, t[j]]
        return out
    step = batch_size or num
    with torch.no_grad():
        for j in range(n):
            xj, bj = x[j], b_all[j]
            ref = _forward(model, (xj if method == "occlusion" else bj)[None])[0, t[j]]
            for s in range(0, num, step):
                m = segment_masks(labels, num, x.dtype, s, s + step)
                kept = m * xj + (1 - m) * bj if method == "build_up" else (1 - m) * xj + m * bj
                pred = _forward(model, kept)[:, t[j]]
                out[j, s:s + m.shape[0]] = pred - ref if method == "build_up" else ref - pred
    return out


# ---- Captum --------------------------------------------------------------------------------
def _last_conv(model):
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError("gradcam needs a convolutional layer: pass layer=<module> (e.g. model.layer4)")
    return convs[-1]


def _captum(model, x, t, method, baseline, options):
    try:
        import captum.attr as ca
    except ImportError as e:  # pragma: no cover - captum is pinned in requirements.txt
        raise ImportError(f"method {method!r} uses Captum: pip install captum") from e
    opts = dict(options)
    if method == "saliency":
        return ca.Saliency(model).attribute(x, target=t, **opts)
    if method == "guided_backprop":
        return ca.GuidedBackprop(model).attribute(x, target=t, **opts)
    if method == "deconvolution":
        return ca.Deconvolution(model).attribute(x, target=t, **opts)
    if method == "deeplift":
        return ca.DeepLift(model).attribute(x, baselines=_baseline_like(x, baseline).contiguous(),
                                            target=t, **opts)
    if method == "deeplift_shap":
        return ca.DeepLiftShap(model).attribute(x, baselines=_references(x, baseline), target=t, **opts)
    if method == "gradient_shap":
        return ca.GradientShap(model).attribute(x, baselines=_references(x, baseline), target=t, **opts)
    if method == "lrp":
        return ca.LRP(model).attribute(x, target=t, **opts)
    if method in ("gradcam", "guided_gradcam"):
        layer = opts.pop("layer", None) or _last_conv(model)
        if method == "guided_gradcam":
            return ca.GuidedGradCam(model, layer).attribute(x, target=t, **opts)
        mode = opts.pop("interpolate_mode", "bilinear")
        cam = ca.LayerGradCam(model, layer).attribute(x, target=t, **opts)
        return ca.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=mode)
    raise AssertionError(method)


# ---- the one API ---------------------------------------------------------------------------
def attribute(model: torch.nn.Module, x, target=None, method: str = "integrated_gradients", *,
              segments=None, baseline=None, batch_size: int | None = 256, decomposer=None,
              **options) -> Attribution:
    """Scores of ``method`` for each input and each segment.

    model: eval-mode model returning (N, num_outputs) (logits: a trailing softmax is part of
        the model for gradient methods, stripped for ``cd``).
    x: (N, C, H, W) or (N, F) inputs, in the model's input space.
    target: int, one per input, or None for the predicted class.
    segments: label map (H, W) or x.shape[1:]; None: every spatial position / feature.
    baseline: reference input (default 0): a scalar or x-shaped for occlusion, build_up,
        integrated_gradients, deeplift; a distribution (K, ...) for expected_gradients,
        deeplift_shap, gradient_shap.
    batch_size: inputs per model call for occlusion / build_up / gradient methods.
    options: passed to the method (steps, rule, num_samples, noise_level, generator; for
        Captum methods the Captum ``attribute`` keywords, and ``layer`` for Grad-CAM).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if getattr(model, "training", False):
        raise ValueError("the model is in training mode; call model.eval() first (attributions are "
                         "defined on eval behaviour: dropout off, batchnorm running statistics)")
    x = _as_batch(x)
    device, dtype = _model_device_dtype(model)
    if device is not None and (x.device != device or x.dtype != dtype):
        raise ValueError(f"x is {x.dtype} on {x.device} but the model is {dtype} on {device}; "
                         f"use x.to({device!r}, {dtype})")
    t = _targets(model, x, target)
    labels, num = segment_labels(x, segments)
    features = None
    if method in REGION_METHODS:
        scores = _region_scores(model, x, t, labels, num, method, baseline, batch_size, decomposer)
    else:
        if method == "gradient_x_input":
            features = gradient_x_input(model, x, t, batch_size=batch_size, **options)
        elif method == "integrated_gradients":
            features = integrated_gradients(model, x, t, baseline=baseline, batch_size=batch_size, **options)
        elif method == "expected_gradients":
            features = expected_gradients(model, x, t, baseline=baseline, batch_size=batch_size, **options)
        elif method == "smoothgrad":
            features = smoothgrad(model, x, t, batch_size=batch_size, **options)
        else:
            features = _captum(model, x, t, method, baseline, options).detach()
        if features.shape != x.shape:  # Grad-CAM: one map for all channels
            features = features.expand_as(x) / x.shape[1] if features.shape[1] == 1 else features
        scores = aggregate(features, labels, num)
    return Attribution(method=method, scores=scores.detach(), segments=labels, target=t,
                       features=None if features is None else features.detach(), options=options)


def compare(model, x, target=None, methods: Sequence[str] = ("cd", "occlusion", "build_up",
            "integrated_gradients", "gradient_x_input"), *, segments=None, baseline=None,
            options: dict | None = None, **common) -> dict[str, Attribution]:
    """``attribute`` for several methods with the same inputs, targets and segments.

    options: per-method keywords, e.g. ``{"integrated_gradients": {"steps": 100}}``.
    """
    x = _as_batch(x)
    t = _targets(model, x, target)
    options = options or {}
    return {m: attribute(model, x, t, m, segments=segments, baseline=baseline,
                         **common, **options.get(m, {})) for m in methods}

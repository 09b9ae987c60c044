"""The steps of the original 2-D agglomeration (users call them directly: ``fastacd.agg_2d``
re-exports them) and the argument checks, shared by the fast agglomeration, the hierarchy
API and the reference. Nothing here depends on how candidates are scored."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx
from scipy.signal import convolve2d

from .tiling_2d import METHODS


def refine_scores(scores, lab_num):
    """The score of class ``lab_num`` for every row."""
    return scores[:, lab_num]


def threshold_scores(scores, percentile_include, method=None):
    """Select the scores at or above a percentile (NaN = already selected, never picked).

    The percentile drops by 15 once more than a third of the scores are NaN, then by 4 at a
    time until something is selected (never below 0, where the original crashed).
    """
    scores = np.asarray(scores)
    return selected(scores, threshold_value(scores, percentile_include))


def threshold_value(scores, percentile_include) -> float:
    """The threshold ``threshold_scores`` selects at."""
    scores = np.asarray(scores)
    if np.isnan(scores).all():
        raise ValueError("threshold_scores: every score is NaN (everything is already selected)")
    if np.sum(np.isnan(scores)) > scores.size / 3:
        percentile_include -= 15
    while True:
        thresh = np.nanpercentile(scores, min(max(percentile_include, 0), 100))
        if selected(scores, thresh).any():
            return thresh
        percentile_include -= 4


def selected(scores, thresh) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.logical_and(scores >= thresh, ~np.isnan(scores))


_CROSS = np.zeros((3, 3))
_CROSS[:, 1] = 1
_CROSS[1, :] = 1


def smooth_im_thresh(im_thresh_old, im_thresh):
    """Add the union of both selections plus every cell with at least 3 of its 4 neighbours in it."""
    im = im_thresh_old + im_thresh
    count = convolve2d(im, _CROSS, mode="same")
    return im + np.logical_and(np.logical_not(im), count >= 3)


def establish_correspondence(seg1, seg2):
    """Relabel the components ``seg2`` so that they keep the numbers they had in ``seg1``.

    A component containing old components takes the smallest of their numbers; new
    components take the smallest free numbers, the last new one (in label order) first, as
    in the original. Unlike the original, which had 11 numbers and silently fell back to
    the unmatched labels when it ran out, any number of components is handled.
    """
    seg1, seg2 = np.asarray(seg1), np.asarray(seg2)
    seg_out = np.zeros(seg1.shape, dtype="int64")
    used, new = set(), []
    for i in range(1, int(np.max(seg2, initial=0)) + 1):
        seg = seg2 == i
        old = seg1[seg]
        matches = np.unique(old[old != 0])
        if matches.size == 0:
            new.append(seg)
        else:
            lab = int(matches.min())
            seg_out[seg] = lab
            used.add(lab)
    free = (k for k in range(1, len(used) + len(new) + 2) if k not in used)
    for seg in reversed(new):
        seg_out[seg] = next(free)
    return seg_out


def logits_module(g) -> torch.nn.Module:
    """A captured graph's model up to its logits (a trailing softmax / log-softmax dropped): batched."""
    step = g.steps.get(g.result_node)
    if step is None or not step.rule.output_only:
        return g.gm
    graph = copy.deepcopy(g.gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (by_name[step.dep[0].name],)
    gm = fx.GraphModule(g.gm, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def is_batched(pred_ims, pred_ims_batched=None) -> bool:
    """Whether ``pred_ims`` takes a batch of images: ``pred_ims_batched=True`` or an attribute
    ``pred_ims.batched = True`` (see ``batched``); otherwise it is called one image at a time,
    as in the original."""
    if pred_ims_batched is not None:
        return bool(pred_ims_batched)
    return bool(getattr(pred_ims, "batched", False))


def batched(fn):
    """Mark a ``pred_ims(model, ims)`` callable as taking a batch (N, H, W[, 3]) -> (N, classes)."""
    fn.batched = True
    return fn


def check_args(method, percentile_include, sweep_dim, image_hw, num_iters):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(percentile_include, bool) or not np.isscalar(percentile_include) \
            or not 0 <= float(percentile_include) <= 100:
        raise ValueError(f"percentile_include must be a number in 0..100, got {percentile_include!r}")
    if isinstance(sweep_dim, bool) or not isinstance(sweep_dim, (int, np.integer)) or sweep_dim < 1:
        raise ValueError(f"sweep_dim must be a positive integer (tile side in pixels), got {sweep_dim!r}")
    if sweep_dim > min(image_hw):
        raise ValueError(f"sweep_dim={sweep_dim} is larger than the image ({image_hw[0]}x{image_hw[1]}); "
                         "use a tile side no larger than the image's shorter side")
    if isinstance(num_iters, bool) or not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive integer (iterations of the agglomeration; "
                         f"0 would give an empty hierarchy), got {num_iters!r}")


def prepare_model_input(model, im_torch, device, image_hw=None):
    """Model and input on one device (``device=None``: the model's)."""
    if device is not None:
        model = model.to(device)
    else:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    if im_torch is None:
        return model, None
    if isinstance(im_torch, np.ndarray):
        im_torch = torch.from_numpy(im_torch)
    if not isinstance(im_torch, torch.Tensor):
        raise TypeError(f"im_torch must be a torch.Tensor (1, C, H, W), got {type(im_torch).__name__}")
    if not im_torch.is_floating_point():  # cast, raw pixels would be read as the model's input
        raise TypeError(f"the model input must be a floating-point tensor preprocessed as the model "
                        f"expects, got {im_torch.dtype} (raw pixels?); convert it, e.g. x.float() / 255, "
                        "and normalise it as in training")
    if im_torch.dim() == 3:
        im_torch = im_torch[None]
    if image_hw is not None and tuple(im_torch.shape[-2:]) != tuple(image_hw):
        raise ValueError(f"im_torch has spatial shape {tuple(im_torch.shape[-2:])} but im_orig is "
                         f"{tuple(image_hw)}; they must show the same image")
    return model, im_torch.to(device)

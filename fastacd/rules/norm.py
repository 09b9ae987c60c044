"""Normalisation layers with fixed statistics (eval batchnorm): an affine map per channel
whose shift is split by the parts' magnitudes."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, arg, load_arg
from ..ops.torch_ops import split_weights
from .base import ZERO_TOL, Elementwise, Rule, unsupported


def batchnorm_parts(step: Step, value_of: Callable):
    """(scale, shift, apply) of an eval batchnorm: ``apply(a) = scale * a + shift``."""
    m = step.module
    if m is not None:
        mean, var, weight, bias, eps = m.running_mean, m.running_var, m.weight, m.bias, m.eps
    else:
        node = step.node
        names = ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        vals = dict(zip(names, load_arg(value_of, node.args[1:])))
        vals.update(load_arg(value_of, node.kwargs))
        mean, var = vals["running_mean"], vals["running_var"]
        weight, bias, eps = vals.get("weight"), vals.get("bias"), vals.get("eps", 1e-5)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias

    def apply(t):
        return F.batch_norm(t, mean, var, weight, bias, False, 0.0, eps)
    return scale, shift, apply


def split_shift(r: torch.Tensor, i: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, apply,
                tol: torch.Tensor | None = None):
    """The reference's batchnorm: the shift goes by |s r| / (|s r| + |s i|), 0/0 -> 0, with
    numerical zero where ``tol`` is given (``fastacd.ops.torch_ops.split_weights``)."""
    view = (1, -1) + (1,) * (r.dim() - 2)
    sr, si = scale.reshape(view) * r, scale.reshape(view) * i
    ar, ai = split_weights(sr, si, tol, 0)
    prop_rel = torch.nan_to_num(ar / (ar + ai), nan=0.0)
    rel = sr + prop_rel * shift.reshape(view)
    return rel, apply(r + i) - rel


class BatchNorm(Rule):
    kind = "batchnorm"
    modules = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    functions = (F.batch_norm,)
    fuses_relu = True
    row = ("BatchNorm1d/2d/3d in eval, `F.batch_norm(training=False)`", "`s*r + qr*c`", "`bn(a) - rel`")

    def claim(self, graph, node, dep, module):
        if module is not None and module.running_mean is None:
            raise unsupported(node, "batchnorm without running statistics (track_running_stats="
                                    "False) normalises with the batch's own statistics")
        if module is None and arg(node, 5, "training", False):
            raise unsupported(node, "batch_norm with training=True uses batch statistics; "
                                    "call model.eval()")
        return Step(node, self, dep, module=module)

    def total(self, step, value_of):
        scale, shift, apply = batchnorm_parts(step, value_of)
        return apply(value_of(step.dep[0])), (scale, shift, apply, None)

    def magnitude(self, step, mags, value_of, aux):
        # |s| times the input's scale: the rounding of r and i comes from the layer before
        scale, shift, apply, _ = aux
        mag = mags[step.dep[0]]
        view = (1, -1) + (1,) * (mag.dim() - 2)
        scaled = scale.abs().reshape(view) * mag
        return scaled + shift.abs().reshape(view), (scale, shift, apply, ZERO_TOL * scaled)

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return split_shift(r, i, *aux)

    def relevant(self, step, rel, values, aux, ops, m):
        scale, shift, _, tol = aux
        d = step.dep[0]
        return ops.bn_split(rel[d], values[d], scale, shift, step.relu_fused, tol)

    def inplace_operand(self, step):
        return step.dep[0] if step.node.args[:1] == (step.dep[0],) else None

    def relevant_(self, step, rel, values, aux, ops):
        d = step.dep[0]
        if not rel[d].is_contiguous():
            return None
        scale, shift, _, tol = aux
        return ops.bn_split_(rel[d], values[d], scale, shift, step.relu_fused, tol)

    def fresh(self, step, rel, out):
        return True

    def locality(self, step, values):
        return Elementwise()

    def crop_aux(self, step, aux, loc, crop):
        scale, shift, apply, tol = aux
        return scale, shift, apply, crop(tol)

"""Normalisation layers. Eval batchnorm (fixed statistics): an affine map per channel whose
shift is split by the parts' magnitudes. LayerNorm, GroupNorm, RMSNorm (statistics of the
sample): the statistics come from the total, each part is centred by its own mean and divided
by the total's std, and beta is split by the affine rule; ResMLP's ``addcmul`` affine likewise."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, arg, call_with, load_arg, op_is
from ..ops.torch_ops import split_weights
from .affine import EPS, split_bias
from .base import Elementwise, Rule, only_gates, split_by_rows, unsupported

aten = torch.ops.aten


def batchnorm_parts(step: Step, value_of: Callable):
    """(scale, shift, apply) of an eval batchnorm: ``apply(a) = scale * a + shift``."""
    m = step.module
    if m is not None:
        mean, var, weight, bias, eps = m.running_mean, m.running_var, m.weight, m.bias, m.eps
    else:
        node = step.node
        names = ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        if op_is(node.target, aten.batch_norm, aten.instance_norm):  # ATen's order: weight and bias first
            names = ["weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"]
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


_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def instance_statistics(node, module) -> bool:
    """Whether an instance norm normalises with each sample's own statistics (the default;
    otherwise, in eval with ``track_running_stats``, with fixed ones: a batchnorm)."""
    if module is not None:
        return module.running_mean is None
    return bool(arg(node, 5, "use_input_stats", True))


class BatchNorm(Rule):
    kind = "batchnorm"
    modules = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm) + _INSTANCE_NORMS
    functions = (F.batch_norm, aten.batch_norm, F.instance_norm, aten.instance_norm)
    fuses_relu = True
    row = ("BatchNorm1d/2d/3d and SyncBatchNorm in eval, `F.batch_norm(training=False)`, `aten.batch_norm`; "
           "InstanceNorm with running statistics in eval", "`s*r + qr*c`", "`bn(a) - rel`")

    def claim(self, graph, node, dep, module):
        if isinstance(module, _INSTANCE_NORMS) or op_is(node.target, F.instance_norm, aten.instance_norm):
            if instance_statistics(node, module):
                return None  # the InstanceNorm rule's
            return Step(node, self, dep, module=module)
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

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        # |s| times the input's scale: the rounding of r and i comes from the layer before
        scale, shift, apply, _ = aux
        mag = mags[step.dep[0]]
        view = (1, -1) + (1,) * (mag.dim() - 2)
        scaled = scale.abs().reshape(view) * mag
        return scaled + shift.abs().reshape(view), (scale, shift, apply, zero_tol * scaled)

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return split_shift(r, i, *aux)

    def relevant(self, step, rel, values, aux, ops, m):
        scale, shift, _, tol = aux
        d = step.dep[0]
        r, total = rel[d], values[d]
        n = total.shape[0]
        if n == 1:
            return ops.bn_split(r, total, scale, shift, step.relu_fused, tol)
        return split_by_rows(lambda r_, t_, tol_: ops.bn_split(r_, t_, scale.repeat(n), shift.repeat(n),
                                                             step.relu_fused, tol_), r, total, tol)

    def paired_relevant(self, step, p):
        # the channel parameters read once; the split keeps only its inputs for backward
        scale, shift, _ = batchnorm_parts(step, p.value_of)
        d = step.dep[0]
        return p.bn_split(step, p.rel[d], p.values[d], scale, shift)

    def inplace_operand(self, step):
        return step.dep[0] if step.node.args[:1] == (step.dep[0],) else None

    def relevant_(self, step, rel, values, aux, ops):
        d = step.dep[0]
        if values[d].shape[0] != 1 or not (
                rel[d].is_contiguous() or rel[d].is_contiguous(memory_format=torch.channels_last)):
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

# --------------------------------------------------------------------------------------
# Normalisation with statistics from the total (design.md section 8)
# --------------------------------------------------------------------------------------
# LayerNorm, GroupNorm, RMSNorm: the mean and variance are the total's (computed once from the
# true activation a, shared by all masks); each part is centred by its own mean over the same
# dims (the mean is linear, so the parts' centred values sum to the total's), divided by the
# total's std sqrt(var(a) + eps) (biased variance, the layer's own eps), times gamma:
#   zr = (r - mean(r)) / std(a) * gamma,  zi = (i - mean(i)) / std(a) * gamma,  zr + zi = (a - mean(a)) / std(a) * gamma
# and beta is split by the affine rule, pr = (|zr|+eps) / ((|zr|+eps) + (|zi|+eps)). RMSNorm
# has no centring (zr = r / rms(a) * gamma) and no beta.

try:  # torchvision's channels-first LayerNorm (ConvNeXt's stem and downsampling): one node
    from torchvision.models.convnext import LayerNorm2d as _TorchvisionLayerNorm2d
    _CHANNELS_FIRST_LN: tuple[type, ...] = (_TorchvisionLayerNorm2d,)
except ImportError:  # torchvision is optional
    _CHANNELS_FIRST_LN = ()
_RMS_NORM_MODULES = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_RMS_NORM_FUNCTIONS = ((F.rms_norm,) if hasattr(F, "rms_norm") else ()) + (
    (aten.rms_norm,) if hasattr(aten, "rms_norm") else ())


@dataclass
class NormAux:
    """What the total pass keeps of a normalisation (or an addcmul affine): the input its
    statistics were computed from, the factor each centred part is multiplied by
    (``gamma / std(a)``, broadcast against the input) and the total's output before beta,
    ``pre = (a - mean(a)) / std(a) * gamma`` (the affine rule's total pre-activation)."""
    source: torch.Tensor
    factor: torch.Tensor | None
    pre: torch.Tensor | None
    tol: torch.Tensor | None = None  # numerical zero of the beta split (Rule.magnitude)


def rows_like(t: torch.Tensor, m: int) -> torch.Tensor:
    """A total's statistics for m relevant rows: shared (batch 1), per-mask (a window's crops),
    or N images repeated for K*N rows in mask-major order (the CDEP pass)."""
    n = t.shape[0]
    return t if n in (1, m) else t.repeat((m // n,) + (1,) * (t.dim() - 1))


def inference(*ts: torch.Tensor) -> bool:
    """Whether no autograd records these (the in-place and ``out=`` forms may run)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def split_beta(ops, zr: torch.Tensor, pre: torch.Tensor, beta: torch.Tensor | None,
               relu: bool = False, own: bool = False, tol: torch.Tensor | None = None) -> torch.Tensor:
    """The affine rule's split of a shift ``beta`` (broadcast right-aligned against zr) for m
    masks: ``zr + pr * beta`` with ``zi = pre - zr``, then ReLU if asked (``own``: zr is a
    contiguous tensor of the caller's that may be overwritten). The compiled ``bias_split``
    takes channels at dim 1: a per-channel beta goes as it is; a beta over the last dims
    (LayerNorm, a token's features) sees each mask's whole map as one row of channels, beta
    repeated along it. That keeps the model's layout (features last, contiguous): moving the
    features to dim 1 and back cost two copies and left a strided output that made the next
    Linear's GEMM 3.6x slower (ConvNeXt-Tiny, docs/engine.md "Norms")."""
    if beta is None:
        return zr.clamp_min(0) if relu else zr
    n = pre.shape[0]
    if n != 1 and zr.dim() >= 2 and zr.shape[1:] == pre.shape[1:] and zr.shape[0] % n == 0:
        # n rows (MobileViT's patches (B * P, N, C), a window's per-mask crops, CDEP's images),
        # the masks their outer factor: each mask's n rows as one row, as the kernels take a
        # total of one row
        split = ops.bias_split_ if own and zr.is_contiguous() and inference(zr, pre, beta) else ops.bias_split
        flat = lambda t: None if t is None else t.expand(pre.shape).reshape(1, -1)  # noqa: E731
        b = beta.reshape((1,) * (zr.dim() - beta.dim()) + tuple(beta.shape))
        out = split(zr.reshape(zr.shape[0] // n, -1), flat(pre), flat(b)[0], relu, flat(tol))
        return out.reshape(zr.shape)
    pre = rows_like(pre, zr.shape[0])
    tol = None if tol is None else rows_like(tol, zr.shape[0])
    split = ops.bias_split_ if own and zr.is_contiguous() and inference(zr, pre, beta) else ops.bias_split
    b = beta.reshape((1,) * (zr.dim() - beta.dim()) + tuple(beta.shape))
    spread = [k for k in range(zr.dim()) if b.shape[k] != 1]
    # the compiled op takes the masks in dim 0; a sequence-first (T, M, F) layout (masks in
    # dim 1: nn.TransformerEncoder with batch_first=False) takes the torch arithmetic below
    masks_first = tuple(pre.shape[1:]) == tuple(zr.shape[1:])
    if masks_first and zr.dim() >= 2 and spread == [1] and b.shape[1] == zr.shape[1]:
        return split(zr, pre, b.reshape(-1), relu, tol)
    if masks_first and spread and spread[0] > 0 and spread == list(range(spread[0], zr.dim())) \
            and b.shape[spread[0]:] == zr.shape[spread[0]:]:
        rows = b.reshape(-1).repeat(zr[0].numel() // b.numel())
        flat = lambda t: None if t is None else t.reshape(t.shape[0], -1)  # noqa: E731
        return split(flat(zr), flat(pre), rows, relu, flat(tol)).reshape(zr.shape)
    zi = pre - zr  # any other broadcast: the same arithmetic as ops.bias_split, in torch
    prop_rel, prop_irrel = split_weights(zr, zi, tol, EPS)
    out = zr + prop_rel / (prop_rel + prop_irrel) * b
    return out.clamp_min(0) if relu else out


class _Norm(Rule):
    """The shared form of LayerNorm, GroupNorm and RMSNorm; a subclass says which dims its
    statistics run over (``params``, ``rstd``, ``mean``) and how they and gamma broadcast
    (``factor``)."""
    fuses_relu = True

    def params(self, step: Step, value_of: Callable) -> dict:
        """The layer's parameters: weight, bias, eps and its layout (normalised dims, groups)."""
        raise NotImplementedError

    def rstd(self, p: dict, a: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(var(a) + eps) (RMSNorm: 1 / sqrt(mean(a^2) + eps)) per normalised group."""
        raise NotImplementedError

    def mean(self, p: dict, t: torch.Tensor) -> torch.Tensor | None:
        """t's own mean over the normalised dims (per group), broadcast against t (None: no
        centring)."""
        raise NotImplementedError

    def factor(self, p: dict, rstd: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``gamma / std(a)`` broadcast against the input (computed once per image)."""
        return rstd if p["weight"] is None else rstd * self.gamma_view(p, like, p["weight"])

    def gamma_view(self, p: dict, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A per-element parameter (gamma, beta) shaped to broadcast against t."""
        return w

    def claim(self, graph, node, dep, module):
        if module is None and dep != [arg(node, 0, "input")]:
            raise unsupported(node, "a normalisation whose weight or bias depends on the input")
        return Step(node, self, dep, module=module)

    def _normalise(self, p: dict, t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``(t - mean(t)) * factor``: the part's own centring, the total's std and gamma. Without
        autograd into a fresh contiguous tensor (the model's layout: the input may be a permuted
        view, as ConvNeXt's channels-last LayerNorm input is) in two passes."""
        f = rows_like(factor, t.shape[0])
        mean = self.mean(p, t)
        if not inference(t, f):
            return t * f if mean is None else (t - mean) * f
        out = torch.empty(torch.broadcast_shapes(t.shape, f.shape), dtype=t.dtype, device=t.device)
        if mean is None:
            return torch.mul(t, f, out=out)
        return torch.sub(t, mean, out=out).mul_(f)

    def _aux(self, step: Step, value_of: Callable, a: torch.Tensor) -> tuple[NormAux, dict]:
        p = self.params(step, value_of)
        factor = self.factor(p, self.rstd(p, a), a)
        pre = self._normalise(p, a, factor) if p["bias"] is not None else None
        return NormAux(a, factor, pre), p

    def total(self, step, value_of):
        a = value_of(step.dep[0])
        return call_with(step, value_of, {}), self._aux(step, value_of, a)[0]

    def _stats(self, step, values, aux):
        """aux and the parameters for the total that ``values`` holds: the shared total's (as
        kept by the total pass), else recomputed from it (a window's per-mask crops, CDEP's)."""
        a = values[step.dep[0]]
        if aux is not None and aux.source is a:
            return aux, self.params(step, values.__getitem__)
        fresh, p = self._aux(step, values.__getitem__, a)
        fresh.tol = None if aux is None else aux.tol  # cropped with the window (crop_aux)
        return fresh, p

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        # the rounding of a centred part (t - mean(t)) * factor is relative to
        # |factor| (|t| + |mean(t)|), bounded by the input's scale
        p = self.params(step, value_of)
        mag = mags[step.dep[0]]
        mean = self.mean(p, mag)
        scaled = aux.factor.abs() * (mag if mean is None else mag + mean)
        beta = self._beta(p, scaled)
        out = scaled if beta is None else scaled + beta.abs()
        return out, NormAux(aux.source, aux.factor, aux.pre, zero_tol * scaled)

    def crop_aux(self, step, aux, loc, crop):
        return NormAux(aux.source, aux.factor, aux.pre, None if aux.tol is None else crop(aux.tol))

    def _beta(self, p: dict, like: torch.Tensor) -> torch.Tensor | None:
        return None if p["bias"] is None else self.gamma_view(p, like, p["bias"])

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        p = self.params(step, value_of)
        zr, zi = self._normalise(p, r, aux.factor), self._normalise(p, i, aux.factor)
        return split_bias(zr, zi, self._beta(p, zr), last=True, tol=aux.tol)

    def relevant(self, step, rel, values, aux, ops, m):
        aux, p = self._stats(step, values, aux)
        zr = self._normalise(p, rel[step.dep[0]], aux.factor)
        return split_beta(ops, zr, aux.pre, self._beta(p, zr), step.relu_fused, own=True, tol=aux.tol)

    def fresh(self, step, rel, out):
        return True  # a tensor of its own (never a view of the input)


def _layer_norm_params(step: Step, value_of: Callable) -> dict:
    m = step.module
    if m is not None:
        return {"shape": tuple(m.normalized_shape), "weight": m.weight, "bias": m.bias, "eps": m.eps}
    node = step.node
    names = ["input", "normalized_shape", "weight", "bias", "eps"]
    vals = dict(zip(names, load_arg(value_of, node.args)))
    vals.update(load_arg(value_of, node.kwargs))
    shape = vals["normalized_shape"]
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    return {"shape": shape, "weight": vals.get("weight"), "bias": vals.get("bias"),
            "eps": vals.get("eps", 1e-5)}


class LayerNorm(_Norm):
    """``nn.LayerNorm`` / ``F.layer_norm`` over the last dims (any ``normalized_shape``, with or
    without elementwise affine, ``bias=False``), and torchvision's channels-first
    ``LayerNorm2d`` (normalised over dim 1 of (N, C, H, W): per position, so windowed)."""
    kind = "layernorm"
    modules = (nn.LayerNorm,) + _CHANNELS_FIRST_LN
    functions = (F.layer_norm, aten.layer_norm)
    row = ("LayerNorm (any normalized_shape), `F.layer_norm`, `aten.layer_norm`, torchvision's LayerNorm2d (channels "
           "first)", "`zr + pr*beta`, `zr = (r - mean(r)) / std(a) * gamma`", "`zi + (1-pr)*beta`")

    def params(self, step, value_of):
        p = _layer_norm_params(step, value_of)
        p["channels_first"] = isinstance(step.module, _CHANNELS_FIRST_LN)
        p["dims"] = (1,) if p["channels_first"] else tuple(range(-len(p["shape"]), 0))
        return p

    def rstd(self, p, a):
        var = torch.var_mean(a, p["dims"], correction=0, keepdim=True)[0]  # biased, as the layer
        return torch.rsqrt(var + p["eps"])

    def mean(self, p, t):
        return t.mean(p["dims"], keepdim=True)

    def gamma_view(self, p, t, w):
        return w.reshape((-1,) + (1,) * (t.dim() - 2)) if p["channels_first"] else w

    def locality(self, step, values):
        # per position over the channels of a (N, C, H, W) map: the parts' means and the total's
        # std at a position read that position only (the window's crop of the total has them)
        return Elementwise() if isinstance(step.module, _CHANNELS_FIRST_LN) else None


class GroupNorm(_Norm):
    """``nn.GroupNorm`` / ``F.group_norm``: statistics per sample and group of channels (over
    the group's channels and all positions), from the total. Not windowed: a part's own mean
    over a group reads the part at every position."""
    kind = "groupnorm"
    modules = (nn.GroupNorm,)
    functions = (F.group_norm, aten.group_norm)
    row = ("GroupNorm, `F.group_norm`, `aten.group_norm`", "`zr + pr*beta`, `zr = (r - mean_g(r)) / std_g(a) * gamma` per group g",
           "`zi + (1-pr)*beta`")

    def params(self, step, value_of):
        m = step.module
        if m is not None:
            return {"groups": m.num_groups, "weight": m.weight, "bias": m.bias, "eps": m.eps}
        names = ["input", "num_groups", "weight", "bias", "eps"]
        vals = dict(zip(names, load_arg(value_of, step.node.args)))
        vals.update(load_arg(value_of, step.node.kwargs))
        return {"groups": int(vals["num_groups"]), "weight": vals.get("weight"), "bias": vals.get("bias"),
                "eps": vals.get("eps", 1e-5)}

    @staticmethod
    def _grouped(p, t):
        return t.reshape(t.shape[0], p["groups"], -1)

    def rstd(self, p, a):
        var = torch.var_mean(self._grouped(p, a), -1, correction=0, keepdim=True)[0]
        return torch.rsqrt(var + p["eps"])  # (N, G, 1)

    def mean(self, p, t):
        n, c = t.shape[:2]
        g = self._grouped(p, t).mean(-1, keepdim=True)  # (N, G, 1) -> per channel
        return g.expand(n, p["groups"], c // p["groups"]).reshape((n, c) + (1,) * (t.dim() - 2))

    def factor(self, p, rstd, like):
        n, c = like.shape[:2]
        per_channel = rstd.expand(n, p["groups"], c // p["groups"]).reshape((n, c) + (1,) * (like.dim() - 2))
        return per_channel if p["weight"] is None else per_channel * self.gamma_view(p, like, p["weight"])

    def gamma_view(self, p, t, w):
        return w.reshape((-1,) + (1,) * (t.dim() - 2))


class InstanceNorm(GroupNorm):
    """``nn.InstanceNorm1d/2d/3d`` / ``F.instance_norm`` with each sample's own statistics: a
    GroupNorm with a group per channel (with running statistics in eval it is a batchnorm)."""
    kind = "instancenorm"
    modules = _INSTANCE_NORMS
    functions = (F.instance_norm, aten.instance_norm)
    row = ("InstanceNorm1d/2d/3d, `F.instance_norm`, `aten.instance_norm` (the sample's statistics)",
           "`zr + pr*beta`, `zr = (r - mean_c(r)) / std_c(a) * gamma` per channel c", "`zi + (1-pr)*beta`")

    def claim(self, graph, node, dep, module):
        if not instance_statistics(node, module):
            return None  # running statistics: the BatchNorm rule's
        if module is None and dep != [arg(node, 0, "input")]:
            raise unsupported(node, "a normalisation whose weight or bias depends on the input")
        return Step(node, self, dep, module=module)

    def params(self, step, value_of):
        a = value_of(step.dep[0])
        m = step.module
        if m is not None:
            if a.dim() == m._get_no_batch_dim():
                raise unsupported(step.node, "an instance norm of an unbatched input")
            return {"groups": a.shape[1], "weight": m.weight, "bias": m.bias, "eps": m.eps}
        names = ["input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"]
        if op_is(step.node.target, aten.instance_norm):
            names = ["input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum", "eps"]
        vals = dict(zip(names, load_arg(value_of, step.node.args)))
        vals.update(load_arg(value_of, step.node.kwargs))
        return {"groups": a.shape[1], "weight": vals.get("weight"), "bias": vals.get("bias"),
                "eps": vals.get("eps", 1e-5)}


class RMSNorm(_Norm):
    """``nn.RMSNorm`` / ``F.rms_norm``: no centring, divided by the total's RMS over the last
    dims, times gamma (no beta): ``r / rms(a) * gamma``."""
    kind = "rmsnorm"
    modules = _RMS_NORM_MODULES
    functions = _RMS_NORM_FUNCTIONS
    row = ("RMSNorm, `F.rms_norm`, `aten.rms_norm`", "`r / sqrt(mean(a^2) + eps) * gamma`", "`i / sqrt(mean(a^2) + eps) * gamma`")

    def params(self, step, value_of):
        m = step.module
        if m is not None:
            shape, weight, eps = tuple(m.normalized_shape), m.weight, m.eps
        else:
            names = ["input", "normalized_shape", "weight", "eps"]
            vals = dict(zip(names, load_arg(value_of, step.node.args)))
            vals.update(load_arg(value_of, step.node.kwargs))
            shape, weight, eps = vals["normalized_shape"], vals.get("weight"), vals.get("eps")
            shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        return {"dims": tuple(range(-len(shape), 0)), "weight": weight, "bias": None, "eps": eps}

    def rstd(self, p, a):
        eps = p["eps"] if p["eps"] is not None else torch.finfo(a.dtype).eps  # F.rms_norm's default
        return torch.rsqrt(a.pow(2).mean(p["dims"], keepdim=True) + eps)

    def mean(self, p, t):
        return None


class Normalize(_Norm):
    """``F.normalize``: the parts divided by the total's p-norm over ``dim`` (a statistic of the
    total, as the norms' std), no centring, no affine (SwiftFormer's additive attention)."""
    kind = "normalize"
    functions = (F.normalize,)
    row = ("`F.normalize` (any p, dim)", "`r / max(norm_p(a), eps)`", "`i / max(norm_p(a), eps)`")

    def params(self, step, value_of):
        vals = dict(zip(["input", "p", "dim", "eps"], load_arg(value_of, step.node.args)))
        vals.update(load_arg(value_of, step.node.kwargs))
        if vals.get("out") is not None:
            raise unsupported(step.node, "F.normalize with out=")
        return {"p": vals.get("p", 2.0), "dim": vals.get("dim", 1), "eps": vals.get("eps", 1e-12),
                "weight": None, "bias": None}

    def rstd(self, p, a):
        return a.norm(p["p"], p["dim"], keepdim=True).clamp_min(p["eps"]).reciprocal()

    def mean(self, p, t):
        return None


def _lrn_denominator(a: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """``(k + alpha * mean of a^2 over size neighbouring channels)^beta``, by the same ops as
    ``F.local_response_norm`` (whose output is ``a / this``)."""
    div = a.mul(a)
    if a.dim() == 3:
        div = F.avg_pool2d(F.pad(div.unsqueeze(1), (0, 0, size // 2, (size - 1) // 2)), (size, 1), stride=1).squeeze(1)
    else:
        sizes = a.size()
        div = F.pad(div.view(sizes[0], 1, sizes[1], sizes[2], -1), (0, 0, 0, 0, size // 2, (size - 1) // 2))
        div = F.avg_pool3d(div, (size, 1, 1), stride=1).squeeze(1).view(sizes)
    return div.mul(alpha).add(k).pow(beta)


class LocalResponseNorm(Rule):
    """``nn.LocalResponseNorm`` / ``F.local_response_norm`` (AlexNet's original, GoogLeNet's):
    the input divided by a statistic of the total over neighbouring channels at each position,
    shared by the parts as the norms' std is."""
    kind = "lrn"
    modules = (nn.LocalResponseNorm,)
    functions = (F.local_response_norm,)
    row = ("LocalResponseNorm, `F.local_response_norm`", "`r / d(a)`, `d(a) = (k + alpha * avg_c(a^2))^beta` over "
           "neighbouring channels", "`i / d(a)`")

    def _denominator(self, step, a, aux):
        if aux is not None and aux[0] is a:
            return aux[1]
        m = step.module
        if m is not None:
            p = {"size": m.size, "alpha": m.alpha, "beta": m.beta, "k": m.k}
        else:
            p = dict(zip(["input", "size", "alpha", "beta", "k"], step.node.args))
            p.update(step.node.kwargs)
            p.pop("input", None)
        return _lrn_denominator(a, **p)

    def total(self, step, value_of):
        a = value_of(step.dep[0])
        div = self._denominator(step, a, None)
        return a / div, (a, div)

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        return mags[step.dep[0]] / aux[1], aux

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        return r / aux[1], i / aux[1]

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        return rel[d] / rows_like(self._denominator(step, values[d], aux), rel[d].shape[0])

    def fresh(self, step, rel, out):
        return True

    def locality(self, step, values):
        return Elementwise()  # over the channels at each position


class AddCMul(Rule):
    """``torch.addcmul(beta, alpha, x)`` = ``beta + value * alpha * x`` with constant (or
    context) ``alpha`` and ``beta``: ResMLP's affine "norm" (timm's ``Affine``). The scaled part
    ``value * alpha * r`` is the affine rule's ``zr``, beta is split by it."""
    kind = "addcmul"
    functions = (torch.addcmul, aten.addcmul)
    methods = ("addcmul",)
    fuses_relu = True
    row = ("`torch.addcmul(beta, alpha, x)` (`aten.addcmul`) with constant alpha, beta (ResMLP's affine)",
           "`zr + pr*beta`, `zr = alpha*r`", "`zi + (1-pr)*beta`")

    @staticmethod
    def _operands(node):
        return node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("tensor1")), \
            (node.args[2] if len(node.args) > 2 else node.kwargs.get("tensor2"))

    def claim(self, graph, node, dep, module):
        base, t1, t2 = self._operands(node)
        dependent = graph.dependent
        if base in dependent:
            raise unsupported(node, "addcmul onto an input-dependent tensor (only a constant beta "
                                    "plus a constant times the input, ResMLP's affine, has a rule)")
        if (t1 in dependent) == (t2 in dependent):
            raise unsupported(node, "addcmul of two input-dependent factors")
        return Step(node, self, dep, extra={"x": t1 if t1 in dependent else t2})

    def gate_like(self, graph, node, gates):
        return only_gates(node, graph.reach, gates)

    def context_operands(self, graph, node, reach, gates):
        _, t1, t2 = self._operands(node)  # a gate as the factor is context (as in Scale)
        if t1 in reach and t2 in reach and (t1 in gates) != (t2 in gates):
            return {t1, t2} & gates
        return set()

    def _parts(self, step, value_of):
        """(scale: t -> value * alpha * t, beta)."""
        base, t1, t2 = self._operands(step.node)
        alpha = load_arg(value_of, t2 if t1 is step.extra["x"] else t1)
        value = load_arg(value_of, step.node.kwargs.get("value", 1))
        beta = load_arg(value_of, base)
        if not isinstance(beta, torch.Tensor):
            beta = torch.as_tensor(beta, dtype=value_of(step.extra["x"]).dtype)

        def scale(t):
            out = t * alpha
            return out if value == 1 else out * value
        return scale, beta

    def total(self, step, value_of):
        scale, _ = self._parts(step, value_of)
        a = value_of(step.extra["x"])
        return call_with(step, value_of, {}), NormAux(a, None, scale(a))

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        scale, beta = self._parts(step, value_of)
        scaled = scale(mags[step.extra["x"]]).abs()
        return scaled + beta.abs(), NormAux(aux.source, None, aux.pre, zero_tol * scaled)

    def crop_aux(self, step, aux, loc, crop):
        return NormAux(aux.source, None, aux.pre, None if aux.tol is None else crop(aux.tol))

    def reference(self, step, parts, value_of, aux):
        scale, beta = self._parts(step, value_of)
        r, i = parts[step.extra["x"]]
        zr, zi = scale(r), scale(i)
        return split_bias(zr, zi, beta, last=True, tol=aux.tol)

    def relevant(self, step, rel, values, aux, ops, m):
        scale, beta = self._parts(step, values.__getitem__)
        a = values[step.extra["x"]]
        pre = aux.pre if aux is not None and aux.source is a else scale(a)
        return split_beta(ops, scale(rel[step.extra["x"]]), pre, beta, step.relu_fused, own=True,
                          tol=None if aux is None else aux.tol)

    def fresh(self, step, rel, out):
        return True  # a tensor of its own (never a view of the input)

    def locality(self, step, values):
        # element-wise where alpha and beta are scalars or per channel (no extent over the map's
        # positions): a window's crop of the total gives its own pre-activation
        _, beta = self._parts(step, values.__getitem__)
        _, t1, t2 = self._operands(step.node)
        alpha = load_arg(values.__getitem__, t2 if t1 is step.extra["x"] else t1)
        per_channel = all(not isinstance(c, torch.Tensor) or c.numel() == 1
                          or (c.dim() >= 2 and tuple(c.shape[-2:]) == (1, 1)) for c in (alpha, beta))
        return Elementwise() if per_channel else None

"""Conv / linear layers: the weights apply to each part; the bias is split by magnitude."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..capture.nodes import Step, load_arg, op_is
from ..ops import conv2d
from ..ops.precision import weight_apply
from ..ops.torch_ops import EPS, split_weights
from .base import Rule, Sliding, as_tuple, mask_dim, merge_masks, only_gates, per_mask, split_by_rows, unsupported

aten = torch.ops.aten

# oneDNN's linear (the kernel torch.compile's CPU backend calls) where torch has it, from
# ONEDNN_LINEAR_MIN_ROWS rows on (below that the default GEMM is as fast): docs/kernels.md.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_LINEAR_MIN_ROWS = 4


def linear_no_bias(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(t, weight)``; float32 (M, F) CPU inference goes to oneDNN's linear, faster at
    the few rows of an ACD call's head (same numbers up to float32 summation order)."""
    if (_ONEDNN_LINEAR and t.device.type == "cpu" and t.dtype == weight.dtype == torch.float32 and t.dim() == 2
            and t.shape[0] >= ONEDNN_LINEAR_MIN_ROWS
            and not (torch.is_grad_enabled() and (t.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(t, weight, None, "none", [], "")
    return F.linear(t, weight)


# |W| of a Linear larger than this is taken in row blocks through one buffer: a whole |W| is a
# fresh allocation of the weight's size whose page faults cost more than the product
# (VGG16's first Linear, 400 MB: docs/kernels.md "CPU buffer reuse").
ABS_BLOCK_BYTES = 1 << 24


def linear_abs(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``linear_no_bias(t, weight.abs())`` without a whole |W| in memory."""
    rows = max(1, ABS_BLOCK_BYTES // max(1, weight.shape[1] * weight.element_size()))
    if weight.shape[0] <= rows or (torch.is_grad_enabled() and (t.requires_grad or weight.requires_grad)):
        return linear_no_bias(t, weight.abs())
    out = t.new_empty(t.shape[:-1] + (weight.shape[0],))
    buf = weight.new_empty((rows, weight.shape[1]))
    for i in range(0, weight.shape[0], rows):
        block = torch.abs(weight[i:i + rows], out=buf[:min(rows, weight.shape[0] - i)])
        out[..., i:i + rows] = linear_no_bias(t, block)
    return out


_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _transposed(m: nn.Module, step: Step, value_of: Callable):
    """(the functional transposed convolution, its output padding) of a ConvTranspose module
    call, with the ``output_size`` argument the call may pass (the padding that reaches it)."""
    nd = len(m.kernel_size)
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    size = load_arg(value_of, step.node.args[1] if len(step.node.args) > 1 else step.node.kwargs.get("output_size"))
    if size is None:
        return fn, m.output_padding
    x = value_of(step.dep[0])
    return fn, m._output_padding(x, list(size), list(m.stride), list(m.padding), list(m.kernel_size), nd,
                                 list(m.dilation))


def affine_parts(step: Step, value_of: Callable, absolute: bool = False):
    """(apply the weights without bias to a tensor, the bias or None) for an affine step. The
    weights apply in bfloat16 inside a ``low_precision`` scope (``Decomposer(precision="bf16")``);
    ``absolute``: the weights' magnitudes |W| instead (the magnitude scale)."""
    m = step.module
    if m is not None:
        if isinstance(m, nn.Linear):
            return (lambda t: weight_apply(linear_abs if absolute else linear_no_bias, t, m.weight)), m.bias
        weight = m.weight.abs() if absolute else m.weight
        if isinstance(m, _CONV_TRANSPOSE):
            fn, output_padding = _transposed(m, step, value_of)
            return (lambda t: weight_apply(fn, t, weight, None, m.stride, m.padding, output_padding, m.groups,
                                           m.dilation)), m.bias
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return (lambda t: weight_apply(conv2d, t, weight, m.stride, m.padding, m.dilation, m.groups)), m.bias
        return (lambda t: weight_apply(m._conv_forward, t, weight, None)), m.bias
    node = step.node
    args = list(load_arg(value_of, node.args[1:]))
    kwargs = dict(load_arg(value_of, node.kwargs))
    weight = args.pop(0) if args else kwargs.pop("weight")
    bias = args.pop(0) if args else kwargs.pop("bias", None)
    fn = node.target
    if op_is(fn, F.linear, aten.linear) and not args and not kwargs:
        return (lambda t: weight_apply(linear_abs if absolute else linear_no_bias, t, weight)), bias
    weight = weight.abs() if absolute else weight
    return (lambda t: weight_apply(fn, t, weight, None, *args, **kwargs)), bias


def is_linear(step: Step) -> bool:
    return isinstance(step.module, nn.Linear) or op_is(step.node.target, F.linear, aten.linear)


def channels_last(step: Step, t: torch.Tensor) -> bool:
    """Whether the layer's channels are the last dim: a Linear on (N, ..., F) (tokens)."""
    return is_linear(step) and t.dim() > 2


def bias_view(bias: torch.Tensor, like: torch.Tensor, last: bool) -> torch.Tensor:
    return bias if last else bias.reshape((1, -1) + (1,) * (like.dim() - 2))


def split_bias(zr: torch.Tensor, zi: torch.Tensor, bias: torch.Tensor | None, last: bool = False,
               tol: torch.Tensor | None = None):
    """The reference's bias split of the pre-bias parts: ``pr = (|zr|+eps) / ((|zr|+eps) + (|zi|+eps))``,
    with numerical zero where ``tol`` is given (``fastacd.ops.torch_ops.split_weights``)."""
    if bias is None:
        return zr, zi
    prop_rel, prop_irrel = split_weights(zr, zi, tol, EPS)
    prop_sum = prop_rel + prop_irrel
    b = bias_view(bias, zr, last)
    return zr + prop_rel / prop_sum * b, zi + prop_irrel / prop_sum * b


def split_bias_tokens(ops, zr: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor, relu: bool,
                      inplace: bool, tol: torch.Tensor | None = None) -> torch.Tensor:
    """The bias split of a Linear on tokens: zr (M masks of pre's shape (..., F)), pre the
    total's pre-bias output. Every element of one sample is a channel of its own, the bias
    repeated along the tokens, so the split ops run on (M, T) rows as they lie (moving the
    features to dim 1 for them copied zr there and back, and left the next layer a strided
    input)."""
    m = zr.numel() // max(1, pre.numel())
    rows = zr if mask_dim(zr.shape, pre.shape) == 0 and zr.is_contiguous() else per_mask(zr, pre.shape)
    flat = rows.reshape(m, pre.numel())  # a view where rows is contiguous
    b = bias.repeat(pre.numel() // bias.numel())
    tol = None if tol is None else tol.expand(pre.shape).reshape(1, -1)  # tol: pre's shape (one per element)
    if inplace and flat.data_ptr() == zr.data_ptr() and flat.is_contiguous():
        ops.bias_split_(flat, pre.reshape(1, -1), b, relu, tol)
        return zr
    out = ops.bias_split(flat, pre.reshape(1, -1), b, relu, tol)
    if rows is zr:
        return out.view(zr.shape)
    return merge_masks(out.view((m,) + tuple(pre.shape)), mask_dim(zr.shape, pre.shape))


def own_buffer(out: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``out`` may be overwritten: a contiguous (or channels_last) tensor that shares no memory with
    ``source`` (a user's weights could return a view of their input) and needs no grad."""
    return ((out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)) and not (torch.is_grad_enabled() and out.requires_grad)
            and out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr())


def conv2d_params(step: Step, value_of: Callable):
    """(weight, stride, padding, dilation, groups) of a zero-padded 2-d convolution, or None."""
    m = step.module
    if m is not None:
        if not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros":
            return None
        padding = m.padding
        if isinstance(padding, str):
            if padding != "valid":
                return None
            padding = 0
        return m.weight, as_tuple(m.stride), as_tuple(padding), as_tuple(m.dilation), m.groups
    node = step.node
    if not op_is(node.target, F.conv2d, aten.conv2d):
        return None
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    vals = dict(zip(names, load_arg(value_of, node.args)))
    vals.update(load_arg(value_of, node.kwargs))
    padding = vals.get("padding", 0)
    if isinstance(padding, str):
        if padding != "valid":
            return None
        padding = 0
    return (vals["weight"], as_tuple(vals.get("stride", 1)), as_tuple(padding),
            as_tuple(vals.get("dilation", 1)), int(vals.get("groups", 1)))


class Affine(Rule):
    kind = "affine"
    modules = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + _CONV_TRANSPOSE
    functions = (F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                 aten.conv1d, aten.conv2d, aten.conv3d, aten.linear, aten.conv_transpose1d, aten.conv_transpose2d,
                 aten.conv_transpose3d)
    fuses_relu = True
    row = ("Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, `F.conv*`, `F.conv_transpose*`, `F.linear`; their `aten` "
           "ops", "`zr + pr*b`", "`zi + (1-pr)*b`")

    def claim(self, graph, node, dep, module):
        if module is None and dep != [node.args[0]]:
            raise unsupported(node, "weights that depend on the input")
        return Step(node, self, dep, module=module)

    def gate_like(self, graph, node, gates):
        """A linear map of attention weights (CaiT's talking heads mix the heads' softmax) is
        context too."""
        return only_gates(node, graph.reach, gates)

    def total(self, step, value_of):
        weights, bias = affine_parts(step, value_of)
        pre = weights(value_of(step.dep[0]))
        out = pre if bias is None else pre + bias_view(bias, pre, channels_last(step, pre))
        return out, (weights, bias, pre, None)

    def magnitude(self, step, mags, value_of, aux, zero_tol):
        # |W| |a| from the true input: the scale of W r's rounding (not |W| times the input's
        # scale, which grows layer by layer far past the values)
        weights, bias, pre, _ = aux
        scale = affine_parts(step, value_of, absolute=True)[0](value_of(step.dep[0]).abs())
        out = scale if bias is None else scale + bias_view(bias.abs(), scale, channels_last(step, pre))
        return out, (weights, bias, pre, None if bias is None else zero_tol * scale)

    def reference(self, step, parts, value_of, aux):
        weights, bias, pre, tol = aux
        r, i = parts[step.dep[0]]
        return split_bias(weights(r), weights(i), bias, channels_last(step, pre), tol)

    def relevant(self, step, rel, values, aux, ops, m):
        weights, bias, pre, tol = aux
        r = rel[step.dep[0]]
        zr = weights(r)
        if bias is None:
            return zr.clamp_min(0) if step.relu_fused else zr
        if channels_last(step, zr) or (pre.shape[0] != 1 and is_linear(step)):  # or (B * N, F) rows
            return split_bias_tokens(ops, zr, pre, bias, step.relu_fused, own_buffer(zr, r), tol)
        if isinstance(pre, torch.Tensor) and pre.shape[0] != 1:  # a convolution over rows of one sample
            n = pre.shape[0]
            return split_by_rows(lambda r_, t_, tol_: ops.bias_split(r_, t_, bias.repeat(n), step.relu_fused, tol_),
                                 zr, pre, tol)
        if own_buffer(zr, r):  # write the split into the fresh conv output (CPU page faults)
            return ops.bias_split_(zr, pre, bias, step.relu_fused, tol)
        return ops.bias_split(zr, pre, bias, step.relu_fused, tol)

    def fresh(self, step, rel, out):
        return own_buffer(out, rel[step.dep[0]])

    def paired_relevant(self, step, p):
        # one weight application for the true and relevant rows, fused split (and ReLU)
        weights, bias = affine_parts(step, p.value_of)
        return p.affine(step, weights, bias, channels_last(step, p.rel[step.dep[0]]))

    def locality(self, step, values):
        conv = conv2d_params(step, values.__getitem__)
        if conv is None:
            return None
        weight, stride, padding, dilation, groups = conv
        return Sliding(tuple(weight.shape[2:]), stride, padding, dilation, weight, groups)

    def crop_aux(self, step, aux, loc: Sliding, crop: Callable):
        """aux for a window: the convolution without padding (the crop carries it) and the
        total pre-activation cropped to the output window."""
        _, bias, pre, tol = aux
        weights = (lambda t: weight_apply(conv2d, t, loc.weight, loc.stride, 0, loc.dilation, loc.groups,
                                          nchw_out=True))
        if bias is None:
            return weights, None, None, None
        return weights, bias, crop(pre), (None if tol is None else crop(tol))

    def macs(self, step, value_of):
        if step.module is not None:
            return step.module.weight.numel()
        w = step.node.args[1] if len(step.node.args) > 1 else step.node.kwargs["weight"]
        return load_arg(value_of, w).numel()

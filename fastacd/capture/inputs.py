"""The input and the masks of a CD call, validated and put in canonical shape.

Shared by the engine and the reference, so both read a mask the same way:

* a mask holds 0/1 (bool, integer or float) or soft values in [0, 1]; anything else is an
  error (a 0/255 image mask would multiply the input by 255);
* for an image input (1, C, *S): one mask is (*S) or (C, *S) or (1, 1 or C, *S); M masks
  are (M, *S), (M, 1, *S) or (M, C, *S). A 3-d (C, *S) stack is ambiguous when its first
  dim equals C > 1 (one per-channel mask or C masks?): an error here; the drop-in
  ``fastacd.cd`` reads it as one mask, as the original package does;
* for a 2-d input (1, F): (F,) or (M, F).
"""
from __future__ import annotations

import numpy as np
import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether t has no NaN or Inf: a finite sum settles it in one reduction; only a
    non-finite sum (which finite values can also give by overflowing) is checked element-wise."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_input(x) -> torch.Tensor:
    """x as a floating-point tensor with a batch dim of 1, finite."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise ValueError("input is on the meta device (no values); pass a real tensor")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] != 1:
        raise ValueError(f"input must have a batch dimension of 1, e.g. (1, C, H, W); got shape "
                         f"{tuple(x.shape)}. Use x[None] for a single image, and call once per image.")
    if not all_finite(x):
        raise ValueError("input contains NaN or Inf values")
    return x


def _as_tensor(masks) -> torch.Tensor:
    if isinstance(masks, torch.Tensor):
        return masks
    arr = np.asarray(masks)
    if arr.dtype == object:
        raise TypeError("masks must be a tensor or array of numbers")
    return torch.from_numpy(np.ascontiguousarray(arr))


def check_values(masks: torch.Tensor) -> None:
    """Refuse mask values outside [0, 1] (saying what they look like)."""
    if masks.dtype == torch.bool or masks.numel() == 0:
        return
    if masks.is_complex():
        raise TypeError(f"masks must be real numbers, got {masks.dtype}")
    lo, hi = masks.min(), masks.max()
    if masks.is_floating_point() and not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError("masks contain NaN or Inf values")
    lo, hi = float(lo), float(hi)
    if lo >= 0 and hi <= 1:
        return
    if lo >= 0 and hi == 255:
        raise ValueError("mask values go up to 255 (an 8-bit image mask?); a mask holds 0/1 or soft "
                         "values in [0, 1]: pass mask > 0 (or mask / 255 for a soft mask)")
    raise ValueError(f"mask values must lie in [0, 1] (1 = relevant; soft masks allowed), got values "
                     f"from {lo:g} to {hi:g}")


def check_masks(x: torch.Tensor, masks, one_per_channel_stack: bool = False) -> torch.Tensor:
    """Masks as (M, 1 or C, *S) (or (M, F) for a 2-d input) in x's dtype and device, validated.

    ``one_per_channel_stack``: read an ambiguous (C, *S) stack as one mask (the original
    package's reading) instead of refusing it.
    """
    masks = _as_tensor(masks)
    if masks.device.type == "meta":
        raise ValueError("masks are on the meta device (no values); pass a real tensor")
    check_values(masks)
    masks = masks.to(device=x.device, dtype=x.dtype)
    feat, spatial, shape = tuple(x.shape[1:]), tuple(x.shape[2:]), tuple(masks.shape)
    channels = x.shape[1]
    dims = lambda t: ", ".join(map(str, t))  # noqa: E731
    if x.dim() == 2:
        if shape == feat:
            masks = masks[None]
        elif masks.dim() != 2 or shape[1:] != feat:
            raise ValueError(f"mask shape {shape} does not fit the input of shape "
                             f"{tuple(x.shape)}; expected ({dims(feat)},) or (M, {dims(feat)})")
    elif shape == spatial:
        masks = masks[None, None]
    elif masks.dim() == len(spatial) + 1 and shape[1:] == spatial:
        if shape[0] == channels and channels > 1:
            if not one_per_channel_stack:
                raise ValueError(
                    f"mask shape {shape} is ambiguous for an input with {channels} channels: one "
                    f"per-channel mask or {channels} masks? Pass (1, {dims(feat)}) for one mask, "
                    f"({channels}, 1, {dims(spatial)}) for {channels} masks")
            masks = masks[None]
        else:
            masks = masks[:, None]
    elif not (masks.dim() == x.dim() and shape[2:] == spatial and shape[1] in (1, channels)):
        raise ValueError(
            f"mask shape {shape} does not fit the input of shape {tuple(x.shape)}; expected "
            f"({dims(spatial)}), ({dims(feat)}) for one mask, (M, {dims(spatial)}), "
            f"(M, 1, {dims(spatial)}) or (M, {dims(feat)}) for M masks")
    if masks.shape[0] == 0:
        raise ValueError("empty mask batch: pass at least one mask")
    return masks

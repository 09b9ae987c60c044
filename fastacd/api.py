"""The original package's entry points (``import fastacd as acd``), on the batched engine."""
from __future__ import annotations

import weakref

import numpy as np
import torch

from . import ops
from ._version import __version__
from .capture.graph import per_model
from .capture.inputs import check_masks
from .engine.decomposer import Decomposer, available_backends, resolve_backend
from .rules import ZERO_TOL

_DECOMPOSERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # (modules, {key: dec})


def decomposer_for(model: torch.nn.Module, backend: str = "auto", precision: str = "float32",
                   zero_tol: float = ZERO_TOL) -> Decomposer:
    """A Decomposer per (model, backend, precision, zero_tol), traced once and reused across calls
    ("auto" and the backend it resolves to are one) while the model's modules stay the same
    objects (a replaced submodule is traced again)."""
    kept = per_model(_DECOMPOSERS, model)
    key = (resolve_backend(backend), precision, zero_tol)
    if key not in kept:
        kept[key] = Decomposer(model, backend=backend, precision=precision, zero_tol=zero_tol).refer_weakly()
    return kept[key]


def cd(im_torch: torch.Tensor, model: torch.nn.Module, mask=None, model_type=None, device=None,
       transform=None):
    """Contextual decomposition scores for a blob (drop-in for ``acd.cd``).

    Params
    ------
    im_torch: torch.Tensor, shape (1, C, H, W)
    model: any traceable PyTorch model (put in eval mode, as the original does)
    mask: array_like of 0/1 (or soft values in [0, 1]), 1 = relevant; one mask (H, W), (C, H, W)
        or (1, C, H, W) as in the original, or a batch of M masks (M, H, W) with M != C, or
        (M, 1 or C, H, W), scored in one batched call
    model_type: accepted for compatibility ('mnist', 'resnet18'); the tracer handles any model
    device: None = the model's device; otherwise the model and image are moved there
    transform: used when ``mask`` is None: ``transform(im_torch)`` is the relevant input

    Returns
    -------
    relevant, irrelevant: torch.Tensor, (M, num_classes); relevant + irrelevant = the logits
    """
    del model_type  # every architecture goes through the same traced engine
    model.eval()  # as the original: CD is defined on eval behaviour
    if device is not None:
        model = model.to(device)
    else:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    if isinstance(im_torch, np.ndarray):
        im_torch = torch.from_numpy(im_torch)
    im_torch = im_torch.to(device)
    dec = decomposer_for(model)
    if mask is not None:
        # a (C, H, W) mask is one per-channel mask, as in the original (Decomposer.cd refuses it)
        res = dec.cd(im_torch, check_masks(im_torch, mask, one_per_channel_stack=True))
    elif transform is not None:
        relevant = transform(im_torch).to(device=device, dtype=im_torch.dtype)
        if relevant.dim() < im_torch.dim():
            relevant = relevant.reshape((1,) * (im_torch.dim() - relevant.dim()) + tuple(relevant.shape))
        res = dec.cd_relevant_input(im_torch, relevant.expand(-1, *im_torch.shape[1:]))
    else:
        raise ValueError("cd needs either a mask or a transform")
    return res.relevant, res.irrelevant


def build_info() -> dict:
    """Versions, the compiled extension and its kernels, devices."""
    info = dict(ops.build_info())
    info.update(fastacd=__version__, torch=torch.__version__,
                cuda_available=torch.cuda.is_available(), backends=available_backends())
    return info

"""How much CD depends on rounding (design.md section 9, docs/engine.md "Numerical zero").

torchvision models with trained-like parameters (conv/linear biases N(0, 0.05), batchnorm
running statistics and affine parameters like a trained net's) at 224x224; four block masks
plus the full and the empty mask. Largest gaps, as a fraction of the largest |logit|:

* f32 vs f64: the engine in float32 against the engine in float64;
* engine vs reference: both in float64;
* batched vs one-mask: the engine's batched call against one call per mask (float32);
* vs paper: the float64 engine against the published formula (no numerical zero).

    .venv/bin/python bench/numerical_zero.py [--models vgg16 ...] [--size 224] [--zero-tol 1e-4] [--seed 0]
                                             [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torchvision

import fastacd

MODELS = ("vgg16", "vgg11_bn", "alexnet", "resnet18")


def trained_like(name: str, seed: int = 0, init: str = "trained") -> torch.nn.Module:
    """Random init, then (``init='trained'``) biases and batchnorm statistics like a trained
    network's; ``init='torchvision'`` keeps torchvision's own initialisation."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    return model if init == "torchvision" else trained_parameters(model)


def trained_parameters(model: torch.nn.Module, affine_norms=(torch.nn.BatchNorm2d,)) -> torch.nn.Module:
    """Biases, batchnorm statistics and the affines of ``affine_norms`` like a trained
    network's, in place (from torch's global generator)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.05)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.2, 2.0)
            if isinstance(m, affine_norms):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def block_masks(size: int) -> torch.Tensor:
    """Four block masks (a quarter, a centre block, a thin band, a corner tile), full, empty."""
    m = torch.zeros(6, 1, size, size)
    h = size // 2
    m[0, :, :h, :h] = 1
    m[1, :, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    m[2, :, :, h - 8:h + 8] = 1
    m[3, :, -16:, -16:] = 1
    m[4] = 1
    return m


def gaps(name: str, size: int, backend: str = "auto", init: str = "trained",
         zero_tol: float = fastacd.rules.ZERO_TOL, seed: int = 0) -> dict:
    model = trained_like(name, seed=seed, init=init)
    torch.manual_seed(1 + seed)
    x = torch.randn(1, 3, size, size)
    masks = block_masks(size)
    with torch.no_grad():
        m64, x64 = model.double(), x.double()
        paper, _ = fastacd.reference.cd(m64, x64, masks.double(), zero_tol=0)
        e64 = fastacd.Decomposer(m64, backend=backend, zero_tol=zero_tol).cd(x64, masks.double())
        ref, _ = fastacd.reference.cd(m64, x64, masks.double(), zero_tol=zero_tol)
        scale = float(e64.output.abs().max())
        m32 = model.float()
        dec32 = fastacd.Decomposer(m32, backend=backend, zero_tol=zero_tol)
        e32 = dec32.cd(x, masks)
        one = torch.cat([dec32.cd(x, mk[None]).relevant for mk in masks])
    return {
        "vs_paper_f64": float((e64.relevant - paper).abs().max()) / scale,
        "f32_vs_f64": float((e32.relevant.double() - e64.relevant).abs().max()) / scale,
        "engine_vs_reference_f64": float((e64.relevant - ref).abs().max()) / scale,
        "batched_vs_one_mask_f32": float((e32.relevant - one).abs().max()) / scale,
        "full_mask_irrelevant_f32": float(e32.irrelevant[4].abs().max()) / scale,
        "logit_scale": scale,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--json", default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--init", choices=("trained", "torchvision"), default="trained",
                   help="trained-like biases and batchnorm statistics, or torchvision's init")
    p.add_argument("--zero-tol", type=float, default=fastacd.rules.ZERO_TOL,
                   help="Decomposer's zero_tol (0 = the paper's formula, no numerical zero)")
    p.add_argument("--seed", type=int, default=0, help="of the parameters (and the input: seed + 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = {}
    for name in args.models:
        t = time.perf_counter()
        rows[name] = gaps(name, args.size, args.backend, args.init, args.zero_tol, args.seed)
        r = rows[name]
        print(f"{name:10s} vs paper (f64) {r['vs_paper_f64']:.1e}  f32 vs f64 {r['f32_vs_f64']:.1e}  engine vs reference (f64) "
              f"{r['engine_vs_reference_f64']:.1e}  batched vs one-mask (f32) {r['batched_vs_one_mask_f32']:.1e}"
              f"  full mask irrelevant {r['full_mask_irrelevant_f32']:.1e}  ({time.perf_counter() - t:.0f} s)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "zero_tol": args.zero_tol, "seed": args.seed, "backend": args.backend,
                       "init": args.init, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

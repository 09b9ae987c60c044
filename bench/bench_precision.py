"""Reduced precision (``precision="bf16"``) and channels_last: accuracy against float32, and
the issue-18 acceptance ratios, each measured in one run (docs/precision.md).

    .venv/bin/python bench/bench_precision.py --accuracy      # bf16 vs float32, 4 models x 2 weights
    .venv/bin/python bench/bench_precision.py --acceptance    # ACD VGG16 vs the original; CD/forward
    .venv/bin/python bench/bench_precision.py --layout        # CD per mask by layout and precision

Figures go to bench/results/precision.json. One thread (``ACD_BENCH_THREADS``); times are
process CPU time (the 2-core box is shared by several jobs: wall time swings 2-5x, CPU time
much less; both are recorded).

--accuracy, per model (torchvision VGG16, ResNet50, ConvNeXt-Tiny; timm DeiT-Tiny as the ViT:
torchvision's vit_b_16 calls nn.MultiheadAttention, which has no rule on main), random init
and trained-like weights (``numerical_zero.trained_like``; for the ViT, biases and LayerNorm
affines alike), IMAGES smooth random images at SIZE px:
* ``cd_gap``: max |relevant_bf16 - relevant_float32| over 32 random tile-union masks and all
  classes, as a fraction of max |output| (the output scale); ``cd_gap_label``: the same for
  the predicted class only, as a fraction of |its logit|;
* ``levels_identical``: ACD (sweep SIZE/16, percentile 95, 5 iterations) in bf16 (decisions in
  float32, the default) vs float32: the fraction of levels whose components are identical,
  level by level (a hierarchy that diverges at level k counts its later levels as different);
  ``hierarchies_identical``; ``levels_identical_bf16_alone``: the same for
  ``exact_decisions=False``.
--acceptance: ACD of VGG16 at the notebook settings (224, sweep 14, percentile 95, 5
iterations; bench_agg's image and model) in float32, bf16 (decisions in float32, the default)
and bf16 alone (``exact_decisions=False``), against the original ``acd`` package's ``acd.cd``
per call (measured before and after) times the masks the original would score (bench_agg's
extrapolation); ``--rounds`` runs of each in turn, the best kept; CD of 64 masks per mask over the best plain forward (batch 1, 8, 64) for
VGG16, ResNet18, AlexNet in float32 and in bf16 against a bf16 channels_last forward.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import fastacd  # noqa: E402
from fastacd import agg_2d  # noqa: E402
from fastacd.api import _DECOMPOSERS  # noqa: E402

from _results import record, tile_masks  # noqa: E402
from bench_agg import SETTINGS, _setup, original_per_call  # noqa: E402
from numerical_zero import trained_like, trained_parameters  # noqa: E402

THREADS = int(os.environ.get("ACD_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
SUITE = "precision"


def cpu_timed(fn, *args, **kwargs):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - c, time.perf_counter() - w


# ------------------------------------------------------------------------------- models

def timm_vit(trained: bool, size: int, seed: int = 0):
    import timm
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=size).eval()
    for blk in model.blocks:  # the written-out attention (softmax(q k^T) @ v), not SDPA
        blk.attn.fused_attn = False
    return trained_parameters(model, affine_norms=(torch.nn.LayerNorm,)) if trained else model


def build(name: str, trained: bool, size: int):
    if name == "deit_tiny":
        return timm_vit(trained, size)
    if trained:
        return trained_like(name)
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def image(seed: int, size: int) -> torch.Tensor:
    """A smooth random image (blobs at 1/28 of the size plus fine noise), normalised."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, max(2, size // 28), max(2, size // 28), generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return x + 0.3 * torch.randn(1, 3, size, size, generator=g)


def tile_union_masks(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tile = size // 16
    cells = (torch.rand(n, 16, 16, generator=g) < torch.rand(n, 1, 1, generator=g) * 0.5).float()
    return cells.repeat_interleave(tile, 1).repeat_interleave(tile, 2)


# ------------------------------------------------------------------------------- accuracy

def same_levels(a: list, b: list) -> float:
    n = max(len(a), len(b))
    k = 0
    while k < min(len(a), len(b)) and np.array_equal(a[k], b[k]):
        k += 1
    return k / n


def accuracy(models, weights, images: int, size: int, acd: bool = True) -> None:
    sweep = size // 16
    for name in models:
        for trained in weights:
            model = build(name, trained, size)
            case = f"accuracy_{name}_{'trained_like' if trained else 'random'}_{size}"
            gaps, gaps_label, levels, levels_alone, identical = [], [], [], [], []
            t32 = t16 = t16a = 0.0
            for i in range(images):
                x = image(i, size)
                masks = tile_union_masks(32, size, i)
                _DECOMPOSERS.pop(model, None)
                with torch.no_grad():
                    d32 = fastacd.Decomposer(model)
                    d16 = fastacd.Decomposer(model, precision="bf16")
                    a, b = d32.cd(x, masks), d16.cd(x, masks)
                lab = int(a.output.argmax())
                gaps.append(float((a.relevant - b.relevant).abs().max() / a.output.abs().max()))
                gaps_label.append(float((a.relevant[:, lab] - b.relevant[:, lab]).abs().max() / a.output[lab].abs()))
                if not acd:
                    print(f"{case} image {i}: cd gap {gaps[-1]:.2e} (label {gaps_label[-1]:.2e})", flush=True)
                    continue
                im = x[0].permute(1, 2, 0).numpy().copy()
                kw = dict(num_iters=5, im_torch=x)
                h32, c32, _ = cpu_timed(agg_2d.agglomerate, model, None, 95, "cd", sweep, im, lab, **kw)
                h16, c16, _ = cpu_timed(agg_2d.agglomerate, model, None, 95, "cd", sweep, im, lab,
                                        precision="bf16", **kw)
                alone, c16a, _ = cpu_timed(agg_2d.agglomerate, model, None, 95, "cd", sweep, im, lab,
                                           precision="bf16", exact_decisions=False, **kw)
                t32, t16, t16a = t32 + c32, t16 + c16, t16a + c16a
                levels.append(same_levels(h32["comps_list"], h16["comps_list"]))
                levels_alone.append(same_levels(h32["comps_list"], alone["comps_list"]))
                identical.append(levels[-1] == 1.0)
                print(f"{case} image {i}: cd gap {gaps[-1]:.2e} (label {gaps_label[-1]:.2e}), levels "
                      f"identical {levels[-1]:.2f} (bf16 alone {levels_alone[-1]:.2f}; "
                      f"{len(h32['comps_list'])} levels), ACD cpu {c32:.1f} s float32 / {c16:.1f} s bf16 / "
                      f"{c16a:.1f} s bf16 alone", flush=True)
            figures = dict(cd_gap_max=max(gaps), cd_gap_mean=float(np.mean(gaps)),
                           cd_gap_label_max=max(gaps_label), images=images, size=size, masks=32)
            if acd:
                figures.update(levels_identical=float(np.mean(levels)), levels_identical_min=min(levels),
                               levels_identical_bf16_alone=float(np.mean(levels_alone)),
                               hierarchies_identical=int(sum(identical)), sweep_dim=sweep,
                               acd_cpu_s_float32=t32, acd_cpu_s_bf16=t16, acd_cpu_s_bf16_alone=t16a,
                               acd_bf16_speedup=t32 / max(t16, 1e-9))
            record(SUITE, case + ("" if acd else "_cd_only"), **figures)


# ------------------------------------------------------------------------------- acceptance

ACCEPTANCE_RUNS = (("float32", {}), ("bf16", {}), ("bf16_no_exact_decisions", dict(exact_decisions=False)))


def acd_vs_original(rounds: int = 1) -> dict:
    """ACD of VGG16 at the notebook settings in float32, bf16 (decisions in float32, the
    default) and bf16 alone, ``rounds`` times each in turn (the best CPU time of each: the
    shared box's speed drifts within minutes), and the original's time per call measured
    before and after them (the mean)."""
    model, x, im, lab = _setup("vgg16")
    s = SETTINGS
    figures = {}
    out = {}
    c0 = time.process_time()
    orig_walls = [original_per_call(model, x)]
    orig_cpu = [(time.process_time() - c0) / 3]  # three calls (one warm-up): the mean CPU per call
    for r in range(rounds):
        for name, extra in ACCEPTANCE_RUNS:
            prec = name.split("_")[0]
            _DECOMPOSERS.pop(model, None)
            stats = {}
            h, cpu, wall = cpu_timed(agg_2d.agglomerate, model, None, s["percentile_include"], s["method"],
                                     s["sweep_dim"], im, lab, num_iters=s["num_iters"], im_torch=x, stats=stats,
                                     precision=prec, **extra)
            out[name] = h
            if cpu < figures.get(f"{name}_cpu_s", float("inf")):
                figures.update({f"{name}_cpu_s": cpu, f"{name}_wall_s": wall})
            figures.update({"masks_requested": stats["requested"], f"{name}_masks_scored": stats["scored"],
                            f"{name}_masks_scored_float32": stats.get("scored_exact", 0),
                            f"{name}_engine_calls": stats["calls"]})
            print(f"vgg16 ACD {name} round {r}: cpu {cpu:.1f} s, wall {wall:.1f} s", flush=True)
    c0 = time.process_time()
    orig_walls.append(original_per_call(model, x))
    orig_cpu.append((time.process_time() - c0) / 3)
    if orig_walls[0] is not None:
        per_call = float(np.mean(orig_cpu))
        req = figures["masks_requested"]
        figures.update(original_per_call_wall_s=float(np.mean(orig_walls)), original_per_call_cpu_s=per_call,
                       original_per_call_cpu_s_before_after=orig_cpu, original_cpu_s=per_call * req,
                       original_extrapolated=True)
        for name, _ in ACCEPTANCE_RUNS:
            figures[f"speedup_vs_original_{name}"] = per_call * req / figures[f"{name}_cpu_s"]
    for name, _ in ACCEPTANCE_RUNS[1:]:
        figures[f"levels_identical_{name}"] = same_levels(out["float32"]["comps_list"], out[name]["comps_list"])
    figures["levels"] = len(out["float32"]["comps_list"])
    figures["threads"] = THREADS
    figures["rounds"] = rounds
    record(SUITE, "acceptance_acd_vgg16_224_sweep14", **figures)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}, flush=True)
    return figures


def _best_cpu(fn, rounds: int = 2) -> float:
    best = float("inf")
    for _ in range(rounds):
        c = time.process_time()
        fn()
        best = min(best, time.process_time() - c)
    return best


def cd_over_forward(arch: str, masks_n: int = 64, batches=(1, 8, 64), rounds: int = 2) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(1, 3, 224, 224)
    masks = tile_masks(masks_n)
    figures = {}
    with torch.no_grad():
        for prec in ("float32", "bf16"):
            dec = fastacd.Decomposer(model, precision=prec)
            dec.cd(x, masks)  # warm-up (trace, weight copies)
            if prec == "bf16":  # the fast plain forward: bf16 weights and input, channels_last
                fmodel = model.to(torch.bfloat16, memory_format=torch.channels_last)
                fx = x.to(torch.bfloat16, memory_format=torch.channels_last)
            else:
                fmodel, fx = model, x
            fwd = {}
            for b in batches:
                batch = fx.expand(b, -1, -1, -1).contiguous(
                    memory_format=torch.channels_last if prec == "bf16" else torch.contiguous_format)
                fmodel(batch)
                fwd[b] = _best_cpu(lambda: fmodel(batch), rounds) / b
            if prec == "bf16":
                model.float().to(memory_format=torch.contiguous_format)
            cd = _best_cpu(lambda: dec.cd(x, masks), rounds)
            best = min(fwd.values())
            figures.update({f"{prec}_cd_per_mask_s": cd / masks_n, f"{prec}_best_forward_s": best,
                            f"{prec}_cd_per_mask_over_best_forward": cd / masks_n / best,
                            f"{prec}_channels_last": dec.channels_last, "masks": masks_n, "rounds": rounds,
                            **{f"{prec}_forward_b{b}_s": t for b, t in fwd.items()}})
    figures["bf16_cd_speedup"] = figures["float32_cd_per_mask_s"] / figures["bf16_cd_per_mask_s"]
    record(SUITE, f"acceptance_cd_over_forward_{arch}", **figures)
    print(arch, {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, flush=True)
    return figures


def layout(arch: str, size: int = 224, masks_n: int = 32) -> dict:
    """CD per mask in each (precision, layout): what ``channels_last=None`` chooses from."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(1, 3, size, size)
    masks = tile_masks(masks_n, size)
    base = torch.zeros(size, size)
    base[: size // 4, : size // 4] = 1
    figures = {}
    with torch.no_grad():
        for prec in ("float32", "bf16"):
            for cl in (False, True):
                dec = fastacd.Decomposer(model, precision=prec, channels_last=cl)
                dec.cd(x, masks[:4])
                key = f"{prec}_{'channels_last' if cl else 'nchw'}"
                figures[f"{key}_cd_per_mask_s"] = _best_cpu(lambda: dec.cd(x, masks)) / masks_n
                figures[f"{key}_cd_delta_per_mask_s"] = _best_cpu(lambda: dec.cd_delta(x, base, masks[:16])) / 16
                print(arch, key, round(figures[f"{key}_cd_per_mask_s"], 4),
                      round(figures[f"{key}_cd_delta_per_mask_s"], 4), flush=True)
    record(SUITE, f"layout_{arch}_{size}", **figures)
    return figures


def main(argv=None) -> int:
    global SUITE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--no-acd", action="store_true", help="--accuracy: CD gaps only (no hierarchies)")
    p.add_argument("--acceptance", action="store_true")
    p.add_argument("--layout", action="store_true")
    p.add_argument("--models", default="vgg16,resnet50,convnext_tiny,deit_tiny")
    p.add_argument("--weights", default="random,trained_like")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--archs", default="vgg16,resnet18,alexnet")
    p.add_argument("--cd-forward", action="store_true", help="only the CD per mask / forward part of --acceptance")
    p.add_argument("--masks", type=int, default=64)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--suite", default=SUITE, help="results file bench/results/SUITE.json (runs in "
                   "parallel processes write separate files)")
    args = p.parse_args(argv)
    SUITE = args.suite
    if args.accuracy:
        accuracy(args.models.split(","), [w == "trained_like" for w in args.weights.split(",")],
                 args.images, args.size, acd=not args.no_acd)
    if args.layout:
        for arch in args.archs.split(","):
            layout(arch)
    if args.acceptance:
        acd_vs_original(args.rounds)
    if args.acceptance or args.cd_forward:
        for arch in args.archs.split(","):
            cd_over_forward(arch, args.masks, tuple(int(b) for b in args.batches.split(",")), args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

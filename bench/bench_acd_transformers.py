"""ACD hierarchy time of ViT-B/16 against VGG16 at the notebook settings (issue 16 item 5).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_acd_transformers.py [--iters 5] [--archs vgg16 vit_b_16]
        [--record]

Settings: one 224x224 image (random normal, seed 0), random-init torchvision models (float32,
eval; ViT's zero-initialised head gets ``nn.Linear``'s default init, else every score is 0
and the hierarchy empty), 1 thread, ``fastacd.hierarchy`` with ``percentile_include=95``, ``--iters`` growing
iterations (the notebook's 5 by default), method ``cd``, the predicted class, default tiles:
VGG16 the paper's 14 (a 16 x 16 grid), ViT-B/16 its patch, 16 (a 14 x 14 grid; tiles on the
patch grid, docs/hierarchies.md). Wall and process CPU time (the box is shared: the CPU time
is the steadier figure), masks asked for / scored / engine calls, and CD per scored mask over
the model's plain batch-1 forward. Records ``<arch>_iters<N>`` in
bench/results/acd_transformers.json with ``--record``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from _results import record
from fastacd.image.hierarchy import hierarchy


def measure(arch: str, iters: int) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    for m in model.modules():  # torchvision's ViT head is zero at init: every score 0, no blob
        if isinstance(m, torch.nn.Linear) and m.weight.abs().max() == 0:
            m.reset_parameters()  # nn.Linear's own init instead
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)  # warm-up
        w, c = time.perf_counter(), time.process_time()
        model(x)
        fwd_wall, fwd_cpu = time.perf_counter() - w, time.process_time() - c
    w, c = time.perf_counter(), time.process_time()
    h = hierarchy(model, x, percentile_include=95, num_iters=iters)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    figures = dict(acd_wall_s=wall, acd_cpu_s=cpu, sweep_dim=h.sweep_dim, num_iters=iters,
                   num_levels=h.num_levels, nodes=len(h.nodes), masks_requested=h.stats["requested"],
                   masks_scored=h.stats["scored"], engine_calls=h.stats["calls"],
                   forward_b1_wall_s=fwd_wall, forward_b1_cpu_s=fwd_cpu,
                   cpu_per_scored_mask_over_forward_b1=cpu / h.stats["scored"] / fwd_cpu,
                   threads=torch.get_num_threads())
    print(arch, {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}, flush=True)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["vgg16", "vit_b_16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for arch in args.archs:
        results[arch] = measure(arch, args.iters)
        if args.record:
            record("acd_transformers", f"{arch}_iters{args.iters}", **results[arch])
    if len(results) == 2:
        (a, fa), (b, fb) = results.items()
        print(f"{b} / {a}: wall {fb['acd_wall_s'] / fa['acd_wall_s']:.2f}x, CPU "
              f"{fb['acd_cpu_s'] / fa['acd_cpu_s']:.2f}x")


if __name__ == "__main__":
    main()

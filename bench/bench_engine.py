"""CD of 64 masks on one 224x224 image vs plain forward passes, and vs the reference backend.

    make bench            (or: .venv/bin/python -m pytest bench/bench_engine.py -q)

Figures (bench/results/engine.json), all ratios taken in the same run:
* ``cd_per_mask_over_best_forward``: CD time per mask / the best plain forward time per image
  over batch sizes 1, 8 and 64 (the floor is about 1: one weight application per mask);
* ``reference_over_engine``: reference backend (one mask at a time, r and i separately)
  over the batched engine on the same masks (a subset, the reference is slow).

``ACD_BENCH_THREADS`` threads (default 1: the 2-core box is shared; the CPU-time ratio
beside the wall one tells contention from change).
"""
from __future__ import annotations

import os

import pytest
import torch
import torchvision

import fastacd

from _results import best_time, best_wall_and_cpu, record, tile_masks

THREADS = int(os.environ.get("ACD_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
MASKS = 64
REFERENCE_MASKS = 8
ROUNDS = 3


@pytest.mark.parametrize("arch", ["vgg16", "resnet18", "alexnet"])
def test_cd_vs_forward(benchmark, arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(1, 3, 224, 224)
    masks = tile_masks(MASKS)
    dec = fastacd.Decomposer(model)
    with torch.no_grad():
        # forward and CD interleaved, so that a change in the machine's load hits both; the
        # best of ROUNDS rounds each (the other engineer's jobs on this box swing single runs
        # by 10-15%)
        forward, forward_cpu, cd_wall, cd_cpu = {}, {}, [], []
        dec.cd(x, masks)  # warm-up (and the fx trace, once)
        for _ in range(ROUNDS):
            for b in (1, 8, 64):
                batch = x.expand(b, -1, -1, -1).contiguous()
                w, c = best_wall_and_cpu(lambda: model(batch), repeats=1, warmup=int(b == 64))
                forward[b], forward_cpu[b] = min(forward.get(b, w), w), min(forward_cpu.get(b, c), c)
            w, c = best_wall_and_cpu(lambda: dec.cd(x, masks), repeats=1, warmup=0)
            cd_wall.append(w)
            cd_cpu.append(c)
        benchmark.pedantic(lambda: None, rounds=1)
        forward_per_image = {b: t / b for b, t in forward.items()}
        forward_cpu_per_image = {b: t / b for b, t in forward_cpu.items()}
        cd_time, cd_cpu_time = min(cd_wall), min(cd_cpu)
        ref = fastacd.Decomposer(model, backend="reference")
        ref_time = best_time(lambda: ref.cd(x, masks[:REFERENCE_MASKS]), repeats=1, warmup=0)
        fast_sub = best_time(lambda: dec.cd(x, masks[:REFERENCE_MASKS]), repeats=1, warmup=0)
    best_forward = min(forward_per_image.values())
    figures = {
        "cd_per_mask_over_best_forward": cd_time / MASKS / best_forward,
        "cd_per_mask_over_best_forward_cpu_time": cd_cpu_time / MASKS / min(forward_cpu_per_image.values()),
        "reference_over_engine": ref_time / fast_sub,
        "cd_seconds_64_masks": cd_time,
        "backend_compiled": float(dec.backend == "compiled"),
        "chunk_size": float(dec.chunk_size(dec._total_pass(x)[0], x)),
        "chunk_plan": " ".join(f"{src.name}:{c}" for _, src, c in dec.pass_plan(dec._total_pass(x)[0], x, MASKS)),
        **{f"forward_per_image_b{b}": t for b, t in forward_per_image.items()},
    }
    record("engine", arch, **figures)
    print(arch, {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})


@pytest.mark.parametrize("backend", fastacd.available_backends()[1:])
def test_backends_vgg16(benchmark, backend):
    """torch vs compiled backend on the same 64 masks (VGG16)."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    x = torch.randn(1, 3, 224, 224)
    masks = tile_masks(MASKS)
    dec = fastacd.Decomposer(model, backend=backend)
    with torch.no_grad():
        benchmark.pedantic(lambda: dec.cd(x, masks), rounds=1, warmup_rounds=1)
        t = best_time(lambda: dec.cd(x, masks), repeats=2, warmup=0)
    record("engine", f"vgg16_backend_{backend}", cd_seconds_64_masks=t)

"""CD of 64 masks on one 224x224 image of vit_b_16 and swin_t vs plain forward passes.

    .venv/bin/python -m pytest bench/bench_transformers.py -q

Figures (bench/results/transformers.json), all ratios taken in the same run:
* ``cd_per_mask_over_best_forward``: CD time per mask / the best plain forward time per image
  over batch sizes 1, 8 and 16, forward and CD interleaved, best of ``ROUNDS`` rounds (the
  attention probabilities are shared, so only the value path carries masks: the floor is
  below 1, the queries, keys and their product are not computed per mask);
* ``total_pass_over_forward_b1``: the per-image total pass (the true activations and what the
  rules keep: attention probabilities, pre-bias outputs) over a batch-1 forward;
* ``tokens_bias_split``: the Linear bias split on (M, N, F) tokens as (M, T) rows against the
  former path (features moved to dim 1 for the split ops and back), each followed by the
  next Linear reading it.

The models run as built (LayerNorms through the norm rules, random init).

``ACD_BENCH_THREADS`` threads (default 1: the 2-core box is shared; the CPU-time ratio beside
the wall one tells contention from change).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torchvision

import fastacd
from fastacd.ops import torch_ops
from fastacd.rules.affine import split_bias_tokens

from _results import best_wall_and_cpu, record, tile_masks

THREADS = int(os.environ.get("ACD_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
MASKS = 64
ROUNDS = int(os.environ.get("ACD_BENCH_ROUNDS", "3"))
BATCHES = (1, 8, 16)


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)().eval()


@pytest.mark.parametrize("arch", ["vit_b_16", "swin_t"])
def test_cd_vs_forward(benchmark, arch):
    model = _model(arch)
    x = torch.randn(1, 3, 224, 224)
    masks = tile_masks(MASKS, tile=16)  # ViT's patches
    dec = fastacd.Decomposer(model)
    with torch.no_grad():
        forward, forward_cpu, cd_wall, cd_cpu, total = {}, {}, [], [], []
        dec.cd(x, masks[:2])  # warm-up
        for _ in range(ROUNDS):  # interleaved: a change of the machine's load hits both
            for b in BATCHES:
                batch = x.expand(b, -1, -1, -1).contiguous()
                w, c = best_wall_and_cpu(lambda: model(batch), repeats=1, warmup=0)
                forward[b], forward_cpu[b] = min(forward.get(b, w), w), min(forward_cpu.get(b, c), c)
            w, c = best_wall_and_cpu(lambda: dec.cd(x, masks), repeats=1, warmup=0)
            cd_wall.append(w)
            cd_cpu.append(c)
            total.append(best_wall_and_cpu(lambda: dec._total_pass(x), repeats=1, warmup=0)[0])
        benchmark.pedantic(lambda: None, rounds=1)
        values = dec._total_pass(x)[0]
    per_image = {b: t / b for b, t in forward.items()}
    per_image_cpu = {b: t / b for b, t in forward_cpu.items()}
    best_forward = min(per_image.values())
    figures = {
        "cd_per_mask_over_best_forward": min(cd_wall) / MASKS / best_forward,
        "cd_per_mask_over_best_forward_cpu_time": min(cd_cpu) / MASKS / min(per_image_cpu.values()),
        "total_pass_over_forward_b1": min(total) / per_image[1],
        "cd_seconds_64_masks": min(cd_wall),
        "backend_compiled": float(dec.backend == "compiled"),
        "chunk_plan": " ".join(f"{src.name}:{c}" for _, src, c in dec.pass_plan(values, x, MASKS)),
        **{f"forward_per_image_b{b}": t for b, t in per_image.items()},
    }
    record("transformers", arch, **figures)
    print(arch, {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})


def test_tokens_bias_split(benchmark):
    """ViT-B's MLP (197 tokens, 768 -> 3072 -> 768), 16 masks: the bias split of fc1 on (M, T)
    rows vs features moved to dim 1 and back, each with fc2 reading the result."""
    torch.manual_seed(0)
    m, n, f, h = 16, 197, 768, 3072
    r = torch.randn(m, n, f)
    w1, b1, w2 = torch.randn(h, f) / f ** 0.5, torch.randn(h), torch.randn(f, h) / h ** 0.5
    pre = torch.nn.functional.linear(torch.randn(1, n, f), w1)
    ops = fastacd.ops if fastacd.ops.HAS_COMPILED else torch_ops

    def rows():
        z = torch.nn.functional.linear(r, w1)
        return torch.nn.functional.linear(split_bias_tokens(ops, z, pre, b1, False, True), w2)

    def moved():
        z = torch.nn.functional.linear(r, w1)
        out = ops.bias_split(z.movedim(-1, 1), pre.movedim(-1, 1), b1, False).movedim(1, -1)
        return torch.nn.functional.linear(out, w2)

    with torch.no_grad():
        torch.testing.assert_close(rows(), moved())
        t_rows, t_moved = [], []
        for _ in range(ROUNDS + 2):
            t_rows.append(best_wall_and_cpu(rows, repeats=1, warmup=0)[0])
            t_moved.append(best_wall_and_cpu(moved, repeats=1, warmup=0)[0])
        benchmark.pedantic(lambda: None, rounds=1)
    figures = {"moved_over_rows": min(t_moved) / min(t_rows), "rows_seconds": min(t_rows),
               "moved_seconds": min(t_moved)}
    record("transformers", "tokens_bias_split", **figures)
    print({k: round(v, 4) for k, v in figures.items()})

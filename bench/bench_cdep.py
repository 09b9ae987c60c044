"""One CDEP training step vs a plain step, and vs the straightforward CD implementation.

    .venv/bin/python bench/bench_cdep.py [--repeats 10] [--fuse]

For each model (the demo CNN on 28x28 digits, batch 64; a CIFAR-style VGG11 on 32x32,
batch 16), one mask per example (a 6x6 box), Adam step included:

* ``plain``: ``cross_entropy(model(x), y)``, backward, step;
* ``penalty``: ``forward_with_penalty`` (the true-activation pass doubles as the forward,
  one relevant pass of N masks), ``cross_entropy + lam * cdep``, backward, step;
* ``penalty_fused``: the same with ``fuse=True`` (bias split through torch.compile);
* ``straightforward``: the CDEP code's way: the forward, then relevant and irrelevant parts
  propagated separately (``fastacd.cdep.straightforward_cd``), backward, step.

Time: median over interleaved repeats (the machine is shared; ratios are within one run).
Memory: bytes of tensors autograd keeps for the backward pass (deduplicated by storage),
which is what a training step's peak grows with; parameters and optimizer state are the
same for all variants and not counted. Results: bench/results/cdep.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastacd import cdep  # noqa: E402
from fastacd.datasets import DemoCNN  # noqa: E402


def vgg11_small(num_classes=10):
    """VGG11's conv stack (64-128-256x2-512x4, 5 max-pools) with a 512 -> 10 head (CIFAR style)."""
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


def saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except Exception:  # noqa: BLE001 - e.g. sparse; not in these models
            pass
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return sum(seen.values())


def bench_model(name, model, x, y, masks, repeats, fuse, lam=10.0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    pens = {"penalty": cdep.CDEPPenalty(model)}
    if fuse:
        pens["penalty_fused"] = cdep.CDEPPenalty(model, fuse=True)
    graph = pens["penalty"].graph
    r0 = masks[None] * x[None]

    def loss_plain():
        return F.cross_entropy(model(x), y)

    def loss_pen(pen):
        def f():
            logits, p = pen.forward_with_penalty(x, masks)
            return F.cross_entropy(logits, y) + lam * p
        return f

    def loss_straight():
        pools = {}
        _, logits = cdep.paired_cd(graph, x, None, pool_indices=pools)  # the ordinary forward
        rel, _ = cdep.straightforward_cd(graph, x, r0.reshape(x.shape), pool_indices=pools)
        irrel = logits - rel
        return F.cross_entropy(logits, y) + lam * cdep.cdep_score(rel, irrel)

    losses = {"plain": loss_plain, **{k: loss_pen(p) for k, p in pens.items()},
              "straightforward": loss_straight}

    def step(f):
        opt.zero_grad()
        f().backward()
        opt.step()

    for f in losses.values():  # warm-up (and torch.compile for the fused variant)
        step(f)
        step(f)
    times = {k: [] for k in losses}
    for _ in range(repeats):
        for k, f in losses.items():
            t = time.perf_counter()
            step(f)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: saved_bytes(f) for k, f in losses.items()}
    res = {"model": name, "batch": tuple(x.shape), "masks_per_example": 1,
           "time_ms": {k: v * 1e3 for k, v in med.items()},
           "saved_MiB": {k: v / 2**20 for k, v in mem.items()}}
    for k in losses:
        if k != "plain":
            res[f"{k}_time_vs_plain"] = med[k] / med["plain"]
            res[f"{k}_mem_vs_plain"] = mem[k] / mem["plain"]
    for k in pens:
        res[f"{k}_time_vs_straightforward"] = med[k] / med["straightforward"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--fuse", action="store_true", help="also time fuse=True (torch.compile, ~1 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cdep.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    box = lambda n, h: cdep.box_masks([[0, 0, 6, 6]] * n, (h, h))
    results = []
    n = 64
    results.append(bench_model("DemoCNN (width 16) 28x28", DemoCNN(width=16),
                               torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)), box(n, 28),
                               args.repeats, args.fuse))
    n = 16
    results.append(bench_model("VGG11 (CIFAR head) 32x32", vgg11_small(),
                               torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)), box(n, 32),
                               args.repeats, args.fuse))
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "repeats": args.repeats, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()

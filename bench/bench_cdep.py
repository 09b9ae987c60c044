"""One CDEP training step vs a plain step, and vs the straightforward CD implementation.

    nice .venv/bin/python bench/bench_cdep.py [--repeats 10] [--fuse] [--models cnn vgg text]

For each model (the demo CNN on 28x28 digits, batch 64; a CIFAR-style VGG11 on 32x32,
batch 16), one mask per example (a 6x6 box), Adam step included:

* ``plain``: ``cross_entropy(model(x), y)``, backward, step;
* ``penalty``: ``forward_with_penalty`` (the true-activation pass doubles as the forward,
  one relevant pass of N masks), ``cross_entropy + lam * cdep``, backward, step;
* ``penalty_fused``: the same with ``fuse=True`` (bias split through torch.compile);
* ``straightforward``: the CDEP code's way: the forward, then relevant and irrelevant parts
  propagated separately (``fastacd.cdep.straightforward_cd``), backward, step.

``text``: the toy sentiment LSTM (``fastacd.sentiment_toy.SentimentLSTM``) on a batch of 64
DecoyText sentences (14 tokens), one decoy-token mask per sentence: ``plain`` (nn.LSTM
forward) vs ``penalty`` (``TextCDEPPenalty.forward_with_penalty``: the true pass in Python
steps doubles as the forward).

Time: median over interleaved repeats (the machine is shared; ratios are within one run).
Memory: bytes of tensors autograd keeps for the backward pass (deduplicated by storage),
which is what a training step's peak grows with; parameters and optimizer state are the
same for all variants and not counted. Results: bench/results/cdep.json (through
bench/_results.py, one case per model; ``bench/report.py`` prints them).

Goals (issue 7): a penalty step <= 2.1x the time and <= 2.0x the memory of a plain step,
and <= 0.7x the time of the straightforward implementation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import RESULTS, record  # noqa: E402
from fastacd import cdep  # noqa: E402
from fastacd.train.datasets import DecoyText, DemoCNN  # noqa: E402
from fastacd.text.sentiment_toy import SentimentLSTM  # noqa: E402

GOALS = {"time_vs_plain": 2.1, "mem_vs_plain": 2.0, "time_vs_straightforward": 0.7}


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

    return measure(name, tuple(x.shape), losses, step, repeats, list(pens))


def measure(name, batch, losses, step, repeats, penalties):
    for f in losses.values():  # warm-up (and torch.compile for the fused variant)
        step(f)
        step(f)
    times = {k: [] for k in losses}
    keys = list(losses)
    for rep in range(repeats):
        # interleaved, the order rotated every repeat (load drifts on a shared machine)
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            t = time.perf_counter()
            step(losses[k])
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: saved_bytes(f) for k, f in losses.items()}
    res = {"model": name, "batch": list(batch), "masks_per_example": 1, "repeats": repeats,
           "time_ms": {k: v * 1e3 for k, v in med.items()},
           "saved_MiB": {k: v / 2**20 for k, v in mem.items()}}
    for k in losses:
        if k != "plain":
            res[f"{k}_time_vs_plain"] = med[k] / med["plain"]
            res[f"{k}_mem_vs_plain"] = mem[k] / mem["plain"]
    if "straightforward" in losses:
        for k in penalties:
            res[f"{k}_time_vs_straightforward"] = med[k] / med["straightforward"]
    for k in penalties:
        met = [res[f"{k}_time_vs_plain"] <= GOALS["time_vs_plain"],
               res[f"{k}_mem_vs_plain"] <= GOALS["mem_vs_plain"]]
        if "straightforward" in losses:
            met.append(res[f"{k}_time_vs_straightforward"] <= GOALS["time_vs_straightforward"])
        res[f"{k}_goals_met"] = f"{sum(met)}/{len(met)}"
    return res


def bench_text(repeats, n=64, lam=10.0):
    torch.manual_seed(0)
    data = DecoyText("train", n, 0)
    model = SentimentLSTM(vocab_size=len(data.vocab))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    pen = cdep.TextCDEPPenalty(model)
    tokens, y, masks = data.tokens, data.y, data.masks

    def loss_plain():
        return F.cross_entropy(model(tokens), y)

    def loss_pen():
        logits, p = pen.forward_with_penalty(tokens, masks, y)
        return F.cross_entropy(logits, y) + lam * p

    def step(f):
        opt.zero_grad()
        f().backward()
        opt.step()
    return measure("SentimentLSTM (toy) text, 14 tokens", tuple(tokens.shape),
                   {"plain": loss_plain, "penalty": loss_pen}, step, repeats, ["penalty"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--fuse", action="store_true", help="also time fuse=True (torch.compile, ~1 min)")
    ap.add_argument("--models", nargs="+", choices=["cnn", "vgg", "text"], default=["cnn", "vgg", "text"])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    box = lambda n, h: cdep.box_masks([[0, 0, 6, 6]] * n, (h, h))
    path = RESULTS / "cdep.json"
    if path.exists() and "cases" not in json.loads(path.read_text()):
        path.unlink()  # the old single-file format; record() merges cases into a new one
    results = []
    if "cnn" in args.models:
        n = 64
        results.append(bench_model("DemoCNN (width 16) 28x28", DemoCNN(width=16),
                                   torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)), box(n, 28),
                                   args.repeats, args.fuse))
    if "vgg" in args.models:
        n = 16
        results.append(bench_model("VGG11 (CIFAR head) 32x32", vgg11_small(),
                                   torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)), box(n, 32),
                                   args.repeats, args.fuse))
    if "text" in args.models:
        results.append(bench_text(args.repeats))
    for r in results:
        record("cdep", r["model"], load_average=list(os.getloadavg()), **r)
        print(json.dumps(r, indent=1), flush=True)


if __name__ == "__main__":
    main()

"""One CDEP training step vs a plain step: the README's way, forward_with_penalty, the
straightforward CD implementation, and the RRR / expected-gradients penalties.

    nice .venv/bin/python bench/bench_cdep.py [--repeats 9] [--models cnn vgg11 vgg3 text]
                                              [--threads 1] [--extra] [--profile]

For each image model (the demo CNN on 28x28 digits, a CIFAR-style VGG11 and a 3-block
VGG-style CNN (``fastacd.train.models.VGGStyleCNN``) on 32x32, batch 32, float32), one mask
per example (a 6x6 box), SGD step included:

* ``plain``: ``cross_entropy(model(x), y)``, backward, step;
* ``readme``: the README's way, ``cross_entropy(model(x), y) + lam * penalty(x, masks)``
  (``CDEPPenalty`` defaults: fused element-wise kernels, the forward's activations reused);
* ``forward_with_penalty``: ``penalty.forward_with_penalty(x, masks)`` (one pass gives the
  logits and the penalty; one weight application per layer for the true and relevant rows);
* ``forward_with_penalty_unfused``: the same with ``fuse=False`` (the plain element-wise
  formulas: what the fused kernels save);
* ``straightforward``: the CDEP code's way, the forward then relevant and irrelevant parts
  propagated separately (``fastacd.cdep.straightforward_cd``);
* with ``--extra``: ``rrr`` (``RRRPenalty.forward_with_penalty``, double backward) and
  ``expected_gradients`` (``ExpectedGradientsPenalty``, 1 sample per example).

``text``: the toy sentiment LSTM on 64 DecoyText sentences (14 tokens), one decoy-token mask
per sentence: ``plain`` vs ``TextCDEPPenalty.forward_with_penalty``.

Time: median over interleaved repeats (the order rotated every repeat), of the process CPU
time of a step (1 thread: the step's work, robust to other processes on a shared machine)
and of its wall time. Ratios are within one run. Memory: bytes of the tensors the autograd
graph holds for the backward pass at the end of the forward (``held_bytes``: each storage
once; tensors recomputed on unpack not held), which is what a step's peak grows with;
parameters and optimizer state are the same for all variants and not counted. The plain
step runs with the penalty's forward recording off (a model without the penalty).
``--profile``: a torch.profiler table (self CPU ms per step, by op) of plain, readme and
forward_with_penalty per model, printed as markdown. Results: bench/results/cdep.json
(through bench/_results.py; ``bench/report.py`` prints them).

Goals (issue 19): the README's way <= 2.1x and forward_with_penalty <= 1.8x the time of a
plain step, both <= 2.0x its memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import RESULTS, record  # noqa: E402
from fastacd import ExpectedGradientsPenalty, RRRPenalty, cdep  # noqa: E402
from fastacd.text.sentiment_toy import SentimentLSTM  # noqa: E402
from fastacd.train.datasets import DecoyText, DemoCNN  # noqa: E402
from fastacd.train.models import VGGStyleCNN  # noqa: E402

GOALS = {"readme_time_vs_plain": 2.1, "forward_with_penalty_time_vs_plain": 1.8,
         "readme_mem_vs_plain": 2.0, "forward_with_penalty_mem_vs_plain": 2.0}


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


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    return [t for t in v if isinstance(t, torch.Tensor)] if isinstance(v, (list, tuple)) else []


_SAVED: dict[type, list[str]] = {}


def held_bytes(fn, exclude=()) -> int:
    """Bytes of the tensors the autograd graph of ``fn()`` holds for backward, each storage
    once, the parameters (``exclude``) not counted. Walks the graph: every node's saved
    tensors (``_saved_*``, a custom function's ``saved_tensors``). A saved tensor that the
    graph recomputes when backward unpacks it (saved-tensor hooks: the penalty's recomputed
    layer inputs and ReLU outputs) is not held; it shows as a new storage on every unpack."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    loss = fn()
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nf for nf, _ in node.next_functions)
        names = _SAVED.get(type(node))
        if names is None:
            names = _SAVED[type(node)] = [a for a in dir(node) if a.startswith("_saved_")] + \
                (["saved_tensors"] if hasattr(node, "saved_tensors") else [])
        for name in names:
            try:
                first, again = _tensors(getattr(node, name)), _tensors(getattr(node, name))
            except RuntimeError:  # e.g. a saved tensor already freed
                continue
            for a, b in zip(first, again):
                st = a.untyped_storage()
                if st.data_ptr() != b.untyped_storage().data_ptr() or st.data_ptr() in skip:
                    continue
                storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    del loss
    return sum(storages.values())


def image_losses(model, x, y, masks, lam=10.0, extra=False):
    pen = cdep.CDEPPenalty(model)
    unfused = cdep.CDEPPenalty(model, fuse=False, reuse_forward=False)
    graph = pen.graph
    r0 = masks[None] * x[None]

    def plain():  # not recorded: a plain step of a model without the penalty's hooks
        pen._recorder.enabled = False
        try:
            return F.cross_entropy(model(x), y)
        finally:
            pen._recorder.enabled = True

    def readme():
        return F.cross_entropy(model(x), y) + lam * pen(x, masks)

    def with_penalty(p):
        def f():
            logits, v = p.forward_with_penalty(x, masks)
            return F.cross_entropy(logits, y) + lam * v
        return f

    def straightforward():
        pools = {}
        _, logits = cdep.paired_cd(graph, x, None, pool_indices=pools)  # the ordinary forward
        rel, _ = cdep.straightforward_cd(graph, x, r0.reshape(x.shape), pool_indices=pools)
        return F.cross_entropy(logits, y) + lam * cdep.cdep_score(rel, logits - rel)

    losses = {"plain": plain, "readme": readme, "forward_with_penalty": with_penalty(pen),
              "forward_with_penalty_unfused": with_penalty(unfused), "straightforward": straightforward}
    if extra:
        rrr = RRRPenalty(model)
        eg = ExpectedGradientsPenalty(model, samples=1, generator=torch.Generator().manual_seed(0))

        def other(p):
            def f():
                logits, v = p.forward_with_penalty(x, masks, y)
                return F.cross_entropy(logits, y) + lam * v
            return f
        losses.update(rrr=other(rrr), expected_gradients=other(eg))
    return losses


def _clock():
    return time.process_time(), time.perf_counter()


def measure(name, batch, losses, step, repeats, params=()):
    for f in losses.values():  # warm-up (and torch.compile of the fused kernels)
        step(f)
        step(f)
    cpu, wall = defaultdict(list), defaultdict(list)
    keys = list(losses)
    for rep in range(repeats):
        # interleaved, the order rotated every repeat (load drifts on a shared machine)
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            c0, w0 = _clock()
            step(losses[k])
            c1, w1 = _clock()
            cpu[k].append(c1 - c0)
            wall[k].append(w1 - w0)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    mem = {k: held_bytes(f, params) for k, f in losses.items()}
    res = {"model": name, "batch": list(batch), "masks_per_example": 1, "repeats": repeats,
           "threads": torch.get_num_threads(),
           "cpu_ms": {k: v * 1e3 for k, v in med.items()},
           "wall_ms": {k: v * 1e3 for k, v in med_wall.items()},
           "held_MiB": {k: v / 2**20 for k, v in mem.items()}}
    for k in losses:
        if k != "plain":
            res[f"{k}_time_vs_plain"] = med[k] / med["plain"]
            res[f"{k}_wall_vs_plain"] = med_wall[k] / med_wall["plain"]
            res[f"{k}_mem_vs_plain"] = mem[k] / mem["plain"]
    met = [res[g] <= v for g, v in GOALS.items() if g in res]
    if met:
        res["goals_met"] = f"{sum(met)}/{len(met)}"
    return res


def sgd_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step(f):
        opt.zero_grad()
        f().backward()
        opt.step()
    return step


CATEGORIES = [  # (label, op names or prefixes); the first that matches counts the op
    ("convolution backward", ("aten::convolution_backward",)),
    ("convolution forward", ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward")),
    ("linear layers (mm)", ("aten::mm", "aten::addmm")),
    ("true max-pool (with indices) and its backward", ("aten::max_pool2d_with_indices",
                                                       "aten::max_pool2d_with_indices_backward")),
    ("fused element-wise kernels (inductor)", ("## Call CompiledFxGraph",)),
    ("ReLU forward / backward (eager)", ("aten::clamp_min", "aten::relu", "aten::threshold_backward")),
    ("relevant max-pool gather / scatter, zero fills", ("aten::gather", "aten::scatter_add_", "aten::fill_",
                                                        "aten::zero_")),
]


def profile(name, losses, step, keys=("plain", "readme", "forward_with_penalty"), steps=3):
    """Self CPU ms per step by op category, for some variants, as a markdown table."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    per = {}
    for k in keys:
        for _ in range(2):
            step(losses[k])
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(losses[k])
        per[k] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    lines = [f"#### {name}: self CPU ms per step (torch.profiler, {steps} steps)", "",
             "| op | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    sums = {k: dict.fromkeys([c for c, _ in CATEGORIES] + ["everything else (Python-level ops, "
                                                           "autograd, optimizer, small ops)"], 0.0)
            for k in keys}
    for k in keys:
        for op, ms in per[k].items():
            cat = next((c for c, names in CATEGORIES if any(op.startswith(n) for n in names)), None)
            sums[k][cat or list(sums[k])[-1]] += ms
    for cat in sums[keys[0]]:
        lines.append(f"| {cat} | " + " | ".join(f"{sums[k][cat]:.1f}" for k in keys) + " |")
    lines.append("| **total** | " + " | ".join(f"{sum(per[k].values()):.1f}" for k in keys) + " |")
    return "\n".join(lines)


def bench_text(repeats, n=64, lam=10.0):
    torch.manual_seed(0)
    data = DecoyText("train", n, 0)
    model = SentimentLSTM(vocab_size=len(data.vocab))
    pen = cdep.TextCDEPPenalty(model)
    tokens, y, masks = data.tokens, data.y, data.masks

    def loss_plain():
        return F.cross_entropy(model(tokens), y)

    def loss_pen():
        logits, p = pen.forward_with_penalty(tokens, masks, y)
        return F.cross_entropy(logits, y) + lam * p

    return measure("SentimentLSTM (toy) text, 14 tokens", tuple(tokens.shape),
                   {"plain": loss_plain, "forward_with_penalty": loss_pen}, sgd_step(model), repeats,
                   list(model.parameters()))


IMAGE_MODELS = {
    "cnn": ("DemoCNN (width 16) 28x28", lambda: DemoCNN(width=16), (1, 28)),
    "vgg11": ("VGG11 (CIFAR head) 32x32", vgg11_small, (3, 32)),
    "vgg3": ("VGG-style CNN (3 blocks, 32-64-128) 32x32", lambda: VGGStyleCNN(width=32), (3, 32)),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", choices=[*IMAGE_MODELS, "text"], default=[*IMAGE_MODELS, "text"])
    ap.add_argument("--extra", action="store_true", help="also time RRR and expected gradients")
    ap.add_argument("--profile", action="store_true", help="print per-op profiles (markdown), no timing")
    ap.add_argument("--no-record", action="store_true", help="print only, do not write the JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = RESULTS / "cdep.json"
    if path.exists() and not args.no_record and not args.profile:
        # the cases of an earlier layout (other models, batch sizes, keys) do not compare
        data = json.loads(path.read_text())
        if any("readme_time_vs_plain" not in c and "SentimentLSTM" not in c.get("model", "")
               for c in data.get("cases", {}).values()):
            path.unlink()
    n = args.batch
    for key in args.models:
        if key == "text":
            if not args.profile:
                r = bench_text(args.repeats)
                print(json.dumps(r, indent=1), flush=True)
                if not args.no_record:
                    record("cdep", r["model"], load_average=list(os.getloadavg()), **r)
            continue
        name, make, (c, h) = IMAGE_MODELS[key]
        torch.manual_seed(0)
        model = make()
        x, y = torch.randn(n, c, h, h), torch.randint(0, 10, (n,))
        masks = cdep.box_masks([[0, 0, 6, 6]] * n, (h, h))
        losses = image_losses(model, x, y, masks, extra=args.extra)
        step = sgd_step(model)
        if args.profile:
            print(profile(f"{name}, batch {n}", losses, step), "\n", flush=True)
            continue
        r = measure(name, tuple(x.shape), losses, step, args.repeats, list(model.parameters()))
        print(json.dumps(r, indent=1), flush=True)
        if not args.no_record:
            record("cdep", name, load_average=list(os.getloadavg()), **r)


if __name__ == "__main__":
    main()

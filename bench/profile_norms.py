"""Where CD's time goes on ConvNeXt-Tiny (LayerNorm everywhere), and CD per mask against the
best plain forward per image: 64 masks, 224x224, float32, 1 thread.

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_norms.py [--arch convnext_tiny] [--masks 64]
        [--no-profile] [--record] [--flush-denormal] [--affine-rows]

Prints the share of the relevant pass per rule kind (each rule's ``relevant`` wrapped in a
``torch.profiler.record_function``) and the top ATen ops, then the ratio. Interleaves forward
and CD rounds so a change in the box's load hits both; reports the best of each.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile, record_function

import fastacd
from fastacd.rules import affine as affine_rules
from fastacd.rules.norm import split_beta

from _results import record, tile_masks


def by_rule(dec: fastacd.Decomposer, x: torch.Tensor, masks: torch.Tensor) -> None:
    """Time per rule kind in one CD call (record_function around every rule's relevant)."""
    rules = {type(r) for r in dec.rules.values()}
    saved = {cls: cls.relevant for cls in rules}
    for cls in rules:
        def wrapped(self, step, *args, _orig=saved[cls], **kwargs):
            with record_function(f"rule:{step.kind}"):
                return _orig(self, step, *args, **kwargs)
        cls.relevant = wrapped
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dec.cd(x, masks)
    finally:
        for cls, fn in saved.items():
            cls.relevant = fn
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kinds = {e.key: e.cpu_time_total for e in events if e.key.startswith("rule:")}
    print(f"relevant pass by rule kind (of {total / 1e6:.2f} s profiled CPU time):")
    for k, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {k[5:]:<14} {t / 1e6:7.2f} s  {100 * t / total:5.1f}%")
    print("top ATen ops (self time):")
    ops = defaultdict(float)
    for e in events:
        if not e.key.startswith("rule:"):
            ops[e.key] += e.self_cpu_time_total
    for k, t in sorted(ops.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {k:<36} {t / 1e6:7.2f} s  {100 * t / total:5.1f}%")


def forward_ops(model, x, b: int = 8) -> None:
    """The top ATen ops of a plain forward, per image, for comparison."""
    batch = x.expand(b, -1, -1, -1).contiguous()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(batch)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    print(f"plain forward (batch {b}), top ATen ops per image: "
          + ", ".join(f"{e.key} {e.self_cpu_time_total / b / 1e3:.0f} ms" for e in events))


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call: on a shared box the CPU time of a 1-thread run is the
    steadier figure (the wall time counts other jobs' slices)."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def ratio(model, dec, x, masks, rounds: int) -> dict:
    m = masks.shape[0]
    fwd: dict[int, tuple] = {}
    cd = []
    for _ in range(rounds):
        for b in (1, 8, 16):
            batch = x.expand(b, -1, -1, -1).contiguous()
            w, c = timed(lambda: model(batch))
            old = fwd.get(b, (float("inf"), float("inf")))
            fwd[b] = (min(old[0], w / b), min(old[1], c / b))
        w, c = timed(lambda: dec.cd(x, masks))
        cd.append((w / m, c / m))
    figures = {}
    for k, name in ((0, "wall"), (1, "CPU")):
        best_b = min(fwd, key=lambda b: fwd[b][k])
        best_cd = min(t[k] for t in cd)
        figures.update({f"cd_per_mask_over_best_forward_{name.lower()}": best_cd / fwd[best_b][k],
                        f"cd_per_mask_s_{name.lower()}": best_cd, f"best_forward_s_{name.lower()}": fwd[best_b][k]})
        print(f"{name}: forward per image {', '.join(f'batch {b} {v[k] * 1e3:.1f} ms' for b, v in fwd.items())}; "
              f"CD per mask {best_cd * 1e3:.1f} ms (rounds {', '.join(f'{t[k] * 1e3:.1f}' for t in cd)}); "
              f"CD per mask / best forward per image (batch {best_b}): {best_cd / fwd[best_b][k]:.3f}")
    return figures


def affine_rows() -> None:
    """What-if (``--affine-rows``): the Affine rule's Linear on token maps splits its bias as
    the norm rules do (each mask's map one row of channels: no movedim, output contiguous)."""
    orig = affine_rules.Affine.relevant

    def relevant(self, step, rel, values, aux, ops, m):
        weights, bias, pre = aux
        zr = weights(rel[step.dep[0]])
        if bias is not None and affine_rules.channels_last(step, zr):
            return split_beta(ops, zr, pre, bias, step.relu_fused)
        return orig(self, step, rel, values, aux, ops, m)
    affine_rules.Affine.relevant = relevant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="convnext_tiny")
    ap.add_argument("--masks", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--record", action="store_true", help="write the ratios to bench/results/norms.json")
    ap.add_argument("--affine-rows", action="store_true", help="what-if: see affine_rows()")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="what-if: flush denormals to zero (random-init ConvNeXt's zero biases and 1e-6 "
                         "LayerScale drive the relevant part at a tile's fringe below 1e-38)")
    args = ap.parse_args()
    torch.set_flush_denormal(args.flush_denormal)
    if args.affine_rows:
        affine_rows()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)().eval()
    x = torch.randn(1, 3, args.size, args.size)
    masks = tile_masks(args.masks, args.size)
    dec = fastacd.Decomposer(model, backend=args.backend)
    print(f"{args.arch} {args.size}px, {args.masks} masks, backend {dec.backend}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread{', affine rows (what-if)' if args.affine_rows else ''}"
          f"{', denormals flushed (what-if)' if args.flush_denormal else ''}")
    with torch.no_grad():
        dec.cd(x, masks[:2])  # warm-up
        if not args.no_profile:
            by_rule(dec, x, masks)
            forward_ops(model, x)
        figures = ratio(model, dec, x, masks, args.rounds)
    if args.record:
        case = "+".join([args.arch, str(args.size), f"{args.masks}masks"]
                        + (["flush_denormal"] if args.flush_denormal else [])
                        + (["affine_rows"] if args.affine_rows else []))
        record("norms", case, **figures)


if __name__ == "__main__":
    main()

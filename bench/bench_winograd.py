"""Winograd F(2x2, 3x3) and F(4x4, 3x3) (``torch.ops.fastacd.winograd_conv3x3``) against oneDNN's
direct float32 convolution, at the shapes VGG16's ACD runs (full maps with padding; 16- and
4-candidate crops of blocks 3-5 without; small crops of one or a few candidates), and the error
of each against float64 (max |error| over max |output|). All run in the same process,
alternating, the best of 5 calls twice each: the ratios are what to read (docs/kernels.md,
"Winograd"; ``WINOGRAD_MIN_CHANNELS`` and ``winograd_tile`` are set from them).

    .venv/bin/python bench/bench_winograd.py      # -> bench/results/winograd.json

One thread (``ACD_BENCH_THREADS``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from fastacd import ops  # noqa: E402

from _results import best_time, record  # noqa: E402

torch.set_num_threads(int(os.environ.get("ACD_BENCH_THREADS", "1")))

# (N, C_in, C_out, H = W, padding)
SHAPES = [(1, 64, 64, 224, 1), (1, 64, 128, 112, 1), (1, 128, 128, 112, 1), (16, 128, 128, 16, 0),
          (1, 256, 256, 56, 1), (16, 256, 256, 15, 0), (1, 512, 512, 28, 1), (16, 512, 512, 15, 0),
          (16, 512, 512, 13, 0), (16, 512, 512, 11, 0), (4, 512, 512, 15, 0), (1, 512, 512, 8, 0),
          (9, 512, 512, 6, 0), (16, 512, 512, 8, 0), (16, 512, 512, 10, 0), (4, 512, 512, 14, 0)]


def best_ms(fn) -> float:
    return best_time(fn, repeats=5) * 1e3


def main() -> int:
    op = torch.ops.fastacd.winograd_conv3x3.default
    print(f"{'shape':>22} {'C_out':>5} {'direct ms':>9} {'F2 ms':>7} {'F4 ms':>7} {'F2 x':>6} {'F4 x':>6} "
          f"{'chosen':>6} {'err direct':>10} {'err F2':>8} {'err F4':>8}")
    for n, ci, co, h, pad in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, ci, h, h, generator=g)
        w = torch.randn(co, ci, 3, 3, generator=g) / (ci * 9) ** 0.5
        u2, u4 = ops.winograd_weight(w, 2), ops.winograd_weight(w, 4)
        ref = F.conv2d(x.double(), w.double(), padding=pad)
        scale = float(ref.abs().max())

        def err(y):
            return float((y.double() - ref).abs().max()) / scale
        err_d, err_2, err_4 = err(F.conv2d(x, w, padding=pad)), err(op(x, u2, pad, pad)), err(op(x, u4, pad, pad))
        times = {"d": [], "2": [], "4": []}
        for _ in range(2):
            times["d"].append(best_ms(lambda: F.conv2d(x, w, padding=pad)))
            times["2"].append(best_ms(lambda: op(x, u2, pad, pad)))
            times["4"].append(best_ms(lambda: op(x, u4, pad, pad)))
        d, t2, t4 = (min(times[k]) for k in "d24")
        ho = h + 2 * pad - 2
        chosen = ops.conv3x3_tile(n, min(ci, co), ho, ho)
        name = f"{n}x{ci}x{h}x{h}_to_{co}_pad{pad}"
        record("winograd", name, direct_ms=d, f2_ms=t2, f4_ms=t4, f2_speedup=d / t2, f4_speedup=d / t4,
               chosen_tile=chosen or None, err_direct=err_d, err_f2=err_2, err_f4=err_4)
        print(f"{str((n, ci, h, h)):>22} {co:>5} {d:>9.1f} {t2:>7.1f} {t4:>7.1f} {d / t2:>5.2f}x {d / t4:>5.2f}x "
              f"{('F' + str(chosen)) if chosen else 'direct':>6} {err_d:>10.1e} {err_2:>8.1e} {err_4:>8.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

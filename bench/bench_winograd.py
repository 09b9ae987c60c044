"""Winograd F(2x2, 3x3) (``torch.ops.fastacd.winograd_conv3x3``) against oneDNN's direct float32
convolution, at the shapes VGG16's ACD runs (full maps with padding; 16- and 4-candidate
crops of blocks 3-5 without), and the error of each against float64 (max |error| over max
|output|). Both run in the same process, alternating, the best of 5 calls twice each: the
ratio is what to read (docs/kernels.md, "Winograd"; ``WINOGRAD_MIN_CHANNELS`` is set from it).

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
          (16, 512, 512, 13, 0), (16, 512, 512, 11, 0), (4, 512, 512, 15, 0)]


def best_ms(fn) -> float:
    return best_time(fn, repeats=5) * 1e3


def main() -> int:
    op = torch.ops.fastacd.winograd_conv3x3.default
    print(f"{'shape':>22} {'C_out':>5} {'direct ms':>9} {'winograd ms':>11} {'speed-up':>8} "
          f"{'err direct':>10} {'err winograd':>12}")
    for n, ci, co, h, pad in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, ci, h, h, generator=g)
        w = torch.randn(co, ci, 3, 3, generator=g) / (ci * 9) ** 0.5
        u = ops.winograd_weight(w)
        ref = F.conv2d(x.double(), w.double(), padding=pad)
        scale = float(ref.abs().max())
        err_d = float((F.conv2d(x, w, padding=pad).double() - ref).abs().max()) / scale
        err_w = float((op(x, u, pad, pad).double() - ref).abs().max()) / scale
        direct, wino = [], []
        for _ in range(2):
            direct.append(best_ms(lambda: F.conv2d(x, w, padding=pad)))
            wino.append(best_ms(lambda: op(x, u, pad, pad)))
        d, wn = min(direct), min(wino)
        name = f"{n}x{ci}x{h}x{h}_to_{co}_pad{pad}"
        record("winograd", name, direct_ms=d, winograd_ms=wn, speedup=d / wn, err_direct=err_d,
               err_winograd=err_w)
        print(f"{str((n, ci, h, h)):>22} {co:>5} {d:>9.1f} {wn:>11.1f} {d / wn:>7.2f}x {err_d:>10.1e} {err_w:>12.1e}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

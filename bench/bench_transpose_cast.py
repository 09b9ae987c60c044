"""The transposing casts of bf16 weight applications (``fastacd.ops.transpose_cast``) against
torch's ``x.to(dtype, memory_format=...)``, at the shapes of VGG16's windowed bf16 ACD: float32
NCHW crops to bfloat16 channels_last (a convolution's input) and bfloat16 channels_last
convolution outputs back to float32 NCHW. Same process, alternating, best of 5 twice, inside
the engine's CPU buffer reuse scope (as in the engine: no page faults for fresh outputs);
ns per value (docs/kernels.md, "Transposing casts").

    .venv/bin/python bench/bench_transpose_cast.py      # -> bench/results/transpose_cast.json

One thread (``ACD_BENCH_THREADS``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from fastacd import ops  # noqa: E402

from _results import best_time, record  # noqa: E402

torch.set_num_threads(int(os.environ.get("ACD_BENCH_THREADS", "1")))

SHAPES = [(16, 512, 13, 13), (16, 512, 15, 15), (16, 256, 30, 30), (16, 128, 60, 60), (4, 64, 100, 100),
          (1, 64, 224, 224), (1, 512, 28, 28)]


def ns_per_value(fn, n: int) -> float:
    return min(best_time(fn, repeats=5) for _ in range(2)) / n * 1e9


def main() -> int:
    if not ops.HAS_COMPILED:
        print("needs the compiled extension")
        return 1
    print(f"{'shape':>20} {'to bf16 CL: ours':>16} {'torch':>6} {'x':>5} {'to f32 NCHW: ours':>17} {'torch':>6} {'x':>5}"
          "   (ns per value)")
    with ops.reuse_cpu_buffers(1 << 30):
        for shape in SHAPES:
            x = torch.randn(shape)
            y = x.to(torch.bfloat16, memory_format=torch.channels_last)
            n = x.numel()
            ours_in = ns_per_value(lambda: ops.transpose_cast(x, torch.bfloat16, True), n)
            torch_in = ns_per_value(lambda: x.to(torch.bfloat16, memory_format=torch.channels_last), n)
            ours_out = ns_per_value(lambda: ops.transpose_cast(y, torch.float32, False), n)
            torch_out = ns_per_value(lambda: y.to(torch.float32, memory_format=torch.contiguous_format), n)
            record("transpose_cast", "x".join(map(str, shape)), to_bf16_cl_ns=ours_in, torch_to_bf16_cl_ns=torch_in,
                   to_bf16_cl_speedup=torch_in / ours_in, to_f32_nchw_ns=ours_out, torch_to_f32_nchw_ns=torch_out,
                   to_f32_nchw_speedup=torch_out / ours_out)
            print(f"{str(shape):>20} {ours_in:>16.2f} {torch_in:>6.2f} {torch_in / ours_in:>4.1f}x "
                  f"{ours_out:>17.2f} {torch_out:>6.2f} {torch_out / ours_out:>4.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

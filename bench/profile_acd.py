"""Where the time of one ACD goes: torch.profiler over ``fastacd.hierarchy`` at the notebook
settings, on the CPU or a GPU.

    python bench/profile_acd.py                            # VGG16, CPU, float32
    python bench/profile_acd.py --device cuda --out prof.txt
    python bench/profile_acd.py --model resnet50 --precision bf16 --size 224

Runs the hierarchy once to warm up, once timed, once under the profiler, and writes: the two
wall times; the operators by self CPU time and (on a GPU) by self device time; the calls that
make the host wait for the device (synchronisations, device-to-host copies, ``.item()``), and
the device's busy time over the wall time (a latency-bound pass keeps the GPU mostly idle).
Models are torchvision's with random initialisation (seeded; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (its seeded models and images)

import fastacd  # noqa: E402
from fastacd import ops  # noqa: E402

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy",
         "aten::item", "aten::_local_scalar_dense", "aten::equal", "aten::nonzero")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg16", help="a torchvision classifier (default vgg16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="float32")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--sweep-dim", type=int, default=14)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rows", type=int, default=25, help="operators listed per table")
    p.add_argument("--out", help="also write the report here")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    model = gpu_check.model_for(a.model, dry=False).to(dev)
    x = gpu_check.image(a.size, seed=2).to(dev)
    acd = dict(sweep_dim=a.sweep_dim, percentile_include=95, num_iters=a.iters, precision=a.precision)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run():
        sync()
        t = time.perf_counter()
        h = fastacd.hierarchy(model, x, **acd)
        sync()
        return time.perf_counter() - t, h

    lines = [f"ACD of {a.model} on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
             f"{a.size}x{a.size}, {acd}, torch {torch.__version__}, {torch.get_num_threads()} threads"]
    with ops.float32_precision():
        first, _ = run()
        second, h = run()
        lines.append(f"wall: first {first:.2f} s, second {second:.2f} s; {h.num_levels} levels, "
                     f"{h.stats.get('scored')} masks scored")
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            profiled, _ = run()
    ev = prof.key_averages()
    lines.append(f"under the profiler: {profiled:.2f} s")
    lines.append("\n== by self CPU time\n" + ev.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    if dev.type == "cuda":
        lines.append("== by self device time\n" + ev.table(sort_by="self_device_time_total", row_limit=a.rows))
        busy = sum(e.self_device_time_total for e in ev) / 1e6
        lines.append(f"device busy {busy:.2f} s of {profiled:.2f} s wall ({100 * busy / profiled:.0f}%)")
    waits = {e.key: (e.count, e.self_cpu_time_total / 1e6) for e in ev if e.key in WAITS}
    lines.append("host waits (calls, self CPU s): " + ", ".join(f"{k} {n} / {s:.2f}" for k, (n, s) in
                                                                 sorted(waits.items())))
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

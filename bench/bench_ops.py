"""Per-op benchmark: the compiled fused ops (torch.ops.fastacd.*) against their pure-torch
formulas (fastacd._torch_ops), at the activation shapes of VGG16 on a 224x224 image with
M masks, and an LSTM cell step.

    .venv/bin/python bench/bench_ops.py                  # all cases, JSON to bench/results/
    .venv/bin/python bench/bench_ops.py --masks 16 --repeats 3 --only bias_split
    .venv/bin/python -m pytest bench/bench_ops.py --benchmark-only   # pytest-benchmark view

Both implementations run in the same process, alternating per repeat (warm-up first,
then the median of the repeats), so the ratio torch / compiled is what to read; the
absolute times depend on the machine and its load. Cases larger than --max-elements use
fewer masks (recorded as "masks" in the JSON) to stay within memory on small machines.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastacd import _torch_ops, ops

RESULTS = Path(__file__).resolve().parent / "results"

# VGG16 at 224x224: (channels, side) of each distinct conv output; pools halve the side.
VGG16_CONV = [(64, 224), (128, 112), (256, 56), (512, 28), (512, 14)]
VGG16_LINEAR = [(4096, True), (1000, False)]  # (features, followed by ReLU)
LSTM_CELLS = [(64, 256), (1024, 256)]  # (masks, hidden)


def cases(masks: int, max_elements: int, device: str, dtype: torch.dtype):
    """(name, op, masks used, make_inputs) for every benchmark case."""
    def fit(per_mask):
        return max(1, min(masks, max_elements // per_mask))

    def gen():
        return torch.Generator().manual_seed(0)

    def rand(*shape, g):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    out = []
    for c, s in VGG16_CONV:
        m = fit(c * s * s)

        def conv(c=c, s=s, m=m):
            g = gen()
            return rand(m, c, s, s, g=g), rand(1, c, s, s, g=g), rand(c, g=g)

        out.append((f"bias_split+relu conv {c}x{s}x{s}", "bias_split", m, lambda f=conv: (*f(), True)))

        def bn(f=conv):
            r, t, b = f()
            return r, t, b.abs() + 0.5, b, True  # scale, shift

        out.append((f"bn_split+relu {c}x{s}x{s}", "bn_split", m, bn))

        def pool(c=c, s=s, m=m):
            g = gen()
            total = rand(1, c, s, s, g=g)
            _, idx = F.max_pool2d(total, 2, return_indices=True)
            return rand(m, c, s, s, g=g), idx

        out.append((f"maxpool_gather {c}x{s}x{s}->{s // 2}", "maxpool_gather", m, pool))
    for f, relu in VGG16_LINEAR:
        def lin(f=f, relu=relu):
            g = gen()
            return rand(masks, f, g=g), rand(1, f, g=g), rand(f, g=g), relu

        out.append((f"bias_split{'+relu' if relu else ''} linear {f}", "bias_split", masks, lin))
    for m, h in LSTM_CELLS:
        def cell(m=m, h=h):
            g = gen()
            return (rand(m, 4 * h, g=g), rand(1, 4 * h, g=g), rand(4 * h, g=g), torch.sigmoid(rand(1, h, g=g)),
                    rand(m, h, g=g), rand(1, h, g=g), (torch.rand(m, generator=g) > 0.5).to(device, dtype), False)

        out.append((f"lstm_cd_cell M={m} H={h}", "lstm_cd_cell", m, cell))
    return out


def impls(op: str):
    return {"compiled": getattr(torch.ops.fastacd, op).default, "torch": getattr(_torch_ops, op)}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn, args, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t0


def run_case(op, make_inputs, repeats, warmup, device):
    args = make_inputs()
    fns = impls(op)
    for _ in range(warmup):
        for fn in fns.values():
            fn(*args)
    times = {k: [] for k in fns}
    for _ in range(repeats):  # alternate, so load drifts hit both alike
        for k, fn in fns.items():
            times[k].append(time_once(fn, args, device))
    # the two agree (the tests check this properly; here it guards the benchmark itself)
    a, b = fns["compiled"](*args), fns["torch"](*args)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    return {k: statistics.median(v) for k, v in times.items()}, times


def metadata(args) -> dict:
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "build": ops.build_info(),
        "device": args.device,
        "dtype": args.dtype,
        "masks_requested": args.masks,
        "max_elements": args.max_elements,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": 0,
        "statistic": "median seconds; ratio = torch / compiled (higher is better for compiled)",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masks", type=int, default=64)
    p.add_argument("--max-elements", type=int, default=64 * 128 * 112 * 112,
                   help="cap on M*C*H*W per case (default: 64 masks at 128x112x112, ~400 MB in fp32)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--only", default="", help="substring filter on case names")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/ops_<device>.json)")
    args = p.parse_args(argv)
    if not ops.HAS_COMPILED:
        print("fastacd._C is not built: nothing to compare (build with `pip install --no-build-isolation -e .`)")
        return 1
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{'case':44s} {'masks':>5s} {'compiled ms':>12s} {'torch ms':>10s} {'ratio':>6s}")
    for name, op, m, make in cases(args.masks, args.max_elements, args.device, dtype):
        if args.only not in name:
            continue
        med, raw = run_case(op, make, args.repeats, args.warmup, args.device)
        ratio = med["torch"] / med["compiled"]
        rows.append({"case": name, "op": op, "masks": m, "compiled_s": med["compiled"], "torch_s": med["torch"],
                     "ratio": ratio, "raw_s": raw})
        print(f"{name:44s} {m:5d} {med['compiled'] * 1e3:12.2f} {med['torch'] * 1e3:10.2f} {ratio:6.2f}", flush=True)
    total_c = sum(r["compiled_s"] for r in rows)
    total_t = sum(r["torch_s"] for r in rows)
    print(f"{'sum over cases':44s} {'':5s} {total_c * 1e3:12.2f} {total_t * 1e3:10.2f} {total_t / total_c:6.2f}")
    out = args.out or RESULTS / f"ops_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": metadata(args), "cases": rows,
                               "sum": {"compiled_s": total_c, "torch_s": total_t, "ratio": total_t / total_c}},
                              indent=1))
    print(f"wrote {out}")
    return 0


# pytest-benchmark view of the same cases (small: 8 masks), not part of the test suite.
try:
    import pytest

    _BENCH = [c for c in cases(8, 8 * 64 * 112 * 112, "cpu", torch.float32)] if ops.HAS_COMPILED else []

    @pytest.mark.skipif(not ops.HAS_COMPILED, reason="fastacd._C not built")
    @pytest.mark.parametrize("impl", ["compiled", "torch"])
    @pytest.mark.parametrize("case", _BENCH, ids=[c[0] for c in _BENCH])
    def test_op(benchmark, case, impl):
        name, op, _, make = case
        benchmark.group = name
        args = make()
        benchmark(impls(op)[impl], *args)
except ImportError:  # pytest is only needed for the pytest-benchmark view
    pass


if __name__ == "__main__":
    sys.exit(main())

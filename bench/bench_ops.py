"""Per-op benchmark: the compiled fused ops (torch.ops.fastacd.*) against their pure-torch
formulas (fastacd._torch_ops), at the activation shapes of VGG16 on a 224x224 image with
64 masks, and an LSTM cell step.

    .venv/bin/python -m pytest bench/bench_ops.py -q        # part of `make bench`
    .venv/bin/python bench/bench_ops.py                      # same, as a table
    .venv/bin/python bench/bench_ops.py --masks 16 --repeats 3 --only bias_split
    .venv/bin/python bench/bench_ops.py --tol           # the split ops with a per-element tol

Both implementations run in the same process, alternating per repeat (warm-up first,
then the median of the repeats), so the ratio torch / compiled is what to read; the
absolute times depend on the machine and its load. Cases larger than --max-elements
(default: 64 masks of 128x112x112, ~400 MB in float32) use fewer masks, recorded as
``masks``: VGG16's first block (64x224x224) runs with 32 masks. Figures go to
bench/results/ops.json (ops_cuda.json with --device cuda) through bench/_results.py.
``ACD_BENCH_THREADS`` threads (default 1: the 2-core box is shared).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fastacd import ops
from fastacd.ops import torch_ops as _torch_ops

from _results import record

torch.set_num_threads(int(os.environ.get("ACD_BENCH_THREADS", "1")))
MASKS = 64
MAX_ELEMENTS = 64 * 128 * 112 * 112

# VGG16 at 224x224: (channels, side) of each distinct conv output; pools halve the side.
VGG16_CONV = [(64, 224), (128, 112), (256, 56), (512, 28), (512, 14)]
VGG16_LINEAR = [(4096, True), (1000, False)]  # (features, followed by ReLU)
LSTM_CELLS = [(64, 256), (1024, 256)]  # (masks, hidden)
# The windowed pass's gathers for single 14x14 tiles: (channels, side, window side, crop side).
WINDOWS = [(64, 224, 18, 20), (256, 56, 14, 16), (512, 28, 13, 15), (512, 14, 12, 14)]


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
    for c, s, wside, cside in WINDOWS:
        def window(c=c, s=s, wside=wside, cside=cside, pool=False):
            g = gen()
            m = masks
            base, win = rand(1, c, s, s, g=g), rand(m, c, wside, wside, g=g)
            wy, wx = (torch.randint(0, s - wside + 1, (m,), generator=g).to(device) for _ in range(2))
            if not pool:
                return base, win, wy, wx, wy - 1, wx - 1, cside, cside, None
            _, idx = F.max_pool2d(rand(1, c, s, s, g=g), 2, return_indices=True)
            return base, win, wy, wx, wy // 2, wx // 2, wside // 2, wside // 2, idx

        out.append((f"window_gather crop {c}x{s}x{s} win {wside} -> {cside}", "window_gather", masks, window))
        out.append((f"window_gather pool {c}x{s}x{s} win {wside} -> {wside // 2}", "window_gather", masks,
                    lambda f=window: f(pool=True)))
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


def with_tol(case):
    """A split case with a per-element tolerance (numerical zero, design.md section 9): half of
    |total|, so that some parts are below their threshold and others not."""
    name, op, m, make = case

    def make_tol(make=make):
        args = make()
        return (*args, 0.5 * args[1].abs())  # args[1] is the total

    return f"{name} tol", op, m, make_tol


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


def measure(name, op, m, make, repeats, warmup, device, suite):
    """Time one case, record it in bench/results/<suite>.json, return its figures."""
    med, _ = run_case(op, make, repeats, warmup, device)
    figures = {"torch_over_compiled": med["torch"] / med["compiled"], "compiled_seconds": med["compiled"],
               "torch_seconds": med["torch"], "masks": float(m)}
    record(suite, name, **figures)
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masks", type=int, default=MASKS)
    p.add_argument("--max-elements", type=int, default=MAX_ELEMENTS, help="cap on M*C*H*W per case")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--only", default="", help="substring filter on case names")
    p.add_argument("--tol", action="store_true", help="the split ops with a per-element tol, instead of all cases")
    args = p.parse_args(argv)
    if not ops.HAS_COMPILED:
        print("fastacd._C is not built: nothing to compare (build with `pip install --no-build-isolation -e .`)")
        return 1
    suite = "ops" if args.device == "cpu" else f"ops_{args.device}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device} {args.dtype}, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'case':44s} {'masks':>5s} {'compiled ms':>12s} {'torch ms':>10s} {'ratio':>6s}")
    total_c = total_t = 0.0
    todo = cases(args.masks, args.max_elements, args.device, getattr(torch, args.dtype))
    if args.tol:
        todo = [with_tol(c) for c in todo if c[1] in ("bias_split", "bn_split")]
    for name, op, m, make in todo:
        if args.only not in name:
            continue
        f = measure(name, op, m, make, args.repeats, args.warmup, args.device, suite)
        total_c += f["compiled_seconds"]
        total_t += f["torch_seconds"]
        print(f"{name:44s} {m:5d} {f['compiled_seconds'] * 1e3:12.2f} {f['torch_seconds'] * 1e3:10.2f} "
              f"{f['torch_over_compiled']:6.2f}", flush=True)
    if total_c:
        print(f"{'sum over cases':44s} {'':5s} {total_c * 1e3:12.2f} {total_t * 1e3:10.2f} {total_t / total_c:6.2f}")
    print(f"recorded in bench/results/{suite}.json")
    return 0


# The pytest view (`make bench`): one test per case, recorded like main() does.
try:
    import pytest

    _CASES = cases(MASKS, MAX_ELEMENTS, "cpu", torch.float32) if ops.HAS_COMPILED else []

    @pytest.mark.skipif(not ops.HAS_COMPILED, reason="fastacd._C not built")
    @pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
    def test_op(benchmark, case):
        name, op, m, make = case
        figures = measure(name, op, m, make, repeats=5, warmup=1, device="cpu", suite="ops")
        args = make()
        benchmark.group = name
        benchmark.pedantic(impls(op)["compiled"], args=args, rounds=3, warmup_rounds=1)
        print(name, {k: round(v, 4) for k, v in figures.items()})
except ImportError:  # pytest is only needed for the pytest view
    pass


if __name__ == "__main__":
    sys.exit(main())

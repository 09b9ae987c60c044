"""The ``fastacd`` command: ``demo``, ``info``, ``bench``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cmd_demo(args) -> int:
    """Train a small CNN on scikit-learn's digits, then explain a few test digits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import fastacd
    from fastacd.models import train_digits_cnn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, images, labels, acc = train_digits_cnn()
    print(f"trained a digits CNN in {time.perf_counter() - t0:.1f} s: test accuracy {acc:.3f}")

    sweep = args.sweep_dim
    size = images.shape[-1]
    grid = -(-size // sweep)
    tiles = torch.zeros(grid * grid, size, size)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        tiles[k, r * sweep:(r + 1) * sweep, c * sweep:(c + 1) * sweep] = 1

    fast = fastacd.Decomposer(model)
    ref = fastacd.Decomposer(model, backend="reference")
    results, t_fast, t_ref = [], 0.0, 0.0
    fig, axes = plt.subplots(2, args.n, figsize=(2.4 * args.n, 5))
    with torch.no_grad():
        for j in range(args.n):
            x, label = images[j:j + 1], int(labels[j])
            pred = int(fast.forward(x).argmax())
            t = time.perf_counter()
            res = fast.cd(x, tiles)
            t_fast += time.perf_counter() - t
            t = time.perf_counter()
            res_ref = ref.cd(x, tiles)
            t_ref += time.perf_counter() - t
            diff = float((res.relevant - res_ref.relevant).abs().max())
            scores = res.scores(pred).reshape(grid, grid)
            results.append({"index": j, "label": label, "prediction": pred, "sweep_dim": sweep,
                             "tile_scores": scores.tolist(), "max_diff_vs_reference": diff})
            axes[0, j].imshow(x[0, 0], cmap="gray")
            axes[0, j].set_title(f"label {label}, pred {pred}")
            lim = float(scores.abs().max()) or 1.0
            im = axes[1, j].imshow(scores, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[1, j].set_title(f"CD score per {sweep}x{sweep} tile")
            for ax in axes[:, j]:
                ax.axis("off")
            fig.colorbar(im, ax=axes[1, j], fraction=0.046)
    fig.tight_layout()
    png = out / "cd_tile_scores.png"
    fig.savefig(png.with_name(png.name + ".tmp.png"), dpi=100)
    os.replace(png.with_name(png.name + ".tmp.png"), png)
    _atomic_write(out / "cd_tile_scores.json", json.dumps(results, indent=1).encode())
    for r in results:
        print(f"digit {r['index']}: label {r['label']} pred {r['prediction']}, "
              f"{grid * grid} tiles, |fast - reference| = {r['max_diff_vs_reference']:.1e}")
    print(f"CD of {grid * grid} tiles x {args.n} digits: {fast.backend} backend {t_fast:.3f} s, "
          f"reference {t_ref:.3f} s ({t_ref / t_fast:.1f}x faster)")
    print(f"wrote {png} and {out / 'cd_tile_scores.json'}")
    return 0


def cmd_info(args) -> int:
    import fastacd
    print(json.dumps(fastacd.build_info(), indent=2, default=str))
    return 0


def cmd_bench(args) -> int:
    import subprocess
    root = Path(__file__).resolve().parents[1]
    bench = root / "bench"
    if not bench.is_dir():
        print("bench/ is not present (the benchmarks ship with the source tree)", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "pytest", str(bench / args.suite) if args.suite else str(bench),
           "-q", "-p", "no:cacheprovider"]
    rc = subprocess.call(cmd, cwd=root)
    subprocess.call([sys.executable, str(bench / "report.py")], cwd=root)
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastacd", description="Fast Contextual Decomposition and ACD hierarchies.")
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="train a small digits CNN (seconds) and explain a few digits; no downloads")
    d.add_argument("--out", default="fastacd_demo_out", help="output folder (default: %(default)s)")
    d.add_argument("--n", type=int, default=4, help="digits to explain (default: %(default)s)")
    d.add_argument("--sweep-dim", type=int, default=4, help="tile size in pixels (default: %(default)s)")
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("info", help="versions, compiled extension and kernels, devices")
    i.set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="run the benchmark harness (bench/) and print the ratio table")
    b.add_argument("suite", nargs="?", default=None, help="one file of bench/, e.g. bench_engine.py")
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    if args.cmd is None:
        p.print_help()
        return 0
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

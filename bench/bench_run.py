"""``fastacd run`` throughput: images per hour at the notebook settings, 1 vs 2 processes.

    .venv/bin/python bench/bench_run.py                       # AlexNet, 2 images
    .venv/bin/python bench/bench_run.py --archs alexnet vgg16 --n 2 --procs 1 2

Settings: scikit-image's bundled photos (chelsea, coffee, astronaut, rocket; nothing is
downloaded) as PNGs, random-init torchvision models (float32; the cost of ACD does not depend
on training), 224x224 (resize 256, centre crop), ``sweep_dim=14``, ``percentile_include=95``,
``num_iters=5``, method ``cd``, the predicted class. Each configuration is a fresh ``fastacd run``
into its own output folder: 1 process with every core, or ``torchrun --standalone
--nproc_per_node=P`` (cores // P threads each).

Figures (bench/results/run.json), per model and process count:
* ``wall_s``: the whole command (start-up, model build, every image, merge);
* ``images_per_hour``: ``n / wall_s * 3600``;
* ``per_image_s``: the manifest's per-image compute times (mean), and their sum;
* ``per_image``: each image's compute time (the same images in every configuration);
* ``speedup_vs_1proc``: images per hour over the 1-process figure of the same run.

The machine is shared: ``load_avg_1min`` is recorded beside each figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SETTINGS = ["--sweep-dim", "14", "--percentile-include", "95", "--num-iters", "5", "--method", "cd",
            "--image-size", "224"]


def write_photos(folder: Path, n: int) -> None:
    import skimage.data
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        name = PHOTOS[k % len(PHOTOS)]
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{k:02d}_{name}.png")


def one(arch: str, procs: int, data: Path, out: Path) -> dict:
    args = [str(data), "--arch", arch, "--out", str(out), "--no-progress", *SETTINGS]
    if procs == 1:
        cmd = [sys.executable, "-m", "fastacd", "run", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "fastacd", "run", *args]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in recs if r["status"] == "ok"]
    if len(times) != len(recs):
        raise RuntimeError(f"{arch} x{procs}: not every image finished: {recs}")
    return dict(wall_s=wall, images=len(recs), images_per_hour=len(recs) / wall * 3600,
                per_image_s=sum(times) / len(times), per_image_sum_s=sum(times),
                per_image={r["image"]: r["time_s"] for r in recs})


def main(argv=None) -> None:
    from _results import record
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["alexnet"])
    p.add_argument("--n", type=int, default=2, help="images per run")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "photos"
        write_photos(data, a.n)
        for arch in a.archs:
            base = None
            for procs in a.procs:
                r = one(arch, procs, data, Path(tmp) / f"out_{arch}_{procs}")
                base = base or (r["images_per_hour"] if procs == 1 else None)
                if base:
                    r["speedup_vs_1proc"] = r["images_per_hour"] / base
                r.update(processes=procs, cpu_cores=len(os.sched_getaffinity(0)),
                         load_avg_1min=os.getloadavg()[0], settings=" ".join(SETTINGS))
                print(f"{arch} x{procs} processes: {r['images']} images in {r['wall_s']:.0f} s = "
                      f"{r['images_per_hour']:.1f} images/hour (per image {r['per_image_s']:.0f} s)", flush=True)
                record("run", f"{arch}_224_sweep14_{procs}proc", **r)


def test_bench_run():
    main([])


if __name__ == "__main__":
    main()

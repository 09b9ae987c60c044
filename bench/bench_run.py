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
* ``masks_scored``: CD masks the engine scored per image (the JSON's ``stats.scored``);
* ``images_per_hour_vs_first_config``: over the first configuration's (1 process by default);
* ``images_per_hour_per_core``: ``images_per_hour / (processes x threads)``, the figure to
  compare machines and layouts by; ``steady_images_per_hour_per_core``: the same from the
  per-image compute times alone (``3600 / (per_image_s x threads)``: start-up left out).

Configurations ``P`` or ``PxT`` (``--configs 1 1x1 2``: 1 process with every core, 1 process
with one thread, 2 processes); ``--precisions float32 bf16 bf16-alone`` runs each in float32,
in bf16 with its decisions checked in float32 (``--precision bf16``) and in bf16 alone
(``--no-exact-decisions``); ``--repeats R`` runs R interleaved rounds and keeps the fastest
(``all_wall_s`` has every round).

Also ``cpu_vgg16_forward_1thread.gflops``: achieved FP32 GFLOP/s of a plain VGG16 forward pass
on one thread (the CPU side of the CPU/GPU FLOP ratio in docs/run.md).

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


# --precisions: the name of each mode and the flags it adds to ``fastacd run``
PRECISIONS = {"float32": [], "bf16": ["--precision", "bf16"],
              "bf16-alone": ["--precision", "bf16", "--no-exact-decisions"]}


def one(arch: str, procs: int, threads: int | None, data: Path, out: Path, precision: str = "float32") -> dict:
    args = [str(data), "--arch", arch, "--out", str(out), "--no-progress", *SETTINGS, *PRECISIONS[precision]]
    if threads:
        args += ["--threads", str(threads)]
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
                per_image={r["image"]: r["time_s"] for r in recs}, load_avg_1min=os.getloadavg()[0],
                masks_scored={r["image"]: json.loads((out / r["outputs"]["json"]).read_text())["stats"]["scored"]
                              for r in recs})


def cpu_gflops(threads: int = 1) -> float:
    """Achieved FP32 GFLOP/s of a plain VGG16 forward pass (batch 4, best of 3) with ``threads``:
    the CPU side of the CPU/GPU FLOP ratio used for the GPU estimate in docs/run.md."""
    import torch
    import torchvision
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = torchvision.models.vgg16().eval()
        x = torch.randn(4, 3, 224, 224)
        with torch.no_grad():
            m(x[:1])
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                m(x)
                best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 4 * 2 * 15.47 / best  # 15.47 GMAC per 224x224 image


def parse_config(c: str) -> tuple[int, int | None]:
    procs, _, threads = c.partition("x")
    return int(procs), (int(threads) if threads else None)


def main(argv=None) -> None:
    from _results import record
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["alexnet"])
    p.add_argument("--n", type=int, default=2, help="images per run")
    p.add_argument("--configs", nargs="+", default=["1", "2"],
                   help="P or PxT: P processes (torchrun when > 1), T threads each (default: cores // P)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the configs, interleaved")
    p.add_argument("--no-flops", action="store_true", help="skip the CPU GFLOP/s measurement")
    p.add_argument("--precisions", nargs="+", default=["float32"], choices=list(PRECISIONS),
                   help="float32; bf16 (decisions checked in float32); bf16-alone (--no-exact-decisions)")
    a = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if not a.no_flops:
        g = cpu_gflops(1)
        print(f"CPU: VGG16 forward at {g:.1f} GFLOP/s on one thread", flush=True)
        record("run", "cpu_vgg16_forward_1thread", gflops=g, load_avg_1min=os.getloadavg()[0])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "photos"
        write_photos(data, a.n)
        for arch in a.archs:
            runs = {(c, pr): [] for pr in a.precisions for c in a.configs}
            for k in range(a.repeats):
                for c, pr in runs:
                    procs, threads = parse_config(c)
                    r = one(arch, procs, threads, data, Path(tmp) / f"out_{arch}_{c}_{pr}_{k}", pr)
                    runs[c, pr].append(r)
                    print(f"{arch} {pr} {procs} process(es) x {threads or cores // procs} thread(s), round {k}: "
                          f"{r['images']} images in {r['wall_s']:.0f} s = {r['images_per_hour']:.1f} "
                          f"images/hour (per image {r['per_image_s']:.0f} s, load {r['load_avg_1min']:.1f})",
                          flush=True)
            base = None
            for (c, pr), rs in runs.items():
                procs, threads = parse_config(c)
                best = min(rs, key=lambda r: r["wall_s"])
                fig = dict(best, processes=procs, threads_per_process=threads or max(1, cores // procs),
                           cpu_cores=cores, settings=" ".join(SETTINGS + PRECISIONS[pr]), rounds=len(rs),
                           all_wall_s=[r["wall_s"] for r in rs], all_load_avg_1min=[r["load_avg_1min"] for r in rs])
                used = procs * fig["threads_per_process"]
                fig.update(dtype="float32", precision=pr, images_per_hour_per_core=fig["images_per_hour"] / used,
                           steady_images_per_hour_per_core=3600 / (fig["per_image_s"] * fig["threads_per_process"]))
                base = base or fig["images_per_hour"]
                fig["images_per_hour_vs_first_config"] = fig["images_per_hour"] / base
                name = (f"{arch}_224_sweep14_{procs}proc" + (f"_{threads}thread" if threads else "")
                        + ("" if pr == "float32" else f"_{pr}"))
                record("run", name, **fig)


def test_bench_run():
    main([])


if __name__ == "__main__":
    main()

"""How many of a hierarchy's nodes ``fastacd run --rounding-check`` needs to decompose again in
float64 (docs/run.md): the gap over 4 nodes spread over the levels against the gap over 16,
on the same hierarchies, and the time of each.

Random-init VGG16 on uniform-noise 224x224 images (one of them has a max-pool argmax that
float32 and float64 order differently), and a mobilenet_v3_small whose batchnorm statistics
amplify rounding (tests/models.py ``randomize_batchnorm``), at the notebook settings.

    .venv/bin/python bench/rounding_check_nodes.py [--images 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _results import record  # noqa: E402
from models import randomize_batchnorm  # noqa: E402

import fastacd  # noqa: E402
from fastacd.cli.run import rounding_gap  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for arch in ("vgg16", "mobilenet_v3_small"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(num_classes=1000)
        if arch != "vgg16":
            randomize_batchnorm(model)
        model.eval()
        dec = fastacd.Decomposer(model)
        for seed in range(a.images if arch == "vgg16" else 1):
            g = torch.Generator().manual_seed(seed)
            x = (torch.rand(1, 3, 224, 224, generator=g) - 0.45) / 0.225
            h = fastacd.hierarchy(model, x, sweep_dim=14, percentile_include=95, num_iters=5)
            row = dict(nodes=len(h.nodes))
            for k in (4, 16):
                t = time.perf_counter()
                row[f"gap_{k}"] = rounding_gap(dec, x, h, k)
                row[f"seconds_{k}"] = time.perf_counter() - t
            print(arch, seed, row, flush=True)
            record("rounding_check_nodes", f"{arch}_noise{seed}", threads=a.threads, **row)


if __name__ == "__main__":
    main()

"""Write benchmark figures to bench/results/<suite>.json atomically, with metadata.

Every figure is a ratio measured in one run (design.md section 6); absolute seconds are
kept beside them for context. ``bench/report.py`` prints and compares these files.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=RESULTS.parent, text=True).strip()
    except Exception:
        return "unknown"


def record(suite: str, name: str, **figures) -> None:
    """Merge ``figures`` (ratios and seconds) for case ``name`` into results/<suite>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{suite}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("meta", {}).update(
        commit=_commit(), torch=torch.__version__, machine=platform.machine(),
        cpu_threads=torch.get_num_threads(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
    data.setdefault("cases", {})[name] = figures
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_wall_and_cpu(fn, repeats: int = 3, warmup: int = 1) -> tuple[float, float]:
    """Best wall time and best process CPU time (all threads) of ``fn()`` (seconds).

    On a shared machine the wall time of a run depends on what else runs; the CPU time it
    burns much less so. Reporting both lets a reader tell contention from real change.
    """
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def tile_masks(n: int, size: int = 224, tile: int = 14) -> torch.Tensor:
    """n masks (n, size, size) of one tile each, tiles drawn without repeats (seed 0)."""
    g = torch.Generator().manual_seed(0)
    grid = size // tile
    masks = torch.zeros(n, size, size)
    for k, cell in enumerate(torch.randperm(grid * grid, generator=g)[:n].tolist()):
        r, c = divmod(cell, grid)
        masks[k, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = 1
    return masks

"""bench/gpu_check.py's dry run: the whole GPU check (stages, workers, JSON) on the CPU with tiny
models and no build, so CI covers the script that runs on a GPU (docs/gpu_check.md)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "all stages passed" in r.stdout
    data = json.loads(out.read_text())
    assert data["ok"] and data["meta"]["dry_run"] and data["env"]["device"] == "cpu"
    st = data["stages"]
    assert st["build"]["status"] == "skipped"
    tests = st["tests"]
    assert tests["status"] == "ok" and tests["counts"]["skipped"] > 0 and tests["counts"]["failed"] == 0
    checks = st["checks"]["items"]
    assert st["checks"]["status"] == "ok" and set(st["checks"]["precisions"]) == {"bf16", "tf32"}
    for name in ("vgg16", "resnet18", "alexnet"):
        assert checks[f"cd_{name}"]["pass"] and checks[f"cd_{name}"]["float32_exact_err"] < 1e-4
        assert checks[f"acd_{name}"]["float64_identical_levels"] == 1.0
    bench = st["bench"]["items"]
    assert st["bench"]["status"] == "ok"
    for name in ("vgg16", "resnet18", "alexnet"):
        assert bench[f"cd_per_mask_{name}"]["float32"]["cd_per_mask_over_best_forward"] > 0
    assert bench["acd_vgg16"]["levels"] >= 1 and bench["acd_resnet50"]["seconds"] > 0
    vit = bench["acd_vit_b_16"]
    assert vit["status"] == "ok" or (vit["status"] == "skipped" and vit["reason"])
    assert bench["fastacd_run"]["images_ok"] == 2 and bench["fastacd_run"]["images_per_second"] > 0
    # one CPU thread: under a minute of CPU time (the wall time also counts the machine's other load)
    assert cpu < 60, f"dry run took {cpu:.1f} s of CPU ({wall:.1f} s wall)"


def test_gpu_check_rejects_unknown_stages():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--stages", "build,nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown stages: nope" in r.stderr

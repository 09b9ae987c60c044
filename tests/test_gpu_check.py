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
    assert bench["acd_vgg16"]["warm_seconds"] > 0
    vit = bench["acd_vit_b_16"]
    assert (vit["status"] == "ok" and vit["levels"] >= 1) or (vit["status"] == "skipped" and vit["reason"])
    assert bench["fastacd_run"]["images_ok"] == 2 and bench["fastacd_run"]["images_per_second"] > 0
    # one CPU thread: under a minute of CPU time (the wall time also counts the machine's other load)
    assert cpu < 60, f"dry run took {cpu:.1f} s of CPU ({wall:.1f} s wall)"


def test_gpu_check_rejects_unknown_stages():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--stages", "build,nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown stages: nope" in r.stderr


def _gpu_check_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tests_stage_survives_a_test_that_kills_pytest(tmp_path, monkeypatch):
    """A device assert aborts the interpreter mid-run (seen on the first H200 run): the stage
    names the test that was running, keeps the dump, and runs the rest without it and without
    the tests already done; the full output of both runs goes to the log."""
    gc = _gpu_check_module()
    crashed = "tests/test_cuda.py::test_c[(1, 2)-torch.float16]"
    calls = []

    def fake_run(cmd, timeout, env=None, echo=None, cwd=None):
        calls.append(cmd)
        if len(calls) == 1:
            lines = ["tests/test_cuda.py::test_a PASSED  [  1%]",
                     "tests/test_cuda.py::test_b[(3, 4)-torch.float32] SKIPPED (one GPU)  [  2%]",
                     f"{crashed} Fatal Python error: Aborted", "", "Current thread 0x1 (most recent call first):",
                     '  File "tests/test_cuda.py", line 7 in test_c']
            rc = -6
        else:
            junit = next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
            Path(junit).write_text('<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0">'
                                   '<testcase classname="tests.test_cuda" name="test_d"/>'
                                   '<testcase classname="tests.test_cuda" name="test_e"><failure message="boom"/>'
                                   '</testcase></testsuite></testsuites>')
            lines = ["tests/test_cuda.py::test_d PASSED  [ 50%]", "tests/test_cuda.py::test_e FAILED  [100%]"]
            rc = 1
        for line in lines:
            echo(line + "\n")
        return {"rc": rc, "timed_out": False, "seconds": 1.0, "output": "\n".join(lines) + "\n"}

    monkeypatch.setattr(gc, "run_logged", fake_run)
    log = tmp_path / "tests.log"
    res = gc.stage_tests(type("Args", (), {"dry_run": False})(), 300, log)
    assert len(calls) == 2
    deselected = {a.split("=", 1)[1] for a in calls[1] if a.startswith("--deselect=")}
    assert deselected == {"tests/test_cuda.py::test_a", "tests/test_cuda.py::test_b[(3, 4)-torch.float32]", crashed}
    assert [c["test"] for c in res["crashed"]] == [crashed] and res["crashed"][0]["rc"] == -6
    assert res["crashed"][0]["output"].startswith("Fatal Python error: Aborted") and "line 7" in res["crashed"][0]["output"]
    assert res["status"] == "failed"
    assert res["counts"] == {"passed": 2, "skipped": 1, "failed": 2, "error": 0}
    assert [f["test"] for f in res["failures"]] == ["tests.test_cuda::test_e"]
    text = log.read_text()
    assert "Fatal Python error" in text and "test_e FAILED" in text


def test_build_probe_checks_that_error_messages_format_numbers():
    """The build stage's probe formats an error with numbers in a fresh interpreter: a library
    linked with a private libstdc++ cut such messages short here and crashed on the H200
    image, and counts as a failed build there (docs/gpu_check.md)."""
    gc = _gpu_check_module()
    info = gc.probe_extension(120)
    from fastacd import ops
    assert info["compiled"] == ops.HAS_COMPILED
    assert info["error_messages_whole"] is (True if ops.HAS_COMPILED else None)


def test_build_stage_fails_a_library_whose_error_messages_break(monkeypatch):
    """After a build, kernels that fit the GPU are not enough: a probe whose error message
    crashed or came out cut short fails the stage with the reason."""
    gc = _gpu_check_module()
    gpu = {"cuda_available": True, "capability": [9, 0], "compiled": True, "cuda_kernels": True,
           "cuda_devices": [{"kernels_fit": True}], "library": None}
    probes = iter([dict(gpu, cuda_kernels=False), dict(gpu, error_messages_whole=False)])
    monkeypatch.setattr(gc, "probe_extension", lambda timeout: next(probes))
    monkeypatch.setattr(gc, "run_logged", lambda *a, **k: {"rc": 0, "timed_out": False, "seconds": 1.0, "output": ""})
    args = type("Args", (), {"dry_run": False, "rebuild": False, "arch_list": "auto"})()
    res = gc.stage_build(args, 100)
    assert res["status"] == "failed" and "error messages crash or are cut short" in res["reason"]
    probes = iter([dict(gpu, cuda_kernels=False), dict(gpu, error_messages_whole=True)])
    assert gc.stage_build(args, 100)["status"] == "ok"
    probes = iter([dict(gpu, cuda_kernels=False), dict(gpu, cuda_devices=[{"kernels_fit": False}])])
    assert "without CUDA kernels that fit" in gc.stage_build(args, 100)["reason"]

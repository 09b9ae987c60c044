"""One-command GPU check (issue 18): build, CUDA tests, CUDA-vs-CPU checks, benchmarks, one JSON.

    make gpu-check                        # or: python bench/gpu_check.py
    python bench/gpu_check.py --dry-run   # the whole script on the CPU, tiny models, no build (CI)

Stages, each in a subprocess with a time limit out of one budget (default 470 s: the check
must finish within 8 minutes on one H200, build included), progress printed as it goes:

  build   ``setup.py build_ext --inplace`` with FASTACD_FORCE_CUDA=1 for this GPU's architecture,
          unless the importable extension is newer than its sources and has a kernel image for
          this GPU (``--rebuild`` builds anyway, ``--arch-list`` sets the architectures)
  tests   every ``needs_cuda`` test (``pytest -m needs_cuda tests/``)
  checks  CUDA against the CPU: CD of VGG16 / ResNet18 / AlexNet (64x64, 16 tiles) in float64
          and exact float32, and with torch's default TF32 flags; ACD hierarchies (64x64);
          reduced precisions that the library accepts (``precision=`` probed at run time)
  bench   CD per mask over the best plain forward (224x224, 64 masks); ACD end to end at the
          notebook settings (VGG16, ResNet50, a ViT if the library can trace it, else the
          reason); ``fastacd run`` images per second

Results: bench/results/gpu_check.json (``--out``), rewritten after every stage, so a run cut
short keeps what it measured. Exit status 0 when every stage passed or was skipped. Docs:
docs/gpu_check.md. The module also holds the dry run's tiny models (``tiny_vgg`` ...), which
``fastacd run --model bench/gpu_check.py:tiny_vgg`` loads: nothing runs at import.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.json"
DRY_RUN_OUT = ROOT / "build" / "gpu_check_dry_run.json"
STAGES = ("build", "tests", "checks", "bench")
# Seconds per stage (a stage's unused time goes to the next ones); sum <= the budget.
STAGE_SECONDS = {"build": 180, "tests": 110, "checks": 75, "bench": 105}
MIN_LATER_STAGE = 25  # seconds kept back for each stage still to run
BUDGET = 470


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


# =========================================================================== orchestrator

def run_logged(cmd: list[str], timeout: float, env: dict | None = None, echo=None,
               cwd: Path = ROOT) -> dict:
    """Run ``cmd`` in its own process group; kill the group at ``timeout``. Lines for which
    ``echo(line)`` returns text are printed as they come. Returns rc, timed_out, seconds and
    the output."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            msg = echo(line) if echo else None
            if msg:
                print(msg, flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=10)
    return {"rc": proc.returncode, "timed_out": timed_out, "seconds": round(time.monotonic() - t0, 2),
            "output": "".join(lines)}


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def probe_extension(timeout: float) -> dict:
    """What the importable fastacd has: build_info() from a fresh interpreter."""
    # error_messages_whole: an error that formats numbers (a private libstdc++ in the library
    # crashed there on the first H200 run, or cut the message short)
    code = ("import json, torch, fastacd.ops as o; i = o.build_info(); i['cuda_available'] = torch.cuda.is_available(); "
            "i['capability'] = list(torch.cuda.get_device_capability(0)) if i['cuda_available'] else None; "
            "m = ''\ntry: torch.ops.fastacd.maxpool_gather(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 1, 1), 7))\n"
            "except Exception as e: m = str(e)\n"
            "i['error_messages_whole'] = 'found values in [7, 7]' in m if i['compiled'] else None; "
            "print('PROBE' + json.dumps(i))")
    r = run_logged([sys.executable, "-c", code], timeout)
    for line in r["output"].splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[5:])
    return {"error": tail(r["output"], 1500)}


def newest_source_mtime() -> float:
    files = [ROOT / "setup.py"] + [p for d in ("csrc", "kernels") for p in (ROOT / d).rglob("*")
                                   if p.suffix in (".cpp", ".h", ".cu", ".cuh")]
    return max(p.stat().st_mtime for p in files if p.exists())


def stage_build(args, timeout: float) -> dict:
    if args.dry_run:
        return {"status": "skipped", "reason": "dry run: no build"}
    t0 = time.monotonic()
    info = probe_extension(min(60.0, timeout))
    result: dict = {"before": info}
    if not info.get("cuda_available", False) and "error" not in info:
        return {"status": "failed", "reason": "torch sees no CUDA device (use --dry-run on a machine without one)",
                **result}
    so = Path(info["library"]) if info.get("library") else None
    current = (info.get("compiled") and info.get("cuda_kernels") and info.get("error_messages_whole")
               and so is not None and so.exists()
               and so.stat().st_mtime >= newest_source_mtime()
               and all(d.get("kernels_fit") for d in info.get("cuda_devices", [])))
    if current and not args.rebuild:
        return {"status": "ok", "reason": "up to date: the extension is newer than its sources and has a "
                "kernel image for this GPU (--rebuild forces a build)", "build_info": info,
                "seconds": round(time.monotonic() - t0, 1)}
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    if shutil.which("nvcc") or Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc").exists():
        env["FASTACD_FORCE_CUDA"] = "1"
    # this GPU's architecture only (a third of the default list's compile time), unless asked
    arch = args.arch_list
    if arch == "auto" and info.get("capability"):
        arch = "{}.{}".format(*info["capability"])
    if arch and arch not in ("auto", "default"):
        env["TORCH_CUDA_ARCH_LIST"] = arch
    log(f"build: {'rebuild asked' if args.rebuild else 'extension missing, stale or without a kernel image'}; "
        f"setup.py build_ext --inplace (MAX_JOBS={env['MAX_JOBS']})")
    def echo(line):
        if line.startswith("  ") and ("CUDA kernels" in line or "TORCH_CUDA_ARCH_LIST" in line):
            return "  | " + line.rstrip()
        m = re.match(r"(\[\d+/\d+\]).*?\s-c\s+(\S+\.(?:cpp|cu))\b", line)
        if m:  # ninja's "[3/9] nvcc ... -c kernels/cd_ops.cu ..."
            return f"  | {m[1]} {os.path.relpath(m[2], ROOT)}"
        return None

    r = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], timeout - (time.monotonic() - t0),
                   env=env, echo=echo)
    result.update(seconds=round(time.monotonic() - t0, 1), command="setup.py build_ext --inplace",
                  env={k: env[k] for k in ("MAX_JOBS", "FASTACD_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST") if k in env},
                  log_tail=tail(r["output"]))
    if r["timed_out"] or r["rc"] != 0:
        return {"status": "timeout" if r["timed_out"] else "failed", **result}
    info = probe_extension(60)
    result["build_info"] = info
    if not (info.get("cuda_kernels") and all(d.get("kernels_fit") for d in info.get("cuda_devices", []))):
        return {"status": "failed", **result, "reason": "built, but without CUDA kernels that fit this GPU"}
    if not info.get("error_messages_whole"):
        return {"status": "failed", **result, "reason": "built, but its error messages crash or are cut short "
                "(a private libstdc++? see docs/gpu_check.md): " + str(info.get("error", ""))[-300:]}
    return {"status": "ok", **result}


def parse_junit(path: Path) -> dict:
    """Totals and the failures' messages from pytest's JUnit XML (written when pytest ends)."""
    out = {"failures": []}
    if not path.exists():
        return out
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["junit_counts"] = {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
                           "failed": total["failures"], "error": total["errors"], "skipped": total["skipped"]}
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                out["failures"].append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                        "message": (el.get("message") or "")[:500]})
    return out


RESULT_LINE = re.compile(r"^(\S+::.+?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
STARTED_LINE = re.compile(r"^(\S+\.py::[^\s\[]+(?:\[.*?\])?) ")
MAX_CRASHES = 5


def crash_report(output: str) -> tuple[str | None, str]:
    """The test that was running when pytest died (the last one ``-v`` started without a
    result) and the interpreter's last words (faulthandler's dump, a device assert)."""
    running = None
    for line in output.splitlines():
        if RESULT_LINE.match(line):
            running = None
        elif m := STARTED_LINE.match(line):
            running = m[1]
    i = max(output.rfind("Fatal Python error"), output.rfind("terminate called"))
    return running, (output[i:i + 3000] if i >= 0 else tail(output, 3000))


def stage_tests(args, timeout: float, log_path: Path | None = None) -> dict:
    """pytest -m needs_cuda. A test that kills the interpreter (a device assert aborts the
    process) is recorded as crashed, with the dump, and pytest runs again without it and
    without the tests already done, so one crash does not hide the rest."""
    # the dry run collects one file (every test there skips without a GPU); a GPU runs them all
    targets = ["tests/test_cuda.py"] if args.dry_run else ["tests"]
    t0 = time.monotonic()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    done: list[str] = []
    crashed: list[dict] = []
    failures: list = []
    outputs: list[str] = []
    base = [sys.executable, "-m", "pytest", "-m", "needs_cuda", "-v", "--tb=short", "-p", "no:cacheprovider"]
    r = {"rc": None, "timed_out": True, "output": ""}  # if no time is left for a run

    def echo(line):
        m = RESULT_LINE.match(line)
        if not m:
            return None
        status = m[2].lower()
        counts[{"xfail": "skipped", "xpass": "passed"}.get(status, status)] += 1
        done.append(m[1])
        if status in ("failed", "error"):
            return f"  | {m[2]} {m[1]}"
        if len(done) % 50 == 0:
            return f"  | {len(done)} tests: {counts['passed']} passed, {counts['failed']} failed, " \
                   f"{counts['skipped']} skipped"
        return None

    while timeout - (time.monotonic() - t0) > 15:
        before = dict(counts)
        junit = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "junit.xml"
        skip = done + [c["test"] for c in crashed]
        log(f"tests: {' '.join(base[1:])} {' '.join(targets)}" + (f" (less {len(skip)} done)" if skip else ""))
        r = run_logged(base + [f"--junitxml={junit}", *targets, *(f"--deselect={t}" for t in skip)],
                       timeout - (time.monotonic() - t0), env=dict(os.environ, PYTHONUNBUFFERED="1"), echo=echo)
        outputs.append(r["output"])
        if log_path is not None:
            log_path.write_text("\n".join(outputs))
        parsed = parse_junit(junit)
        shutil.rmtree(junit.parent, ignore_errors=True)
        failures += parsed["failures"]
        if "junit_counts" in parsed:  # complete: this run's totals from pytest itself
            counts = {k: before[k] + parsed["junit_counts"][k] for k in counts}
            break
        if r["timed_out"] or len(crashed) == MAX_CRASHES:
            break
        test, dump = crash_report(r["output"])
        if test is None:  # died outside a test (collection, start-up): nothing to skip
            break
        log(f"tests: pytest died in {test} (rc {r['rc']}); running the rest without it")
        crashed.append({"test": test, "rc": r["rc"], "output": dump})
        counts["failed"] += 1
    res = {"command": " ".join(["python"] + base[1:] + targets), "seconds": round(time.monotonic() - t0, 2),
           "counts": counts, "rc": r["rc"], "failures": failures, "crashed": crashed,
           "output_tail": tail(r["output"], 4000), **({"log": str(log_path)} if log_path else {})}
    if r["timed_out"]:
        return {"status": "timeout", **res}
    # rc 5: nothing selected (no needs_cuda test collected) is a failure of the check too
    ok = r["rc"] == 0 and counts["failed"] == 0 and counts["error"] == 0 and not crashed
    return {"status": "ok" if ok else "failed", **res}


def stage_worker(args, stages: list[str], timeout: float) -> dict:
    """checks / bench: this script in worker mode; its results file is read even after a kill."""
    result_file = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(stages),
           "--result", str(result_file), "--deadline", str(time.time() + timeout - 5)]
    if args.dry_run:
        cmd.append("--dry-run")
    r = run_logged(cmd, timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                   echo=lambda line: "  | " + line.rstrip() if line.startswith("  ") or "[worker]" in line else None)
    data = json.loads(result_file.read_text()) if result_file.exists() else {}
    shutil.rmtree(result_file.parent, ignore_errors=True)
    out = {}
    for st in stages:
        res = data.get(st, {"items": {}})
        if r["timed_out"]:
            res["status"] = "timeout"
        elif r["rc"] != 0 and res.get("status") is None:
            res["status"] = "failed"
            res["error"] = tail(r["output"], 3000)
        res.setdefault("status", "failed")
        out[st] = res
    if "env" in data:
        out["env"] = data["env"]
    out["_seconds"] = r["seconds"]
    return out


def orchestrate(args) -> int:
    t_start = time.monotonic()
    deadline = t_start + args.budget
    out = Path(args.out) if args.out else (DRY_RUN_OUT if args.dry_run else DEFAULT_OUT)
    stages = [s for s in STAGES if s in args.stages.split(",")]
    report = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), "dry_run": args.dry_run,
                       "host": platform.node(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                       "budget_s": args.budget, "argv": sys.argv[1:]},
              "stages": {}}
    log(f"{'DRY RUN (CPU, tiny models, no build)' if args.dry_run else 'GPU check'}: stages {', '.join(stages)}, "
        f"budget {args.budget:.0f} s, results -> {out}")
    carry = 0.0
    # the dry run runs checks and bench in one worker (one interpreter start less)
    groups = [[s] for s in stages]
    if args.dry_run and "checks" in stages and "bench" in stages:
        groups = [[s] for s in stages if s not in ("checks", "bench")] + [["checks", "bench"]]
    for i, group in enumerate(groups):
        later = sum(1 for g in groups[i + 1:])
        left = deadline - time.monotonic()
        share = sum(STAGE_SECONDS[s] for s in group) + carry
        timeout = min(share, left - MIN_LATER_STAGE * later)
        name = "+".join(group)
        if timeout < 10:
            for s in group:
                report["stages"][s] = {"status": "skipped", "reason": f"budget: {left:.0f} s left"}
            log(f"{name}: skipped (budget)")
            continue
        log(f"{name}: start (limit {timeout:.0f} s, {left:.0f} s of the budget left)")
        t0 = time.monotonic()
        try:
            if group == ["build"]:
                results = {"build": stage_build(args, timeout)}
            elif group == ["tests"]:
                results = {"tests": stage_tests(args, timeout, out.with_suffix(".tests.log"))}
            else:
                results = stage_worker(args, group, timeout)
        except Exception as e:  # noqa: BLE001 - a broken stage is recorded, the others run
            results = {s: {"status": "failed", "error": f"{type(e).__name__}: {e}",
                           "traceback": tail(traceback.format_exc())} for s in group}
        spent = time.monotonic() - t0
        carry = max(0.0, share - spent)
        if "env" in results:
            report["env"] = results.pop("env")
        results.pop("_seconds", None)
        for s in group:
            results[s].setdefault("seconds", round(spent, 1))
            report["stages"][s] = results[s]
            log(f"{s}: {results[s]['status']} ({results[s]['seconds']} s)"
                + (f": {results[s]['reason']}" if results[s].get("reason") else ""))
        if group == ["build"] and results["build"]["status"] in ("failed", "timeout") and not args.dry_run:
            for s in stages[1:]:
                report["stages"][s] = {"status": "skipped", "reason": "the build failed"}
            write_json(out, report)
            break
        report["meta"]["seconds"] = round(time.monotonic() - t_start, 1)
        write_json(out, report)
    report["meta"]["seconds"] = round(time.monotonic() - t_start, 1)
    bad = [s for s, r in report["stages"].items() if r["status"] not in ("ok", "skipped")]
    report["ok"] = not bad
    write_json(out, report)
    print_summary(report)
    log(f"{'all stages passed' if not bad else 'FAILED: ' + ', '.join(bad)} in {report['meta']['seconds']} s; "
        f"results in {out}")
    return 0 if not bad else 1


def print_summary(report: dict) -> None:
    st = report["stages"]
    for name in STAGES:
        if name in st:
            print(f"  {name:7s} {st[name]['status']:8s} {st[name].get('seconds', '')}", flush=True)
    tests = st.get("tests", {}).get("counts")
    if tests:
        print(f"  tests: {tests}")
    for name in ("checks", "bench"):
        for item, res in st.get(name, {}).get("items", {}).items():
            summary = res.get("summary") or res.get("status")
            print(f"  {name}.{item}: {summary}", flush=True)


# =========================================================================== worker

class Ctx:
    """What a worker item needs: device, dry-run sizes, the deadline, the results file."""

    def __init__(self, args):
        import torch
        self.torch = torch
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.deadline = args.deadline
        self.result_file = Path(args.result)
        self.data: dict = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        write_json(self.result_file, self.data)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def item(self, stage: str, name: str, fn, need: float) -> None:
        """Run one item unless less than ``need`` seconds are left; record its result or error."""
        items = self.data.setdefault(stage, {}).setdefault("items", {})
        if self.left() < need:
            items[name] = {"status": "skipped", "reason": f"budget: {self.left():.0f} s left, needs ~{need:.0f}"}
            print(f"  {stage}.{name}: skipped (budget)", flush=True)
            self.save()
            return
        t0 = time.monotonic()
        print(f"  {stage}.{name} ...", flush=True)
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - recorded, the next item runs
            res = {"status": "error", "error": f"{type(e).__name__}: {e}"[:1000], "traceback": tail(
                traceback.format_exc(), 2000)}
        res.setdefault("status", "ok")
        res["seconds"] = round(time.monotonic() - t0, 2)
        items[name] = res
        print(f"  {stage}.{name}: {res['status']} ({res['seconds']} s) {res.get('summary', '')}", flush=True)
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
        self.save()


# ---- models

def _seeded(builder):
    import torch
    torch.manual_seed(0)
    model = builder()
    _randomize_batchnorm(model)
    for m in model.modules():  # torchvision's ViT head is zero at init: every score 0, no levels
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            m.reset_parameters()
    return model.eval()


def _randomize_batchnorm(model) -> None:
    """Non-trivial running statistics (random init has mean 0, var 1: bn_split's easy case)."""
    import torch
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def tiny_vgg():
    """Dry-run stand-in for VGG16 (32x32 inputs): conv-ReLU, 2x2 max-pools, a linear head."""
    import torch.nn as nn
    return _seeded(lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10)))


def tiny_alexnet():
    """Dry-run stand-in for AlexNet: a strided conv, overlapping 3/2 max-pools."""
    import torch.nn as nn
    return _seeded(lambda: nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 10)))


def tiny_resnet():
    """Dry-run stand-in for ResNet18/50: torchvision's ResNet with one block per stage."""
    from torchvision.models.resnet import BasicBlock, ResNet
    return _seeded(lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10))


def tiny_vit():
    """Dry-run stand-in for ViT-B/16: one encoder layer on 8x8 patches of 32x32."""
    from torchvision.models import VisionTransformer
    return _seeded(lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                             hidden_dim=16, mlp_dim=32, num_classes=10))


def model_for(name: str, dry: bool):
    if dry:
        return {"vgg16": tiny_vgg, "resnet18": tiny_resnet, "resnet50": tiny_resnet, "alexnet": tiny_alexnet,
                "vit_b_16": tiny_vit}[name]()
    import torchvision
    return _seeded(getattr(torchvision.models, name))


def tile_masks(n: int, size: int, tile: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    grid = size // tile
    masks = torch.zeros(n, size, size)
    for k, cell in enumerate(torch.randperm(grid * grid, generator=g)[:n].tolist()):
        r, c = divmod(cell, grid)
        masks[k, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = 1
    return masks[:, None]  # (n, 1, H, W): unambiguous for any n


def image(size: int, seed: int = 0):
    import torch
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def accepted_precisions(ctx) -> dict:
    """Which ``precision=`` values Decomposer / hierarchy accept here, or why not: another
    engineer adds the option; the check uses whatever exists when it runs."""
    import inspect

    import fastacd
    out = {}
    has = "precision" in inspect.signature(fastacd.Decomposer).parameters
    for p in ("bf16", "tf32"):
        if not has:
            out[p] = "skipped: fastacd.Decomposer has no precision option"
            continue
        try:
            fastacd.Decomposer(tiny_vgg().to(ctx.device), precision=p)
            out[p] = "ok"
        except Exception as e:  # noqa: BLE001
            out[p] = f"skipped: Decomposer(precision={p!r}) on {ctx.device.type}: {type(e).__name__}: {e}"[:300]
    return out


def rel_err(a, b, scale) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max()) / max(scale, 1e-30)


def levels_of(h) -> list:
    return [sorted(tuple(sorted(n.units)) for n in level) for level in h.levels()]


def identical_levels(a, b) -> float:
    la, lb = levels_of(a), levels_of(b)
    n = max(len(la), len(lb), 1)
    return sum(x == y for x, y in zip(la, lb)) / n


# ---- checks

def stage_checks(ctx) -> None:
    import torch

    import fastacd
    from fastacd import ops
    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": str(ctx.device),
           "build_info": fastacd.build_info(), "tf32_default_flags": ops.tf32_enabled()}
    if ctx.device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
        try:
            env["driver"] = subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version",
                                                     "--format=csv,noheader"], text=True, timeout=20).strip()
        except Exception:  # noqa: BLE001
            pass
    ctx.data["env"] = env
    precisions = accepted_precisions(ctx)
    ctx.data.setdefault("checks", {})["precisions"] = precisions
    size, n_masks = (32, 4) if ctx.dry else (64, 16)
    for name in ("vgg16", "resnet18", "alexnet"):
        ctx.item("checks", f"cd_{name}", lambda name=name: check_cd(ctx, name, size, n_masks, precisions),
                 need=3 if ctx.dry else 12)
    hier = dict(sweep_dim=8, percentile_include=90, num_iters=2 if ctx.dry else 3)
    for name in ("alexnet", "resnet18", "vgg16"):  # VGG16 last: its CPU hierarchies cost the most
        ctx.item("checks", f"acd_{name}", lambda name=name: check_hierarchy(ctx, name, size, hier, precisions),
                 need=3 if ctx.dry else (35 if name == "vgg16" else 20))
    items = ctx.data["checks"]["items"]
    failed = [k for k, v in items.items() if v["status"] == "error" or v.get("pass") is False]
    ctx.data["checks"]["status"] = "failed" if failed else "ok"
    if failed:
        ctx.data["checks"]["reason"] = f"failed: {', '.join(failed)}"
    ctx.save()


def check_cd(ctx, name: str, size: int, n_masks: int, precisions: dict) -> dict:
    """CD on the device in float64, exact float32 and torch's default flags, against the CPU in
    float64; errors as fractions of the output's scale."""
    import copy

    import torch

    import fastacd
    from fastacd import ops
    model = model_for(name, ctx.dry)
    x, masks = image(size), tile_masks(n_masks, size, size // 8)
    with torch.no_grad():
        ref = fastacd.Decomposer(copy.deepcopy(model).double()).cd(x.double(), masks.double())
        scale = float(ref.output.abs().max())
        dev = ctx.device
        res = {"input": [1, 3, size, size], "masks": n_masks, "output_scale": scale}
        got = fastacd.Decomposer(copy.deepcopy(model).double().to(dev)).cd(x.double().to(dev), masks.to(dev))
        res["float64_err"] = rel_err(got.relevant, ref.relevant, scale)
        m32 = copy.deepcopy(model).to(dev)
        with ops.float32_precision():
            got = fastacd.Decomposer(m32).cd(x.to(dev), masks.to(dev))
            cpu32 = fastacd.Decomposer(copy.deepcopy(model)).cd(x, masks)
        res["float32_exact_err"] = rel_err(got.relevant, ref.relevant, scale)
        res["cpu_float32_err"] = rel_err(cpu32.relevant, ref.relevant, scale)
        res["float32_default_flags_err"] = rel_err(fastacd.Decomposer(m32).cd(x.to(dev), masks.to(dev)).relevant,
                                                   ref.relevant, scale)
        for p, state in precisions.items():
            if state != "ok":
                res[f"{p}_err"] = state
                continue
            low = fastacd.Decomposer(m32, precision=p).cd(x.to(dev), masks.to(dev))
            res[f"{p}_err"] = rel_err(low.relevant, ref.relevant, scale)
    # float64 across devices: rounding only. Exact float32: the tests' float32 tolerance, or as
    # accurate as the CPU's float32 (a random AlexNet at 64x64 cancels to 1e-3 of its output there)
    res["pass"] = res["float64_err"] <= 1e-8 and res["float32_exact_err"] <= max(1e-4, 4 * res["cpu_float32_err"])
    res["summary"] = (f"float64 {res['float64_err']:.1e}, float32 exact {res['float32_exact_err']:.1e} "
                      f"(CPU float32 {res['cpu_float32_err']:.1e}), "
                      f"default flags {res['float32_default_flags_err']:.1e} of the output scale")
    if not res["pass"]:
        res["status"] = "failed"
    return res


def check_hierarchy(ctx, name: str, size: int, hier: dict, precisions: dict) -> dict:
    """ACD hierarchies on the device against the CPU: float64 must agree at every level;
    exact float32 is compared with the CPU's float32 (near-ties may differ: reported)."""
    import copy
    import inspect

    import torch

    import fastacd
    from fastacd import ops
    model = model_for(name, ctx.dry)
    x = image(size, seed=1)
    dev = ctx.device
    res = {"input": [1, 3, size, size], **hier}
    cpu64 = fastacd.hierarchy(copy.deepcopy(model).double(), x.double(), **hier)
    dev64 = fastacd.hierarchy(copy.deepcopy(model).double().to(dev), x.double().to(dev), **hier)
    res["levels"] = cpu64.num_levels
    res["float64_identical_levels"] = identical_levels(dev64, cpu64)
    with ops.float32_precision():
        cpu32 = fastacd.hierarchy(copy.deepcopy(model), x, **hier)
        dev32 = fastacd.hierarchy(copy.deepcopy(model).to(dev), x.to(dev), **hier)
    res["float32_exact_identical_levels"] = identical_levels(dev32, cpu32)
    res["float32_vs_float64_identical_levels"] = identical_levels(dev32, cpu64)
    has_option = "precision" in inspect.signature(fastacd.hierarchy).parameters
    for p, state in precisions.items():
        if state != "ok" or not has_option:
            res[f"{p}_identical_levels"] = state if state != "ok" else "skipped: hierarchy has no precision option"
            continue
        low = fastacd.hierarchy(copy.deepcopy(model).to(dev), x.to(dev), precision=p, **hier)
        res[f"{p}_identical_levels"] = identical_levels(low, dev32)
    res["pass"] = res["float64_identical_levels"] == 1.0
    res["summary"] = (f"{res['levels']} levels; float64 identical {res['float64_identical_levels']:.2f}, "
                      f"float32 exact vs CPU float32 {res['float32_exact_identical_levels']:.2f}")
    if not res["pass"]:
        res["status"] = "failed"
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return res


# ---- bench

def best_of(ctx, fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        ctx.sync()
        t = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t)
    return min(times)


def stage_bench(ctx) -> None:
    precisions = ctx.data.get("checks", {}).get("precisions") or accepted_precisions(ctx)
    size, n_masks = (32, 4) if ctx.dry else (224, 64)
    for name in ("vgg16", "resnet18", "alexnet"):
        ctx.item("bench", f"cd_per_mask_{name}", lambda name=name: bench_cd(ctx, name, size, n_masks, precisions),
                 need=2 if ctx.dry else 10)
    acd = dict(sweep_dim=8 if ctx.dry else 14, percentile_include=95, num_iters=2 if ctx.dry else 5)
    for name in ("vgg16", "resnet50", "vit_b_16"):
        ctx.item("bench", f"acd_{name}", lambda name=name: bench_acd(ctx, name, size, acd, precisions),
                 need=2 if ctx.dry else 15)
    ctx.item("bench", "fastacd_run", lambda: bench_run(ctx), need=5 if ctx.dry else 30)
    items = ctx.data["bench"]["items"]
    errors = [k for k, v in items.items() if v["status"] == "error"]
    ctx.data["bench"]["status"] = "failed" if errors else "ok"
    if errors:
        ctx.data["bench"]["reason"] = f"errors: {', '.join(errors)}"
    ctx.save()


def bench_cd(ctx, name: str, size: int, n_masks: int, precisions: dict) -> dict:
    """CD time per mask over the best plain forward time per image (batch 1, 8, 64)."""
    import torch

    import fastacd
    from fastacd import ops
    dev = ctx.device
    model = model_for(name, ctx.dry).to(dev)
    x, masks = image(size).to(dev), tile_masks(n_masks, size, size // 16 if not ctx.dry else 8).to(dev)
    repeats = 1 if ctx.dry else 3
    res = {"input": [1, 3, size, size], "masks": n_masks}
    modes = {"float32": (lambda: ops.float32_precision("ieee"), {})}
    if precisions.get("tf32") == "ok":
        modes["tf32"] = (lambda: ops.float32_precision("tf32"), {"precision": "tf32"})
    if precisions.get("bf16") == "ok":
        modes["bf16"] = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16), {"precision": "bf16"})
    with torch.no_grad():
        for mode, (scope, kw) in modes.items():
            with scope() if mode != "bf16" else ops.float32_precision("ieee"):
                dec = fastacd.Decomposer(model, **kw)
                dec.cd(x, masks)  # warm-up (trace, cuDNN's choices)
                cd = best_of(ctx, lambda: dec.cd(x, masks), repeats)
            forward = {}
            with scope():
                for b in (1, 8) if ctx.dry else (1, 8, 64):
                    batch = x.expand(b, -1, -1, -1).contiguous()
                    model(batch)
                    forward[b] = best_of(ctx, lambda: model(batch), repeats + 2) / b
            best = min(forward.values())
            res[mode] = {"cd_seconds": cd, "cd_per_mask_over_best_forward": cd / n_masks / best,
                         **{f"forward_per_image_b{b}": t for b, t in forward.items()}}
    res["summary"] = ", ".join(f"{m} {r['cd_per_mask_over_best_forward']:.2f}" for m, r in res.items()
                               if isinstance(r, dict)) + " (CD per mask / best forward)"
    return res


def bench_acd(ctx, name: str, size: int, acd: dict, precisions: dict | None = None) -> dict:
    """ACD of one image end to end (fastacd.hierarchy) at the notebook settings."""
    import torch

    import fastacd
    from fastacd import ops
    dev = ctx.device
    model = model_for(name, ctx.dry).to(dev)
    x = image(size, seed=2).to(dev)
    try:  # can the library trace and decompose it? (a ViT needs attention rules)
        with torch.no_grad():
            fastacd.Decomposer(model).cd(x, tile_masks(1, size, size // 4).to(dev))
    except Exception as e:  # noqa: BLE001 - recorded as the reason
        return {"status": "skipped", "reason": f"not supported by the library: {type(e).__name__}: {e}"[:600],
                "summary": "skipped (unsupported)"}
    with ops.float32_precision():
        ctx.sync()
        t = time.perf_counter()
        h = fastacd.hierarchy(model, x, **acd)
        ctx.sync()
        seconds = time.perf_counter() - t
    res = {"input": [1, 3, size, size], **acd, "seconds": seconds, "levels": h.num_levels,
           "masks_scored": h.stats.get("scored"), "engine_calls": h.stats.get("calls")}
    res["acd_seconds"] = seconds
    res["summary"] = f"{seconds:.2f} s, {h.num_levels} levels, {h.stats.get('scored')} masks scored"
    if ctx.left() > seconds + 10:  # again, warm (what each image of a dataset run costs)
        with ops.float32_precision():
            ctx.sync()
            t = time.perf_counter()
            fastacd.hierarchy(model, x, **acd)
            ctx.sync()
            res["warm_seconds"] = time.perf_counter() - t
        res["summary"] += f"; warm {res['warm_seconds']:.2f} s"
    import inspect
    if name == "vgg16" and "precision" in inspect.signature(fastacd.hierarchy).parameters:
        for p, state in (precisions or {}).items():  # reduced precision: time and levels kept
            if state != "ok" or ctx.left() < 2 * seconds + 10:
                res[p] = state if state != "ok" else "skipped: budget"
                continue
            with ops.float32_precision():
                ctx.sync()
                t = time.perf_counter()
                low = fastacd.hierarchy(model, x, precision=p, **acd)
                ctx.sync()
                dt = time.perf_counter() - t
            res[p] = {"seconds": dt, "float32_seconds_over_this": seconds / dt,
                      "identical_levels_vs_float32": identical_levels(low, h)}
            res["summary"] += f"; {p} {res[p]['seconds']:.2f} s"
    return res


def bench_run(ctx) -> dict:
    """``fastacd run`` over a folder of generated images: images per second."""
    import numpy as np
    from PIL import Image
    dry = ctx.dry
    n = 2 if dry else 3
    acd_time = ctx.data.get("bench", {}).get("items", {}).get("acd_vgg16", {}).get("acd_seconds")
    if not dry and acd_time:  # as many images as the time left allows (startup ~20 s)
        n = int(max(2, min(8, (ctx.left() - 25) // max(acd_time * 1.2, 0.1))))
    size = 32 if dry else 224
    work = Path(tempfile.mkdtemp(prefix="gpu_check_run_"))
    try:
        src = work / "images"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size + 16, size + 16, 3), dtype=np.uint8)).save(src / f"{i}.png")
        cmd = [sys.executable, "-m", "fastacd", "run", str(src), "--out", str(work / "out"), "--no-progress"]
        if dry:
            cmd += ["--model", f"{Path(__file__).resolve()}:tiny_vgg", "--image-size", "32", "--sweep-dim", "8",
                    "--num-iters", "2", "--device", "cpu", "--threads", "1"]
        else:
            cmd += ["--arch", "vgg16", "--device", "cuda"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, ctx.left() - 3))
        wall = time.perf_counter() - t0
        res = {"command": " ".join(["fastacd"] + cmd[3:]), "images": n, "wall_seconds": wall, "rc": r.returncode}
        if r.returncode != 0:
            return {**res, "status": "error", "error": tail(r.stdout + r.stderr, 2000)}
        manifest = work / "out" / "manifest.jsonl"
        recs = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()] \
            if manifest.exists() else []
        times = [rec.get("time_s") for rec in recs if rec.get("status") == "ok" and rec.get("time_s")]
        res["images_ok"] = len(times)
        if times:
            res["images_per_second"] = len(times) / sum(times)
            if len(times) > 1:  # without the first image (cuDNN's first calls)
                res["images_per_second_after_first"] = (len(times) - 1) / sum(times[1:])
        res["images_per_second_wall"] = n / wall
        m = re.search(r"([\d.]+) images/s", r.stdout + r.stderr)
        if m:
            res["reported_images_per_second"] = float(m[1])
        res["summary"] = f"{res.get('images_per_second', 0):.3g} images/s ({n} images; {n / wall:.3g} with startup)"
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def worker(args) -> int:
    sys.path.insert(0, str(ROOT))  # this checkout's fastacd, whatever is installed
    ctx = Ctx(args)
    import torch
    if ctx.device.type == "cpu":
        torch.set_num_threads(1 if args.dry_run else torch.get_num_threads())
    elif not torch.cuda.is_available():
        print("[worker] no CUDA device", flush=True)
        return 2
    for stage in args.worker.split(","):
        print(f"[worker] {stage} on {ctx.device}", flush=True)
        ctx.data.setdefault(stage, {"items": {}})
        (stage_checks if stage == "checks" else stage_bench)(ctx)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes, no build (CI)")
    p.add_argument("--out", help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; dry run: "
                                 f"{DRY_RUN_OUT.relative_to(ROOT)})")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds for everything (default %(default)s)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of %(default)s")
    p.add_argument("--rebuild", action="store_true", help="build even if the extension is up to date")
    p.add_argument("--arch-list", default="auto", help="TORCH_CUDA_ARCH_LIST when the check builds: 'auto' (this "
                   "GPU's architecture: the fastest build), 'default' (setup.py's list) or a list")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        p.error(f"unknown stages: {', '.join(sorted(unknown))}")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

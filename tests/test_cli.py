"""The ``fastacd`` command: ``run`` end to end (outputs, manifest, resume after a kill, torchrun,
settings refusal, weights loading), ``demo`` and ``--help``.

Data: 12 generated 32x32 PNGs in 3 class folders (one of them 48x36, resized and cropped),
plus one corrupt file; the model is the tiny seeded CNN of ``tests/cli_models.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastacd.cli import main
from fastacd.image.hierarchy import Hierarchy
from fastacd.cli.run import collect_images, load_image, load_masks, read_class_index

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ACD = ["--image-size", "32", "--sweep-dim", "4", "--percentile-include", "80", "--num-iters", "3"]
COMMON = ["--model", "cli_models:factory", *ACD, "--threads", "1", "--no-progress"]
CLASSES = ("ant", "bee", "cow")
N_GOOD = 12


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def run_cli(*argv) -> int:
    """The command in this process (threads restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir()
        for i in range(N_GOOD // len(CLASSES)):
            shape = (36, 48, 3) if (c, i) == (1, 2) else (32, 32, 3)
            a = rng.random(shape) * 0.5
            a[8 * i:8 * i + 12, 4 + 6 * c:16 + 6 * c] += 0.5  # a bright patch, different per image
            Image.fromarray((a.clip(0, 1) * 255).astype(np.uint8)).save(root / cls / f"img{i}.png")
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted one-process run (labels from the folders)."""
    out = tmp_path_factory.mktemp("ref")
    assert run_cli("run", data, "--out", out, "--label", "folder", *COMMON) == 0
    return out


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def outputs(out: Path) -> dict[str, object]:
    """Every per-image output, comparable across runs: JSON text, npz arrays (record minus its
    timing / rank / rounding-check fields)."""
    res = {}
    for p in sorted((out / "hierarchies").rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.suffix == ".json":
            res[rel] = p.read_text()
        elif p.suffix == ".npz":
            d = load_masks(p)
            for k in ("time_s", "finished", "rank", "path"):
                d["record"].pop(k)
            d["record"].pop("rounding_gap", None)  # --rounding-check first: the first image this run computed
            d["record"]["outputs"].pop("figure", None)  # present with --figures only
            d["record"]["bytes"].pop("figure", None)
            res[rel] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
    return res


def stable(recs):
    keys = ("image", "status", "label", "prediction", "folder", "num_levels", "num_nodes", "settings_hash")
    return [{k: r.get(k) for k in keys} | {"error": bool(r.get("error"))} for r in recs]


# ------------------------------------------------------------------------------------------
def test_run_outputs_and_manifest(reference, data):
    settings = json.loads((reference / "run_settings.json").read_text())
    digest = settings["settings_hash"]
    recs = manifest(reference)
    assert [r["image"] for r in recs] == sorted(r["image"] for r in recs)
    assert len(recs) == N_GOOD + 1
    bad = [r for r in recs if r["status"] != "ok"]
    assert [r["image"] for r in bad] == ["bee/broken.png"]
    assert bad[0]["status"] == "error" and "cannot identify image" in bad[0]["error"]
    assert not list(reference.rglob("*.tmp")) and not list(reference.rglob("*.png.png"))
    for r in recs:
        if r["status"] != "ok":
            continue
        assert r["label"] == CLASSES.index(r["image"].split("/")[0]) and r["settings_hash"] == digest
        h = Hierarchy.from_json((reference / r["outputs"]["json"]).read_text())
        assert h.label == r["label"] and h.image_hw == (32, 32) and h.sweep_dim == 4
        assert h.num_levels == r["num_levels"] >= 1 and len(h.nodes) == r["num_nodes"]
        z = load_masks(reference / r["outputs"]["npz"])
        assert z["settings_hash"] == digest and z["label"] == r["label"]
        assert z["masks"].shape == (len(h.nodes), 32, 32) and z["masks"].dtype == bool
        for node, m, lev, sc in zip(h.nodes, z["masks"], z["level"], z["score"]):
            np.testing.assert_array_equal(m, h.mask(node))
            assert lev == node.level and sc == node.score
        assert z["record"]["image"] == r["image"]
    # the 48x36 image went through resize (shorter side 37) + centre crop to 32x32
    assert load_image(str(data / "bee" / "img2.png"),
                      dict(image_size=32, resize=37, mean=[0.5], std=[0.5], grayscale=False)).shape == (1, 3, 32, 32)


def test_resume_after_kill_equals_uninterrupted(reference, data, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastacd", "run", str(data), "--out", str(out), "--label", "folder",
           "--figures", *COMMON]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not list((out / "hierarchies").rglob("*.npz")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no image finished within 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    done = len(list((out / "hierarchies").rglob("*.npz")))
    assert 1 <= done < N_GOOD, "killed too late to test a resume"
    assert not (out / "manifest.jsonl").exists()
    # more damage, as a kill at other moments leaves it: a torn manifest line, a temp file, and an
    # image whose JSON was written but not its .npz (the commit marker)
    with open(out / "manifest.rank0.jsonl", "a") as f:
        f.write('{"image": "ant/img0.png", "sta')
    pending = [it for it in collect_images(str(data))[0]
               if it.id != "bee/broken.png" and not (out / "hierarchies" / f"{it.id}.npz").exists()]
    half = out / "hierarchies" / f"{pending[-1].id}.json"
    half.parent.mkdir(parents=True, exist_ok=True)
    half.with_name(f".{half.name}.tmp").write_text("{partial")
    half.write_text("{partial")
    first = sorted((out / "hierarchies").rglob("*.npz"))[0]
    mtime = first.stat().st_mtime_ns
    assert run_cli("run", data, "--out", out, "--label", "folder", "--figures", *COMMON) == 0
    assert first.stat().st_mtime_ns == mtime  # finished before the kill: skipped, not recomputed
    assert outputs(out) == outputs(reference)
    assert stable(manifest(out)) == stable(manifest(reference))
    assert len(list((out / "hierarchies").rglob("*.png.png"))) == N_GOOD


def test_torchrun_two_processes_equal_one(reference, data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastacd", "run", str(data), "--out", str(out), "--label", "folder", *COMMON]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "manifest.rank0.jsonl").exists() and (out / "manifest.rank1.jsonl").exists()
    ranks = {json.loads(line)["image"]: json.loads(line)["rank"]
             for r in (0, 1) for line in (out / f"manifest.rank{r}.jsonl").read_text().splitlines()}
    images = sorted(ranks)
    assert all(ranks[im] == i % 2 for i, im in enumerate(images))  # i % world == rank
    assert outputs(out) == outputs(reference)
    assert stable(manifest(out)) == stable(manifest(reference))
    # resuming with another world size: finished images are found per image, not per rank
    before = {p: p.stat().st_mtime_ns for p in (out / "hierarchies").rglob("*")}
    assert run_cli("run", data, "--out", out, "--label", "folder", *COMMON) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "hierarchies").rglob("*")} == before
    assert stable(manifest(out)) == stable(manifest(reference))


def test_settings_change_refused_then_overwrite(data, tmp_path, capsys):
    out = tmp_path / "o"
    src = data / "ant"
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    npz = out / "hierarchies" / "img0.png.npz"
    before = {p: p.stat().st_mtime_ns for p in (out / "hierarchies").rglob("*")}
    old_hash = json.loads((out / "run_settings.json").read_text())["settings_hash"]
    # same settings: everything skipped
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "hierarchies").rglob("*")} == before
    # --figures added later: figures drawn from the JSON, nothing recomputed
    assert run_cli("run", src, "--out", out, "--figures", *COMMON) == 0
    assert len(list((out / "hierarchies").glob("*.png.png"))) == len(before) // 2
    assert {p: p.stat().st_mtime_ns for p in before} == before
    capsys.readouterr()
    changed = [a if a != "4" else "8" for a in COMMON]  # --sweep-dim 8
    assert run_cli("run", src, "--out", out, *changed) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "acd.sweep_dim: 4 -> 8" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert run_cli("run", src, "--out", out, *changed, "--overwrite") == 0
    new_hash = json.loads((out / "run_settings.json").read_text())["settings_hash"]
    assert new_hash != old_hash and load_masks(npz)["settings_hash"] == new_hash
    assert Hierarchy.from_json((out / "hierarchies" / "img0.png.json").read_text()).sweep_dim == 8
    assert all(r["status"] == "ok" and r["settings_hash"] == new_hash for r in manifest(out))
    # the old settings are now the changed ones
    assert run_cli("run", src, "--out", out, *COMMON) == 2


def test_weights_only_loading(data, tmp_path, capsys):
    import cli_models
    src = data / "cow" / "img1.png"  # one image as the source
    torch.manual_seed(7)
    model = cli_models.TinyCNN().eval()
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    out = tmp_path / "w"
    assert run_cli("run", src, "--out", out, "--weights", sd, *COMMON) == 0
    x = load_image(str(src), dict(image_size=32, resize=37, mean=[0.485, 0.456, 0.406],
                                  std=[0.229, 0.224, 0.225], grayscale=False))
    with torch.no_grad():
        logits = model(x)[0]
    h = Hierarchy.from_json((out / "hierarchies" / "img1.png.json").read_text())
    assert h.label == int(logits.argmax())
    np.testing.assert_allclose(h.full_scores, logits.numpy(), rtol=1e-4, atol=1e-4)
    assert "RANDOM-INIT" not in capsys.readouterr().err
    # a checkpoint dict around the state_dict also loads with weights_only
    ck = tmp_path / "ck.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ck)
    assert run_cli("run", src, "--out", tmp_path / "ck", "--weights", ck, *COMMON) == 0
    assert (tmp_path / "ck" / "hierarchies" / "img1.png.json").read_text() == \
        (out / "hierarchies" / "img1.png.json").read_text()
    # a pickled object (a whole module) is refused without --unsafe-load, loads with it
    whole = tmp_path / "whole.pt"
    torch.save(model, whole)
    capsys.readouterr()
    assert run_cli("run", src, "--out", tmp_path / "u", "--weights", whole, *COMMON) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "weights_only=True" in err and "--unsafe-load" in err
    assert not (tmp_path / "u").exists()  # refused before anything was written
    assert run_cli("run", src, "--out", tmp_path / "u", "--weights", whole, "--unsafe-load", *COMMON) == 0
    assert (tmp_path / "u" / "hierarchies" / "img1.png.json").read_text() == \
        (out / "hierarchies" / "img1.png.json").read_text()


def test_arch_without_weights_warns_random_init(data, tmp_path, capsys):
    src = data / "ant" / "img0.png"
    assert run_cli("run", src, "--out", tmp_path / "a", "--arch", "alexnet", "--image-size", "64",
                   "--sweep-dim", "32", "--num-iters", "1", "--label", "3", "--threads", "1",
                   "--no-progress") == 0
    assert "RANDOM-INIT" in capsys.readouterr().err
    (rec,) = manifest(tmp_path / "a")
    assert rec["status"] == "ok" and rec["label"] == 3
    assert run_cli("run", src, "--out", tmp_path / "b", "--arch", "no_such_net", "--no-progress") == 2
    assert "not a torchvision classification model" in capsys.readouterr().err


def test_timm_arch(data, tmp_path, capsys):
    """``--arch timm:NAME`` builds the timm model (random-init, a warning); its hierarchy equals
    the one of the same model given as --model, and a misspelt name is refused with near names."""
    pytest.importorskip("timm")
    src = data / "ant" / "img0.png"
    common = ("--image-size", "32", "--sweep-dim", "16", "--num-iters", "1", "--label", "1", "--threads", "1",
              "--num-classes", "3", "--no-progress")
    assert run_cli("run", src, "--out", tmp_path / "a", "--arch", "timm:resnet18", *common) == 0
    assert "RANDOM-INIT" in capsys.readouterr().err
    (rec,) = manifest(tmp_path / "a")
    assert rec["status"] == "ok"
    assert run_cli("run", src, "--out", tmp_path / "b", "--model", "cli_models:timm_resnet18_3", *common) == 0
    assert (tmp_path / "a" / "hierarchies" / "img0.png.json").read_text() == \
        (tmp_path / "b" / "hierarchies" / "img0.png.json").read_text()
    assert run_cli("run", src, "--out", tmp_path / "c", "--arch", "timm:resnet_18", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "not a timm model" in err and "resnet18" in err


def test_sources_and_class_index(data, tmp_path):
    items, kind = collect_images(str(data))
    assert kind == "folder" and len(items) == N_GOOD + 1
    assert [it.id for it in items] == sorted(it.id for it in items) and items[0].id == "ant/img0.png"
    lst = data / "list.txt"  # ids relative to the list's own folder
    lst.write_text("# images\n" + "\n".join(str(Path(it.path)) for it in reversed(items)) + "\n\n")
    try:
        from_list, kind = collect_images(str(lst))
    finally:
        lst.unlink()
    assert kind == "list" and [it.id for it in from_list] == [it.id for it in items]
    from_glob, kind = collect_images(str(data / "*" / "img*.png"))
    assert kind == "glob" and [it.id for it in from_glob] == [it.id for it in items if "broken" not in it.id]
    assert {it.folder for it in items} == set(CLASSES)
    (tmp_path / "a.json").write_text(json.dumps({"0": ["cow", "x"], "1": ["ant", "y"]}))
    (tmp_path / "b.txt").write_text("cow a cow\nant an ant\n")
    (tmp_path / "c.json").write_text(json.dumps({"cow": 0, "ant": 1}))
    for f in ("a.json", "b.txt", "c.json"):
        assert read_class_index(str(tmp_path / f)) == {"cow": 0, "ant": 1}
    with pytest.raises(SystemExit):
        main(["run", str(data), "--out", str(tmp_path), "--label", "dog"])
    assert run_cli("run", data / "ant", "--out", tmp_path / "flat", "--label", "folder", *COMMON) == 2


def test_folder_labels_with_class_index_and_missing_class(data, tmp_path):
    idx = tmp_path / "classes.txt"
    idx.write_text("cow\nant\n")  # no 'bee'
    out = tmp_path / "o"
    assert run_cli("run", data, "--out", out, "--label", "folder", "--class-index", idx, *COMMON) == 0
    recs = {r["image"]: r for r in manifest(out)}
    assert recs["cow/img0.png"]["label"] == 0 and recs["ant/img1.png"]["label"] == 1
    assert recs["bee/img0.png"]["status"] == "error" and "not in the class mapping" in recs["bee/img0.png"]["error"]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for word in ("--arch", "--weights", "--unsafe-load", "--model", "--label", "--sweep-dim",
                 "--memory-budget", "--overwrite", "torchrun", "docs/run.md"):
        assert word in text
    p = subprocess.run([sys.executable, "-m", "fastacd", "--help"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "run" in p.stdout


def test_demo(tmp_path, capsys):
    assert run_cli("demo", "--n", "1", "--out", tmp_path) == 0
    text = capsys.readouterr().out
    assert "faster" in text and "hierarchy of" in text
    (js,) = tmp_path.glob("digit_0_class_*.json")
    h = Hierarchy.from_json(js.read_text())
    assert h.num_levels >= 1 and js.with_suffix(".png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["speed"]["max_abs_diff"] < 1e-4 and summary["hierarchies"][0]["prediction"] == h.label


def test_no_class_scores(data, tmp_path):
    src = data / "ant" / "img0.png"
    assert run_cli("run", src, "--out", tmp_path, "--no-class-scores", *COMMON) == 0
    h = Hierarchy.from_json((tmp_path / "hierarchies" / "img0.png.json").read_text())
    assert h.nodes and all(n.class_scores == [] for n in h.nodes)
    assert run_cli("run", src, "--out", tmp_path, *COMMON) == 2  # a different output: refused


def test_dist_env_and_device(monkeypatch):
    from fastacd.cli.run import Dist, RunError, cpu_threads, pick_device
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    d = Dist.from_env()
    assert (d.rank, d.world, d.local_rank, d.local_world) == (3, 4, 1, 2)
    assert cpu_threads(d) == max(1, len(os.sched_getaffinity(0)) // 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", d) == torch.device("cpu")
    with pytest.raises(RunError):
        pick_device("cuda", d)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto", d) == torch.device("cuda:0")  # 2 processes share the one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", d) == torch.device("cuda:1") == pick_device("cuda", d)
    assert pick_device("cpu", d) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(RunError):
        Dist.from_env()


def test_no_exact_decisions_flag(data, tmp_path, capsys):
    """--precision bf16 checks near-tied decisions in float32 unless --no-exact-decisions; the
    choice reaches the hierarchy and the settings (a folder of checked decisions does not resume
    unchecked)."""
    src = data / "ant"
    for flags, decisions in ((["--precision", "bf16"], "float32"),
                             (["--precision", "bf16", "--no-exact-decisions"], "bf16")):
        out = tmp_path / decisions
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no fast bf16 path on some CPUs
            assert run_cli("run", src, "--out", out, *flags, *COMMON) == 0
        h = Hierarchy.from_json((out / "hierarchies" / "img0.png.json").read_text())
        assert h.params["precision"] == "bf16" and h.params["decisions"] == decisions
        assert (h.stats["scored_exact"] > 0) == (decisions == "float32")
    capsys.readouterr()
    assert run_cli("run", src, "--out", tmp_path / "float32", "--precision", "bf16", "--no-exact-decisions",
                   *COMMON) == 2
    assert "exact_decisions" in capsys.readouterr().err


def test_zero_tol_flag(data, tmp_path, capsys):
    """--zero-tol reaches the engine and the settings (recorded only when not the default, so
    folders written before the flag resume); a bad value is a clean error."""
    out = tmp_path / "o"
    src = data / "ant"
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    assert "zero_tol" not in json.loads((out / "run_settings.json").read_text())["settings"]
    assert run_cli("run", src, "--out", out, "--zero-tol", "1e-4", *COMMON) == 0  # the default: resumes
    capsys.readouterr()
    assert run_cli("run", src, "--out", out, "--zero-tol", "0", *COMMON) == 2
    assert "zero_tol" in capsys.readouterr().err
    assert run_cli("run", src, "--out", out, "--zero-tol", "0", "--overwrite", *COMMON) == 0
    assert json.loads((out / "run_settings.json").read_text())["settings"]["zero_tol"] == 0
    h = Hierarchy.from_json((out / "hierarchies" / "img0.png.json").read_text())
    assert h.params["zero_tol"] == 0
    for bad in ("-1", "1", "nan"):
        assert run_cli("run", src, "--out", tmp_path / "p", "--zero-tol", bad, *COMMON) == 2
        assert "--zero-tol" in capsys.readouterr().err


def test_rounding_check(data, tmp_path, capsys):
    """--rounding-check: the float64 comparison (Decomposer.rounding_gap) on the first image by
    default, on every image, or none; a warning where rounding moves the scores."""
    src = data / "ant"
    n = len(list(src.iterdir()))
    for mode, checked in (("first", 1), ("every", n), ("off", 0)):
        out = tmp_path / mode
        assert run_cli("run", src, "--out", out, *COMMON, *(["--rounding-check", mode] if mode != "first" else [])) == 0
        gaps = [r["rounding_gap"] for r in manifest(out) if "rounding_gap" in r]
        assert len(gaps) == checked
        assert all(0 < g < 1e-5 for g in gaps)  # a small CNN: float32 at its best
        assert "rounding moves" not in capsys.readouterr().err
    out = tmp_path / "sensitive"
    assert run_cli("run", src, "--out", out, "--model", "cli_models:rounding_sensitive", *ACD,
                   "--threads", "1", "--no-progress", "--rounding-check", "every") == 0
    err = capsys.readouterr().err
    gaps = [r["rounding_gap"] for r in manifest(out) if "rounding_gap" in r]
    assert len(gaps) == n and max(gaps) > 1e-3
    assert err.count("rounding moves the CD scores") == 1 and "--dtype float64" in err

"""``fastacd run`` on hostile inputs (issue 17, item 5): symlink loops, long names, an output
folder inside the source, damaged outputs, changed pixels, high-bit-depth images, growing file
lists, concurrent writers, kill -9 and resume, write errors, and the command's clean errors.

Images are tiny generated 32x32 PNGs; the model is the seeded CNN of ``tests/cli_models.py``.
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fastacd.cli import RunError, main
from fastacd.cli import outdir
from fastacd.cli.inputs import collect_images, load_image, read_class_index
from fastacd.cli.outdir import RunLock, finished_record, output_paths, run_key
from fastacd.cli.run import load_masks

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ACD = ["--image-size", "32", "--sweep-dim", "8", "--percentile-include", "80", "--num-iters", "2"]
COMMON = ["--model", "cli_models:factory", *ACD, "--threads", "1", "--no-progress"]
RAW = dict(image_size=32, resize=37, mean=[0.0], std=[1.0], grayscale=False)  # pixels in [0, 1]


def run_cli(*argv) -> int:
    threads = torch.get_num_threads()
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def make_images(folder: Path, names, seed: int = 0) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(p)


def manifest(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def npz_mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / "hierarchies").rglob("*.npz")}


def one_error_line(capsys) -> str:
    """The error: one line, the last of stderr (notes may come before it), no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err.splitlines()[-1]


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------
def _collect_with_timeout(source, timeout=30, **kw):
    result = {}
    t = threading.Thread(target=lambda: result.update(v=collect_images(source, **kw)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"collect_images({source}) still running after {timeout} s: a symlink loop?"
    return result["v"]


def test_symlink_loops_one_id_per_real_file(tmp_path, capsys):
    src, other = tmp_path / "src", tmp_path / "other"
    make_images(src, ["a/x.png", "b/y.png"])
    make_images(other, ["z.png"])
    os.symlink("..", src / "a" / "up")            # a loop back to the root
    os.symlink(".", src / "self")                 # a loop on itself
    os.symlink("../a/x.png", src / "b" / "alias.png")  # a second name for a/x.png
    os.symlink(other, src / "ext")                # a folder reached only through a link
    os.symlink(src / "a", src / "b" / "again")    # a/ again, one level down
    items, kind = _collect_with_timeout(str(src))
    assert kind == "folder" and [it.id for it in items] == ["a/x.png", "b/y.png", "ext/z.png"]
    items, kind = _collect_with_timeout(str(src / "**" / "*.png"))
    assert kind == "glob" and [it.id for it in items] == ["a/x.png", "b/y.png", "ext/z.png"]
    out = tmp_path / "out"
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    recs = manifest(out)
    assert sorted(recs) == ["a/x.png", "b/y.png", "ext/z.png"]
    assert all(r["status"] == "ok" for r in recs.values())


def test_out_inside_source_with_figures(tmp_path, capsys):
    src = tmp_path / "src"
    make_images(src, ["p.png", "q.png"])
    out = src / "acd"
    for _ in range(2):
        assert run_cli("run", src, "--out", out, "--figures", *COMMON) == 0
    err = capsys.readouterr().err
    assert "2 images" in err and "2 already done, 0 to do" in err  # the figures were not ingested
    assert sorted(manifest(out)) == ["p.png", "q.png"]
    assert len(list((out / "hierarchies").glob("*.png.png"))) == 2
    assert run_cli("run", src, "--out", src, *COMMON) == 2
    assert "is the source folder" in one_error_line(capsys)


def test_long_names_hashed_full_id_recorded(tmp_path, capsys):
    src = tmp_path / "src"
    long1, long2 = "L" * 240 + "one.png", "L" * 240 + "two.png"  # 247 characters each
    make_images(src, [long1, long2, "short.png"])
    out = tmp_path / "out"
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    recs = manifest(out)
    assert sorted(recs) == sorted([long1, long2, "short.png"])
    assert all(r["status"] == "ok" for r in recs.values())
    names = {recs[k]["outputs"]["npz"] for k in (long1, long2)}
    assert len(names) == 2 and all(len(Path(n).name) < 255 and "~" in n for n in names)
    assert load_masks(out / recs[long1]["outputs"]["npz"])["record"]["image"] == long1
    assert recs["short.png"]["outputs"]["json"] == "hierarchies/short.png.json"
    before = npz_mtimes(out)
    assert run_cli("run", src, "--out", out, *COMMON) == 0  # the re-run's scan: nothing recomputed
    assert npz_mtimes(out) == before and "3 already done, 0 to do" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# What counts as finished
# ------------------------------------------------------------------------------------------
def test_damaged_outputs_and_changed_pixels_recomputed(tmp_path):
    src = tmp_path / "src"
    names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    make_images(src, names)
    out = tmp_path / "out"
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    h = out / "hierarchies"
    good_json = {n: (h / f"{n}.json").read_bytes() for n in names}
    before = npz_mtimes(out)
    (h / "a.png.json").write_bytes(b"")                                  # zero-byte JSON, valid .npz
    (h / "b.png.json").write_bytes(good_json["b.png"][:50])              # truncated JSON
    npz = (h / "c.png.npz").read_bytes()
    (h / "c.png.npz").write_bytes(npz[:len(npz) // 2])                   # truncated .npz
    make_images(src, ["d.png"], seed=7)                                  # other pixels, same name
    for n in ("a.png", "b.png", "c.png", "d.png"):
        assert finished_record(output_paths(out, n), json.loads(
            (out / "run_settings.json").read_text())["settings_hash"], str(src / n)) is None
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    after = npz_mtimes(out)
    changed = sorted(k for k in before if after[k] != before[k])
    assert changed == ["hierarchies/a.png.npz", "hierarchies/b.png.npz", "hierarchies/c.png.npz",
                       "hierarchies/d.png.npz"]
    for n in ("a.png", "b.png", "c.png"):  # recomputed to the same result
        assert (h / f"{n}.json").read_bytes() == good_json[n]
    recs = manifest(out)
    assert all(r["status"] == "ok" for r in recs.values())
    assert recs["d.png"]["input_sha256"] == hashlib.sha256((src / "d.png").read_bytes()).hexdigest()


def _png16_rgb(path: Path, a: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_high_bit_depth_images(tmp_path):
    from PIL import Image
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    g16 = (rng.random((32, 32)) * 65535).astype(np.uint16)
    rgb16 = (rng.random((32, 32, 3)) * 65535).astype(np.uint16)
    Image.fromarray(g16).save(src / "grey16.png")
    Image.fromarray(np.round(g16 / 257).astype(np.uint8)).save(src / "grey8.png")
    _png16_rgb(src / "rgb16.png", rgb16)
    Image.fromarray(np.round(rgb16 / 257).astype(np.uint8)).save(src / "rgb8.png")
    Image.fromarray((g16 / 65535).astype(np.float32)).save(src / "float01.tif")
    Image.fromarray((g16 / 257).astype(np.float32)).save(src / "float255.tif")
    Image.fromarray(g16.astype(np.int32)).save(src / "int32.tif")
    assert Image.open(src / "grey16.png").mode == "I;16" and Image.open(src / "float01.tif").mode == "F"

    x8 = load_image(str(src / "grey8.png"), RAW)
    for name in ("grey16.png", "float01.tif"):
        x = load_image(str(src / name), RAW)
        assert x.shape == (1, 3, 32, 32) and torch.equal(x[0, 0], x[0, 2])
        assert float((x - x8).abs().max()) < 2 / 255 and float(x.std()) > 0.1  # not saturated, not black
    x = load_image(str(src / "rgb16.png"), RAW)
    assert float((x - load_image(str(src / "rgb8.png"), RAW)).abs().max()) < 2 / 255
    assert load_image(str(src / "grey16.png"), dict(RAW, grayscale=True, mean=[0.0])).shape == (1, 1, 32, 32)

    out = tmp_path / "out"
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    recs = manifest(out)
    assert {k for k, r in recs.items() if r["status"] == "ok"} == {
        "grey16.png", "grey8.png", "rgb16.png", "rgb8.png", "float01.tif"}
    assert "float pixels in [" in recs["float255.tif"]["error"]
    assert "expected [0, 1]" in recs["float255.tif"]["error"]
    assert "32-bit integer pixels" in recs["int32.tif"]["error"]


def test_file_list_ids_stable_when_the_list_grows(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    make_images(data, ["ant/a.png", "bee/b.png"])
    make_images(elsewhere, ["c.png"], seed=1)
    lst = data / "list.txt"
    lst.write_text("ant/a.png\nbee/b.png\n" + str(data / "ant" / "a.png") + "\n")  # a.png twice
    items, kind = collect_images(str(lst))
    assert kind == "list" and [it.id for it in items] == ["ant/a.png", "bee/b.png"]
    out = tmp_path / "out"
    assert run_cli("run", lst, "--out", out, *COMMON) == 0
    before = npz_mtimes(out)
    lst.write_text(lst.read_text() + "../elsewhere/c.png\n")
    assert run_cli("run", lst, "--out", out, *COMMON) == 0
    ids = sorted(manifest(out))
    far = Path(os.path.realpath(elsewhere / "c.png")).as_posix().lstrip("/")
    assert ids == sorted(["ant/a.png", "bee/b.png", far])
    assert {k: v for k, v in npz_mtimes(out).items() if k in before} == before  # nothing recomputed


# ------------------------------------------------------------------------------------------
# One run per folder; kill -9 and resume; write errors
# ------------------------------------------------------------------------------------------
def test_lock_shared_by_one_run_refuses_another(tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    with RunLock(out, "run-a"), RunLock(out, "run-a"):  # two ranks of one run
        with pytest.raises(RunError, match="in use by another fastacd run"):
            with RunLock(out, "run-b"):
                pass
    with RunLock(out, "run-b"):  # released: the next run takes it
        pass
    for k, v in dict(TORCHELASTIC_RUN_ID="x", MASTER_ADDR="h", MASTER_PORT="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    assert run_key(2) == run_key(2)  # every rank of one torchrun job: the same key
    monkeypatch.setenv("MASTER_PORT", "2")
    key2 = run_key(2)
    monkeypatch.setenv("MASTER_PORT", "1")
    assert key2 != run_key(2) and run_key(1) != run_key(1)


def test_second_writer_refused_then_dead_holder_recovered(tmp_path, capsys):
    src = tmp_path / "src"
    make_images(src, ["a.png"])
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(  # another live run, as far as the folder can tell
        [sys.executable, "-c", "import sys, time; from fastacd.cli.outdir import RunLock\n"
         f"l = RunLock({str(out)!r}, 'other').__enter__(); print('locked', flush=True); time.sleep(120)"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_cli("run", src, "--out", out, *COMMON) == 2
        assert "in use by another fastacd run" in one_error_line(capsys)
        other = [a if a != "8" else "4" for a in COMMON]  # --sweep-dim 4, with --overwrite
        assert run_cli("run", src, "--out", out, *other, "--overwrite") == 2
        assert f"pid {holder.pid}" in one_error_line(capsys)
        assert not (out / "hierarchies").exists() and not (out / "run_settings.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert run_cli("run", src, "--out", out, *COMMON) == 0  # the dead run's lock: taken over
    assert manifest(out)["a.png"]["status"] == "ok"


def test_kill9_then_resume(tmp_path):
    src = tmp_path / "src"
    names = [f"{c}/img{i}.png" for c in ("ant", "bee") for i in range(4)]
    make_images(src, names)
    ref = tmp_path / "ref"
    assert run_cli("run", src, "--out", ref, *COMMON) == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fastacd", "run", str(src), "--out", str(out),
                             "--figures", *COMMON], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not list((out / "hierarchies").rglob("*.npz")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no image finished within 120 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert 1 <= len(npz_mtimes(out)) < len(names)
    assert json.loads((out / ".fastacd.lock").read_text())["pid"] == proc.pid
    # temp files as kills leave them: of another run's tag, of the old naming, at the top
    stale = [out / "hierarchies" / "bee" / ".img3.png.json.deadbeef-4242.tmp",
             out / "hierarchies" / "ant" / ".img0.png.npz.1234.tmp", out / ".manifest.jsonl.0badf00d-7.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    assert run_cli("run", src, "--out", out, "--figures", *COMMON) == 0
    assert not list(out.rglob("*.tmp"))
    for n in names:
        o, r = out / "hierarchies", ref / "hierarchies"
        assert (o / f"{n}.json").read_bytes() == (r / f"{n}.json").read_bytes()
        a, b = load_masks(o / f"{n}.npz"), load_masks(r / f"{n}.npz")
        np.testing.assert_array_equal(a["masks"], b["masks"])
        assert a["settings_hash"] == b["settings_hash"] and (o / f"{n}.png").stat().st_size > 0
    assert all(r["status"] == "ok" for r in manifest(out).values()) and len(manifest(out)) == len(names)


def test_disk_full_stops_with_no_false_records(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    names = [f"img{i}.png" for i in range(4)]
    make_images(src, names)
    out = tmp_path / "out"
    fsync = os.fsync

    def full_from_img1(fd):  # the disk fills up while image 1's JSON is written
        if ".img1.png.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", full_from_img1)
    assert run_cli("run", src, "--out", out, *COMMON) == 2
    err = one_error_line(capsys)
    assert "No space left on device" in err and "re-run the same command" in err
    monkeypatch.setattr(os, "fsync", fsync)
    assert not list(out.rglob("*.tmp"))
    digest = json.loads((out / "run_settings.json").read_text())["settings_hash"]
    logged = [json.loads(line) for line in (out / "manifest.rank0.jsonl").read_text().splitlines()]
    assert [r["image"] for r in logged] == ["img0.png"]  # only what was written
    assert finished_record(output_paths(out, "img0.png"), digest, str(src / "img0.png")) is not None
    assert not (out / "hierarchies" / "img1.png.npz").exists()
    assert run_cli("run", src, "--out", out, *COMMON) == 0
    assert "1 already done, 3 to do" in capsys.readouterr().err
    assert all(r["status"] == "ok" for r in manifest(out).values()) and len(manifest(out)) == 4


def test_read_only_out(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    make_images(src, ["a.png"])
    out = tmp_path / "ro"
    out.mkdir()
    ro = str(out)
    real_open, real_os_open = builtins.open, os.open

    def refuse(path):
        if str(path).startswith(ro):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def fake_open(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **kw)

    def fake_os_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **kw)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    assert run_cli("run", src, "--out", out, *COMMON) == 2
    assert "Read-only file system" in one_error_line(capsys)
    monkeypatch.undo()
    assert not list(out.iterdir())
    if os.geteuid() != 0:  # a real read-only folder (root ignores permissions)
        out.chmod(0o555)
        try:
            assert run_cli("run", src, "--out", out, *COMMON) == 2
            assert "cannot create files there" in one_error_line(capsys)
        finally:
            out.chmod(0o755)


# ------------------------------------------------------------------------------------------
# Clean errors (exit 2, one line, no traceback) and settings
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    src = tmp_path_factory.mktemp("classes")
    make_images(src, ["ant/a.png", "bee/b.png"])
    return src


def _weights(tmp: Path) -> dict[str, Path]:
    import cli_models
    good = tmp / "good.pt"
    torch.save(cli_models.TinyCNN().state_dict(), good)
    data = good.read_bytes()
    files = dict(zero=b"", garbage=b"this is not a checkpoint\n" * 20, truncated=data[:len(data) // 2])
    paths = {}
    for k, v in files.items():
        paths[k] = tmp / f"{k}.pt"
        paths[k].write_bytes(v)
    sd = cli_models.TinyCNN().state_dict()
    sd["features.0.weight"][0, 0, 0, 0] = float("nan")
    paths["nan"] = tmp / "nan.pt"
    torch.save(sd, paths["nan"])
    return paths


CLI_ERRORS = [  # extra arguments, words the one-line message must hold
    (["--weights", "{zero}"], "empty (0 bytes)"),
    (["--weights", "{garbage}"], "not a readable PyTorch weights file"),
    (["--weights", "{truncated}"], "not a readable PyTorch weights file"),
    (["--weights", "{nan}"], "NaN or infinite values in features.0.weight"),
    (["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--threads", "-3"], "--threads -3: must be >= 1"),
    (["--label", "folder", "--class-index", "{tmp}/missing.json"], "no such file"),
    (["--label", "folder", "--class-index", "{broken}"], "broken JSON"),
    (["--label", "folder", "--class-index", "{fractional}"], "class index 1.7 is not a non-negative integer"),
    (["--class-index", "{tmp}/missing.json"], "needs --label folder"),
    (["--memory-budget", "-5"], "expected a positive size"),
    (["--num-iters", "0"], "--num-iters must be >= 1"),
    (["--model", "cli_models:unsupported"], "cannot be decomposed: fastacd has no CD rule for method .sort"),
]


@pytest.mark.parametrize("extra, words", CLI_ERRORS, ids=[f"{i}-{w.split()[0]}" for i, (_, w) in enumerate(CLI_ERRORS)])
def test_clean_errors(extra, words, classes, tmp_path, capsys):
    fmt = {k: str(v) for k, v in _weights(tmp_path).items()} | dict(tmp=str(tmp_path))
    (tmp_path / "broken.txt").write_text('{"ant": 0, "bee": ')  # JSON-looking: never read as text
    (tmp_path / "fractional.json").write_text('{"ant": 0, "bee": 1.7}')
    fmt.update(broken=str(tmp_path / "broken.txt"), fractional=str(tmp_path / "fractional.json"))
    argv = [*COMMON, *[a.format(**fmt) for a in extra]]
    if "--model" in extra:
        argv = argv[2:]  # the test's own model instead
    out = tmp_path / "out"
    assert run_cli("run", classes, "--out", out, *argv) == 2
    err = one_error_line(capsys)
    assert err.startswith("fastacd run: error: ") and words in err, err
    assert not out.exists()  # refused before the output folder was touched


def test_class_index_formats():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "list.json").write_text('["cow", "ant"]')
        (p / "dup.txt").write_text("cow\nant\ncow\n")
        (p / "neg.json").write_text('{"cow": -1}')
        (p / "bool.json").write_text('{"cow": true}')
        assert read_class_index(str(p / "list.json")) == {"cow": 0, "ant": 1}
        for name, words in (("dup.txt", "appears twice"), ("neg.json", "-1 is not"),
                            ("bool.json", "true is not")):
            with pytest.raises(RunError, match=words):
                read_class_index(str(p / name))


def test_demo_nonsense_values(capsys):
    for argv, words in ((["--tile", "0"], "--tile 0: must be >= 1"), (["--n", "0"], "--n 0"),
                        (["--percentile-include", "150"], "within 0..100"), (["--threads", "-1"], "--threads")):
        assert run_cli("demo", *argv) == 2
        err = one_error_line(capsys)
        assert err.startswith("fastacd demo: error: ") and words in err


def test_settings_recorded_once_started_and_paths_normalised(classes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # every image fails (class 7 of a 3-class model): nothing finished, no settings recorded
    assert run_cli("run", classes, "--out", out, *COMMON, "--label", "7") == 0
    assert all(r["status"] == "error" for r in manifest(out).values())
    assert not (out / "run_settings.json").exists()
    # so another run with other settings may use the folder; a relative --model file ...
    monkeypatch.chdir(TESTS)
    argv = [a for a in COMMON if a != "cli_models:factory" and a != "--model"]
    assert run_cli("run", classes, "--out", out, "--model", "cli_models.py:factory", *argv) == 0
    before = npz_mtimes(out)
    assert len(before) == 2
    # ... and the same file given by its absolute path is the same setting: nothing recomputed
    assert run_cli("run", classes, "--out", out, "--model", f"{TESTS / 'cli_models.py'}:factory", *argv) == 0
    assert npz_mtimes(out) == before
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["settings"]["model"]["module"] == f"{os.path.realpath(TESTS / 'cli_models.py')}:factory"
    capsys.readouterr()


# ------------------------------------------------------------------------------------------
# Throughput: reading overlaps compute; no oversubscription by default
# ------------------------------------------------------------------------------------------
def test_prefetch_order_errors_and_overlap():
    from fastacd.cli.inputs import prefetch
    started = []

    def load(i):
        started.append(i)
        if i == 2:
            raise ValueError("bad 2")
        return i * 10
    got = []
    for i, fut in prefetch(range(5), load, ahead=2):
        if i == 0:
            time.sleep(0.2)
            assert {1, 2} <= set(started)  # the next images were read while image 0 was worked on
        try:
            got.append(fut.result())
        except ValueError as e:
            got.append(str(e))
    assert got == [0, 10, "bad 2", 30, 40]


def test_oversubscription_warned(classes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    threads = [a if a != "1" else "2" for a in COMMON]  # --threads 2 on one core
    assert run_cli("run", classes, "--out", tmp_path / "o", *threads) == 0
    assert "1 process(es) x 2 threads on 1 cores: oversubscribed" in capsys.readouterr().err

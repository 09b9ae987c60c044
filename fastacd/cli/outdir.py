"""The output folder of ``fastacd run``: atomic files, the lock, the settings file, what counts as
a finished image, the manifest. docs/run.md, "Never lose work".

No torch here: the lock, the files and the manifest are plain Python and NumPy.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .._version import __version__
from .errors import RunError

SETTINGS_FILE = "run_settings.json"
MANIFEST = "manifest.jsonl"
ITEMS_DIR = "hierarchies"
LOCK_FILE = ".fastacd.lock"
# an output name's component longer than this (bytes) is shortened and hashed: with the
# suffixes (.json, .npz, .png) and a temp file's decoration it stays under the usual 255
NAME_BYTES = 200


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------
# Temp names carry the run's tag (shared by the ranks of one run) and the pid (ranks may write
# the same file at once): a later run knows every temp file of another tag for a dead run's.
_tag = uuid.uuid4().hex[:8]
_TEMP = re.compile(r"^\..+\.tmp$")


def set_temp_tag(tag: str) -> None:
    global _tag
    _tag = tag


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_tag}-{os.getpid()}.tmp")


def atomic_write(path: Path, write) -> None:
    """``write(f)`` into a hidden temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def clean_stale_temps(out: Path) -> int:
    """Remove temp files left by killed runs (any tag but this run's) from ``out``'s own files
    and its hierarchies tree; returns how many. Only safe while holding the lock."""
    mine = f".{_tag}-"
    n = 0
    tops = [(str(out), [], [e.name for e in os.scandir(out) if e.is_file(follow_symlinks=False)])]
    items = out / ITEMS_DIR
    for folder, _, names in tops + (list(os.walk(items)) if items.is_dir() else []):
        for name in names:
            if _TEMP.match(name) and mine not in name:
                try:
                    os.unlink(os.path.join(folder, name))
                    n += 1
                except FileNotFoundError:  # another rank of this run removed it first
                    pass
    return n


# ------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------
class RunLock:
    """One run at a time in an output folder; the ranks of one run share it.

    Every process of the run holds a shared ``flock`` on ``OUT/.fastacd.lock`` for its whole
    life; the file names the run holding it (``key``: a fresh id for one process, the same id
    for the ranks of one torchrun job). The kernel drops the flock when a process dies, even
    by SIGKILL, so a dead run's lock is never stale: the next run takes it over.
    """

    def __init__(self, out: Path, key: str, wait_s: float = 30.0):
        self.out, self.key, self.wait_s, self.fd = Path(out), key, wait_s, None
        self.path = self.out / LOCK_FILE

    def __enter__(self):
        import fcntl
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"--out {self.out}: cannot create files there ({e.strerror})") from e
        try:
            try:  # nobody holds it (no run, or a dead one): ours; write who we are
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, json.dumps(dict(key=self.key, pid=os.getpid(), host=socket.gethostname(),
                                                   started=_now(), command=sys.argv)).encode(), 0)
                os.fsync(self.fd)
                fcntl.flock(self.fd, fcntl.LOCK_SH)  # let the other ranks of this run in
            except BlockingIOError:  # held: an exclusive holder is only writing, so wait a little
                deadline = time.monotonic() + self.wait_s
                while True:
                    try:
                        fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise RunError(f"{self.out} is locked by another process ({self.path}); "
                                           "wait for it to finish, or use another --out") from None
                        time.sleep(0.05)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                print(f"WARNING: {self.out}: the file system does not support locks ({e.strerror}); "
                      "a second run into the same --out would not be detected", file=sys.stderr)
                return self
            raise RunError(f"--out {self.out}: cannot lock {self.path} ({e.strerror})") from e
        except BaseException:
            self.__exit__()
            raise
        holder = self.holder()
        if holder.get("key") != self.key:  # a run that took it between our two flock calls, or a live one
            self.__exit__()
            raise RunError(
                f"{self.out} is in use by another fastacd run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')}): wait for it to finish, or "
                "use another --out (two runs in one folder would mix their results)")
        return self

    def holder(self) -> dict:
        try:
            return json.loads(Path(self.path).read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def run_key(world: int) -> str:
    """The id the ranks of one run share: torchrun's rendezvous (run id, master address and
    port, restart count) is the same in each rank and differs between independent runs."""
    if world == 1:
        return uuid.uuid4().hex[:16]
    env = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                                            "TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE", "SLURM_JOB_ID")]
    return hashlib.sha256("|".join(env).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------
def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "classes":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v, n=60):
    s = json.dumps(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def check_settings_file(out: Path, settings: dict, digest: str, overwrite: bool, source: str,
                        write: bool) -> None:
    """Refuse a settings change in ``out`` unless ``overwrite``; record the settings (``write``)."""
    path = out / SETTINGS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            if not overwrite:
                raise RunError(f"{path} is unreadable ({e}); remove it or pass --overwrite") from e
            old = {}
        if old.get("settings_hash") == digest:
            return
        if not overwrite:
            a, b = _flat(old.get("settings", {})), _flat(settings)
            diffs = [f"  {k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]
            raise RunError(
                f"{out} holds results made with other settings:\n" + "\n".join(diffs or ["  (format)"]) +
                f"\nUse another --out folder, or pass --overwrite to recompute every image of {out} "
                "with the new settings (finished images of the old settings are replaced).")
    if write:
        record = dict(settings_hash=digest, settings=settings, source=os.path.abspath(source),
                      fastacd_version=__version__, created=_now(), command=sys.argv)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------
# Per-image outputs
# ------------------------------------------------------------------------------------------
def _safe_name(part: str) -> str:
    b = part.encode("utf-8", "surrogateescape")
    if len(b) <= NAME_BYTES:
        return part
    # the start stays readable; the hash of the whole keeps names apart (the full id is in the record)
    return b[:NAME_BYTES // 2].decode("utf-8", "ignore") + "~" + hashlib.sha256(b).hexdigest()[:16]


def output_paths(out: Path, image_id: str) -> dict[str, Path]:
    base = out / ITEMS_DIR / Path(*[_safe_name(p) for p in image_id.split("/")])
    return dict(json=base.with_name(base.name + ".json"), npz=base.with_name(base.name + ".npz"),
                figure=base.with_name(base.name + ".png"))


def finished_record(paths: dict, digest: str, input_path: str):
    """The stored manifest record when the image is finished, else None.

    Finished: the ``.npz`` (written last, the commit marker) loads and holds these settings'
    hash; the ``.json`` has the size the record says (a zero-byte or truncated copy is not
    finished); the input file's content still has the recorded sha256 (other pixels under the
    same name are recomputed). Anything unreadable counts as not finished, never as an error.
    """
    import numpy as np
    try:
        with np.load(paths["npz"]) as z:
            if str(z["settings_hash"]) != digest:
                return None
            rec = json.loads(str(z["record"]))
        if paths["json"].stat().st_size != rec["bytes"]["json"]:
            return None
        if sha256_file(input_path) != rec["input_sha256"]:
            return None
        return rec
    except Exception:  # noqa: BLE001 - missing, truncated, foreign or older-format files: recompute
        return None


def figure_ok(paths: dict, rec: dict) -> bool:
    """The figure exists with the recorded size (drawn by a later --figures run: not empty)."""
    try:
        size = paths["figure"].stat().st_size
    except OSError:
        return False
    return size > 0 and size == rec.get("bytes", {}).get("figure", size)


# ------------------------------------------------------------------------------------------
# The manifest
# ------------------------------------------------------------------------------------------
def read_manifest_parts(out: Path) -> list[dict]:
    recs = []
    for part in sorted(out.glob("manifest.rank*.jsonl")):
        for line in part.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if isinstance(r, dict) and isinstance(r.get("image"), str):
                recs.append(r)
    return recs


def merge_manifest(out: Path, items, digest: str) -> dict:
    """``manifest.jsonl``: one record per image, sorted by id; returns the status counts."""
    last_error = {}
    for r in read_manifest_parts(out):
        if r.get("settings_hash") == digest and r.get("status") != "ok":
            last_error[r["image"]] = r
    lines, counts = [], {}
    for item in items:
        rec = finished_record(output_paths(out, item.id), digest, item.path)
        if rec is None:
            rec = last_error.get(item.id) or dict(image=item.id, path=item.path, status="missing",
                                                  error="not processed yet (re-run the command to resume)")
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        lines.append(json.dumps(rec, sort_keys=True))
    atomic_write_text(out / MANIFEST, "".join(line + "\n" for line in lines))
    return counts


class ManifestPart:
    """This rank's append-only log: one JSON line per image processed, flushed and fsync'ed."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "ab")
        if self._f.tell() > 0:  # a torn last line from a kill: start on a fresh line
            with open(path, "rb") as g:
                g.seek(-1, os.SEEK_END)
                if g.read(1) != b"\n":
                    self._f.write(b"\n")

    def append(self, rec: dict) -> None:
        self._f.write((json.dumps(rec, sort_keys=True) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        self._f.close()

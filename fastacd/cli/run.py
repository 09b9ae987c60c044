"""Dataset-scale ACD hierarchies: the logic behind ``fastacd run`` and ``fastacd demo``.

``fastacd run SOURCE --out DIR`` explains every image of a folder, a file list or a glob
(docs/run.md). What it guarantees:

* **Outputs per image** under ``DIR/hierarchies/<image id>``: ``.json`` (``Hierarchy.to_json``
  without the image), ``.npz`` (compressed boolean pixel masks of every node, plus the run's
  settings hash and the image's manifest record), ``.png`` with ``--figures``. The image id
  is the image's path relative to the source's root, extension included.
* **Atomic files.** Each file is written to a hidden temp file in the same folder, flushed,
  fsync'ed and renamed over the final name (``os.replace``). The ``.npz`` is written last and
  is the commit marker: an image is finished when its ``.json`` and ``.npz`` exist and the
  ``.npz`` holds the current settings hash. A kill at any point leaves either a finished image
  or one that is recomputed.
* **Resume.** ``DIR/run_settings.json`` holds the settings that determine the results and
  their hash; a re-run with the same settings skips finished images; with other settings it is
  refused unless ``--overwrite`` (then every image is recomputed, as the old outputs carry the
  old hash).
* **Errors** (an unreadable image, a label outside the model's classes, ...) are recorded in the
  manifest with the message; the run goes on. Errored images are retried by a re-run.
* **Manifest.** Each rank appends one JSON line per image it processed to
  ``manifest.rank{r}.jsonl`` (flushed and fsync'ed per line; a torn last line after a kill is
  ignored). At the end rank 0 writes ``manifest.jsonl`` atomically: one record per image of
  the source, sorted by image id, taken from the finished outputs themselves.
* **torchrun.** RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE come from the environment;
  rank r takes images i of the sorted list with ``i % world == r``; device ``cuda:LOCAL_RANK``
  when CUDA is there; ``torch.distributed`` (gloo on CPU, nccl on GPU) only for the final
  barrier before the merge.
"""
from __future__ import annotations

import glob as _glob
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .._version import __version__
from ..api import decomposer_for
from ..engine import Decomposer
from ..image.hierarchy import Hierarchy, display_image, hierarchy
from ..train.models import train_digits_cnn

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SETTINGS_FILE = "run_settings.json"
MANIFEST = "manifest.jsonl"
ITEMS_DIR = "hierarchies"
SETTINGS_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RunError(Exception):
    """A problem with the command's arguments or the output folder (exit code 2)."""


# ------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------
def _tmp_path(path: Path) -> Path:
    # one name per process: torchrun's ranks may write the same file (the settings) at once,
    # and a shared temp name let one rank's rename find the other's file already moved
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


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


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    id: str         # path relative to the source's root (posix), extension included: the output key
    path: str       # where to read it
    folder: str     # name of the folder holding it (the class for --label folder)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


def collect_images(source: str) -> tuple[list[Item], str]:
    """The images of ``source``, sorted by id, and the kind of source.

    source: a folder (searched recursively for image files, hidden entries skipped: the
    ImageFolder layout ``root/class/img.png`` or flat), a glob pattern (``'data/**/*.png'``,
    quoted; every matching file), a text file listing image paths (one per line, relative
    to the list's folder or absolute; blank lines and lines starting with ``#`` skipped), or
    one image file.
    """
    if _glob.has_magic(source):
        kind = "glob"
        paths = [Path(p) for p in _glob.glob(source, recursive=True) if Path(p).is_file()]
        prefix = []
        for part in Path(source).parts:
            if _glob.has_magic(part):
                break
            prefix.append(part)
        root = Path(*prefix) if prefix else Path(".")
    else:
        src = Path(source)
        if src.is_dir():
            kind = "folder"
            root = src
            paths = []
            for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                paths += [Path(dirpath) / f for f in filenames if not f.startswith(".") and _is_image(Path(f))]
        elif src.is_file() and _is_image(src):
            kind = "file"
            root, paths = src.parent, [src]
        elif src.is_file():
            kind = "list"
            paths = []
            for line in src.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = Path(line)
                paths.append(p if p.is_absolute() else src.parent / p)
            if not paths:
                raise RunError(f"the file list {source} names no images")
            parents = [str(p.parent.resolve()) for p in paths]
            root = Path(os.path.commonpath(parents))
            paths = [p.resolve() for p in paths]
        else:
            raise RunError(f"{source}: no such folder, file list or image (for a glob pattern, quote it)")
    root = root.resolve() if kind == "list" else root
    items = {}
    for p in paths:
        rel = os.path.relpath(p, root)
        if rel.startswith(".."):
            rel = str(p.resolve()).lstrip("/")
        rel = Path(rel).as_posix()
        items[rel] = Item(id=rel, path=str(p), folder=p.parent.name)
    if not items:
        raise RunError(f"{source}: no images found (extensions: {', '.join(sorted(IMAGE_EXTS))})")
    return [items[k] for k in sorted(items)], kind


def read_class_index(path: str) -> dict[str, int]:
    """A folder-name -> class-index mapping from a file.

    JSON ``{"n01440764": 0, ...}``, JSON like ``imagenet_class_index.json``
    (``{"0": ["n01440764", "tench"], ...}``), or text: one folder name per line (the first word
    of the line, e.g. ``LOC_synset_mapping.txt``), the line number being the index.
    """
    text = Path(path).read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        names = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
        return {n: i for i, n in enumerate(names)}
    if isinstance(d, list):
        return {str(n): i for i, n in enumerate(d)}
    if all(isinstance(v, list) and v for v in d.values()):
        return {str(v[0]): int(k) for k, v in d.items()}
    return {str(k): int(v) for k, v in d.items()}


def preprocess_settings(args) -> dict:
    grey = bool(getattr(args, "grayscale", False))
    mean = list(args.mean) if args.mean is not None else ([0.5] if grey else list(IMAGENET_MEAN))
    std = list(args.std) if args.std is not None else ([0.5] if grey else list(IMAGENET_STD))
    channels = 1 if grey else 3
    for name, v in (("--mean", mean), ("--std", std)):
        if len(v) not in (1, channels):
            raise RunError(f"{name} takes 1 or {channels} values, got {len(v)}")
    if any(s == 0 for s in std):
        raise RunError("--std values must be non-zero")
    size = args.image_size
    resize = args.resize
    if size is not None and resize is None:
        resize = round(size * 256 / 224)  # torchvision's ImageNet convention: 256 -> crop 224
    if size is not None and (size < 1 or resize < size):
        raise RunError(f"need 1 <= --image-size <= --resize, got {size} and {resize}")
    return dict(image_size=size, resize=resize, mean=mean, std=std, grayscale=grey)


def load_image(path: str, pre: dict):
    """The model input (1, C, H, W) float32: resize the shorter side, centre-crop, normalise
    (the same arithmetic as torchvision's Resize + CenterCrop + ToTensor + Normalize on PIL)."""
    import numpy as np
    import torch
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("L" if pre["grayscale"] else "RGB")
    if pre["image_size"] is not None:
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = pre["resize"], int(pre["resize"] * long / short)
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BILINEAR)
        s = pre["image_size"]
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        im = im.crop((left, top, left + s, top + s))
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(-1, 1, 1)
    return torch.from_numpy(np.ascontiguousarray((a - mean) / std))[None]


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
def sha256_file(path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def load_weights(path: str, unsafe: bool = False):
    """``torch.load`` with ``weights_only=True`` unless ``unsafe``; a clear refusal otherwise."""
    import torch
    if not Path(path).is_file():
        raise RunError(f"--weights {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if unsafe:
            raise RunError(f"--weights {path}: torch.load failed: {e}") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(
            f"--weights {path}: refused. torch.load(..., weights_only=True) accepts only tensors and "
            f"plain containers, and this file holds other Python objects ({first}). Loading it runs "
            f"arbitrary code from the file: pass --unsafe-load only if you trust where it came from.") from e


def _state_dict_of(obj, path):
    import torch
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise RunError(f"--weights {path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _import_factory(spec: str):
    if ":" not in spec:
        raise RunError(f"--model {spec!r}: expected 'package.module:factory' or 'file.py:factory'")
    mod_name, attr = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        file = Path(mod_name)
        if not file.is_file():
            raise RunError(f"--model {spec!r}: no such file {file}")
        s = importlib.util.spec_from_file_location(file.stem, file)
        mod = importlib.util.module_from_spec(s)
        sys.modules[file.stem] = mod
        s.loader.exec_module(mod)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise RunError(f"--model {spec!r}: cannot import {mod_name}: {e}") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RunError(f"--model {spec!r}: {mod_name} has no attribute {attr}")
        obj = getattr(obj, part)
    return obj


def model_settings(args) -> dict:
    """What identifies the model in the settings hash (the weights by their sha256)."""
    if (args.arch is None) == (args.model is None):
        raise RunError("give exactly one of --arch NAME (a torchvision model) or --model module:factory")
    d = dict(arch=args.arch, module=args.model, num_classes=args.num_classes, seed=args.seed,
             weights_sha256=None)
    if args.weights is not None:
        if not Path(args.weights).is_file():
            raise RunError(f"--weights {args.weights}: no such file")
        d["weights_sha256"] = sha256_file(args.weights)
    return d


def build_model(args):
    """The model in eval mode on the CPU, and whether it is random-init."""
    import torch
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(args.seed)  # the same random-init model on every rank and every run
        return _build_model(args)


def _build_model(args):
    import torch
    if args.arch is not None:
        import torchvision
        names = torchvision.models.list_models(module=torchvision.models)
        if args.arch not in names:
            raise RunError(f"--arch {args.arch!r}: not a torchvision classification model; one of: "
                           f"{', '.join(names)}")
        kw = {} if args.num_classes is None else dict(num_classes=args.num_classes)
        model = torchvision.models.get_model(args.arch, weights=None, **kw)
    else:
        obj = _import_factory(args.model)
        model = obj if isinstance(obj, torch.nn.Module) else obj()
        if not isinstance(model, torch.nn.Module):
            raise RunError(f"--model {args.model!r} returned {type(model).__name__}, not a torch.nn.Module")
    random_init = args.weights is None and args.arch is not None
    if args.weights is not None:
        obj = load_weights(args.weights, args.unsafe_load)
        if isinstance(obj, torch.nn.Module):
            model = obj
        else:
            state = _state_dict_of(obj, args.weights)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise RunError(f"--weights {args.weights} does not fit the model: {e}") from e
    return model.eval(), random_init


# ------------------------------------------------------------------------------------------
# Settings and the output folder
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
    """Refuse a settings change in ``out`` unless ``overwrite``; record the settings."""
    path = out / SETTINGS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{path} is unreadable ({e}); remove it or pass --overwrite") from e
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
        record = dict(settings_hash=digest, settings=settings, source=source,
                      fastacd_version=_version(), created=_now(), command=sys.argv)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def _version():
    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def output_paths(out: Path, item: Item) -> dict[str, Path]:
    base = out / ITEMS_DIR / item.id
    return dict(json=base.with_name(base.name + ".json"), npz=base.with_name(base.name + ".npz"),
                figure=base.with_name(base.name + ".png"))


def finished_record(paths: dict, digest: str):
    """The stored manifest record when the image is finished with these settings, else None."""
    import numpy as np
    if not (paths["npz"].exists() and paths["json"].exists()):
        return None
    try:
        with np.load(paths["npz"]) as z:
            if str(z["settings_hash"]) != digest:
                return None
            return json.loads(str(z["record"]))
    except Exception:  # unreadable or foreign file: recompute
        return None


def read_manifest_parts(out: Path) -> list[dict]:
    recs = []
    for part in sorted(out.glob("manifest.rank*.jsonl")):
        for line in part.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if isinstance(r, dict) and "image" in r:
                recs.append(r)
    return recs


def merge_manifest(out: Path, items: list[Item], digest: str) -> dict:
    """``manifest.jsonl``: one record per image, sorted by id; returns the status counts."""
    last_error = {}
    for r in read_manifest_parts(out):
        if r.get("settings_hash") == digest and r.get("status") != "ok":
            last_error[r["image"]] = r
    lines, counts = [], {}
    for item in items:
        rec = finished_record(output_paths(out, item), digest)
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
        path.parent.mkdir(parents=True, exist_ok=True)
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


# ------------------------------------------------------------------------------------------
# Distributed environment
# ------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        rank = int(env.get("RANK", 0))
        local_rank = int(env.get("LOCAL_RANK", rank if world > 1 else 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        if not 0 <= rank < world:
            raise RunError(f"RANK={rank} outside WORLD_SIZE={world}")
        return cls(rank, world, local_rank, max(1, local_world))


def pick_device(requested: str, dist: Dist):
    import torch
    # LOCAL_RANK % GPUs: one process per GPU, or several per GPU with --nproc_per_node > GPUs
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{dist.local_rank % torch.cuda.device_count()}")
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {requested}: CUDA is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{dist.local_rank % torch.cuda.device_count()}")
    return dev


def cpu_threads(dist: Dist) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n // dist.local_world)


def final_barrier(dist: Dist, device, timeout_s: float) -> None:
    """Wait for every rank (torch.distributed, only here); no-op for one process."""
    if dist.world == 1:
        return
    from datetime import timedelta
    import torch.distributed as td
    if "MASTER_ADDR" not in os.environ:
        raise RunError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start the ranks with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = dict(device_id=device) if backend == "nccl" else {}
    td.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    try:
        td.barrier()
    finally:
        td.destroy_process_group()


# ------------------------------------------------------------------------------------------
# One image
# ------------------------------------------------------------------------------------------
def node_masks(h):
    import numpy as np
    if not h.nodes:
        return np.zeros((0,) + tuple(h.image_hw), dtype=bool)
    return np.stack([h.mask(n) for n in h.nodes]).astype(bool)


def write_outputs(paths: dict, h, record: dict, digest: str, figures: bool) -> None:
    """Figure, JSON, then the .npz last (the commit marker)."""
    import numpy as np
    if figures:
        save_figure(h.plot(), paths["figure"])
    atomic_write_text(paths["json"], h.to_json(include_image=False))
    arrays = dict(masks=node_masks(h),
                  level=np.array([n.level for n in h.nodes], dtype=np.int32),
                  component=np.array([n.component for n in h.nodes], dtype=np.int32),
                  score=np.array([n.score for n in h.nodes], dtype=np.float64),
                  label=np.int64(h.label), settings_hash=np.str_(digest),
                  record=np.str_(json.dumps(record, sort_keys=True)))
    atomic_write(paths["npz"], lambda f: np.savez_compressed(f, **arrays))


def load_masks(npz_path) -> dict:
    """An output ``.npz`` as a dict: ``masks`` (nodes, H, W) bool in the JSON's node order,
    ``level``, ``component``, ``score`` per node, ``label``, ``settings_hash``, ``record``."""
    import numpy as np
    with np.load(npz_path) as z:
        d = {k: z[k] for k in z.files}
    d["record"] = json.loads(str(d["record"]))
    d["settings_hash"] = str(d["settings_hash"])
    d["label"] = int(d["label"])
    return d


# ------------------------------------------------------------------------------------------
# fastacd run
# ------------------------------------------------------------------------------------------
def parse_memory(s):
    if s is None:
        return None
    t = str(s).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise RunError(f"--memory-budget {s!r}: expected bytes, e.g. 2G, 512M or 1073741824") from None


def label_settings(args, items: list[Item]) -> dict:
    mode = str(args.label)
    if mode == "pred":
        return dict(mode="pred", index=None, classes=None)
    if mode == "folder":
        if all("/" not in it.id for it in items) and len({it.folder for it in items}) == 1:
            raise RunError(f"--label folder: every image is directly in {items[0].folder!r}; it needs "
                           "one folder per class (root/class/img.png), or use --label pred or an index")
        if args.class_index is not None:
            classes = read_class_index(args.class_index)
        else:
            classes = {n: i for i, n in enumerate(sorted({it.folder for it in items}))}
        return dict(mode="folder", index=None, classes=classes)
    try:
        return dict(mode="fixed", index=int(mode), classes=None)
    except ValueError:
        raise RunError(f"--label {mode!r}: expected 'pred', 'folder' or a class index") from None


def run_settings(args, items) -> dict:
    dtype = args.dtype
    if dtype not in ("float32", "float64"):
        raise RunError(f"--dtype {dtype!r}: float32 or float64")
    return dict(format=SETTINGS_FORMAT, model=model_settings(args), label=label_settings(args, items),
                acd=dict(sweep_dim=args.sweep_dim, percentile_include=args.percentile_include,
                         num_iters=args.num_iters, method=args.method, base=args.base,
                         corrected=args.corrected),
                preprocess=preprocess_settings(args), dtype=dtype, tf32=bool(args.tf32),
                outputs=dict(class_scores=not args.no_class_scores))


def _check_acd_args(args):
    if args.sweep_dim is not None and args.sweep_dim < 1:
        raise RunError("--sweep-dim must be >= 1")
    if not 0 <= args.percentile_include <= 100:
        raise RunError("--percentile-include must be within 0..100")
    if args.num_iters < 0:
        raise RunError("--num-iters must be >= 0")


def run(args) -> int:
    """``fastacd run``: see the module docstring and docs/run.md. Returns the exit code."""
    _check_acd_args(args)
    dist = Dist.from_env()
    out = Path(args.out)
    items, kind = collect_images(args.source)
    settings = run_settings(args, items)
    digest = settings_hash(settings)
    # every rank checks (all refuse together) before anything is loaded or written
    check_settings_file(out, settings, digest, args.overwrite, args.source, write=False)

    import torch
    device = pick_device(args.device, dist)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_threads(dist))
    else:
        torch.cuda.set_device(device)
        # PyTorch runs float32 convolutions in TF32 on Ampere+ GPUs by default (10-bit mantissa):
        # off unless asked for, so that the scores stay float32-faithful
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    model, random_init = build_model(args)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if dist.rank == 0 else (lambda *a: None)
    if random_init:
        say(f"WARNING: no --weights given: {args.arch} is RANDOM-INIT (seed {args.seed}). The "
            "hierarchies explain an untrained network; pass --weights PATH to explain a trained one.")
    elif args.weights is None:
        say(f"note: no --weights given: {args.model} is used as its factory returns it "
            "(random-init unless the factory loads weights)")
    dtype = getattr(torch, args.dtype)
    model = model.to(device=device, dtype=dtype)
    # the model loaded: record the settings. Rank 0 writes; other ranks write only a missing
    # file (identical settings, so the race between them is harmless)
    out.mkdir(parents=True, exist_ok=True)
    if dist.rank == 0 or not (out / SETTINGS_FILE).exists():
        check_settings_file(out, settings, digest, args.overwrite, args.source, write=True)

    dec = decomposer_for(model, args.backend)
    if args.memory_budget is not None:
        dec.memory_budget = parse_memory(args.memory_budget)
    lab = settings["label"]
    pre = settings["preprocess"]
    acd = settings["acd"]

    shard = [it for i, it in enumerate(items) if i % dist.world == dist.rank]
    todo, n_done, figure_only = [], 0, []
    for it in shard:
        paths = output_paths(out, it)
        if finished_record(paths, digest) is None:
            todo.append(it)
        else:
            n_done += 1
            if args.figures and not paths["figure"].exists():
                figure_only.append(it)
    say(f"fastacd run: {len(items)} images ({kind} {args.source}) -> {out}; rank {dist.rank} of "
        f"{dist.world} on {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
        + f": {len(shard)} in this shard, {n_done} already done, {len(todo)} to do")

    for it in figure_only:  # finished earlier without --figures: draw from the JSON
        paths = output_paths(out, it)
        try:
            h = Hierarchy.from_json(paths["json"].read_text())
            h.image = display_image(load_image(it.path, pre))
            save_figure(h.plot(), paths["figure"])
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            say(f"figure for {it.id} failed: {e}")

    from tqdm.auto import tqdm
    part = ManifestPart(out / f"manifest.rank{dist.rank}.jsonl")
    n_err = n_ok = 0
    t_start = time.perf_counter()
    bar = tqdm(total=len(shard), initial=n_done, unit="img", dynamic_ncols=True, smoothing=0.1,
               desc=f"ACD rank {dist.rank}/{dist.world}" if dist.world > 1 else "ACD",
               disable=args.no_progress or dist.rank != 0)
    try:
        for it in todo:
            paths = output_paths(out, it)
            rec = dict(image=it.id, path=it.path, folder=it.folder, rank=dist.rank,
                       settings_hash=digest, label=None, prediction=None)
            t0 = time.perf_counter()
            try:
                x = load_image(it.path, pre).to(device=device, dtype=dtype)
                with torch.no_grad():
                    logits = dec.forward(x).reshape(-1)
                pred = int(logits.argmax())
                if lab["mode"] == "pred":
                    label = pred
                elif lab["mode"] == "fixed":
                    label = lab["index"]
                else:
                    if it.folder not in lab["classes"]:
                        raise ValueError(f"folder {it.folder!r} is not in the class mapping "
                                         f"({len(lab['classes'])} classes)")
                    label = lab["classes"][it.folder]
                if not 0 <= label < logits.numel():
                    raise ValueError(f"label {label} outside the model's {logits.numel()} classes")
                h = hierarchy(model, x, label, sweep_dim=acd["sweep_dim"],
                              percentile_include=acd["percentile_include"], num_iters=acd["num_iters"],
                              method=acd["method"], backend=args.backend, base=acd["base"],
                              corrected=acd["corrected"])
                if args.no_class_scores:
                    for node in h.nodes:
                        node.class_scores = []
                rec.update(label=label, prediction=pred, status="ok", error=None,
                           num_levels=h.num_levels, num_nodes=len(h.nodes),
                           outputs={k: os.path.relpath(p, out) for k, p in paths.items()
                                    if k != "figure" or args.figures},
                           time_s=round(time.perf_counter() - t0, 4), finished=_now())
                write_outputs(paths, h, rec, digest, args.figures)
                n_ok += 1
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                rec.update(status="error", error=f"{type(e).__name__}: {e}",
                           time_s=round(time.perf_counter() - t0, 4), finished=_now())
                n_err += 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # e.g. after an out-of-memory error on a large image
                if dist.rank != 0 or args.no_progress:
                    print(f"rank {dist.rank}: {it.id}: {rec['error']}", file=sys.stderr, flush=True)
                else:
                    bar.write(f"{it.id}: {rec['error']}")
            part.append(rec)
            bar.update(1)
            bar.set_postfix(errors=n_err, refresh=False)
    finally:
        bar.close()
        part.close()
    dt = time.perf_counter() - t_start
    if dist.rank != 0 and (n_ok or n_err):
        print(f"rank {dist.rank}: {n_ok} done, {n_err} errors in {dt:.1f} s", file=sys.stderr, flush=True)
    final_barrier(dist, device, args.barrier_timeout)
    if dist.rank != 0:
        return 0
    counts = merge_manifest(out, items, digest)
    rate = f", {n_ok / dt:.3g} images/s on rank 0" if n_ok and dt > 0 else ""
    say(f"done: {n_ok} computed, {n_done} skipped (finished before), {n_err} errors on rank 0{rate}; "
        f"all ranks: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}. "
        f"Manifest: {out / MANIFEST}")
    return 0  # finished: per-image errors are in the manifest (a re-run retries them)


# ------------------------------------------------------------------------------------------
# fastacd demo
# ------------------------------------------------------------------------------------------
def demo(out_dir, n: int = 4, sweep_dim: int = 2, percentile_include: float = 90, num_iters: int = 5,
         tile: int = 4, threads: int | None = 1) -> int:
    """Train the small digits CNN (seconds), write ACD hierarchies (PNG + JSON) of ``n`` test
    digits, and compare the batched engine with the reference backend on tile CD.

    ``threads``: torch CPU threads (default 1: the model is tiny, and on a shared machine one
    thread was 3-4x faster than two; None = torch's default)."""
    import torch
    if threads:
        torch.set_num_threads(threads)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, images, labels, acc = train_digits_cnn()
    print(f"trained a digits CNN in {time.perf_counter() - t0:.1f} s: test accuracy {acc:.3f}")
    n = max(1, min(n, len(images)))

    summary = []
    for j in range(n):
        x, truth = images[j:j + 1], int(labels[j])
        t = time.perf_counter()
        h = hierarchy(model, x, sweep_dim=sweep_dim, percentile_include=percentile_include,
                      num_iters=num_iters)
        dt = time.perf_counter() - t
        stem = out / f"digit_{j}_class_{h.label}"
        save_figure(h.plot(), stem.with_suffix(".png"), dpi=110)
        atomic_write_text(stem.with_suffix(".json"), h.to_json())
        summary.append(dict(index=j, label=truth, prediction=h.label, levels=h.num_levels,
                            nodes=len(h.nodes), seconds=round(dt, 3), figure=stem.name + ".png",
                            json=stem.name + ".json"))
        print(f"digit {j}: label {truth}, prediction {h.label}: hierarchy of {h.num_levels} levels "
              f"({len(h.nodes)} blobs) in {dt:.2f} s -> {stem.name}.png/.json")

    # tile CD, batched engine vs the reference backend (one mask at a time)
    size = images.shape[-1]
    grid = -(-size // tile)
    tiles = torch.zeros(grid * grid, size, size)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        tiles[k, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = 1
    fast = Decomposer(model)
    ref = Decomposer(model, backend="reference")
    t_fast = t_ref = 0.0
    diff = 0.0
    n_cmp = min(n, 2)  # the reference is slow: time it on at most two digits
    with torch.no_grad():
        for j in range(n_cmp):
            x = images[j:j + 1]
            t = time.perf_counter()
            a = fast.cd(x, tiles).relevant
            t_fast += time.perf_counter() - t
            t = time.perf_counter()
            b = ref.cd(x, tiles).relevant
            t_ref += time.perf_counter() - t
            diff = max(diff, float((a - b).abs().max()))
    line = (f"CD of {grid * grid} tiles x {n_cmp} digit(s): {fast.backend} backend {t_fast:.3f} s, reference "
            f"{t_ref:.3f} s ({t_ref / t_fast:.1f}x faster), max |fast - reference| = {diff:.1e}")
    print(line)
    atomic_write_text(out / "summary.json", json.dumps(dict(
        test_accuracy=acc, hierarchies=summary, settings=dict(sweep_dim=sweep_dim,
        percentile_include=percentile_include, num_iters=num_iters),
        speed=dict(tiles=grid * grid, digits=n_cmp, backend=fast.backend, fast_s=t_fast, reference_s=t_ref,
                   speedup=t_ref / t_fast, max_abs_diff=diff)), indent=1) + "\n")
    print(f"wrote {n} hierarchies (figure + JSON) and summary.json to {out}/")
    return 0

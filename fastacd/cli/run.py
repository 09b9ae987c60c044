"""Dataset-scale ACD hierarchies: the logic behind ``fastacd run`` and ``fastacd demo``.

``fastacd run SOURCE --out DIR`` explains every image of a folder, a file list or a glob
(docs/run.md). What it guarantees:

* **Inputs** (``inputs.py``): one id per real file (symbolic links are followed without
  looping), the output folder left out, high-bit-depth pixels scaled to [0, 1] (or refused as an
  error of that image).
* **Outputs per image** under ``DIR/hierarchies/<image id>``: ``.json`` (``Hierarchy.to_json``
  without the image), ``.npz`` (compressed boolean pixel masks of every node, plus the run's
  settings hash and the image's manifest record), ``.png`` with ``--figures``. A path component
  too long for the file system is shortened and hashed; the record keeps the full id.
* **Atomic files, finished images** (``outdir.py``): each file is written to a hidden temp file,
  fsync'ed and renamed; the ``.npz`` is written last. An image is finished when its ``.npz``
  holds the current settings hash, its ``.json`` has the recorded size and the input file the
  recorded sha256. A kill at any point leaves either a finished image or one that is recomputed.
* **One run per folder**: a lock (shared by the ranks of one torchrun job) refuses a second run;
  a killed run's lock and temp files are taken over / removed by the next run.
* **Resume.** ``DIR/run_settings.json`` holds the settings that determine the results and their
  hash (written with the first finished image); a re-run with the same settings skips finished
  images; with other settings it is refused unless ``--overwrite``.
* **Errors**: an image that cannot be read or explained is recorded in the manifest with the
  message and the run goes on (a re-run retries it); a write error (disk full, read-only) or a
  model that cannot be decomposed stops the run with a message (exit 2), recording nothing false.
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

import importlib
import importlib.util
import io
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..api import decomposer_for
from ..capture import UnsupportedOpError
from ..engine import Decomposer
from ..image.hierarchy import Hierarchy, display_image, hierarchy
from ..rules import ZERO_TOL
from ..train.models import train_digits_cnn
from .errors import RunError
from .inputs import (IMAGE_EXTS, Item, collect_images, load_image, prefetch, read_class_index,  # noqa: F401
                     read_image)
from .outdir import (ITEMS_DIR, MANIFEST, SETTINGS_FILE, ManifestPart, RunLock,  # noqa: F401
                     _now, atomic_write, atomic_write_bytes, atomic_write_text, check_settings_file,
                     clean_stale_temps, figure_ok, finished_record, merge_manifest, output_paths,
                     run_key, save_figure, set_temp_tag, settings_hash, sha256_file)

SETTINGS_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def preprocess_settings(args) -> dict:
    grey = bool(getattr(args, "grayscale", False))
    mean = list(args.mean) if args.mean is not None else ([0.5] if grey else list(IMAGENET_MEAN))
    std = list(args.std) if args.std is not None else ([0.5] if grey else list(IMAGENET_STD))
    channels = 1 if grey else 3
    for name, v in (("--mean", mean), ("--std", std)):
        if len(v) not in (1, channels):
            raise RunError(f"{name} takes 1 or {channels} values, got {len(v)}")
        if not all(math.isfinite(x) for x in v):
            raise RunError(f"{name} values must be finite numbers")
    if any(s == 0 for s in std):
        raise RunError("--std values must be non-zero")
    size = args.image_size
    resize = args.resize
    if size is not None and resize is None:
        resize = round(size * 256 / 224)  # torchvision's ImageNet convention: 256 -> crop 224
    if size is not None and (size < 1 or resize < size):
        raise RunError(f"need 1 <= --image-size <= --resize, got {size} and {resize}")
    if size is None and resize is not None:
        raise RunError("--resize needs an --image-size (0 keeps each image's own size, unresized)")
    return dict(image_size=size, resize=resize, mean=mean, std=std, grayscale=grey)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
def load_weights(path: str, unsafe: bool = False):
    """``torch.load`` with ``weights_only=True`` unless ``unsafe``; a clear refusal otherwise."""
    import torch
    where = f"--weights {path}"
    if not Path(path).is_file():
        raise RunError(f"{where}: no such file")
    if Path(path).stat().st_size == 0:
        raise RunError(f"{where}: the file is empty (0 bytes): an interrupted download or copy?")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as e:  # noqa: BLE001 - torch.load fails with many types on damaged files
        if not unsafe and isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            first = str(e).strip().splitlines()[0]
            raise RunError(
                f"{where}: refused. torch.load(..., weights_only=True) accepts only tensors and "
                f"plain containers, and this file holds other Python objects ({first}). Loading it "
                "runs arbitrary code from the file: pass --unsafe-load only if you trust where it "
                "came from.") from e
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RunError(f"{where}: not a readable PyTorch weights file ({type(e).__name__}: {first}); "
                       "is it complete (a truncated download?) and written by torch.save?") from e


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
        raise RunError("give exactly one of --arch NAME (a torchvision model, or timm:NAME) or --model "
                       "module:factory")
    module = args.model
    if module is not None and ":" in module and module.rsplit(":", 1)[0].endswith(".py"):
        file, attr = module.rsplit(":", 1)  # relative or absolute: one file, one setting
        module = f"{os.path.realpath(file)}:{attr}"
    d = dict(arch=args.arch, module=module, num_classes=args.num_classes, seed=args.seed,
             weights_sha256=None)
    if args.weights is not None:
        if not Path(args.weights).is_file():
            raise RunError(f"--weights {args.weights}: no such file")
        try:
            d["weights_sha256"] = sha256_file(args.weights)
        except OSError as e:
            raise RunError(f"--weights {args.weights}: unreadable ({e.strerror})") from e
    return d


def build_model(args):
    """The model in eval mode on the CPU, and whether it is random-init."""
    import torch
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(args.seed)  # the same random-init model on every rank and every run
        return _build_model(args)


def _timm_model(arch: str, num_classes: int | None):
    """``--arch timm:NAME``: the timm model, random-init (``pretrained=False``: nothing is downloaded)."""
    name = arch[len("timm:"):]
    try:
        import timm
    except ImportError as e:
        raise RunError(f"--arch {arch!r}: timm is not installed (pip install timm)") from e
    if name not in timm.list_models():
        near = timm.list_models(f"*{name}*")[:8]
        raise RunError(f"--arch {arch!r}: not a timm model" + (f"; close: {', '.join(near)}" if near else
                                                                "; timm.list_models() names them"))
    kw = {} if num_classes is None else dict(num_classes=num_classes)
    return timm.create_model(name, pretrained=False, **kw)


def _build_model(args):
    import torch
    if args.arch is not None and args.arch.startswith("timm:"):
        model = _timm_model(args.arch, args.num_classes)
    elif args.arch is not None:
        import torchvision
        names = torchvision.models.list_models(module=torchvision.models)
        if args.arch not in names:
            raise RunError(f"--arch {args.arch!r}: not a torchvision classification model; one of: "
                           f"{', '.join(names)} (or timm:NAME for a timm model)")
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
                raise RunError(f"--weights {args.weights} does not fit the model: {_one_line(e)}") from e
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:  # every score would be NaN: say why now, not after an hour of NaN hierarchies
        where = f"--weights {args.weights}" if args.weights is not None else f"--model {args.model}"
        raise RunError(f"{where}: NaN or infinite values in {', '.join(bad[:3])}"
                       f"{f' (and {len(bad) - 3} more)' if len(bad) > 3 else ''}")
    return model.eval(), random_init



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
    try:
        dev = torch.device(requested)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise RunError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {requested}: CUDA is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{dist.local_rank % torch.cuda.device_count()}")
        elif dev.index >= torch.cuda.device_count():
            raise RunError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
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


# a gap beyond float32's usual 1e-7..1e-5 says the scores depend on rounding; bf16 weight
# applications alone move them by ~0.5% to a few % of a logit (docs/precision.md)
ROUNDING_WARN = {"float32": 1e-3, "tf32": 1e-2, "bf16": 5e-2}


def rounding_gap(dec, x, h, most: int = 4) -> float:
    """``Decomposer.rounding_gap`` on up to ``most`` of the hierarchy's nodes, spread over its levels."""
    import numpy as np
    import torch
    masks = node_masks(h)
    pick = np.unique(np.linspace(0, len(masks) - 1, min(most, len(masks))).round().astype(int))
    # (K, 1, H, W): K = C masks of shape (H, W) would read as one per-channel mask
    return dec.rounding_gap(x, torch.from_numpy(masks[pick])[:, None].to(device=x.device, dtype=x.dtype))


def prepare_outputs(h, record: dict, digest: str, figures: bool) -> dict:
    """The image's files as bytes (the figure, the JSON, then the .npz holding ``record``, which
    gets the other files' sizes): everything that may fail for the image before anything is written."""
    import numpy as np
    files = dict(json=h.to_json(include_image=False).encode())
    if figures:
        buf = io.BytesIO()
        h.plot().savefig(buf, format="png", dpi=100)
        files["figure"] = buf.getvalue()
    record["bytes"] = {k: len(v) for k, v in files.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=node_masks(h),
                        level=np.array([n.level for n in h.nodes], dtype=np.int32),
                        component=np.array([n.component for n in h.nodes], dtype=np.int32),
                        score=np.array([n.score for n in h.nodes], dtype=np.float64),
                        label=np.int64(h.label), settings_hash=np.str_(digest),
                        record=np.str_(json.dumps(record, sort_keys=True)))
    files["npz"] = buf.getvalue()
    return files


def write_outputs(paths: dict, files: dict) -> None:
    """Figure, JSON, then the .npz last (the commit marker)."""
    for key in ("figure", "json", "npz"):
        if key in files:
            atomic_write_bytes(paths[key], files[key])


def write_failed(e: OSError, what: str) -> RunError:
    """A write error stops the run: the next images would fail the same way (disk full,
    read-only folder, quota), and a record must never claim files that were not written."""
    return RunError(f"writing {e.filename or what} failed: {e.strerror or e}. The run stops: nothing is "
                    "recorded for the image being written, finished images are kept; free some space "
                    "(or fix the folder's permissions), then re-run the same command to resume")


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
        v = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v >= 1):
        raise RunError(f"--memory-budget {s!r}: expected a positive size in bytes, e.g. 2G, 512M or 1073741824")
    return int(v)


def label_settings(args, items: list[Item]) -> dict:
    mode = str(args.label)
    if args.class_index is not None and mode != "folder":
        raise RunError("--class-index maps folder names to classes: it needs --label folder")
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
        index = int(mode)
    except ValueError:
        raise RunError(f"--label {mode!r}: expected 'pred', 'folder' or a class index") from None
    if index < 0:
        raise RunError(f"--label {index}: a class index is >= 0")
    return dict(mode="fixed", index=index, classes=None)


def run_settings(args, items) -> dict:
    dtype = args.dtype
    if dtype not in ("float32", "float64"):
        raise RunError(f"--dtype {dtype!r}: float32 or float64")
    return dict(format=SETTINGS_FORMAT, model=model_settings(args), label=label_settings(args, items),
                acd=dict(sweep_dim=args.sweep_dim, percentile_include=args.percentile_include,
                         num_iters=args.num_iters, method=args.method, base=args.base,
                         corrected=args.corrected),
                preprocess=preprocess_settings(args), dtype=dtype, tf32=bool(args.tf32),
                outputs=dict(class_scores=not args.no_class_scores),
                # only when not the default, so that folders written before --precision resume
                **({"precision": args.precision} if getattr(args, "precision", "float32") not in ("float32", "tf32") else {}),
                **({"exact_decisions": False} if not getattr(args, "exact_decisions", True) else {}),
                **({"zero_tol": args.zero_tol} if args.zero_tol != ZERO_TOL else {}))


def _check_args(args):
    """The numbers of the command line, before anything is read or loaded."""
    precision = getattr(args, "precision", "float32")
    if args.tf32 and precision == "bf16":
        raise RunError("--tf32 and --precision bf16: choose one")
    if args.tf32 or precision == "tf32":  # --tf32 is --precision tf32
        args.tf32, args.precision = True, "tf32"
    else:
        args.precision = precision
    if args.precision == "bf16" and getattr(args, "dtype", "float32") != "float32":
        raise RunError("--precision bf16 runs a float32 model's weights in bfloat16: use --dtype float32")
    args.exact_decisions = getattr(args, "exact_decisions", True)
    if not args.exact_decisions and args.precision == "float32":
        raise RunError("--no-exact-decisions goes with --precision bf16 or tf32: float32 decisions are exact already")
    args.zero_tol = ZERO_TOL if getattr(args, "zero_tol", None) is None else float(args.zero_tol)
    if not 0 <= args.zero_tol < 1:  # also NaN
        raise RunError("--zero-tol must be within [0, 1) (0: the published split formula)")
    if args.image_size is not None and args.image_size < 1:
        raise RunError("--image-size must be >= 1 (0 keeps each image's own size)")
    if args.resize is not None and args.resize < 1:
        raise RunError("--resize must be >= 1")
    if args.sweep_dim is not None and args.sweep_dim < 1:
        raise RunError("--sweep-dim must be >= 1")
    if args.sweep_dim is not None and args.image_size is not None and args.sweep_dim > args.image_size:
        raise RunError(f"--sweep-dim {args.sweep_dim} is larger than the image "
                       f"(--image-size {args.image_size})")
    if not 0 <= args.percentile_include <= 100:  # also NaN
        raise RunError("--percentile-include must be within 0..100")
    if args.num_iters < 1:
        raise RunError("--num-iters must be >= 1 (0 would give an empty hierarchy)")
    if args.threads is not None and args.threads < 1:
        raise RunError(f"--threads {args.threads}: must be >= 1 (leave it out for cores // processes)")
    if args.num_classes is not None and args.num_classes < 1:
        raise RunError("--num-classes must be >= 1")
    if not args.barrier_timeout > 0:
        raise RunError("--barrier-timeout must be > 0 seconds")
    parse_memory(args.memory_budget)


def _decomposer(model, backend, precision="float32", zero_tol=ZERO_TOL):
    try:
        return decomposer_for(model, backend, precision, zero_tol)
    except (UnsupportedOpError, RuntimeError) as e:  # an op without a rule; a backend not built
        raise RunError(f"the model cannot be decomposed: {_one_line(e)}") from e


def run(args) -> int:
    """``fastacd run``: see the module docstring and docs/run.md. Returns the exit code.

    Everything that can be refused is checked before the output folder is touched: the
    arguments, the source, the settings against the folder's, the device, the weights, the
    model's graph. Then the lock; the settings are recorded with the first finished image."""
    _check_args(args)
    dist = Dist.from_env()
    device = pick_device(args.device, dist)
    out = Path(args.out)
    items, kind = collect_images(args.source, exclude=out)
    settings = run_settings(args, items)
    digest = settings_hash(settings)
    # every rank checks (all refuse together) before anything is loaded or written
    check_settings_file(out, settings, digest, args.overwrite, args.source, write=False)

    import torch
    if device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_threads(dist))
        cores = cpu_threads(Dist())
        if dist.rank == 0 and args.threads and args.threads * dist.local_world > cores:
            print(f"WARNING: {dist.local_world} process(es) x {args.threads} threads on {cores} cores: "
                  "oversubscribed threads wait for each other (often several times slower); "
                  f"use --threads {max(1, cores // dist.local_world)} or fewer processes", file=sys.stderr)
    else:
        torch.cuda.set_device(device)
        # PyTorch runs float32 convolutions in TF32 on Ampere+ GPUs by default (10-bit mantissa):
        # off unless asked for, so that the scores stay float32-faithful (the engine's calls set
        # it per call from the precision too: Decomposer.compute)
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
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    dec = _decomposer(model, args.backend, args.precision, args.zero_tol)
    if args.memory_budget is not None:
        dec.memory_budget = parse_memory(args.memory_budget)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create the folder ({e.strerror})") from e
    key = run_key(dist.world)
    set_temp_tag(key[:8])
    with RunLock(out, key):
        # again under the lock: a run that finished meanwhile may have recorded other settings
        check_settings_file(out, settings, digest, args.overwrite, args.source, write=False)
        clean_stale_temps(out)
        return _run_locked(args, dist, device, out, items, kind, settings, digest, model, dec, say)


def _run_locked(args, dist, device, out, items, kind, settings, digest, model, dec, say) -> int:
    import torch
    lab, pre, acd = settings["label"], settings["preprocess"], settings["acd"]
    dtype = getattr(torch, args.dtype)
    recorded = [False]

    def record_settings():  # once the first image is done: a run failing before blocks nothing
        if not recorded[0] and (dist.rank == 0 or not (out / SETTINGS_FILE).exists()):
            try:
                check_settings_file(out, settings, digest, args.overwrite, args.source, write=True)
            except OSError as e:
                raise write_failed(e, SETTINGS_FILE) from e
        recorded[0] = True

    shard = [it for i, it in enumerate(items) if i % dist.world == dist.rank]
    todo, n_done, figure_only = [], 0, []
    for it in shard:
        paths = output_paths(out, it.id)
        rec = finished_record(paths, digest, it.path)
        if rec is None:
            todo.append(it)
        else:
            n_done += 1
            if args.figures and not figure_ok(paths, rec):
                figure_only.append(it)
    say(f"fastacd run: {len(items)} images ({kind} {args.source}) -> {out}; rank {dist.rank} of "
        f"{dist.world} on {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
        + f": {len(shard)} in this shard, {n_done} already done, {len(todo)} to do")

    for it in figure_only:  # finished earlier without --figures (or the figure was damaged): from the JSON
        paths = output_paths(out, it.id)
        try:
            h = Hierarchy.from_json(paths["json"].read_text())
            h.image = display_image(load_image(it.path, pre))
            buf = io.BytesIO()
            h.plot().savefig(buf, format="png", dpi=100)
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            say(f"figure for {it.id} failed: {e}")
            continue
        try:
            atomic_write_bytes(paths["figure"], buf.getvalue())
        except OSError as e:
            raise write_failed(e, str(paths["figure"])) from e

    from tqdm.auto import tqdm
    try:
        part = ManifestPart(out / f"manifest.rank{dist.rank}.jsonl")
    except OSError as e:
        raise write_failed(e, f"manifest.rank{dist.rank}.jsonl") from e
    n_err = n_ok = n_checked = 0
    flat_warned = rounding_warned = False
    t_start = time.perf_counter()
    bar = tqdm(total=len(shard), initial=n_done, unit="img", dynamic_ncols=True, smoothing=0.1,
               desc=f"ACD rank {dist.rank}/{dist.world}" if dist.world > 1 else "ACD",
               disable=args.no_progress or dist.rank != 0)
    reading = prefetch(todo, lambda it: read_image(it.path, pre))
    try:
        for it, pending in reading:
            paths = output_paths(out, it.id)
            rec = dict(image=it.id, path=it.path, folder=it.folder, rank=dist.rank,
                       settings_hash=digest, label=None, prediction=None, input_sha256=None)
            t0 = time.perf_counter()
            files = None
            try:
                x, rec["input_sha256"] = pending.result()
                x = x.to(device=device, dtype=dtype)
                with torch.no_grad():
                    logits = dec.forward(x).reshape(-1)
                pred = int(logits.argmax())
                if not flat_warned and bool((logits == logits[0]).all()):
                    flat_warned = True  # e.g. torchvision's ViT, whose head is zero at init
                    say(f"WARNING: the model's {logits.numel()} outputs are all equal on {it.id}: every CD "
                        "score is the same and the hierarchy has no blobs (a random-init model with a "
                        "zero-initialised head, such as torchvision's ViT, does this; pass --weights)")
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
                              corrected=acd["corrected"], precision=args.precision,
                              zero_tol=args.zero_tol, exact_decisions=args.exact_decisions)
                if args.no_class_scores:
                    for node in h.nodes:
                        node.class_scores = []
                if h.nodes and (args.rounding_check == "every" or (args.rounding_check == "first" and n_checked == 0)):
                    n_checked += 1
                    rec["rounding_gap"] = rounding_gap(dec, x, h)
                    if rec["rounding_gap"] > ROUNDING_WARN[args.precision] and not rounding_warned:
                        rounding_warned = True
                        say(f"WARNING: rounding moves the CD scores of {it.id} by {rec['rounding_gap']:.1e} of its "
                            "largest logit (float64 gives other numbers: rounding decides a max-pool's argmax "
                            "at a near tie, or CD's splits amplify it). Read the scores with that error, or run "
                            "with --dtype float64 (docs/engine.md \"When float32 is not enough\")")
                rec.update(label=label, prediction=pred, status="ok", error=None,
                           num_levels=h.num_levels, num_nodes=len(h.nodes),
                           outputs={k: os.path.relpath(p, out) for k, p in paths.items()
                                    if k != "figure" or args.figures},
                           time_s=round(time.perf_counter() - t0, 4), finished=_now())
                files = prepare_outputs(h, rec, digest, args.figures)
            except UnsupportedOpError as e:  # the model, not the image: every image would fail
                raise RunError(f"the model cannot be decomposed ({it.id}): {_one_line(e)}") from e
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
            try:
                if files is not None:
                    record_settings()
                    write_outputs(paths, files)
                    n_ok += 1
                part.append(rec)
            except OSError as e:
                raise write_failed(e, it.id) from e
            bar.update(1)
            bar.set_postfix(errors=n_err, refresh=False)
    finally:
        reading.close()  # stops the reader thread now, also when a write error ends the loop
        bar.close()
        part.close()
    dt = time.perf_counter() - t_start
    if dist.rank != 0 and (n_ok or n_err):
        print(f"rank {dist.rank}: {n_ok} done, {n_err} errors in {dt:.1f} s", file=sys.stderr, flush=True)
    final_barrier(dist, device, args.barrier_timeout)
    if dist.rank != 0:
        return 0
    try:
        if n_done:
            record_settings()  # finished images of these settings, but no settings file (removed?)
        counts = merge_manifest(out, items, digest)
    except OSError as e:
        raise write_failed(e, MANIFEST) from e
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
    for name, v, lo in (("--n", n, 1), ("--sweep-dim", sweep_dim, 1), ("--num-iters", num_iters, 1),
                        ("--tile", tile, 1), ("--threads", threads or 0, 0)):
        if v < lo:
            raise RunError(f"{name} {v}: must be >= {lo}")
    if not 0 <= percentile_include <= 100:  # also NaN
        raise RunError(f"--percentile-include {percentile_include}: must be within 0..100")
    import torch
    if threads:
        torch.set_num_threads(threads)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, images, labels, acc = train_digits_cnn()
    size = images.shape[-1]
    if sweep_dim > size or tile > size:
        raise RunError(f"--sweep-dim and --tile must be at most the digits' size, {size}")
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

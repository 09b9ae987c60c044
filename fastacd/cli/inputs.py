"""What ``fastacd run`` reads: the images of a source (folder, glob, file list, one image), their
pixels, and the class index of ``--label folder``. docs/run.md, "Inputs".

Hostile inputs handled here: symlink loops (each real folder is entered once), one id per real
file, the output folder left out of the walk, high-bit-depth pixels scaled (or refused), broken
class-index files refused with a message.
"""
from __future__ import annotations

import fnmatch
import glob as _glob
import hashlib
import io
import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .errors import RunError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


@dataclass(frozen=True)
class Item:
    id: str         # the output key: path relative to the source's root (posix), extension included
    path: str       # where to read it
    folder: str     # name of the folder holding it (the class for --label folder)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------
def walk_files(top: Path, skip=(), max_depth: int | None = None) -> list[Path]:
    """Every non-hidden file under ``top``, following symbolic links without looping.

    Each real folder is entered once, so ``ln -s .. up`` or ``ln -s . self`` cannot recurse;
    folders reached without a link are entered before any reached through one (an image keeps
    the id of its real place); ``skip`` (the output folder) is never entered; ``max_depth``
    limits the folder depth (0: ``top`` only). A folder that cannot be listed is an error: a
    silently skipped class would bias a whole dataset's results.
    """
    seen = {os.path.realpath(p) for p in skip}
    files, queue, links = [], deque([(Path(top), 0)]), []
    while queue or links:
        if not queue:  # the plain tree is done: now the folders only reached through links
            queue, links = deque(sorted(links)), []
        folder, depth = queue.popleft()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise RunError(f"cannot list the folder {folder}: {e.strerror or e}") from e
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows a link (a dangling one is a file, an error later)
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(Path(e.path))
            elif max_depth is None or depth < max_depth:
                (links if e.is_symlink() else queue).append((Path(e.path), depth + 1))
    return files


def _glob_match(parts: tuple, pattern: tuple) -> bool:
    """``glob``'s rules on path components: ``**`` is any number of folders (also none)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _rel_id(p: Path, root: Path) -> str:
    """``p`` relative to ``root`` (as written, else through real paths); outside it, the
    absolute real path without its leading '/', so that an id never leaves the output folder."""
    for a, b in ((os.path.abspath(p), os.path.abspath(root)), (os.path.realpath(p), os.path.realpath(root))):
        rel = os.path.relpath(a, b)
        if rel != ".." and not rel.startswith(".." + os.sep):
            return Path(rel).as_posix()
    return Path(os.path.realpath(p)).as_posix().lstrip("/")


def collect_images(source: str, exclude=None) -> tuple[list[Item], str]:
    """The images of ``source``, sorted by id, and the kind of source.

    source: a folder (searched recursively for image files, hidden entries skipped: the
    ImageFolder layout ``root/class/img.png`` or flat), a glob pattern (``'data/**/*.png'``,
    quoted; every matching file), a text file listing image paths (one per line, relative
    to the list's folder or absolute; blank lines and lines starting with ``#`` skipped), or
    one image file. ``exclude``: a folder never read (the output folder).

    One id per real file: paths reaching the same file (links, or a list naming it twice) give
    one item, under the id of the path without a link (else the smallest id).
    """
    skip = [exclude] if exclude is not None else []
    src = Path(source)
    if src.is_dir():
        kind, root = "folder", src
        if exclude is not None and os.path.realpath(src) == os.path.realpath(exclude):
            raise RunError(f"--out {exclude} is the source folder: use an output folder of its own "
                           "(inside the source is fine: it is left out of the walk)")
        paths = [p for p in walk_files(src, skip) if _is_image(p.name)]
    elif src.is_file() and _is_image(src.name):
        kind, root, paths = "file", src.parent, [src]
    elif src.is_file():
        kind, paths = "list", []
        root = Path(os.path.abspath(src.parent))  # ids relative to the list's folder: stable as the list grows
        try:
            lines = src.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise RunError(f"{source}: not an image (extension) nor a readable text file listing "
                           f"images ({e})") from e
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(p if p.is_absolute() else root / p)
        if not paths:
            raise RunError(f"the file list {source} names no images")
    elif _glob.has_magic(source):
        kind, parts = "glob", src.parts
        n = next(i for i, part in enumerate(parts) if _glob.has_magic(part))
        root, pattern = Path(*parts[:n]) if n else Path("."), parts[n:]
        depth = None if "**" in pattern else len(pattern) - 1
        paths = [p for p in (walk_files(root, skip, depth) if root.is_dir() else [])
                 if _glob_match(p.relative_to(root).parts, pattern)]
    else:
        raise RunError(f"{source}: no such folder, file list or image (for a glob pattern, quote it)")
    best = {}  # real path -> (is a link, id, path): one item per real file
    for p in paths:
        key = (os.path.islink(p), _rel_id(p, root), p)
        real = os.path.realpath(p)
        if real not in best or key < best[real]:
            best[real] = key
    items = sorted((Item(id=i, path=str(p), folder=Path(os.path.abspath(p)).parent.name)
                    for _, i, p in best.values()), key=lambda it: it.id)
    if not items:
        raise RunError(f"{source}: no images found (extensions: {', '.join(sorted(IMAGE_EXTS))})")
    return items, kind


# ------------------------------------------------------------------------------------------
# Class index
# ------------------------------------------------------------------------------------------
def _index(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:  # 1.7 or "3" are not indices
        raise RunError(f"{where}: class index {json.dumps(v)} is not a non-negative integer")
    return v


def read_class_index(path: str) -> dict[str, int]:
    """A folder-name -> class-index mapping from a file.

    JSON ``{"n01440764": 0, ...}``, JSON like ``imagenet_class_index.json``
    (``{"0": ["n01440764", "tench"], ...}``), a JSON list of names, or text: one folder name
    per line (the first word of the line, e.g. ``LOC_synset_mapping.txt``), the line number
    being the index. A file that looks like JSON (``.json``, or starting with ``{`` / ``[``)
    must be valid JSON: it is never re-read as text.
    """
    where = f"--class-index {path}"
    p = Path(path)
    if not p.is_file():
        raise RunError(f"{where}: no such file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{where}: unreadable ({e})") from e
    if p.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RunError(f"{where}: broken JSON ({e})") from e
        if isinstance(d, list) and all(isinstance(n, str) for n in d):
            names = d
        elif isinstance(d, dict) and d and all(isinstance(v, list) and v and isinstance(v[0], str)
                                               for v in d.values()):
            try:
                return {v[0]: _index(int(k), where) for k, v in d.items()}
            except ValueError:
                raise RunError(f"{where}: keys of an {{index: [name, ...]}} mapping must be integers") from None
        elif isinstance(d, dict) and all(isinstance(k, str) for k in d):
            mapping = {k: _index(v, where) for k, v in d.items()}
            if not mapping:
                raise RunError(f"{where}: empty mapping")
            return mapping
        else:
            raise RunError(f"{where}: expected {{name: index}}, {{index: [name, ...]}} or [name, ...]")
    else:
        names = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
    if not names:
        raise RunError(f"{where}: names no classes")
    first = {}
    for i, n in enumerate(names):
        if n in first:
            raise RunError(f"{where}: {n!r} appears twice (indices {first[n]} and {i})")
        first[n] = i
    return first


# ------------------------------------------------------------------------------------------
# Pixels
# ------------------------------------------------------------------------------------------
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


def _model_mode(im, grey: bool):
    """``im`` as 8-bit L / RGB (white = 255), or as one float channel F (white = 1) when its
    pixels have more than 8 bits: ``convert('RGB')`` would saturate 16-bit values and turn float
    ones black."""
    import numpy as np
    from PIL import Image
    if im.mode in _SIXTEEN_BIT or (im.mode == "I" and im.format == "PNG"):  # PNG has no 32-bit ints
        return Image.fromarray(np.asarray(im, dtype=np.float32) / 65535), 1.0
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        if not (lo >= 0 and hi <= 1):  # also NaN
            raise ValueError(f"float pixels in [{lo:.4g}, {hi:.4g}], expected [0, 1]: rescale the "
                             "image or save it with 8 or 16 bits per channel")
        return im, 1.0
    if im.mode == "I":
        raise ValueError("32-bit integer pixels (mode I) have no known white level: save the image "
                         "with 8 or 16 bits per channel")
    return im.convert("L" if grey else "RGB"), 255.0


def decode_image(data: bytes, pre: dict):
    """The model input (1, C, H, W) float32 from an image file's bytes: resize the shorter side,
    centre-crop, normalise (the same arithmetic as torchvision's Resize + CenterCrop + ToTensor +
    Normalize on PIL)."""
    import numpy as np
    import torch
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im, white = _model_mode(im, pre["grayscale"])
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
    a = np.asarray(im, dtype=np.float32) / np.float32(white)
    if a.ndim == 2:  # one channel: replicated for an RGB model
        a = a[None] if pre["grayscale"] else np.repeat(a[None], 3, axis=0)
    else:
        a = np.moveaxis(a, -1, 0)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(-1, 1, 1)
    return torch.from_numpy(np.ascontiguousarray((a - mean) / std))[None]


def read_image(path: str, pre: dict):
    """(model input, sha256 of the file): the pixels and the hash come from the same bytes."""
    from PIL import UnidentifiedImageError
    data = Path(path).read_bytes()
    try:
        return decode_image(data, pre), hashlib.sha256(data).hexdigest()
    except UnidentifiedImageError:  # PIL names the in-memory buffer: name the file
        raise UnidentifiedImageError(f"cannot identify image file {path!r}") from None


def load_image(path: str, pre: dict):
    """The model input (1, C, H, W) float32 of an image file (see ``decode_image``)."""
    return read_image(path, pre)[0]


def prefetch(items, load, ahead: int = 2):
    """Yield ``(item, future of load(item))`` in order, the next ``ahead`` items loading in a
    background thread while the caller works on the current one: reading and decoding (PIL
    works without the GIL) overlap the engine's compute. ``future.result()`` raises what
    ``load`` raised, so a bad image stays an error of that image."""
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1, thread_name_prefix="fastacd-read")
    queue, rest = deque(), iter(items)
    try:
        for item in rest:
            queue.append((item, pool.submit(load, item)))
            if len(queue) > ahead:
                yield queue.popleft()
        while queue:
            yield queue.popleft()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

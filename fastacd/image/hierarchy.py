"""ACD hierarchies as objects: ``hierarchy(model, image) -> Hierarchy``.

The agglomeration is the one of ``fastacd.agg_2d`` (batched, cached); this module gives it
a modern face:

* the input is the model input itself (a tensor), the label defaults to the prediction;
* base units are square tiles (as the paper) or superpixels (scikit-image SLIC or
  Felzenszwalb), with neighbourhoods from the segments' adjacency;
* the result is a tree of ``Node`` s (level, units, CD score of the class, all class
  scores, children) with ``to_json`` / ``from_json``, ``levels()`` and ``plot()``;
* ``corrected=True`` switches off the original's unintended quirks (docs/hierarchies.md).

``occlusion`` and ``build_up`` work in input space here: the region is set to 0 (occlusion)
or everything else is (build-up) in the tensor given to the model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from math import ceil
from pathlib import Path

import numpy as np
import torch

from . import agg_2d
from ..api import decomposer_for
from ..capture.nodes import eval_mode
from ..rules import ZERO_TOL
from ..train.models import acd_mnist_cnn, digits_28, train_digits_cnn

BASES = ("tiles", "slic", "felzenszwalb")


@dataclass
class Node:
    """One blob of one level.

    units: indices of the base units (row-major tile indices, or segment labels);
    component: the blob's number, stable from level to level (the plot's colour);
    score: the class's score (CD relevant logit for ``cd``); class_scores: every class;
    children: ids of the blobs of the level below that it contains.
    """
    id: int
    level: int
    component: int
    units: list[int]
    score: float
    class_scores: list[float]
    children: list[int] = field(default_factory=list)


@dataclass
class Hierarchy:
    label: int
    method: str
    base: str
    image_hw: tuple[int, int]
    sweep_dim: int | None
    nodes: list[Node]
    num_levels: int
    num_grow_levels: int  # levels from the growing phase; the rest come from merging
    full_scores: list[float]  # the scores of the whole image
    params: dict = field(default_factory=dict)
    segments: np.ndarray | None = None  # (H, W) segment labels for superpixel bases
    image: np.ndarray | None = None  # (H, W) or (H, W, 3) in [0, 1], for plots
    stats: dict = field(default_factory=dict)

    # ---- structure ---------------------------------------------------------------------
    def levels(self) -> list[list[Node]]:
        """Nodes per level, from the first components to the final single blob."""
        out = [[] for _ in range(self.num_levels)]
        for n in self.nodes:
            out[n.level].append(n)
        return out

    def roots(self) -> list[Node]:
        return self.levels()[-1] if self.num_levels else []

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def unit_mask(self, node: Node) -> np.ndarray:
        """The node's units as a boolean array of the grid's (tiles) or (n_segments,) shape."""
        if self.base == "tiles":
            shape = (ceil(self.image_hw[0] / self.sweep_dim), ceil(self.image_hw[1] / self.sweep_dim))
        else:
            shape = (int(self.segments.max()) + 1,)
        m = np.zeros(int(np.prod(shape)), dtype=bool)
        m[node.units] = True
        return m.reshape(shape)

    def mask(self, node: Node) -> np.ndarray:
        """The node as an (H, W) boolean pixel mask."""
        return self._units().pixels(self.unit_mask(node))

    def _units(self):
        if self.base == "tiles":
            return agg_2d.TileUnits(self.image_hw, self.sweep_dim)
        return agg_2d.SegmentUnits(self.segments)

    # ---- JSON ------------------------------------------------------------------------
    def to_json(self, include_image: bool = True) -> str:
        d = asdict(self)
        d["nodes"] = [asdict(n) for n in self.nodes]
        d["image_hw"] = list(self.image_hw)
        d["segments"] = None if self.segments is None else self.segments.tolist()
        d["image"] = None if (self.image is None or not include_image) else np.asarray(self.image).tolist()
        return json.dumps(d, default=_json_default)

    @classmethod
    def from_json(cls, s: str) -> "Hierarchy":
        d = json.loads(s)
        d["nodes"] = [Node(**n) for n in d["nodes"]]
        d["image_hw"] = tuple(d["image_hw"])
        if d.get("segments") is not None:
            d["segments"] = np.asarray(d["segments"], dtype=np.int64)
        if d.get("image") is not None:
            d["image"] = np.asarray(d["image"], dtype=np.float64)
        return cls(**d)

    # ---- plot ------------------------------------------------------------------------
    def plot(self, ncols: int = 5, panel_size: float = 2.4, cmap: str = "tab20", alpha: float = 0.65):
        """One panel per level: the image in grey, each blob in its component's colour with
        its score written at its centre (the ACD paper's figure). Returns a Figure."""
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        levels = self.levels()
        n = max(len(levels), 1)
        ncols = min(ncols, n)
        nrows = ceil(n / ncols)
        fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.4), layout="constrained")
        colours = colormaps[cmap]
        grey = self._grey()
        for i in range(n):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            ax.set_axis_off()
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            if i >= len(levels):
                continue
            overlay = np.zeros(self.image_hw + (4,))
            for node in levels[i]:
                m = self.mask(node)
                overlay[m] = (*colours(node.component % colours.N)[:3], alpha)
                r, c = np.argwhere(m).mean(0)
                ax.text(c, r, f"{node.score:.2f}", ha="center", va="center", fontsize=7,
                        color="white", bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.5, lw=0))
            ax.imshow(overlay)
            phase = "grow" if i < self.num_grow_levels else "merge"
            ax.set_title(f"level {i} ({phase})", fontsize=8)
        fig.suptitle(f"ACD ({self.method}) for class {self.label}", fontsize=9)
        return fig

    def _grey(self) -> np.ndarray:
        if self.image is None:
            return np.full(self.image_hw, 0.5)
        im = np.asarray(self.image, dtype=np.float64)
        return im.mean(-1) if im.ndim == 3 else im


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def display_image(x: torch.Tensor) -> np.ndarray:
    """A model input (1, C, H, W) as an (H, W) or (H, W, 3) image scaled to [0, 1]."""
    im = x[0].detach().cpu().double().numpy()
    im = im[0] if im.shape[0] == 1 else np.moveaxis(im[:3], 0, -1)
    lo, hi = im.min(), im.max()
    return (im - lo) / (hi - lo) if hi > lo else np.zeros_like(im)


def segment(image01: np.ndarray, base: str, **kwargs) -> np.ndarray:
    """Superpixels of a display image in [0, 1]: an (H, W) label image."""
    from skimage import segmentation
    channel_axis = -1 if image01.ndim == 3 else None
    if base == "slic":
        kw = dict(n_segments=64, compactness=10 if channel_axis is not None else 0.1, start_label=0)
        kw.update(kwargs)
        return segmentation.slic(image01, channel_axis=channel_axis, **kw)
    if base == "felzenszwalb":
        kw = dict(scale=100, sigma=0.5, min_size=max(4, image01.shape[0] * image01.shape[1] // 256))
        kw.update(kwargs)
        return segmentation.felzenszwalb(image01, channel_axis=channel_axis, **kw)
    raise ValueError(f"base must be one of {BASES}, got {base!r}")


def from_lists(lists: dict, label: int, method: str, units, *, base="tiles", sweep_dim=None,
               params=None, image=None, stats=None) -> Hierarchy:
    """A Hierarchy from the original dict of lists (the output of ``agg_2d.agglomerate``)."""
    nodes: list[Node] = []
    prev: list[Node] = []
    comps_levels = lists["comps_list"][1:]
    raw_levels = lists["comp_scores_raw_list"][1:]
    for level, (comps, raw) in enumerate(zip(comps_levels, raw_levels)):
        flat = np.asarray(comps).ravel()
        cur = []
        for k in sorted(raw):
            members = np.flatnonzero(flat == k).tolist()
            unit_set = set(members)
            node = Node(id=len(nodes), level=level, component=int(k), units=members,
                        score=float(raw[k][label]), class_scores=np.asarray(raw[k], dtype=float).tolist(),
                        children=[p.id for p in prev if unit_set.issuperset(p.units)])
            nodes.append(node)
            cur.append(node)
        prev = cur
    grow = lists["num_before_final"] - 1
    return Hierarchy(label=int(label), method=method, base=base, image_hw=tuple(units.hw),
                     sweep_dim=sweep_dim, nodes=nodes, num_levels=len(comps_levels),
                     num_grow_levels=min(grow, len(comps_levels)),
                     full_scores=np.asarray(lists["comp_scores_raw_list"][0][0], dtype=float).tolist(),
                     params=params or {}, segments=getattr(units, "segments", None), image=image,
                     stats=stats or {})


def hierarchy(model: torch.nn.Module, image, label: int | None = None, *, sweep_dim: int | None = None,
              percentile_include: float = 95, num_iters: int = 5, method: str = "cd",
              backend: str = "auto", base: str = "tiles", segment_kwargs: dict | None = None,
              corrected: bool = False, device=None, progress: bool = False,
              precision: str = "float32", zero_tol: float = ZERO_TOL, exact_decisions: bool = True) -> Hierarchy:
    """The ACD hierarchy of one image.

    Params
    ------
    model: a traceable PyTorch model (run in eval mode; its own mode is restored after)
    image: the model input, (C, H, W) or (1, C, H, W)
    label: class to explain; None = the model's prediction
    sweep_dim: tile side for ``base='tiles'``; None = ceil(min(H, W) / 16) (14 at 224), and for
        a patch model (the input read by a convolution with kernel = stride, no padding: ViT,
        Swin, ConvNeXt) the smallest multiple of its patch size at least that, so that tiles
        align to the patch grid (16 for vit_b_16, swin_t and convnext_tiny at 224)
    percentile_include, num_iters, method: as in ``agg_2d.agglomerate``
    backend: engine backend ('auto', 'torch', 'compiled', 'reference')
    precision: 'float32' (exact, default), 'bf16' or 'tf32' (CUDA): docs/precision.md
    exact_decisions: with 'bf16' (or 'tf32' on a GPU), the decisions read float32 scores of the
        candidates close to them (as in ``agg_2d.agglomerate``); False: the reduced precision alone
    zero_tol: numerical zero (``Decomposer``, docs/engine.md); 0 = the published split formula
    base: 'tiles', 'slic' or 'felzenszwalb'; ``segment_kwargs`` go to scikit-image
    corrected: False = exactly the original algorithm (same blobs as ``agg_2d.agglomerate``);
        True = the final selection also becomes a level, a tile bordering several blobs keeps
        its best gain, and occlusion's "all blobs" score occludes all of them
    progress: tqdm bars
    """
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if not isinstance(image, torch.Tensor):
        image = torch.as_tensor(np.asarray(image))
    if image.dim() == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4):
        raise ValueError(f"image has shape {tuple(image.shape)}, an (H, W, C) picture; pass the model "
                         "input (C, H, W) or (1, C, H, W), preprocessed as the model expects")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be the model input (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    hw = tuple(int(v) for v in image.shape[-2:])
    agg_2d.check_args(method, percentile_include, sweep_dim if base == "tiles" and sweep_dim is not None else 1,
                      hw, num_iters)
    model, x = agg_2d.prepare_model_input(model, image, device)
    if sweep_dim is None:
        sweep_dim = default_sweep_dim(hw, patch_size(decomposer_for(model, backend).graph))
    with eval_mode(model):
        return _hierarchy(model, x, hw, label, sweep_dim, percentile_include, num_iters, method,
                          backend, base, segment_kwargs, corrected, progress, precision, zero_tol,
                          exact_decisions)


def patch_size(graph) -> int | None:
    """The patch size of a patch model: the side of a square convolution reading the input
    with kernel = stride > 1, no padding, no dilation (ViT's ``conv_proj``, Swin's and
    ConvNeXt's stems, timm's ``patch_embed.proj``); None for anything else."""
    for user in graph.input_node.users:
        if user.op != "call_module":
            continue
        conv = graph.gm.get_submodule(user.target)
        if (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size[0] == conv.kernel_size[1] > 1
                and tuple(conv.stride) == tuple(conv.kernel_size) and conv.padding in ((0, 0), "valid")
                and tuple(conv.dilation) == (1, 1)):
            return int(conv.kernel_size[0])
    return None


def default_sweep_dim(hw, patch: int | None = None) -> int:
    """ceil(min(H, W) / 16) (the paper's 14 at 224); for a patch model the smallest multiple
    of the patch size at least that (tiles on the patch grid: a tile never splits a patch,
    whose pixels the model only sees together), at most the image's shorter side."""
    side = max(1, ceil(min(hw) / 16))
    if patch is None or patch > min(hw):
        return side
    return min(min(hw), patch * ceil(side / patch))


def _hierarchy(model, x, hw, label, sweep_dim, percentile_include, num_iters, method, backend, base,
               segment_kwargs, corrected, progress, precision="float32", zero_tol=ZERO_TOL,
               exact_decisions=True) -> Hierarchy:
    p = next(model.parameters(), None)
    if p is not None and x.dtype != p.dtype:
        x = x.to(p.dtype)
    dec = decomposer_for(model, backend, precision, zero_tol)
    with torch.no_grad():
        out = dec.forward(x).reshape(-1)
    if label is None:
        label = int(out.argmax())
    elif isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < out.numel():
        raise ValueError(f"label must be a class index in 0..{out.numel() - 1} (the model has "
                         f"{out.numel()} outputs), got {label!r}")
    shown = display_image(x)
    if base == "tiles":
        units = agg_2d.TileUnits(hw, sweep_dim)
    else:
        units = agg_2d.SegmentUnits(segment(shown, base, **(segment_kwargs or {})))
    scorer = agg_2d.Scorer(units, method, model, dec=dec, x=x, progress=progress,
                           exact_dec=agg_2d.exact_decomposer(dec, method, exact_decisions, x))
    lists = agg_2d.run_iterations(units, scorer, percentile_include, method, label, num_iters,
                                  hw, corrected=corrected, progress=progress)
    lists = agg_2d.run_merges(lists, scorer, label, progress=progress)
    reduced_alone = scorer.exact is None and agg_2d.reduced_precision(dec, x)
    params = dict(percentile_include=percentile_include, num_iters=num_iters, backend=dec.backend,
                  precision=dec.precision, decisions=dec.precision if reduced_alone else "float32",
                  zero_tol=dec.zero_tol, corrected=corrected, segment_kwargs=segment_kwargs or {})
    stats = dict(requested=scorer.requested, scored=scorer.scored, calls=scorer.calls,
                 scored_exact=scorer.exact.scored if scorer.exact else 0)
    return from_lists(lists, label, method, units, base=base,
                      sweep_dim=sweep_dim if base == "tiles" else None, params=params,
                      image=shown, stats=stats)


def demo_digits(out_dir, n: int = 4, weights=None, sweep_dim: int = 2, percentile_include: float = 90,
                num_iters: int = 5, progress: bool = False) -> list[Path]:
    """Hierarchies (PNG figure + JSON) for the first ``n`` test digits with a built-in model.

    ``weights``: path to the ACD MNIST CNN's published weights; None = train the small
    digits CNN (seconds). Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        model = acd_mnist_cnn(weights)
        xs, _ = digits_28()
        xs = xs[1500:]
    else:
        model, xs, _, _ = train_digits_cnn()
    written = []
    for i in range(n):
        h = hierarchy(model, xs[i:i + 1], sweep_dim=sweep_dim, percentile_include=percentile_include,
                      num_iters=num_iters, progress=progress)
        fig = h.plot()
        png, js = out / f"digit_{i}_class_{h.label}.png", out / f"digit_{i}_class_{h.label}.json"
        fig.savefig(png, dpi=120)
        js.write_text(h.to_json())
        written += [png, js]
    return written

"""Plots for attributions and interactions; every function returns a matplotlib Figure.

* ``attribution_heatmap``: one method's map over the image;
* ``compare_attributions``: several methods side by side (the ACD paper's comparison figure);
* ``interaction_matrix``: an S x S interaction matrix; ``top_interactions``: top-k pairs;
* ``summary_plot``: attributions of many inputs per feature, coloured by the feature's value
  (path_explain's / SHAP's summary plot).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def _np(a):
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=float)


def _figure(figsize):
    from matplotlib.figure import Figure
    return Figure(figsize=figsize)


def _image_2d(image):
    im = _np(image)
    if im.ndim == 4:
        im = im[0]
    if im.ndim == 3:  # (C, H, W) or (H, W, C)
        im = np.moveaxis(im, 0, -1) if im.shape[0] in (1, 3) else im
        im = im[..., 0] if im.shape[-1] == 1 else im
    if im.ndim == 3:
        lo, hi = im.min(), im.max()
        im = (im - lo) / (hi - lo + 1e-12)
    return im


def _heat(attr, index):
    heat = attr.heatmap()[index] if hasattr(attr, "heatmap") else _np(attr)
    heat = _np(heat)
    if heat.ndim == 3:
        heat = heat.sum(0)
    return heat


def _draw(ax, heat, image, alpha, cmap, title):
    lim = float(np.abs(heat).max()) or 1.0
    if image is not None:
        im = _image_2d(image)
        ax.imshow(im, cmap="gray" if im.ndim == 2 else None)
        mappable = ax.imshow(heat, cmap=cmap, vmin=-lim, vmax=lim, alpha=alpha)
    else:
        mappable = ax.imshow(heat, cmap=cmap, vmin=-lim, vmax=lim)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return mappable


def attribution_heatmap(attr, image=None, *, index: int = 0, alpha: float = 0.6, cmap: str = "RdBu_r",
                        title: str | None = None, figsize=(4, 4)):
    """Heatmap of an Attribution (or an (H, W) array) over ``image`` ((C, H, W), (H, W, C) or
    (H, W)); colours are symmetric around 0 (red: for the target, blue: against)."""
    fig = _figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    title = title if title is not None else getattr(attr, "method", None)
    m = _draw(ax, _heat(attr, index), image, alpha, cmap, title)
    fig.colorbar(m, ax=ax, fraction=0.046, pad=0.04)
    return fig


def compare_attributions(results: Mapping[str, object], image=None, *, index: int = 0,
                         alpha: float = 0.6, cmap: str = "RdBu_r", ncols: int | None = None,
                         panel_size: float = 2.6):
    """One panel per method (e.g. the dict from ``fastacd.attribution.compare``), the image first."""
    names = list(results)
    panels = len(names) + (image is not None)
    ncols = ncols or min(panels, 5)
    nrows = int(np.ceil(panels / ncols))
    fig = _figure((panel_size * ncols, panel_size * nrows))
    k = 1
    if image is not None:
        ax = fig.add_subplot(nrows, ncols, k)
        im = _image_2d(image)
        ax.imshow(im, cmap="gray" if im.ndim == 2 else None)
        ax.set_title("image")
        ax.set_xticks([])
        ax.set_yticks([])
        k += 1
    for name in names:
        ax = fig.add_subplot(nrows, ncols, k)
        _draw(ax, _heat(results[name], index), image, alpha, cmap, name)
        k += 1
    fig.tight_layout()
    return fig


def interaction_matrix(matrix, labels: Sequence[str] | None = None, *, cmap: str = "RdBu_r",
                       title: str = "interactions", show_diagonal: bool = True, figsize=(5, 4.5)):
    """An (S, S) interaction matrix (e.g. ``CDInteractions.matrix(c)`` or one input of
    ``integrated_hessians``); the diagonal (main effects) can be hidden."""
    m = _np(matrix).copy()
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square (S, S), got shape {m.shape}")
    if not show_diagonal:
        np.fill_diagonal(m, np.nan)
    fig = _figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def top_interactions(matrix, k: int = 10, labels: Sequence[str] | None = None, *,
                     title: str = "top interactions", figsize=(5, 4)):
    """Horizontal bars of the k pairs (i < j) with the largest |interaction|, signed."""
    m = _np(matrix)
    s = m.shape[0]
    iu, ju = np.triu_indices(s, 1)
    vals = m[iu, ju]
    order = np.argsort(-np.abs(vals))[:k][::-1]
    names = [f"{labels[i] if labels else i} x {labels[j] if labels else j}"
             for i, j in zip(iu[order], ju[order])]
    fig = _figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(order)), vals[order], color=["#d62728" if v > 0 else "#1f77b4" for v in vals[order]])
    ax.set_yticks(range(len(order)), names)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("interaction")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def summary_plot(attributions, feature_values=None, feature_names: Sequence[str] | None = None, *,
                 max_display: int = 20, cmap: str = "coolwarm", seed: int = 0, figsize=(6, 5)):
    """Attributions (N, F) of many inputs: one row per feature (most important on top, by mean
    |attribution|), one dot per input, coloured by the feature's value (N, F) when given."""
    a = _np(attributions).reshape(len(attributions), -1)
    v = None if feature_values is None else _np(feature_values).reshape(a.shape)
    order = np.argsort(np.abs(a).mean(0))[::-1][:max_display][::-1]
    rng = np.random.default_rng(seed)
    fig = _figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    sc = None
    for row, f in enumerate(order):
        y = row + rng.uniform(-0.3, 0.3, size=a.shape[0])
        if v is None:
            ax.scatter(a[:, f], y, s=8, color="#444444")
        else:
            col = v[:, f]
            lo, hi = np.nanpercentile(col, 5), np.nanpercentile(col, 95)
            sc = ax.scatter(a[:, f], y, s=8, c=np.clip((col - lo) / (hi - lo + 1e-12), 0, 1),
                            cmap=cmap, vmin=0, vmax=1)
    ax.set_yticks(range(len(order)), [feature_names[f] if feature_names else f"feature {f}" for f in order])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("attribution")
    if sc is not None:
        cb = fig.colorbar(sc, ax=ax)
        cb.set_ticks([0, 1], labels=["low", "high"])
        cb.set_label("feature value")
    fig.tight_layout()
    return fig

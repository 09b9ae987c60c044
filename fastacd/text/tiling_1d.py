"""Tiles over a sentence (drop-in for ``acd.util.tiling_1d``).

A tile is a column of token ids the model can read: for ``build_up`` and ``cd`` the
tile's words kept and 0 elsewhere; for ``occlusion`` the sentence with the tile's words
replaced by ``fill``. Same names and returns as the original; ``np.int`` (removed from
NumPy) is ``int`` here, and a (seq_len, 1) sentence works with any ``sweep_dim``.
"""
from __future__ import annotations

import numpy as np

METHODS = ("occlusion", "build_up", "cd")


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def gen_tiles(text, fill=0, method="occlusion", prev_text=None, sweep_dim=1):
    """All windows of ``sweep_dim`` words: returns (L - sweep_dim + 1, L) int token ids."""
    _check_method(method)
    text = np.asarray(text).reshape(-1)
    L = text.shape[0]
    if not 1 <= sweep_dim <= L:
        raise ValueError(f"sweep_dim must be in 1..{L} (the sentence length), got {sweep_dim}")
    texts = np.zeros((L - sweep_dim + 1, L), dtype=int)
    for start in range(L - sweep_dim + 1):
        end = start + sweep_dim
        if method == "occlusion":
            texts[start] = text
            texts[start, start:end] = fill
        else:
            texts[start, start:end] = text[start:end]
    return texts


def gen_tile_from_comp(text_orig, comp_tile, method, fill=0):
    """The tile of one component (boolean over positions), shaped like ``text_orig``."""
    _check_method(method)
    text_orig = np.asarray(text_orig)
    comp_tile = np.asarray(comp_tile, dtype=bool)
    if method == "occlusion":
        tile_new = np.copy(text_orig).flatten()
        tile_new[comp_tile] = fill
    else:
        tile_new = np.zeros(text_orig.shape)
        tile_new[comp_tile] = text_orig[comp_tile]
    return tile_new


def border_positions(comp_tile, sweep_dim=1):
    """The positions ``sweep_dim`` left of a component's first word and right of its last
    (clipped to the sentence): where the original tries to grow a component."""
    pos = np.flatnonzero(np.asarray(comp_tile).reshape(-1))
    if pos.size == 0:
        raise ValueError("the component is empty")
    L = np.asarray(comp_tile).reshape(-1).shape[0]
    return max(0, int(pos[0]) - sweep_dim), min(L - 1, int(pos[-1]) + sweep_dim)


def gen_tiles_around_baseline(text_orig, comp_tile, method="build_up", sweep_dim=1, fill=0):
    """Tiles of a component plus its left / right border word: ``(tiles (2, *text.shape),
    [left, right])``."""
    _check_method(method)
    text_orig = np.asarray(text_orig)
    comp_tile = np.asarray(comp_tile, dtype=bool)
    tiles = []
    lr = list(border_positions(comp_tile, sweep_dim))
    for x in lr:
        if method == "occlusion":
            tile_new = np.copy(text_orig).flatten()
            tile_new[comp_tile] = fill
            tile_new[x] = fill
        else:
            tile_new = np.zeros(text_orig.shape)
            tile_new[comp_tile] = text_orig[comp_tile]
            tile_new[x] = text_orig[x]
        tiles.append(tile_new)
    return np.array(tiles), lr


def tiles_to_cd(batch):
    """The original ``score_funcs.tiles_to_cd``: the (start, stop) phrase of each column of
    ``batch.text`` (build-up tiles, 0 = blank), read from its first and last non-zero id.

    Token id 0 inside a sentence is indistinguishable from a blank here; the agglomeration
    in ``fastacd.agg_1d`` tracks positions instead and does not use this.
    """
    tiles = getattr(batch, "text", batch)
    tiles = tiles.detach().cpu().numpy() if hasattr(tiles, "detach") else np.asarray(tiles)
    if tiles.ndim == 1:
        tiles = tiles[:, None]
    starts, stops = [], []
    for c in range(tiles.shape[1]):
        nz = np.flatnonzero(tiles[:, c])
        if nz.size == 0:
            raise ValueError(f"tile {c} has no non-zero token id: it selects no phrase")
        starts.append(int(nz[0]))
        stops.append(int(nz[-1]))
    return starts, stops

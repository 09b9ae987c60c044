"""Square tiles over an image: the original package's ``util.tiling_2d`` helpers.

Every tile, component and candidate of the agglomeration is a union of ``sweep_dim`` x
``sweep_dim`` tiles (the last row / column of tiles may be cut by the image border). The
grid has ``ceil(R / sweep_dim) x ceil(C / sweep_dim)`` tiles, numbered row-major.

What a "tile image" is depends on the method:

* ``cd``: a 0/1 mask of shape (R, C), 1 on the tile;
* ``build_up``: the image kept on the tile and 0 elsewhere (shape of the image);
* ``occlusion``: the image with the tile set to ``fill`` (shape of the image).

One deliberate difference from the original: ``combine_tiles`` returned ``None`` for
occlusion (the original agglomeration then crashed in its merge phase); here the union
of two occluded tiles is the image with both occluded.
"""
from __future__ import annotations

from math import ceil

import numpy as np

METHODS = ("cd", "occlusion", "build_up")


def grid_shape(image_shape, sweep_dim: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid."""
    return ceil(image_shape[0] / sweep_dim), ceil(image_shape[1] / sweep_dim)


def upsample(grid_mask: np.ndarray, sweep_dim: int, shape) -> np.ndarray:
    """A grid-level boolean mask as a pixel mask of shape ``shape[:2]`` (tiles cut at the border)."""
    big = np.repeat(np.repeat(np.asarray(grid_mask, dtype=bool), sweep_dim, 0), sweep_dim, 1)
    return big[:shape[0], :shape[1]]


def tile_image(im_orig: np.ndarray, pixel_mask: np.ndarray, method: str, fill=0) -> np.ndarray:
    """The image a method scores for a region given as an (R, C) pixel mask."""
    if method == "cd":
        return pixel_mask.astype(np.float64)
    m = pixel_mask if im_orig.ndim == 2 else pixel_mask[..., None]
    if method == "build_up":
        return np.where(m, im_orig, 0).astype(np.float64)
    if method == "occlusion":
        return np.where(m, fill, im_orig).astype(im_orig.dtype)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def gen_tiles(image, fill=0, method="occlusion", prev_im=None, sweep_dim=1, num_ims=None,
              im_num_start=0):
    """One image per tile, row-major; ``prev_im`` (a pixel mask) is added to every tile.

    ``num_ims`` / ``im_num_start`` select a window of the tiles, as in the original.
    """
    image = np.asarray(image)
    R, C = image.shape[:2]
    total = ceil(R / sweep_dim) * ceil(C / sweep_dim)
    if num_ims is None:
        num_ims = total
    shape = (R, C) if (image.ndim == 2 or method == "cd") else image.shape
    ims = np.empty((num_ims,) + tuple(shape))
    i = 0
    for rmin in range(0, R, sweep_dim):
        for cmin in range(0, C, sweep_dim):
            if im_num_start <= i < im_num_start + num_ims:
                mask = np.zeros((R, C), dtype=bool)
                mask[rmin:rmin + sweep_dim, cmin:cmin + sweep_dim] = True
                if prev_im is not None:
                    mask |= np.asarray(prev_im, dtype=bool)
                ims[i - im_num_start] = tile_image(image, mask, method, fill)
            i += 1
    return ims


def neighbour_tiles(grid_mask: np.ndarray) -> list[tuple[int, int]]:
    """Grid cells outside ``grid_mask`` that share an edge with it (4-way), row-major."""
    g = np.asarray(grid_mask, dtype=bool)
    near = np.zeros_like(g)
    near[1:] |= g[:-1]
    near[:-1] |= g[1:]
    near[:, 1:] |= g[:, :-1]
    near[:, :-1] |= g[:, 1:]
    return [tuple(int(v) for v in rc) for rc in np.argwhere(near & ~g)]


def gen_tiles_around_baseline(im_orig, comp_tile, fill=0, method="occlusion", sweep_dim=3):
    """Images of ``comp_tile`` (a pixel mask made of whole tiles) plus each 4-neighbouring tile.

    Returns (images (N, ...), [(row, col) of each added tile in the grid]).
    """
    im_orig = np.asarray(im_orig)
    comp_tile = np.asarray(comp_tile, dtype=bool)
    # the tile grid sampled at each tile's top-left pixel: the original's membership test
    grid = comp_tile[::sweep_dim, ::sweep_dim]
    ims, idxs = [], []
    for r, c in neighbour_tiles(grid):
        mask = comp_tile.copy()
        mask[r * sweep_dim:(r + 1) * sweep_dim, c * sweep_dim:(c + 1) * sweep_dim] = True
        ims.append(tile_image(im_orig, mask, method, fill))
        idxs.append((r, c))
    return np.array(ims), idxs


def gen_tile_from_comp(im_orig, comp_tile_downsampled, sweep_dim, method, fill=0):
    """The full-size tile image of a component given on the grid (boolean for ``cd``)."""
    im_orig = np.asarray(im_orig)
    mask = upsample(comp_tile_downsampled, sweep_dim, im_orig.shape)
    if method == "cd":
        return mask
    return tile_image(im_orig, mask, method, fill)


def combine_tiles(tile1, tile2, method="cd", im_orig=None, fill=0):
    """The union of two tile images.

    ``cd`` and ``build_up``: their sum (the tiles are disjoint). ``occlusion``: the image with
    both regions occluded: the pixels where either tile differs from ``im_orig`` take ``fill``.
    Without ``im_orig``, a pixel occluded in one tile is the pixel of that tile (equal to
    ``fill``), which gives the same image whenever the image itself is not ``fill`` there.
    """
    if method != "occlusion":
        return tile1 + tile2
    if im_orig is None:  # keep each tile's occluded pixels: min distance from fill wins
        return np.where(tile1 == fill, tile1, tile2)
    occluded = (tile1 != im_orig) | (tile2 != im_orig)
    return np.where(occluded, fill, im_orig)

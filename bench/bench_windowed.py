"""Windowed propagation (``Decomposer.cd_delta``): CD cost per ACD candidate vs a plain forward.

    .venv/bin/python -m pytest bench/bench_windowed.py -q -s
    .venv/bin/python bench/bench_windowed.py

Settings: random-init torchvision VGG16 (1000 classes, float32, eval), one 224x224 image
(random normal, seed 0), 16x16 grid of 14x14 tiles (``sweep_dim=14``), ``ACD_BENCH_THREADS``
threads (default 1: on the shared 2-core box, 2-thread OpenMP stalls ~10 ms on every small op
while other jobs hold the second core; the forward baseline runs with the same setting).

Figures (bench/results/windowed.json, case ``vgg16_224_sweep14``):

* ``forward_per_image_s``: the best plain forward time per image over batches 1, 8 and 64
  (``forward_b{1,8,64}_per_image_s``; batch 1 and 8 best of 3 after a warm-up, batch 64 one
  run after those);
* ``tiles_*``: the first ACD step, all 256 single tiles (base = empty mask) in one
  ``cd_delta`` call; ``per_candidate_s`` includes the total pass and the base pass;
* ``comp_tile_*``: a 3x3-tile component plus each of its 12 neighbouring tiles (one
  ``cd_delta`` call; per candidate including the total and the base pass, as ACD pays it
  minus the component's own score, which that base pass also gives);
* ``iteration_*``: what one ACD iteration asks for: 4 components (3x3 tiles) each scored
  alone and with each of its 12 neighbouring tiles (52 masks), in one ``cd_groups`` call
  (one total pass; each component is the base of its tiles and read from its base pass), vs
  ``iteration_full_*``: the same 52 masks through ``Decomposer.cd`` (``iteration_speedup``);
* ``full_*``: the ordinary batched path (``Decomposer.cd``) on 16 of the single tiles;
* ``*_ratio``: per-candidate time / ``forward_per_image_s`` (goal for the windowed ones: <= 0.3);
* ``max_rel_err``: windowed vs ordinary path on the tiles both scored, relative to the largest
  score (float32).
"""
from __future__ import annotations

import os
import time

import torch
import torchvision

from _results import best_time, record

import fastacd
from fastacd.engine import windowed

THREADS = int(os.environ.get("ACD_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
SUITE = "windowed"
TILE, SIZE = 14, 224


def _setup():
    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return model, x


def _tile(i: int, j: int) -> torch.Tensor:
    m = torch.zeros(SIZE, SIZE)
    m[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE] = 1
    return m


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench() -> dict:
    model, x = _setup()
    dec = fastacd.Decomposer(model)
    n = SIZE // TILE
    fig: dict = {"backend": dec.backend, "window_max_fraction": windowed.WINDOW_MAX_FRACTION,
                 "threads": THREADS}
    with torch.no_grad():
        fwd = {}
        for b in (1, 8):
            xb = x.expand(b, -1, -1, -1).contiguous()
            fwd[b] = best_time(lambda: model(xb), repeats=3, warmup=1) / b
        xb = x.expand(64, -1, -1, -1).contiguous()
        fwd[64] = best_time(lambda: model(xb), repeats=1, warmup=0) / 64
        for b, t in fwd.items():
            fig[f"forward_b{b}_per_image_s"] = t
        forward = min(fwd.values())
        fig["forward_per_image_s"] = forward

        tiles = torch.stack([_tile(i, j) for i in range(n) for j in range(n)])
        empty = torch.zeros(SIZE, SIZE)
        info: dict = {}
        res, t = _timed(lambda: dec.cd_delta(x, empty, tiles, stats=info))
        fig.update(tiles_masks=len(tiles), tiles_s=t, tiles_per_candidate_s=t / len(tiles),
                   tiles_ratio=t / len(tiles) / forward, tiles_windowed=info["windowed"],
                   tiles_estimated_cost_ratio=info["cost_ratio"])

        comp = torch.zeros(SIZE, SIZE)
        comp[6 * TILE:9 * TILE, 6 * TILE:9 * TILE] = 1
        neigh = [(5, 6), (5, 7), (5, 8), (9, 6), (9, 7), (9, 8), (6, 5), (7, 5), (8, 5), (6, 9), (7, 9), (8, 9)]
        deltas = torch.stack([_tile(i, j) for i, j in neigh])
        info = {}
        res_c, t = _timed(lambda: dec.cd_delta(x, comp, deltas, stats=info))
        fig.update(comp_tile_masks=len(deltas), comp_tile_s=t, comp_tile_per_candidate_s=t / len(deltas),
                   comp_tile_ratio=t / len(deltas) / forward, comp_tile_windowed=info["windowed"],
                   comp_tile_estimated_cost_ratio=info["cost_ratio"])

        jobs, masks = [], []
        for ci, cj in ((2, 2), (2, 10), (10, 3), (9, 9)):
            c = torch.zeros(SIZE, SIZE)
            c[ci * TILE:(ci + 3) * TILE, cj * TILE:(cj + 3) * TILE] = 1
            around = [(ci - 1, cj + k) for k in range(3)] + [(ci + 3, cj + k) for k in range(3)] + \
                     [(ci + k, cj - 1) for k in range(3)] + [(ci + k, cj + 3) for k in range(3)]
            d = torch.stack([_tile(i, j) for i, j in around])
            jobs.append((c, d, True))
            masks += [c[None], torch.maximum(c, d)]
        masks = torch.cat(masks)
        (groups, _), t = _timed(lambda: windowed.cd_groups(dec, x, jobs))
        _, t_full = _timed(lambda: dec.cd(x, masks))
        fig.update(iteration_masks=len(masks), iteration_s=t, iteration_per_candidate_s=t / len(masks),
                   iteration_ratio=t / len(masks) / forward, iteration_full_s=t_full,
                   iteration_full_ratio=t_full / len(masks) / forward, iteration_speedup=t_full / t)

        sub = list(range(0, 256, 16))
        full, t = _timed(lambda: dec.cd(x, tiles[sub]))
        fig.update(full_masks=len(sub), full_s=t, full_per_candidate_s=t / len(sub),
                   full_ratio=t / len(sub) / forward)
        full_c = dec.cd(x, torch.maximum(comp, deltas))
    scale = float(full.relevant.abs().max())
    err = float((res.relevant[sub] - full.relevant).abs().max()) / scale
    err_c = float((res_c.relevant - full_c.relevant).abs().max()) / float(full_c.relevant.abs().max())
    fig["max_rel_err"] = max(err, err_c)
    record(SUITE, "vgg16_224_sweep14", **fig)
    print(f"\nforward {forward:.3f} s/image (b1 {fwd[1]:.3f}, b8 {fwd[8]:.3f}, b64 {fwd[64]:.3f}); "
          f"tiles {fig['tiles_ratio']:.3f}, component+tile {fig['comp_tile_ratio']:.3f}, "
          f"iteration {fig['iteration_ratio']:.3f} (full path {fig['iteration_full_ratio']:.3f}), "
          f"full path {fig['full_ratio']:.3f} forwards per candidate; max rel err {fig['max_rel_err']:.1e}")
    return fig


def test_windowed_vgg16_224():
    fig = bench()
    assert fig["max_rel_err"] < 1e-4


if __name__ == "__main__":
    bench()

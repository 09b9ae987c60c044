"""Reference agglomeration: the published ACD algorithm for images, step by step.

Every candidate is built as a full-size image or mask with the tiling helpers and scored
on its own: ``fastacd.reference.cd`` for ``cd`` (one mask per call, the reference CD
arithmetic), ``pred_ims`` one image at a time for ``occlusion`` / ``build_up``. Nothing is
cached or batched. The only departures from the original package are its crash fixes
(docs/hierarchies.md): unlimited component numbers in the correspondence step, a stop when
every tile is selected, the occlusion merge phase (union = both occluded), the percentile
never below 0, and ``device`` honoured. This is the oracle ``fastacd.agg_2d`` is tested
against.
"""
from __future__ import annotations

from math import ceil

import numpy as np
import torch
from skimage import measure

from ..image import tiling_2d as tiling
from ..image.steps import (check_args, establish_correspondence, is_batched, logits_module,
                           prepare_model_input, refine_scores, smooth_im_thresh, threshold_scores)
from .cd import captured, cd as reference_cd


class _OneAtATime:
    """``get_scores_2d`` of the original: one model call per image or mask."""

    def __init__(self, model, method, im_torch, pred_ims, pred_ims_batched):
        self.model, self.method, self.x = model, method, im_torch
        self.pred_ims, self.batched = pred_ims, pred_ims_batched
        self.calls = 0
        self._logits = None

    def pred(self, im):
        """The model's class scores for one numpy image (``pred_ims``), or for the input with
        ``im`` as a 0/1 keep-mask when no ``pred_ims`` was given."""
        self.calls += 1
        if self.pred_ims is None:
            if self._logits is None:
                self._logits = logits_module(captured(self.model))
            x = self.x
            if isinstance(im, str):
                inp = x
            else:
                inp = (x[0] * torch.from_numpy(np.asarray(im)).to(x))[None]
            with torch.no_grad():
                out = self._logits(inp)
            return out.detach().cpu().numpy()[0]
        if self.batched:
            out = self.pred_ims(self.model, np.asarray(im)[None])
        else:
            out = self.pred_ims(self.model, im)
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        return np.asarray(out)[0]

    def scores(self, ims, method=None) -> np.ndarray:
        method = method or self.method
        rows = []
        for im in ims:
            if method == "cd":
                self.calls += 1
                with torch.no_grad():
                    rel, _ = reference_cd(self.model, self.x, torch.from_numpy(np.asarray(im, dtype=np.float64)))
                rows.append(rel[0].detach().cpu().numpy())
            else:
                rows.append(self.pred(im))
        rows = np.array(rows).reshape(len(ims), -1)
        return -1 * rows if method == "occlusion" else rows


def _input_space_image(im_orig_shape, pixel_mask, method):
    """Without ``pred_ims`` the candidates live in input space: a keep-mask on ``im_torch``."""
    return pixel_mask.astype(np.float64) if method == "build_up" else 1.0 - pixel_mask


def agglomerate(model, pred_ims, percentile_include, method, sweep_dim, im_orig, lab_num,
                num_iters=5, im_torch=None, model_type="mnist", device=None, *,
                pred_ims_batched=None, stats=None):
    """The reference ACD for one image; same arguments and result as ``fastacd.agg_2d.agglomerate``."""
    del model_type
    im_orig = np.asarray(im_orig)
    check_args(method, percentile_include, sweep_dim, im_orig.shape[:2], num_iters)
    model, x = prepare_model_input(model, im_torch, device, im_orig.shape[:2])
    model.eval()
    if x is not None:
        x = x.to(next(model.parameters()).dtype)
    S = _OneAtATime(model, method, x, pred_ims, is_batched(pred_ims, pred_ims_batched))
    input_space = method != "cd" and pred_ims is None
    R, C = im_orig.shape[:2]
    size_downsampled = (ceil(R / sweep_dim), ceil(C / sweep_dim))

    def comp_image(grid_mask):
        if input_space:
            return _input_space_image(im_orig.shape, tiling.upsample(grid_mask, sweep_dim, (R, C)), method)
        return tiling.gen_tile_from_comp(im_orig, grid_mask, sweep_dim, method)

    # 1. every tile alone
    if input_space:
        tiles = [comp_image(m.reshape(size_downsampled)) for m in np.eye(np.prod(size_downsampled), dtype=bool)]
    else:
        tiles = tiling.gen_tiles(im_orig, fill=0, method=method, sweep_dim=sweep_dim)
    scores_orig_raw = S.scores(tiles)
    n = scores_orig_raw.shape[1]
    if isinstance(lab_num, bool) or not (isinstance(lab_num, (int, np.integer)) and 0 <= lab_num < n):
        raise ValueError(f"lab_num must be a class index in 0..{n - 1}, got {lab_num!r}")
    scores_track = np.copy(refine_scores(scores_orig_raw, lab_num)).reshape(size_downsampled)
    im_thresh = threshold_scores(scores_track, percentile_include, method)

    scores_list, im_thresh_list, comps_list = [np.copy(scores_track)], [im_thresh], []
    if method == "cd":
        full = S.scores([np.ones((R, C))])[0]
    else:
        full = S.pred("full" if input_space else im_orig)
    comp_scores_raw_list = [{0: full}]
    comp_scores_raw_combined_list = []

    # 2. grow the selection
    for step in range(num_iters):
        if np.all(im_thresh_list[-1]):
            break
        comps = np.copy(measure.label(im_thresh_list[-1], background=0, connectivity=2))
        if step > 0:
            comps = establish_correspondence(comps_list[-1], comps)
        comp_nums = np.unique(comps)
        comp_nums = comp_nums[comp_nums > 0]

        comp_tiles, surround, surround_idxs = {}, {}, {}
        combined = np.zeros((R, C) if method == "cd" or input_space else im_orig.shape)
        for k in comp_nums:
            comp_tiles[k] = comp_image(comps == k)
            binary = tiling.gen_tile_from_comp(im_orig, comps == k, sweep_dim, "cd")
            combined += comp_tiles[k]
            if input_space:
                idxs = tiling.neighbour_tiles(comps == k)
                ims = []
                for r, c in idxs:
                    g = comps == k
                    g[r, c] = True
                    ims.append(comp_image(g))
                surround[k], surround_idxs[k] = ims, idxs
            else:
                surround[k], surround_idxs[k] = tiling.gen_tiles_around_baseline(
                    im_orig, binary, method=method, sweep_dim=sweep_dim)

        comp_scores_raw_dict = {}
        for k in comp_nums:
            scores_raw = S.scores([comp_tiles[k], combined] + list(surround[k]))
            score_comp = np.copy(refine_scores(scores_raw, lab_num)[0])
            scores_tiles = np.copy(refine_scores(scores_raw, lab_num)[2:])
            comp_scores_raw_dict[k] = np.copy(scores_raw[0])
            score_combined = np.copy(scores_raw[1])
            for (r, c), s in zip(surround_idxs[k], scores_tiles):
                scores_track[r, c] = np.max(s - score_comp)

        scores_track[im_thresh_list[-1]] = np.nan
        im_thresh = threshold_scores(scores_track, percentile_include, method)
        scores_list.append(np.copy(scores_track))
        im_thresh_list.append(smooth_im_thresh(im_thresh_list[-1], im_thresh))
        comps_list.append(comps)
        comp_scores_raw_list.append(comp_scores_raw_dict)
        comp_scores_raw_combined_list.append(score_combined)

    comps_list = [np.zeros(im_orig.shape)] + comps_list
    lists = {"scores_list": scores_list, "im_thresh_list": im_thresh_list, "comps_list": comps_list,
             "comp_scores_raw_list": comp_scores_raw_list,
             "comp_scores_raw_combined_list": comp_scores_raw_combined_list,
             "scores_orig_raw": scores_orig_raw, "num_before_final": len(im_thresh_list)}

    # 3. merge the components pair by pair
    while np.unique(lists["comps_list"][-1]).size > 2:
        comps = np.copy(lists["comps_list"][-1])
        raw = {k: np.copy(v) for k, v in lists["comp_scores_raw_list"][-1].items()}
        nums = [k for k in np.unique(comps) if k > 0]
        tiles = {k: comp_image(comps == k) for k in nums}
        best, best_pair, best_row = -np.inf, None, None
        for a in nums:
            for b in nums:
                if not 0 < a < b:
                    continue
                if input_space:  # keep-masks: build-up adds, occlusion multiplies
                    both = tiles[a] + tiles[b] if method == "build_up" else tiles[a] * tiles[b]
                else:
                    both = tiling.combine_tiles(tiles[a], tiles[b], method, im_orig=im_orig)
                scores_raw = S.scores([1.0 * both])
                diff = np.copy(refine_scores(scores_raw, lab_num)[0]) - max(raw[a][lab_num], raw[b][lab_num])
                if diff > best:
                    best, best_pair, best_row = diff, (a, b), np.copy(scores_raw[0])
        a, b = best_pair
        comps[comps == b] = a
        raw[a] = best_row
        raw.pop(b)
        lists["comps_list"].append(comps)
        lists["comp_scores_raw_list"].append(raw)
        lists["scores_list"].append(lists["scores_list"][-1])
        lists["im_thresh_list"].append(lists["im_thresh_list"][-1])
        lists["comp_scores_raw_combined_list"].append(lists["comp_scores_raw_combined_list"][-1])
    if stats is not None:
        stats.update(calls=S.calls)
    return lists

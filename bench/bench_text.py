"""Text CD and 1-D agglomeration: fastacd vs the one-phrase reference and the original
``acd`` package (``acd==0.0.2``).

    .venv/bin/python -m pytest bench/bench_text.py -q -s

Figures (bench/results/text.json), ratios taken in the same run, the contenders
interleaved (every repeat runs each of them):
* ``agglomerate_1d_15_words``: ``agg_1d.agglomerate`` (method ``cd``, percentile 50,
  5 iterations) on a 15-word sentence, over ``fastacd.reference.agglomerate_1d`` (one
  ``cd_text`` per phrase) and over the original package's ``agg_1d.agglomerate``; the
  hierarchies are checked to be identical first. ``*_over_fast`` uses the best wall time
  of each, ``*_over_fast_cpu`` the best CPU time of the calling thread,
  ``*_over_fast_cpu_median`` the median CPU times (the least sensitive to other
  processes on a shared machine: a 0.4 s run is interrupted far more often than a 10 ms
  one, which biases best-of wall ratios upward).
* ``all_phrases_40_tokens``: CD of all 820 phrases of a 40-token sentence in one call
  (``cd_text_phrases``) over a loop of the reference ``cd_text`` (checked to agree), and
  over the original's ``cd_text`` loop (every 10th phrase, scaled).
* ``backend_torch_over_compiled``: one engine call on the general path with the
  pure-torch cell over the same with the compiled ``fastacd.ops.lstm_cd_cell`` (when the
  extension is built), and the default one-layer fast path (``backend="auto"``) against
  both: 4 phrases of a 15-word sentence (an agglomeration step) and the 820 of 40 tokens.

The model is the paper's sentiment LSTM shape (300-d embeddings, 128 hidden units, two
classes), random-initialised, float32 weights (CD arithmetic in float64, as the original).
One torch thread: text CD is a chain of small (M x 128) ops, which a second thread does not
speed up, and on a shared, oversubscribed 2-core machine spinning OpenMP / MKL worker
threads made every op 10-40x slower (the original's numpy code is single-threaded too).
The original package is the installed ``acd`` (or ``$ACD_ORIG``, an unpacked
``acd==0.0.2`` wheel), with ``np.int`` restored for it; it is skipped when absent.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from _results import record
from fastacd import agg_1d
from fastacd import text as ft
from fastacd.reference import text as rt

torch.set_num_threads(1)
SUITE = "text"


class SentimentNet(nn.Module):
    """The ACD paper's text model shape: .embed, .lstm, .hidden_to_label, .hidden_dim."""

    def __init__(self, vocab=2000, embed=300, hidden=128):
        super().__init__()
        torch.manual_seed(0)
        self.hidden_dim = hidden
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden)
        self.hidden_to_label = nn.Linear(hidden, 2)
        with torch.no_grad():
            self.hidden_to_label.weight.mul_(10)

    def forward(self, batch):
        out, _ = self.lstm(self.embed(batch.text))
        return self.hidden_to_label(out[-1])


def _original():
    if not hasattr(np, "int"):
        np.int = int  # the original uses np.int, removed from NumPy 1.24+
    path = os.environ.get("ACD_ORIG", "/tmp/acdorig")
    added = os.path.isdir(os.path.join(path, "acd"))
    if added:
        sys.path.insert(0, path)
    try:
        import acd
        if not hasattr(acd, "cd_text") or not hasattr(acd, "agg_1d"):
            return None       # not the original package
        return acd
    except Exception:
        return None
    finally:
        if added:
            sys.path.remove(path)


def _timed(fns: dict, repeats: int, inner: dict | None = None) -> dict:
    """Wall and thread-CPU seconds of each function, the functions run in turn each repeat
    (``inner[k]`` runs of function k per repeat): ``{k: (best wall, best cpu, median cpu)}``."""
    walls = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            for _ in range((inner or {}).get(k, 1)):
                w, c = time.perf_counter(), time.thread_time()
                fn()
                cpus[k].append(time.thread_time() - c)
                walls[k].append(time.perf_counter() - w)
    return {k: (min(walls[k]), min(cpus[k]), float(np.median(cpus[k]))) for k in fns}


def _sentence(T, seed=0):
    return ft.Batch(torch.randint(1, 2000, (T,), generator=torch.Generator().manual_seed(seed)))


def _same(a, b):
    return (len(a["mask_list"]) == len(b["mask_list"])
            and all(np.array_equal(x, y) for x, y in zip(a["mask_list"], b["mask_list"]))
            and all(np.array_equal(x, y) for x, y in zip(a["comps_list"], b["comps_list"])))


def test_agglomerate_1d_15_words(benchmark):
    model = SentimentNet().eval()
    batch = _sentence(15)
    fns = {"fast": lambda: agg_1d.agglomerate(model, batch, 50, "cd", 1, 0),
           "reference": lambda: rt.agglomerate_1d(model, batch, 50, "cd", 1, 0)}
    acd = _original()
    if acd is not None:
        fns["original"] = lambda: acd.agg_1d.agglomerate(model, ft.Batch(batch.text.clone()), 50,
                                                         "cd", 1, 0, device="cpu")
    out = {k: fn() for k, fn in fns.items()}   # also the warm-up
    figures = {"words": 15, "levels": len(out["fast"]["mask_list"]),
               "same_hierarchy_as_reference": _same(out["fast"], out["reference"])}
    assert figures["same_hierarchy_as_reference"]
    if acd is not None:
        figures["same_hierarchy_as_original"] = _same(out["fast"], out["original"])
    best = _timed(fns, repeats=7, inner={"fast": 20})
    for k, (wall, cpu, cpu_med) in best.items():
        figures[f"{k}_s"], figures[f"{k}_cpu_s"], figures[f"{k}_cpu_median_s"] = wall, cpu, cpu_med
        if k != "fast":
            figures[f"{k}_over_fast"] = wall / best["fast"][0]
            figures[f"{k}_over_fast_cpu"] = cpu / best["fast"][1]
            figures[f"{k}_over_fast_cpu_median"] = cpu_med / best["fast"][2]
    record(SUITE, "agglomerate_1d_15_words", **figures)
    print(figures)
    benchmark.pedantic(fns["fast"], rounds=3, warmup_rounds=1)


def test_all_phrases_40_tokens(benchmark):
    model = SentimentNet().eval()
    batch = _sentence(40, seed=1)
    phrases = ft.all_phrases(40)
    fast = lambda: ft.cd_text_phrases(batch, model, phrases)  # noqa: E731
    got = fast()[0]
    best = _timed({"fast": fast}, repeats=5)
    t0, c0 = time.perf_counter(), time.thread_time()
    expected = np.array([rt.cd_text(batch, model, s, e) for s, e in phrases])
    t_loop, c_loop = time.perf_counter() - t0, time.thread_time() - c0
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    figures = {"phrases": len(phrases), "fast_s": best["fast"][0], "fast_cpu_s": best["fast"][1],
               "reference_loop_s": t_loop, "reference_loop_cpu_s": c_loop,
               "reference_over_fast": t_loop / best["fast"][0],
               "reference_over_fast_cpu": c_loop / best["fast"][1],
               "max_rel_diff_vs_reference": float(np.abs(got - expected).max()
                                                  / np.abs(expected).max())}
    acd = _original()
    if acd is not None:
        # the original's loop on every 10th phrase, scaled to all of them (one call per phrase)
        sub = phrases[::10]
        t0, c0 = time.perf_counter(), time.thread_time()
        orig = np.array([acd.cd_text(batch, model, s, e) for s, e in sub])
        t_orig = (time.perf_counter() - t0) * len(phrases) / len(sub)
        c_orig = (time.thread_time() - c0) * len(phrases) / len(sub)
        figures.update(original_loop_s_est=t_orig, original_over_fast=t_orig / best["fast"][0],
                       original_loop_cpu_s_est=c_orig,
                       original_over_fast_cpu=c_orig / best["fast"][1],
                       original_max_rel_diff=float(np.abs(orig - got[::10]).max()
                                                   / np.abs(got).max()))
    record(SUITE, "all_phrases_40_tokens", **figures)
    print(figures)
    benchmark.pedantic(fast, rounds=3, warmup_rounds=1)


def test_backend_torch_over_compiled(benchmark):
    from fastacd import ops
    if not getattr(ops, "HAS_COMPILED", False):
        pytest.skip("compiled extension not built")
    model = SentimentNet().eval()
    figures = {}
    for T, phrases in ((15, [(3, 5), (2, 5), (3, 6), (9, 9)]), (40, ft.all_phrases(40))):
        batch = _sentence(T, seed=1)
        decs = {b: ft.TextDecomposer(model.embed, model.lstm, model.hidden_to_label,
                                     dtype=torch.float64, backend=b)
                for b in ("torch", "compiled", "auto")}
        with torch.no_grad():
            sent = decs["auto"].prepare(batch)
            best = _timed({b: (lambda d=d: d.cd(sent, phrases=phrases)) for b, d in decs.items()},
                          repeats=5 if T == 40 else 30)
        key = f"T{T}_M{len(phrases)}"
        figures.update({f"{key}_torch_s": best["torch"][0],
                        f"{key}_compiled_s": best["compiled"][0],
                        f"{key}_fast_path_s": best["auto"][0],
                        f"{key}_torch_over_compiled": best["torch"][0] / best["compiled"][0],
                        f"{key}_compiled_over_fast_path": best["compiled"][0] / best["auto"][0],
                        f"{key}_torch_over_fast_path": best["torch"][0] / best["auto"][0]})
    record(SUITE, "backend_torch_over_compiled", **figures)
    print(figures)
    benchmark.pedantic(lambda: None, rounds=1)

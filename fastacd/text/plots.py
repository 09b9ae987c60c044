"""A 1-D hierarchy as JSON and as the paper's sentiment figure."""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np


def text_hierarchy(lists: dict, words: Sequence[str] | None = None) -> dict:
    """A JSON-ready form of a 1-D hierarchy (``agg_1d.agglomerate``, collapsed or not).

    Returns ``{"words": [...], "score_orig": float, "levels": [[{"start", "stop",
    "positions", "words", "score"}, ...], ...]}``: one list of phrases per level. Level 0
    lists every word with its score from the first sweep (``scores_list[0]``); level k > 0
    the components of ``comps_list[k]`` with their scores (``comp_scores_list[k]``).
    """
    comps_list = lists["comps_list"]
    n = len(comps_list[0])
    words = [str(w) for w in (words if words is not None else range(n))]
    if len(words) != n:
        raise ValueError(f"{len(words)} words for a hierarchy over {n} tokens")
    word_scores = lists.get("scores_list", [None])[0]
    levels = []
    for lv, (comps, comp_scores) in enumerate(zip(comps_list, lists["comp_scores_list"])):
        comps = np.asarray(comps)
        phrases = []
        if lv == 0 and word_scores is not None:
            # level 0: every word with its own score (the first sweep); multi-word phrases
            # that collapse_tree put on level 0 follow
            phrases = [{"start": p, "stop": p, "positions": [p], "words": words[p],
                        "score": float(word_scores[p])} for p in range(n)]
            comps = np.where(np.bincount(comps, minlength=comps.max() + 1)[comps] > 1, comps, 0)
        for num in sorted(int(k) for k in np.unique(comps) if k > 0):
            pos = np.flatnonzero(comps == num)
            score = comp_scores.get(num)
            phrases.append({"start": int(pos.min()), "stop": int(pos.max()),
                            "positions": pos.tolist(),
                            "words": " ".join(words[p] for p in pos),
                            "score": None if score is None else float(np.asarray(score))})
        levels.append(phrases)
    return {"words": words, "score_orig": float(np.asarray(lists["score_orig"])),
            "levels": levels}


def text_hierarchy_json(lists: dict, words: Sequence[str] | None = None, **kwargs) -> str:
    return json.dumps(text_hierarchy(lists, words), **kwargs)


def plot_text_hierarchy(lists: dict, words: Sequence[str], cmap: str = "RdBu", ax=None,
                        vmax: float | None = None):
    """Plot a 1-D hierarchy like the paper's sentiment figure: one row per level, each
    phrase a box around its words, coloured by its score (red negative, blue positive).

    Returns the matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    h = text_hierarchy(lists, words)
    levels = [lv for lv in h["levels"] if lv]
    scores = [p["score"] for lv in levels for p in lv if p["score"] is not None]
    vmax = vmax or max([abs(s) for s in scores] + [1e-12])
    norm, cm = Normalize(-vmax, vmax), plt.get_cmap(cmap)
    n = len(h["words"])
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * n), 0.5 * len(levels) + 1.0))
    else:
        fig = ax.figure
    for row, lv in enumerate(levels):
        y = len(levels) - 1 - row
        for p in lv:
            color = cm(norm(p["score"])) if p["score"] is not None else (0.9, 0.9, 0.9, 1)
            ax.add_patch(plt.Rectangle((p["start"], y + 0.1), p["stop"] - p["start"] + 1, 0.8,
                                       facecolor=color, edgecolor="k", linewidth=0.5))
            dark = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] < 0.5
            for pos in p["positions"]:
                ax.text(pos + 0.5, y + 0.5, h["words"][pos], ha="center", va="center",
                        fontsize=9, color="white" if dark else "black")
    ax.set_xlim(0, n)
    ax.set_ylim(0, max(len(levels), 1))
    ax.set_yticks([len(levels) - 1 - r + 0.5 for r in range(len(levels))])
    ax.set_yticklabels([f"level {r}" for r in range(len(levels))])
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cm), ax=ax, label="CD score")
    fig.tight_layout()
    return fig

"""fastacd: fast, faithful Contextual Decomposition (CD) and Agglomerative CD for PyTorch.

The package follows the pipeline: ``capture`` (trace a model, one rule per op) -> ``rules``
-> ``engine`` (batched and windowed passes) -> ``image`` / ``text`` (hierarchies) ->
``cli`` (``fastacd run``); ``reference`` is the pure-torch oracle, ``attribution`` the
baselines and interactions, ``train`` the CD penalties (CDEP).

``import fastacd as acd`` keeps the original package's names: ``cd``, ``cd_text``,
``agg_2d.agglomerate``, ``agg_1d.agglomerate`` / ``collapse_tree``, ``tiling_2d``,
``tiling_1d`` and the ``score_funcs`` functions at the top level, as ``acd`` has them.

The modern API sits beside it: ``Decomposer`` (trace once, many masks per call),
``hierarchy`` -> ``Hierarchy`` (image ACD as a tree with JSON and plots), ``TextDecomposer``,
``attribute`` / ``compare`` (attribution baselines), ``PathExplainer`` / ``cd_interactions``
(interactions) and ``cdep`` (CD penalties for training).
"""
import sys as _sys

from ._version import __version__  # noqa: F401
from .api import build_info, cd, decomposer_for  # noqa: F401
from .engine import BACKENDS, CDResult, Decomposer, available_backends  # noqa: F401
from .capture import UnsupportedOpError  # noqa: F401
from . import reference, rules  # noqa: F401
from .engine import decomposer as _decomposer
from .rules import RuleSet, register_rule  # noqa: F401

# the original package's modules and top-level functions (drop-in)
from .image import agg_2d, tiling_2d  # noqa: F401
from .text import agg_1d, tiling_1d  # noqa: F401
from .attribution import score_funcs  # noqa: F401
from .attribution.score_funcs import (get_scores_1d, get_scores_2d,  # noqa: F401
                                      gradient_times_input_scores, ig_scores_1d, ig_scores_2d,
                                      tiles_to_cd)
from .text import TextDecomposer, cd_text, cd_text_phrases  # noqa: F401
from .rules.recurrent import propagate_tanh_two, propagate_three  # noqa: F401

# the modern API
from . import attribution, text  # noqa: F401
from .attribution import Attribution, attribute, compare, interactions  # noqa: F401
from .attribution.interactions import CDInteractions, PathExplainer, cd_interactions  # noqa: F401
from .image import plots  # noqa: F401
from .image.hierarchy import Hierarchy, Node, hierarchy  # noqa: F401
from .train import cdep  # noqa: F401
from .train.cdep import CDEPPenalty, cdep_score  # noqa: F401

# ``import fastacd.agg_2d`` and ``from fastacd.agg_2d import ...`` keep working for the
# original's module names (and the earlier flat layout's public ones): the modules live in
# the pipeline's packages, registered here under their short names too.
for _name, _module in {"agg_2d": agg_2d, "tiling_2d": tiling_2d, "agg_1d": agg_1d,
                       "tiling_1d": tiling_1d, "score_funcs": score_funcs, "cdep": cdep,
                       "interactions": interactions, "plots": plots}.items():
    _sys.modules[f"{__name__}.{_name}"] = _module

# the engine's reference backend is the oracle; neither package imports the other
_decomposer.use_reference(reference.cd_relevant_input)


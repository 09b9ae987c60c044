"""fastacd: fast, faithful Contextual Decomposition (CD) and Agglomerative CD for PyTorch.

``import fastacd as acd`` keeps the original package's names: ``cd``, ``cd_text``,
``agg_2d.agglomerate``, ``agg_1d.agglomerate`` / ``collapse_tree``, ``tiling_2d``,
``tiling_1d`` and the ``score_funcs`` functions at the top level, as ``acd`` has them.

The modern API sits beside it: ``Decomposer`` (trace once, many masks per call),
``hierarchy`` -> ``Hierarchy`` (image ACD as a tree with JSON and plots), ``TextDecomposer``,
``attribute`` / ``compare`` (attribution baselines), ``PathExplainer`` / ``cd_interactions``
(interactions) and ``cdep`` (CD penalties for training).
"""
from .api import cd, decomposer_for  # noqa: F401
from .engine import BACKENDS, CDResult, Decomposer, available_backends  # noqa: F401
from .graph import UnsupportedOpError, register_rule  # noqa: F401
from . import reference  # noqa: F401

# the original package's modules and top-level functions (drop-in)
from . import agg_1d, agg_2d, score_funcs, tiling_1d, tiling_2d  # noqa: F401
from .score_funcs import (get_scores_1d, get_scores_2d, gradient_times_input_scores,  # noqa: F401
                          ig_scores_1d, ig_scores_2d, tiles_to_cd)
from .text import TextDecomposer, cd_text, cd_text_phrases  # noqa: F401
from .reference.text import propagate_tanh_two, propagate_three  # noqa: F401

# the modern API
from . import attribution, cdep, interactions, plots  # noqa: F401
from .attribution import Attribution, attribute, compare  # noqa: F401
# ``fastacd.hierarchy`` is the function; its module stays importable as ``fastacd.hierarchy``
# through ``from fastacd.hierarchy import ...`` (sys.modules)
from .hierarchy import Hierarchy, Node, hierarchy  # noqa: F401
from .interactions import CDInteractions, PathExplainer, cd_interactions  # noqa: F401
from .cdep import CDEPPenalty, cdep_score  # noqa: F401

__version__ = "0.1.0"


def build_info() -> dict:
    """Versions, the compiled extension and its kernels, devices."""
    import torch
    try:
        from .ops import build_info as _ops_info
        info = dict(_ops_info())
    except ImportError:
        info = {"compiled": False}
    info.update(fastacd=__version__, torch=torch.__version__,
                cuda_available=torch.cuda.is_available(), backends=available_backends())
    return info

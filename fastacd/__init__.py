"""fastacd: fast, faithful Contextual Decomposition (CD) and Agglomerative CD for PyTorch.

``import fastacd as acd`` keeps the original package's names (``cd``, ...); the modern API
is ``Decomposer`` (trace once, many masks per call).
"""
from .api import cd, decomposer_for  # noqa: F401
from .engine import BACKENDS, CDResult, Decomposer, available_backends  # noqa: F401
from .graph import UnsupportedOpError, register_rule  # noqa: F401
from . import reference  # noqa: F401

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

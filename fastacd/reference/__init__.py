"""Pure-torch reference implementations: the spec every fast path is tested against.

* ``cd(model, x, mask)``: CD one mask at a time, relevant and irrelevant propagated
  separately (design.md section 2).
"""
from .cd import cd, cd_relevant_input, propagate_graph  # noqa: F401

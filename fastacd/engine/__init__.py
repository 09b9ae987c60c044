"""The batched engine: many masks per call against one shared total pass, chunked under a
memory budget, and the windowed (incremental) pass for masks that differ from a base."""
from .decomposer import (BACKENDS, CDResult, Decomposer, available_backends,  # noqa: F401
                         compiled_ops)

"""Capture: trace a model into a graph of ops (``graph``), each input-dependent op with the
rule that decomposes it; what a step is (``nodes``); the inputs of a call (``inputs``:
images and masks, ``phrases``: token ids and phrases)."""
from .graph import CapturedGraph  # noqa: F401
from .nodes import Step, UnsupportedOpError, check_eval, check_hooks, check_model, describe_node  # noqa: F401

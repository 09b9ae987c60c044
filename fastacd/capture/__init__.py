"""Capture: trace a model into a graph of ops and give every input-dependent op a CD rule."""
from .graph import (CapturedGraph, Step, UnsupportedOpError, check_eval, describe_node,  # noqa: F401
                    register_rule)

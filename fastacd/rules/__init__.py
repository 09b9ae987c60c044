"""CD rules, one object per kind of op, one file per family (``affine``, ``norm``,
``activation``, ``pool``, ``structural``, ``recurrent``); ``base`` defines ``Rule`` and
``RuleSet``. ``DEFAULT`` is the ACD paper's rule set (design.md section 2)."""
from .activation import Activation, OffsetActivation
from .affine import Affine
from .gates import MatMul, Normaliser, Product
from .base import ZERO_TOL, Elementwise, Rule, RuleSet, Sliding, Union, register_rule, unsupported  # noqa: F401
from .norm import AddCMul, BatchNorm, GroupNorm, LayerNorm, RMSNorm
from .pool import MaxPool
from .structural import (Add, Cat, Getitem, Linear, Neg, OutputSoftmax, Reshape, Scale, Shape, Split,
                         Sub)

DEFAULT = RuleSet([Affine(), BatchNorm(), LayerNorm(), GroupNorm(), RMSNorm(), AddCMul(), Activation(),
                   OffsetActivation(), MaxPool(), Linear(), Reshape(), Getitem(), Split(), Add(), Sub(), Neg(),
                   Scale(), MatMul(), Product(), Normaliser(), Cat(), OutputSoftmax(), Shape()], name="acd")


def resolve(rules) -> RuleSet:
    """A rule set from ``Decomposer(rules=...)``: None (the default) or a ``RuleSet``."""
    if rules is None:
        return DEFAULT
    if not isinstance(rules, RuleSet):
        raise TypeError(f"rules must be a fastacd.rules.RuleSet, got {type(rules).__name__}")
    return rules

"""CD rules, one object per kind of op, one file per family (``affine``, ``norm``,
``activation``, ``pool``, ``structural``, ``gates``, ``attention``, ``recurrent``); ``base`` defines ``Rule`` and
``RuleSet``. ``DEFAULT`` is the ACD paper's rule set (design.md section 2); ``CDT`` the CD-T
paper's formulas for transformers (``cdt``; docs/engine.md, "Rule sets: default and cdt")."""
from .activation import Activation, OffsetActivation
from .affine import Affine
from .attention import Einsum, MultiheadAttention, ScaledDotProductAttention, SwinWindowAttention
from .gates import GLU, MatMul, Normaliser, Product
from .cdt import cdt_rules
from .base import ZERO_TOL, ContextOnly, Elementwise, Rule, RuleSet, Sliding, Union, register_rule, unsupported  # noqa: F401
from .norm import AddCMul, BatchNorm, GroupNorm, InstanceNorm, LayerNorm, LocalResponseNorm, Normalize, RMSNorm
from .pool import MaxPool, MaxReduce
from .recurrent import Recurrent
from .structural import (Add, Cast, Cat, Comparison, Copy, Expand, Getitem, Linear, Neg, OutputSoftmax, Pad, PartWise, Repeat, Reshape,  # noqa: F401
                         Roll, Scale, Scatter, Shape, Split, Stack, Sub, Where)

DEFAULT = RuleSet([Affine(), BatchNorm(), LayerNorm(), GroupNorm(), InstanceNorm(), RMSNorm(), Normalize(),
                   LocalResponseNorm(), AddCMul(), Activation(),
                   OffsetActivation(), MaxPool(), MaxReduce(), Linear(), Cast(), Reshape(), Getitem(), Split(), Add(), Sub(), Neg(),
                   Scale(), MatMul(), Product(), GLU(), Normaliser(), Cat(), Stack(), OutputSoftmax(), Shape(), Roll(),
                   Pad(), Expand(), Repeat(), Scatter(), Copy(), Where(), Comparison(), ScaledDotProductAttention(), MultiheadAttention(), SwinWindowAttention(),
                   Einsum(), Recurrent()], name="acd")


CDT = cdt_rules(DEFAULT)
SETS = {"acd": DEFAULT, "default": DEFAULT, "cdt": CDT}


def resolve(rules) -> RuleSet:
    """A rule set from ``Decomposer(rules=...)``: None (the default), a name in ``SETS``
    (``"cdt"``) or a ``RuleSet``."""
    if rules is None:
        return DEFAULT
    if isinstance(rules, str):
        if rules not in SETS:
            raise ValueError(f"unknown rule set {rules!r}; known: {sorted(SETS)}")
        return SETS[rules]
    if not isinstance(rules, RuleSet):
        raise TypeError(f"rules must be a fastacd.rules.RuleSet, got {type(rules).__name__}")
    return rules

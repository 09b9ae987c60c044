"""The ``cdt`` rule set: the formulas of CD-T (Hsu et al., "Efficient automated circuit
discovery in transformers using contextual decomposition", arXiv 2407.00886), so results can
be compared with that paper. Transcribed from the authors' repository adelaidehsu/CD_Circuit
(``pyfunctions/cdt_core.py``, ``cdt_basic.py``, ``cdt_from_source_nodes.py``): docs/engine.md,
"Rule sets: default and cdt".

Where CD-T differs from the default set:

* activation (every element-wise function): ``irrel = f(i)``, ``rel = f(r + i) - f(i)``;
* bias of a linear map: ``pr = |zr| / (|zr| + |zi| + tol)``, ``tol = 1e-8``;
* LayerNorm: beta split by the *input* parts' magnitudes ``|r| / (|r| + |i| + tol)``;
* after each step the two parts are sign-normalised: where they have opposite signs the
  larger takes the whole activation and the other becomes 0 (for the relevant part: a clamp
  between 0 and the total).

Attention is treated as in the default set (probabilities from the total, the value path
decomposed). The irrelevant part stays the completion ``a - rel`` at every step (CD-T's own
code propagates it separately, losing ``tol``'s share of each bias: ``b * tol / (|zr| + |zi| +
tol)``), so relevant + irrelevant = the model's output exactly.
"""
from __future__ import annotations

import torch

from ..capture.nodes import Step, call_with
from .activation import Activation, OffsetActivation
from .affine import Affine, bias_view, channels_last
from .base import Rule, RuleSet, mask_dim
from .norm import LayerNorm

TOL = 1e-8  # CD-T's ``tol`` in prop_linear_core and prop_layer_norm (cdt_core.py)


def total_like(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The total ``a`` broadcastable against a relevant part ``r`` of m masks in r's layout
    (tiled where the masks are the outer factor of a dim the total has > 1 of: windows)."""
    if a.dim() == 0 or a.shape == r.shape:
        return a
    k = mask_dim(r.shape, a.shape)
    if a.shape[k] == 1:
        return a
    reps = [1] * a.dim()
    reps[k] = r.shape[k] // a.shape[k]
    return a.repeat(reps)


def cdt_share(zr: torch.Tensor, zi: torch.Tensor) -> torch.Tensor:
    """CD-T's relevant share of a shift: ``|zr| / (|zr| + |zi| + tol)`` (0 where both are 0:
    the shift then goes to the irrelevant part here, CD-T's code drops it)."""
    wr = zr.abs()
    return wr / (wr + zi.abs() + TOL)


# --------------------------------------------------------------------------------------
# The variants (one class per rule CD-T changes)
# --------------------------------------------------------------------------------------
class CDTActivation(Activation):
    """CD-T's ``prop_act``: the irrelevant part alone through f, the relevant part the rest:
    ``rel = f(a) - f(a - r)``, ``irrel = f(i)``. Never folded into a producer."""
    row = (Activation.row[0], "`f(a) - f(i)`", "`f(i)`")

    def folds_into(self, step):
        return False

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        irrel = call_with(step, value_of, {step.dep[0]: i})
        return call_with(step, value_of, {step.dep[0]: r + i}) - irrel, irrel

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        r, a = rel[d], total_like(values[d], rel[d])
        return call_with(step, values.__getitem__, {d: a}) - call_with(step, values.__getitem__, {d: a - r})

    def inplace_operand(self, step):
        return None


class CDTOffsetActivation(OffsetActivation):
    """Sigmoid, Softplus on their own: CD-T's one activation rule (``irrel = f(i)``, which
    carries f(0): an empty mask keeps rel = 0)."""
    row = (OffsetActivation.row[0], "`f(a) - f(i)`", "`f(i)`")
    reference = CDTActivation.reference

    def relevant(self, step, rel, values, aux, ops, m):
        d = step.dep[0]
        r, a = rel[d], total_like(values[d], rel[d])
        return self._f(step, a, values.__getitem__) - self._f(step, a - r, values.__getitem__)


class CDTAffine(Affine):
    """CD-T's ``prop_linear_core``: the bias split with ``tol`` in the denominator."""
    fuses_relu = False
    row = (Affine.row[0], "`zr + pr*b`, `pr = abs(zr) / (abs(zr) + abs(zi) + tol)`", "`zi + (1-pr)*b`")

    def reference(self, step, parts, value_of, aux):
        weights, bias, pre, _ = aux  # numerical zero: CD-T has its own tol
        r, i = parts[step.dep[0]]
        zr, zi = weights(r), weights(i)
        if bias is None:
            return zr, zi
        b = bias_view(bias, zr, channels_last(step, pre))
        pr = cdt_share(zr, zi)
        return zr + pr * b, zi + (1 - pr) * b

    def relevant(self, step, rel, values, aux, ops, m):
        weights, bias, pre, _ = aux  # numerical zero: CD-T has its own tol
        zr = weights(rel[step.dep[0]])
        if bias is None:
            return zr
        b = bias_view(bias, pre, channels_last(step, pre))
        return zr + cdt_share(zr, total_like(pre, zr) - zr) * b

    def fresh(self, step, rel, out):
        return False


class CDTLayerNorm(LayerNorm):
    """CD-T's ``prop_layer_norm``: parts centred by their own mean over the total's std (as the
    default set), beta split by the input parts' magnitudes ``|r| / (|r| + |i| + tol)``."""
    fuses_relu = False
    row = (LayerNorm.row[0], "`zr + pr*beta`, `pr = abs(r) / (abs(r) + abs(i) + tol)` of the input parts",
           "`zi + (1-pr)*beta`")

    def reference(self, step, parts, value_of, aux):
        r, i = parts[step.dep[0]]
        p = self.params(step, value_of)
        zr, zi = self._normalise(p, r, aux.factor), self._normalise(p, i, aux.factor)
        beta = self._beta(p, zr)
        if beta is None:
            return zr, zi
        pr = cdt_share(r, i)
        return zr + pr * beta, zi + (1 - pr) * beta

    def relevant(self, step, rel, values, aux, ops, m):
        aux, p = self._stats(step, values, aux)
        r = rel[step.dep[0]]
        zr = self._normalise(p, r, aux.factor)
        beta = self._beta(p, zr)
        if beta is None:
            return zr
        return zr + cdt_share(r, total_like(values[step.dep[0]], r) - r) * beta


# --------------------------------------------------------------------------------------
# Sign normalisation after each step (CD-T's normalize_rel_irrel)
# --------------------------------------------------------------------------------------
def normalise_relevant(r: torch.Tensor, a: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The relevant part after CD-T's sign normalisation against the total ``a``: where r and
    i = a - r have opposite signs, r becomes a if |r| >= |i|, else 0. That is r clamped
    between 0 and a: r and a - r differ in sign exactly where r lies outside [min(0, a),
    max(0, a)], and then |r| >= |a - r| exactly where r is beyond a (not beyond 0)."""
    lo, hi = total_like(a.clamp(max=0), r), total_like(a.clamp(min=0), r)
    return r.clamp_(lo, hi) if inplace else torch.clamp(r, lo, hi)


def normalise_parts(r: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CD-T's ``normalize_rel_irrel`` on separately propagated parts."""
    tot = r + i
    flip = r * i < 0
    to_rel = flip & (r.abs() >= i.abs())
    to_irrel = flip & ~to_rel
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    return (torch.where(to_rel, tot, torch.where(to_irrel, zero, r)),
            torch.where(to_irrel, tot, torch.where(to_rel, zero, i)))


def _shares(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


class SignNormalised(Rule):
    """A rule of the set followed by CD-T's sign normalisation of its output's two parts. Not at
    the model's output (CD-T's code leaves the logits as the formulas give them) nor on tuple
    outputs (their pieces are normalised where a step reads them); no in-place or windowed form."""

    def __init__(self, inner: Rule):
        self.inner = inner
        for name in ("kind", "modules", "functions", "methods", "value", "output_only", "context_only"):
            setattr(self, name, getattr(inner, name))
        self.fuses_relu = False
        self.row = (inner.row[0], inner.row[1] + ", then sign-normalised", inner.row[2])

    def __getattr__(self, name):  # anything else a pass or a test asks of the rule
        inner = self.__dict__.get("inner")
        if inner is None:  # not set up yet (a copy or unpickling in progress)
            raise AttributeError(name)
        return getattr(inner, name)

    def claim(self, graph, node, dep, module):
        step = self.inner.claim(graph, node, dep, module)
        if step is not None:
            step.rule = self
            step.extra["cdt_result"] = self._result(graph, node)
        return step

    @staticmethod
    def _result(graph, node) -> bool:
        """Whether the node is the model's output, or feeds it through a trailing op left out
        of CD (a softmax: the scores are the logits)."""
        out = graph.output_node
        return any(u is out or (list(u.users) == [out] and any(
            r.output_only for r in graph.rules.candidates(graph, u))) for u in node.users)

    def folds_into(self, step):
        return False

    def gate_like(self, graph, node, gates):
        return self.inner.gate_like(graph, node, gates)

    def context_operands(self, graph, node, reach, gates):
        return self.inner.context_operands(graph, node, reach, gates)

    def total(self, step, value_of):
        return self.inner.total(step, value_of)

    @staticmethod
    def _applies(step: Step, out) -> bool:
        result = step.extra.get("cdt_result", any(u.op == "output" for u in step.node.users))
        return isinstance(out, torch.Tensor) and not result

    def reference(self, step, parts, value_of, aux):
        r, i = self.inner.reference(step, parts, value_of, aux)
        return normalise_parts(r, i) if self._applies(step, r) else (r, i)

    def relevant(self, step, rel, values, aux, ops, m):
        out = self.inner.relevant(step, rel, values, aux, ops, m)
        if not self._applies(step, out):
            return out
        ptr = out.untyped_storage().data_ptr()
        total = values[step.node]
        if any(isinstance(rel[d], torch.Tensor) and d.op != "placeholder"
               and rel[d].untyped_storage().data_ptr() == ptr and _shares(total, values[d]) for d in step.dep):
            # both parts views of an input's (reshape, transpose, indexing, identity): its
            # elements were normalised against the same elements of the total already (not the
            # model's input, nor a tuple output: those are not normalised; an add of a constant
            # returns the input's relevant part for a new total: normalised)
            return out
        own = not (torch.is_grad_enabled() and out.requires_grad) and total.untyped_storage().data_ptr() != ptr
        return normalise_relevant(out, total, inplace=own and out._base is None and out.is_contiguous())

    def inplace_operand(self, step):
        return None

    def fresh(self, step, rel, out):
        return False

    def locality(self, step, values):
        return None

    def macs(self, step, value_of):
        return self.inner.macs(step, value_of)

    def __repr__(self) -> str:
        return f"<SignNormalised {self.inner!r}>"


def cdt_rules(default: RuleSet) -> RuleSet:
    """The ``cdt`` set: ``default`` with CD-T's variants, every decomposing rule sign-normalised."""
    base = default.replace(CDTAffine(), CDTLayerNorm(), CDTActivation(), CDTOffsetActivation())
    return RuleSet([SignNormalised(r) if r.value and not r.context_only else r for r in base.values()],
                   name="cdt")

"""``Decomposer``: trace a model once, score many masks per call (design.md section 4).

* the true activation ``a`` of every node is computed once per image (batch 1) and shared;
* the relevant part ``r`` carries the M masks; ``i`` is never stored: a rule that needs it
  uses ``a - r``. A conv/linear layer therefore applies its weights M + 1 times, not 2M;
* M is cut into chunks so that peak memory stays under a budget, per segment of the graph
  (``fastacd.engine.chunks``); results do not depend on the chunk size;
* backends: ``reference`` (the oracle of ``fastacd.reference``: one mask at a time, r and
  i propagated separately), ``torch`` (batched, pure torch) and ``compiled`` (batched,
  fused C++/CUDA element-wise ops).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops, rules as rules_
from ..capture.export import export_module
from ..capture.graph import CapturedGraph, module_identities
from ..capture.inputs import all_finite, check_input, check_masks
from ..capture.nodes import TraceError, UnsupportedOpError, check_model
from ..ops import torch_ops
from . import chunks
from .batched import walk
from .windowed import cd_delta

BACKENDS = ("auto", "reference", "torch", "compiled")
CAPTURES = ("auto", "fx", "export")

# The reference backend runs the oracle (fastacd.reference), which the engine does not import
# (neither may depend on the other); the package root plugs it in with ``use_reference``.
_reference_cd: Callable | None = None


def use_reference(fn: Callable) -> None:
    """Install the reference's CD (graph, x, relevant_input) -> (relevant, irrelevant)."""
    global _reference_cd
    _reference_cd = fn


def compiled_ops():
    """The fused ops module if the compiled extension is built, else None."""
    return ops if ops.HAS_COMPILED else None


def available_backends() -> list[str]:
    return ["reference", "torch"] + (["compiled"] if ops.HAS_COMPILED else [])


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "compiled" if ops.HAS_COMPILED else "torch"
    if backend == "compiled" and not ops.HAS_COMPILED:
        raise RuntimeError("backend='compiled' needs the C++ extension fastacd._C, which is not "
                           "built. Run `make setup` (or `pip install --no-build-isolation -e .`), "
                           "or use backend='torch'.")
    return backend


@dataclass
class CDResult:
    """CD scores of M masks for one input.

    relevant, irrelevant: (M, *output_shape); ``relevant + irrelevant == output`` for each mask.
    output: (*output_shape,) the model's output (logits; a trailing softmax is not applied).
    """
    relevant: torch.Tensor
    irrelevant: torch.Tensor
    output: torch.Tensor

    def scores(self, label: int) -> torch.Tensor:
        """The relevant score of one class for every mask, shape (M,)."""
        return self.relevant[:, label]

    def to_json(self) -> dict:
        return {"relevant": self.relevant.tolist(), "irrelevant": self.irrelevant.tolist(),
                "output": self.output.tolist()}


def converted_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``copy.deepcopy(model).to(dtype)`` without copying the weights in their own dtype first
    (VGG16 to float64: 528 MB copied, then converted)."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            d = t.detach().to(dtype)
            memo[id(t)] = torch.nn.Parameter(d, t.requires_grad) if isinstance(t, torch.nn.Parameter) else d
    return copy.deepcopy(model, memo)


class Decomposer:
    """Trace a model once; compute CD for many masks per call.

    >>> dec = Decomposer(model.eval())
    >>> res = dec.cd(x, masks)          # x: (1, C, H, W); masks: (M, H, W) of 0/1
    >>> res.relevant.shape              # (M, num_classes)

    The model must be in eval mode (CD is defined on eval behaviour: dropout off, batchnorm
    with running statistics); a model in training mode raises ``ValueError``.
    ``memory_budget`` (bytes, or a string such as ``"2G"``) bounds the activations held for
    the masks of one chunk; the default is 1 GiB on the CPU and half the free memory on a
    GPU. ``rules``: the rule set (``fastacd.rules``; default ``fastacd.rules.DEFAULT``; ``"cdt"``
    or ``fastacd.rules.CDT``: CD-T's formulas, docs/engine.md "Rule sets: default and cdt").

    ``capture``: how the model becomes a graph (docs/engine.md, "Capture"), once: a call after a
    submodule was replaced or added is an error (make a new Decomposer). ``"fx"``: traced
    by torch.fx, once for any input shape. ``"export"``: torch.export's ATen graph, recorded
    on ``example_input`` or on the first input (and again for an input of another shape:
    every size but the batch is fixed by export); for models with Python control flow on
    shapes. ``"auto"`` (default): fx, falling back to export with a warning where torch.fx
    cannot trace the model.

    ``precision`` (docs/precision.md): ``"float32"`` (default: exact IEEE float32; TF32 is
    switched off inside every call, whatever the process set); ``"bf16"``: the weight
    applications of the relevant passes (conv, linear, ``P @ v``) run in bfloat16 with float32
    in and out, the totals, the splits and all bookkeeping stay float32 (a float32 model only;
    warns once where the device has no fast bf16 path); ``"tf32"``: float32 convolutions and
    matrix products on TF32 tensor cores on a CUDA GPU (on the CPU it warns once and runs
    exact float32). ``channels_last``: run the relevant maps of 2-d convolutions in
    channels_last memory format; None chooses (on for bf16 with 2-d convolutions, off for
    float32, where it measured slower end to end).

    ``zero_tol``: numerical zero (docs/engine.md): a split's part near or below this fraction of
    its magnitude scale ramps out of the split's weights (a rounding residue weighs nothing), so
    that rounding cannot flip a split; 0 gives the paper's formula (the original package's numbers).
    """

    def __init__(self, model: torch.nn.Module, backend: str = "auto",
                 memory_budget: int | str | None = None, rules: rules_.RuleSet | str | None = None,
                 capture: str = "auto", example_input: torch.Tensor | None = None,
                 precision: str = "float32", channels_last: bool | None = None,
                 zero_tol: float = rules_.ZERO_TOL):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
        if precision not in ops.PRECISIONS:
            raise ValueError(f"precision must be one of {ops.PRECISIONS}, got {precision!r}")
        self._model: torch.nn.Module | weakref.ref = model
        self._modules = module_identities(model)  # what the captured graph calls (_check_input)
        self.rules = rules_.resolve(rules)
        self.capture = capture
        self._graph: CapturedGraph | None = None
        self._export_shape: tuple | None = None
        self._fx_error: TraceError | None = None
        if capture != "export":
            try:
                self._graph = CapturedGraph(model, self.rules)
                self.capture = "fx"
            except TraceError as exc:
                if capture == "fx":
                    raise
                self._fx_error = exc
                warnings.warn(f"torch.fx cannot trace {type(model).__name__} ({str(exc).splitlines()[0]}); "
                              "fastacd captures it with torch.export instead (capture='export')",
                              stacklevel=2)
                self.capture = "export"
        else:
            self.capture = "export"
        if self._graph is None and example_input is not None:
            self._capture_export(check_input(example_input))
        self.backend = resolve_backend(backend)
        if self.backend == "reference" and precision != "float32":
            raise ValueError(f"precision={precision!r} needs a batched backend: the reference "
                             "backend is the exact oracle")
        self.memory_budget = chunks.parse_budget(memory_budget)
        if isinstance(zero_tol, bool) or not isinstance(zero_tol, (int, float)) or not 0 <= zero_tol < 1:
            raise ValueError(f"zero_tol must be a number in [0, 1) (0: the paper's formula), got {zero_tol!r}")
        self.zero_tol = float(zero_tol)
        self._ops = ops if self.backend == "compiled" else torch_ops
        self.precision = precision
        if channels_last is None:  # measured: docs/precision.md, "channels_last"
            # from the model, not the graph: an export graph has no modules and may not exist yet
            channels_last = precision == "bf16" and any(isinstance(mod, torch.nn.Conv2d) for mod in model.modules())
        self.channels_last = bool(channels_last)
        self._weight_mode = (ops.WeightMode(torch.bfloat16 if precision == "bf16" else torch.float32,
                                            self.channels_last)
                             if precision == "bf16" or self.channels_last else None)

    @property
    def model(self) -> torch.nn.Module:
        model = self._model() if isinstance(self._model, weakref.ref) else self._model
        if model is None:
            raise RuntimeError("this Decomposer's model has been freed")
        return model

    def refer_weakly(self) -> "Decomposer":
        """Hold the model by a weak reference (for caches keyed by the model: a strong one
        would keep the model, its graph and its buffers alive for ever)."""
        self._model = weakref.ref(self.model)
        return self

    @property
    def graph(self) -> CapturedGraph:
        """The captured graph (``fastacd.capture``)."""
        if self._graph is None:
            raise RuntimeError("the model is captured with torch.export on its first input: call "
                               "cd() or forward() first, or pass example_input= to the Decomposer")
        return self._graph

    @graph.setter
    def graph(self, graph: CapturedGraph) -> None:
        self._graph = graph

    def _capture_export(self, x: torch.Tensor) -> None:
        """torch.export's graph of the model for inputs shaped like x (any batch)."""
        check_model(self.model)
        try:
            gm = export_module(self.model, x)
        except UnsupportedOpError as exc:
            if self._fx_error is None:
                raise
            raise UnsupportedOpError(f"{str(self._fx_error).splitlines()[0]}\n{exc}") from exc
        self._graph = CapturedGraph(self.model, self.rules, gm)
        self._export_shape = tuple(x.shape[1:])

    # ---- public -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for x (trailing softmax not applied)."""
        x = self._check_input(x)
        with self.compute(x):
            values, _ = self._total_pass(x, magnitudes=False)
        return values[self.graph.result_node]

    def cd(self, x: torch.Tensor, masks, *, chunk_size: int | None = None) -> CDResult:
        """CD of each mask: the relevant input is ``mask * x``, the irrelevant ``(1 - mask) * x``.

        masks (0/1 or soft values in [0, 1]): one mask (H, W), (1, 1 or C, H, W); M masks
        (M, H, W), (M, 1, H, W) or (M, C, H, W); for a 2-d input (1, F): (F,) or (M, F).
        A (C, H, W) stack with C > 1 channels is ambiguous and refused (fastacd.capture.inputs).
        """
        x = self._check_input(x)
        masks = check_masks(x, masks)
        return self.cd_relevant_input(x, masks * x, chunk_size=chunk_size, _checked=True)

    def rounding_gap(self, x: torch.Tensor, masks) -> float:
        """How far rounding moves these masks' CD scores: the largest gap between the relevant
        parts of ``cd(x, masks)`` and a second decomposition with other rounding, as a fraction
        of the largest |logit|. The second one is float64 (this model copied to float64, same
        rules and settings) for a float32 or bf16 Decomposer, and the float64 reference
        (``fastacd.reference``, its own order of operations) for a float64 one.

        CD's splits can amplify rounding layer by layer (a large bias or shift split between
        two small parts; deep batchnorm networks compound it: docs/engine.md "When float32 is
        not enough", docs/zoo.md), so on some models the scores depend on rounding. Near the
        dtype's resolution (1e-7 to 1e-5 in float32) the scores are sound; around 1e-3 and
        above, read them with that error or decompose in float64. Costs one more CD of the
        masks in float64 (2-3x this call on a CPU; the reference: one mask at a time).
        """
        x = self._check_input(x)
        masks = check_masks(x, masks)
        with torch.no_grad():
            rel = self.cd_relevant_input(x, masks * x, _checked=True).relevant
            x64, masks64 = x.double(), masks.double()
            if x.dtype == torch.float64:
                rel64, irrel64 = _reference_cd(self.graph, x64, masks64 * x64, self.zero_tol)
            else:
                model64 = converted_copy(self.model, torch.float64)
                dec64 = Decomposer(model64, backend=self.backend, memory_budget=self.memory_budget,
                                   rules=self.rules, capture=self.capture, zero_tol=self.zero_tol)
                res64 = dec64.cd(x64, masks64)
                rel64, irrel64 = res64.relevant, res64.irrelevant
        scale = float((rel64[0] + irrel64[0]).abs().max())
        return float((rel.double() - rel64).abs().max()) / max(scale, torch.finfo(torch.float64).tiny)

    def cd_relevant_input(self, x: torch.Tensor, relevant_input: torch.Tensor, *,
                          chunk_size: int | None = None, _checked: bool = False) -> CDResult:
        """CD with the input's relevant part given directly, shape (M, *x.shape[1:])."""
        with self.compute(x):
            return self._cd_relevant_input(x, relevant_input, chunk_size=chunk_size, _checked=_checked)

    def _cd_relevant_input(self, x, relevant_input, *, chunk_size, _checked):
        if not _checked:
            x = self._check_input(x)
            if relevant_input.shape[1:] != x.shape[1:] or relevant_input.dim() != x.dim():
                raise ValueError(f"relevant_input must have shape (M, {', '.join(map(str, x.shape[1:]))}), "
                                 f"got {tuple(relevant_input.shape)}")
            relevant_input = relevant_input.to(device=x.device, dtype=x.dtype)
        if relevant_input.shape[0] == 0:
            raise ValueError("empty mask batch: pass at least one mask")
        if self.backend == "reference":
            rel, irrel = _reference_cd(self.graph, x, relevant_input, self.zero_tol)
            return CDResult(relevant=rel, irrelevant=irrel, output=(rel[0] + irrel[0]))
        values, aux = self._total_pass(x)
        out = values[self.graph.result_node]
        m = relevant_input.shape[0]
        plan = self.pass_plan(values, x, m, chunk_size=chunk_size)
        self._check_grad_budget(values, x, m, relevant_input)
        with chunks.reuse_buffers(x.device, self.memory_budget), chunks.denormals_flushed():
            rel = self._planned_pass(relevant_input, values, aux, plan)
        return CDResult(relevant=rel, irrelevant=out - rel, output=out[0])

    def cd_delta(self, x: torch.Tensor, base_mask, delta_masks, *,
                 chunk_size: int | None = None, **options) -> CDResult:
        """CD of the masks ``base_mask | delta_masks[j]``, the same numbers as ``cd`` on them.

        The base's relevant maps are propagated once; each candidate is then recomputed only
        inside the window of every layer that its delta's receptive field reaches, the rest
        copied from the base (``fastacd.engine.windowed``, docs/engine.md "Windowed propagation").
        Falls back to ``cd`` where windowing would not pay off (or for the reference backend).
        base_mask: one mask (H, W) (or x's shape without the batch dim); delta_masks: M masks
        in any form ``cd`` accepts. ``options`` (``max_fraction``, ``max_cost_ratio``,
        ``stats``) go to ``fastacd.engine.windowed.cd_delta``.
        """
        with self.compute(x):
            rel, out = cd_delta(self, x, base_mask, delta_masks, chunk_size=chunk_size, **options)
        return CDResult(relevant=rel, irrelevant=out - rel, output=out[0])

    def chunk_size(self, values: dict, x: torch.Tensor) -> int:
        """Masks per engine pass (one segment): under the memory budget and the CPU cache cap."""
        return chunks.chunk_for(chunks.largest_bytes(values), x.device, self.memory_budget)

    def pass_plan(self, values: dict, x: torch.Tensor, m: int, *,
                  chunk_size: int | None = None) -> list:
        """The segments ``(start, source, chunk)`` of a relevant pass (``chunks.pass_plan``)."""
        return chunks.pass_plan(self.graph, values, x, m, self.memory_budget, chunk_size=chunk_size)

    @contextlib.contextmanager
    def compute(self, x: torch.Tensor):
        """The scope of one call: float32 convolutions and matrix products exact (IEEE) unless
        ``precision="tf32"`` on a GPU, and the weight applications of the relevant passes in
        this Decomposer's ``WeightMode`` (bfloat16, channels_last) if any."""
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        if self.precision == "tf32" and device.type != "cuda":
            ops.precision.warn_once(("tf32", device.type), f"fastacd: precision='tf32' has no effect on "
                                    f"{device.type} (TF32 is a CUDA tensor-core format); running exact float32")
        if self.precision == "bf16":
            fast, why = ops.fast_bf16(device)
            if not fast:
                ops.precision.warn_once(("bf16", str(device)), f"fastacd: precision='bf16' on {device}: "
                                        f"{why}; it may run slower than float32")
        mode = "tf32" if self.precision == "tf32" and device.type == "cuda" else "ieee"
        low = self._weight_mode if x is None or x.dtype == torch.float32 else None
        with ops.float32_precision(mode), ops.low_precision(low):
            yield

    # ---- validation -----------------------------------------------------------------------
    def _check_input(self, x) -> torch.Tensor:
        x = check_input(x)
        check_model(self.model)
        if module_identities(self.model) != self._modules:
            raise ValueError("the model's modules changed since this Decomposer captured it (a submodule "
                             "was replaced or added, or a forward replaced): its graph would still call "
                             "the old ones. Make a new Decomposer(model) (fastacd.cd, hierarchy and "
                             "agg_2d do so themselves)")
        param = next(self.model.parameters(), None)
        if param is not None:
            if param.device != x.device:
                raise ValueError(f"input is on {x.device} but the model is on {param.device}; "
                                 f"move one of them, e.g. x.to('{param.device}')")
            if param.dtype != x.dtype:
                raise TypeError(f"input is {x.dtype} but the model's parameters are {param.dtype}; "
                                f"use x.to({param.dtype}) or model.to({x.dtype})")
        if self.capture == "export" and (self._graph is None or self._export_shape != tuple(x.shape[1:])):
            self._capture_export(x)  # export fixes every size but the batch: capture for this shape
        return x

    def _check_grad_budget(self, values: dict, x: torch.Tensor, m: int, r0: torch.Tensor) -> None:
        """With autograd recording, every chunk's activations stay alive for backward, so the
        memory budget cannot bound them: refuse a call that would exceed it."""
        recording = torch.is_grad_enabled() and (
            r0.requires_grad or any(p.requires_grad for p in self.model.parameters()))
        if not recording:
            return
        need = m * sum(v[0].numel() * v.element_size() for n, v in values.items()
                       if n in self.graph.steps and isinstance(v, torch.Tensor))
        budget = self.memory_budget or chunks.default_memory_budget(x.device)
        if need > budget:
            raise ValueError(
                f"CD of {m} masks with autograd recording keeps every chunk's activations for "
                f"backward (about {need / 2**20:.0f} MiB), beyond the memory budget "
                f"({budget / 2**20:.0f} MiB). Wrap the call in torch.no_grad() when you need no "
                "gradients, pass fewer masks per call, or train with fastacd.CDEPPenalty.")

    # ---- the two passes -----------------------------------------------------------------
    def _total_pass(self, x: torch.Tensor, magnitudes: bool = True) -> tuple[dict, dict]:
        """``magnitudes=False``: no tolerances of numerical zero in ``aux`` (the values are the
        same; the magnitude pass costs |W| of every layer, about a forward more)."""
        with ops.low_precision(None):  # the totals are exact float32, whatever the precision
            values, aux = self.graph.total_pass(x, self.zero_tol if magnitudes else 0)
        if not all_finite(values[self.graph.result_node]):
            bad = [n for n, p in self.model.named_parameters() if not all_finite(p.detach())]
            raise ValueError("the model's output for this input is not finite (NaN or Inf)"
                             + (f": parameters {', '.join(bad[:3])} hold NaN or Inf" if bad else ""))
        return values, aux

    def _relevant_pass(self, r0: torch.Tensor, values: dict, aux: dict, *, keep: bool = False):
        """The relevant part of every node for one chunk of masks.

        Returns the output node's relevant part, or with ``keep=True`` the dict of every
        node's (the windowed pass reads a base mask's maps).
        """
        g = self.graph
        rel = self._walk({g.input_node: r0}, values, aux, 0, len(g.nodes), r0.shape[0], keep=keep)
        return rel if keep else rel[g.result_node]

    def _walk(self, rel: dict, values: dict, aux: dict, start: int, stop: int, m: int,
              keep: bool = False) -> dict:
        return walk(self.graph, rel, values, aux, self._ops, start, stop, m, keep=keep)

    def _planned_pass(self, r0: torch.Tensor, values: dict, aux: dict, plan: list) -> torch.Tensor:
        """The output's relevant part for the masks of r0, run segment by segment (``pass_plan``)."""
        g = self.graph
        stops = [seg[0] for seg in plan[1:]] + [len(g.nodes)]
        outputs = [seg[1] for seg in plan[1:]] + [g.result_node]

        def run(k: int, lo: int, hi: int) -> torch.Tensor:
            start, source, _ = plan[k]
            if k == 0:
                rel = r0[lo:hi]
            else:
                parts = [run(k - 1, a, b) for a, b in chunks.passes(lo, hi, plan[k - 1][2])]
                rel = parts[0] if len(parts) == 1 else torch.cat(parts)
            return self._walk({source: rel}, values, aux, start, stops[k], hi - lo)[outputs[k]]

        parts = [run(len(plan) - 1, a, b) for a, b in chunks.passes(0, r0.shape[0], plan[-1][2])]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

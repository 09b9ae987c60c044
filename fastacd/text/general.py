"""CD for any text classifier through the general engine: token masks over the embeddings.

``ModelTextDecomposer`` explains models the recurrent text engine does not read: an
``nn.TransformerEncoder`` classifier (embedding + position embedding -> encoder -> pooled or
[CLS] readout -> linear), a recurrent layer inside a larger network, anything the general
engine (``fastacd.Decomposer``) decomposes after a token embedding. It gives the same
calls and results as ``TextDecomposer``: ``cd(tokens, phrases=... | masks=...)`` ->
``TextCDResult`` with (M, C) relevant and irrelevant scores ``head.weight @ feature part``
(no head bias), so ``relevant + irrelevant == logits - head.bias``.

How (per sentence, in ``prepare``):

* the model is traced once (the capture tracer: nn.TransformerEncoder's plain path); the
  token embedding is the ``nn.Embedding`` fed by the input ids (through ``.text``, views or
  transposes only), the head the last ``nn.Linear`` (before an optional softmax);
* the model runs once on the sentence, in the layout its forward takes (the batch as given;
  for bare token ids a batch with ``.text`` (T, 1) if forward reads ``.text``, else a
  (T, 1) or a (1, T) tensor, whichever gives one row of logits);
* a graph from the word vectors (1, T, E) to the head's input is cut out of the trace:
  everything the word vectors do not reach (position embeddings and ids, padding masks from
  the ids, class tokens, sizes) is a constant of the sentence, so it is irrelevant;
* the general engine decomposes that graph with the relevant input ``mask * word vectors``
  for M token masks in one batched pass.
"""
from __future__ import annotations

import copy
import operator
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import rules as rules_
from ..capture.concrete import ConcreteTracer
from ..capture.graph import _Tracer
from ..capture.nodes import UnsupportedOpError, check_hooks, check_model, fetch_attr, packing_error
from ..capture.phrases import Batch, _pair_masks, check_phrases, check_token_masks, tokens_of
from ..engine.decomposer import Decomposer, converted_copy
from ..ops import tensor_state
from .lstm import TextCDResult, TextDecomposer

# ops between the input ids and the token embedding that keep the ids as they are
_ID_METHODS = {"transpose", "permute", "t", "contiguous", "long", "to", "squeeze", "unsqueeze",
               "view", "reshape", "int"}
_ID_FUNCTIONS = {torch.transpose, torch.permute, torch.t, torch.squeeze, torch.unsqueeze,
                 torch.reshape}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}

# a model converted to another dtype, per model (keyed by its parameters' storage and version)
_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _converted(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    params = list(model.parameters())
    if not params or all(p.dtype == dtype for p in params if p.is_floating_point()):
        return model
    key = (dtype,) + tuple(map(tensor_state, params))
    hit = _CONVERTED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    copy_ = converted_copy(model, dtype).eval()
    _CONVERTED[model] = (key, copy_)
    return copy_


def _fail(model, why: str) -> ValueError:
    return ValueError(
        f"cannot read {type(model).__name__} as a text classifier for the general engine "
        f"({why}); it needs one nn.Embedding fed by the input token ids and an nn.Linear head "
        "producing the output (optionally followed by softmax / log_softmax)")


@dataclass
class _Structure:
    """What the trace of a model says about it, found once per model (or per sentence for a
    model traced concretely)."""
    gm: fx.GraphModule
    placeholder: fx.Node
    embedding: fx.Node       # the token embedding's call
    features: fx.Node        # the head's input
    head: nn.Linear
    reads_text: bool         # forward reads ``.text`` of its input


class _Root(nn.Module):
    """The model as the root of a concrete (per-sentence) trace: its logits (a
    ``transformers`` model's ``.logits``, the first element of a tuple output), and the
    trace's tensor constants kept here rather than on the user's model (a trace per
    sentence would pile them up there)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, (torch.Tensor, fx.Proxy)):
            return out
        if isinstance(out, (tuple, list)):
            return out[0]
        logits = getattr(out, "logits", None)
        return out if logits is None else logits


def _symbolic_graph(root: nn.Module, rules) -> fx.GraphModule:
    return fx.GraphModule(root, _Tracer(rules).trace(root))


def _read(gm: fx.GraphModule, model) -> _Structure:
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        raise _fail(model, "forward takes no input")
    ph = placeholders[0]

    def from_ids(a) -> bool:
        while isinstance(a, fx.Node) and a is not ph:
            if a.op == "call_function" and a.target is getattr and a.args[1] == "text":
                a = a.args[0]
            elif a.op == "call_method" and a.target in _ID_METHODS:
                a = a.args[0]
            elif a.op == "call_function" and a.target in _ID_FUNCTIONS:
                a = a.args[0]
            else:
                return False
        return a is ph

    embs = [n for n in nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), nn.Embedding) and from_ids(n.args[0])]
    if len(embs) != 1:
        raise _fail(model, f"found {len(embs)} embeddings of the input ids")
    out = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        raise _fail(model, "the output is not one tensor")
    softmax = ((out.op == "call_function" and out.target in _SOFTMAX)
               or (out.op == "call_method" and out.target in ("softmax", "log_softmax"))
               or (out.op == "call_module" and isinstance(gm.get_submodule(out.target),
                                                          (nn.Softmax, nn.LogSoftmax))))
    if softmax:
        out = out.args[0]
    if not (out.op == "call_module" and isinstance(gm.get_submodule(out.target), nn.Linear)):
        raise _fail(model, f"the output comes from {out.format_node()}, not an nn.Linear")
    reads_text = any(u.op == "call_function" and u.target is getattr and u.args[1] == "text"
                     for u in ph.users)
    return _Structure(gm, ph, embs[0], out.args[0], gm.get_submodule(out.target), reads_text)


def _concrete(root: _Root, rules, inputs: list) -> tuple[_Structure, dict]:
    """The first input of ``inputs`` the model maps to one row of logits, traced concretely
    (``fastacd.capture.concrete``): its structure and every node's value."""
    tried = []
    for inp in inputs:
        try:
            with torch.no_grad():
                out = root(inp)
        except Exception as exc:  # noqa: BLE001 - a wrong layout fails in many ways
            tried.append(f"{_shape(inp)}: {type(exc).__name__}: {exc}")
            continue
        if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1):
            tried.append(f"{_shape(inp)}: output of shape {tuple(getattr(out, 'shape', ()))}")
            continue
        tracer = ConcreteTracer(rules)
        try:
            graph = tracer.trace(root, inp)
        except Exception as exc:  # noqa: BLE001 - any tracing failure gets the same advice
            packing = packing_error(exc, root.model)
            if packing is not None:
                raise packing from exc
            raise _fail(root.model, f"tracing one sentence's forward failed: "
                                    f"{type(exc).__name__}: {exc}") from exc
        gm = fx.GraphModule(root, graph)
        values = {n: tracer.values[n.name] for n in gm.graph.nodes if n.name in tracer.values}
        return _read(gm, root.model), values
    raise ValueError("could not run the model on the sentence as one row of logits: "
                     + "; ".join(tried))


class _Recorder(fx.Interpreter):
    """Runs the traced model keeping every node's value."""

    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)


@dataclass
class ModelSentence:
    """One sentence prepared for the general engine: its word vectors, the graph from them to
    the head's input (a ``Decomposer``) and the true head input."""
    tokens: torch.Tensor          # (T,)
    vectors: torch.Tensor         # (1, T, E) the word vectors: the decomposed input
    decomposer: Decomposer
    features: torch.Tensor        # (F,) the head's input
    memo: dict | None = None      # unused (the recurrent engine's phrase states)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


class ModelTextDecomposer(TextDecomposer):
    """Text CD of any classifier the general engine decomposes (module docstring).

    >>> dec = ModelTextDecomposer(model)           # or TextDecomposer.from_model(model)
    >>> res = dec.cd(tokens, phrases=[(0, 1), (2, 4)])
    >>> res.relevant.shape                          # (2, num_classes)

    model:   in eval mode; its forward takes a sentence as the original's text models do (a
             batch with ``.text`` (seq_len, N)), or a token tensor.
    dtype:   arithmetic dtype (default: the model's); another dtype runs a converted copy of
             the model (cached while its parameters do not change).
    backend, memory_budget, rules: passed to ``fastacd.Decomposer``.
    readout: accepted for the recurrent families' signature; the model's own readout is used.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, backend: str = "auto",
                 memory_budget: int | str | None = None, rules: rules_.RuleSet | None = None,
                 readout: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_model(model)
        param = next(model.parameters(), None)
        self.model = model
        self.dtype = dtype or (param.dtype if param is not None else torch.float32)
        self.backend, self.memory_budget = backend, memory_budget
        self.rules = rules_.resolve(rules)
        self._run = _converted(model, self.dtype)
        self._root = _Root(self._run).eval()
        try:
            # one symbolic trace serves every sentence
            # (the model itself: graph names are its own, as in the user's error messages)
            self._s: _Structure | None = _read(_symbolic_graph(self._run, self.rules), model)
        except Exception as exc:  # noqa: BLE001 - torch.fx fails in many ways
            if isinstance(exc, ValueError) and str(exc).startswith("cannot read"):
                raise
            packing = packing_error(exc, model)
            if packing is not None:
                raise packing from exc
            # shapes read in Python, branches (transformers models): a concrete trace per
            # sentence; a two-token probe finds the embedding and the head
            self._s = None
            self._symbolic_error = exc
            # token 1, not 0 (often padding: a model may refuse an all-padding sentence)
            rows = min((m.num_embeddings for m in self._run.modules()
                        if isinstance(m, nn.Embedding)), default=2)
            probe = torch.full((2,), min(1, rows - 1), dtype=torch.long, device=_device(self._run))
            s, _ = _concrete(self._root, self.rules, self._inputs(probe, probe, None))
        else:
            s = self._s
        self.embed = s.gm.get_submodule(s.embedding.target)
        self.head = s.head
        self.rnn, self.readout, self.num_directions = None, None, 1

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> "ModelTextDecomposer":
        return cls(model, **kwargs)

    # -------------------------------------------------------------- the sentence

    def _inputs(self, tokens_or_batch, tokens: torch.Tensor, reads_text: bool | None) -> list:
        """The model's input for a sentence, in the order tried: the batch as given, then the
        layouts a token tensor may take ((1, T) first for a ``transformers`` model)."""
        given = [tokens_or_batch] if hasattr(tokens_or_batch, "text") else []
        if reads_text:
            return given or [Batch(tokens)]
        if reads_text is None and not given:      # not known yet (a concrete trace)
            given = [Batch(tokens)]
        layouts = [tokens[:, None], tokens[None]]
        if hasattr(self._run, "config"):
            layouts.reverse()
        return given + layouts

    def _record(self, inputs: list) -> dict:
        """Every node's value on the first input that gives one row of logits."""
        gm = self._s.gm
        tried = []
        for inp in inputs:
            rec = _Recorder(gm)
            try:
                with torch.no_grad():
                    out = rec.run(inp)
            except Exception as exc:  # noqa: BLE001 - a wrong layout fails in many ways
                tried.append(f"{_shape(inp)}: {type(exc).__name__}: {exc}")
                continue
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1:
                return rec.env
            tried.append(f"{_shape(inp)}: output of shape {tuple(getattr(out, 'shape', ()))}")
        raise ValueError("could not run the model on the sentence as one row of logits: "
                         + "; ".join(tried))

    def prepare(self, tokens, keep_states: bool = False) -> ModelSentence:
        """Run the model once on a sentence and cut out the graph from its word vectors to the
        head's input. ``keep_states`` has no effect (the recurrent engine's phrase states)."""
        check_hooks(self.model)
        ids = tokens_of(tokens, self.vocab_size)
        dev = self.embed.weight.device
        ids = ids.to(dev)
        if hasattr(tokens, "text"):
            tokens = copy.copy(tokens)
            tokens.text = tokens.text.to(dev)
        if self._s is not None:
            s = self._s
            env = self._record(self._inputs(tokens, ids, s.reads_text))
        else:
            s, env = _concrete(self._root, self.rules, self._inputs(tokens, ids, None))
        emb = env[s.embedding]
        T = ids.shape[0]
        if emb.dim() != 3 or emb.shape[-1] != self.embed.embedding_dim or T not in emb.shape[:2] or \
                1 not in emb.shape[:2]:
            raise ValueError(f"the token embedding gave shape {tuple(emb.shape)} for {T} tokens; "
                             "expected (T, 1, E) or (1, T, E) (one sentence)")
        seq_first = emb.shape[0] == T and emb.shape[1] == 1 and T > 1
        vectors = (emb.transpose(0, 1) if seq_first else emb).contiguous()
        wrapper = _cut(s, env, seq_first)
        dec = Decomposer(wrapper, backend=self.backend, memory_budget=self.memory_budget,
                         rules=self.rules)
        feats = env[s.features]
        if feats.dim() != 2 or feats.shape[0] != 1:
            raise ValueError(f"the head's input has shape {tuple(feats.shape)}; expected (1, F)")
        return ModelSentence(ids, vectors, dec, feats[0], None)

    def forward(self, tokens) -> torch.Tensor:
        """The model's output (logits, with the head's bias) from the head's input."""
        s = self.prepare(tokens)
        return self.head(s.features.to(self.head.weight.dtype))

    # -------------------------------------------------------------- CD

    def cd(self, tokens_or_sentence, phrases=None, masks=None) -> TextCDResult:
        """CD of M phrases (inclusive (start, stop) pairs) or M token masks ((T,) or (M, T) of
        0/1): the relevant word vectors are ``mask * vectors``."""
        sent = (tokens_or_sentence if isinstance(tokens_or_sentence, ModelSentence)
                else self.prepare(tokens_or_sentence))
        T = sent.length
        if (phrases is None) == (masks is None):
            raise ValueError("give exactly one of phrases=[(start, stop), ...] or masks=(M, T)")
        x = sent.vectors
        if phrases is not None:
            mask = torch.from_numpy(_pair_masks(check_phrases(phrases, T), T)).to(x.dtype)
        else:
            mask = check_token_masks(masks, T).to(x.dtype)
        mask = mask.to(x.device)
        feats = sent.features
        if mask.shape[0] == 0:
            rel = feats.new_zeros(0, feats.shape[0])
        else:
            rel = sent.decomposer.cd_relevant_input(x, mask.unsqueeze(2) * x).relevant
        irrel = feats.unsqueeze(0) - rel
        w = self.head.weight.to(x.dtype)
        b = None if self.head.bias is None else self.head.bias.to(x.dtype)
        return TextCDResult(rel @ w.T, irrel @ w.T, mask, b)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _shape(inp) -> str:
    t = getattr(inp, "text", inp)
    return f"input {tuple(t.shape)}" + (" (.text)" if t is not inp else "")


def _cut(s: _Structure, env: dict, seq_first: bool) -> fx.GraphModule:
    """The graph from the word vectors (placeholder, (1, T, E)) to the head's input: what the
    embedding reaches is copied; everything else is a constant of this sentence."""
    gm = s.gm
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    # what the head's input needs, and what the word vectors reach
    need, todo = set(), [s.features]
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            if n is not s.embedding:      # the word vectors replace it: its inputs are not needed
                todo.extend(n.all_input_nodes)
    reach = {s.embedding}
    for n in gm.graph.nodes:
        if any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    graph = fx.Graph()
    root: dict = {}           # target -> module, parameter or constant (names as in the model)
    vecs = graph.placeholder("vectors")
    mapping: dict = {}
    constants = 0
    for n in sorted(need, key=order.__getitem__):
        if n is s.embedding:
            mapping[n] = graph.call_method("transpose", (vecs, 0, 1)) if seq_first else vecs
        elif n in reach:
            mapping[n] = graph.node_copy(n, lambda a: mapping[a])
            if n.op == "call_module":
                root[n.target] = gm.get_submodule(n.target)
        elif n.op == "get_attr":
            mapping[n] = graph.get_attr(n.target)
            root[n.target] = fetch_attr(gm, n.target)
        elif n in env:
            value = env[n]
            if isinstance(value, torch.Tensor):
                name = f"_sentence_constant{constants}"
                constants += 1
                root[name] = value.detach()
                mapping[n] = graph.get_attr(name)
            else:
                mapping[n] = value
        else:
            raise UnsupportedOpError(f"no value for {n.format_node()}")
    graph.output(mapping[s.features])
    wrapper = fx.GraphModule(root, graph)
    return wrapper.eval()


TextDecomposer.general = ModelTextDecomposer

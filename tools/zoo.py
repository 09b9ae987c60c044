"""Model zoo: which architectures fastacd decomposes, how well, and which ops it lacks (issue 16).

Every entry is built with random initialisation (no weights are downloaded; network access is
refused in the worker process), in eval mode, from a fixed seed. ``check(entry)`` runs

* ``torch.fx`` symbolic tracing and ``torch.export.export(strict=False)`` (ok / the error),
* ``fastacd.Decomposer(model).cd(x, masks)`` for 4 block masks (ok / the exception and the
  first line of its message),
* when that works: completeness (relevant + irrelevant == logits), batched vs one mask at a
  time, float32 vs float64, the float64 engine vs ``fastacd.reference.cd``, and the time of
  CD per mask over one plain forward (1 thread),
* an op inventory (fx graph, or the export graph where fx fails) and every op fastacd has
  no rule for (not only the first one), so the rule work can be prioritised.

Command line (from the repository root; each model runs in its own subprocess with a
timeout so one hang or crash does not stop the survey)::

    OMP_NUM_THREADS=1 python tools/zoo.py                       # all entries -> bench/results/zoo.json
    python tools/zoo.py --only timm:convnext_atto tv:resnet18   # some entries (names or globs)
    python tools/zoo.py --list                                  # the registry
    python tools/zoo.py --markdown docs/zoo.md                  # the report, from the JSON

Importable: ``ENTRIES`` (name -> Entry), ``build(entry)``, ``check(entry)``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# No downloads, ever: the zoo is random init only (set before transformers/timm import).
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's fastacd, not an installed copy
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import torch.nn as nn  # noqa: E402

RESULTS_JSON = ROOT / "bench" / "results" / "zoo.json"
OWN_INIT_JSON = ROOT / "bench" / "results" / "zoo_own_init.json"  # the survey with --init own
TIMING_MASKS = 64          # masks of the CD / forward timing (issue 16's setting)
TIMING_BUDGET_S = 30.0     # fewer timing masks when 64 would take longer than this
NUM_CLASSES = 10           # small heads: the head is not what the zoo is about


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One zoo model.

    name: unique id, ``<source>:<model>`` (``tv:``, ``timm:``, ``text:``).
    family: the architecture family it stands for.
    size: the survey's input size (images: H = W; text: tokens); the model's native size.
    min_size: the smallest size the model accepts (what the fast tests use).
    input_kind: ``"image"`` (1, 3, H, W) floats, or ``"tokens"`` (1, T) ids; a token model
        is decomposed from its embeddings (the masks select tokens, as in CD for text).
    build: ``build(size) -> nn.Module`` with random init (``size`` matters only for models
        whose input size is fixed at construction).
    """
    name: str
    source: str
    family: str
    size: int
    min_size: int
    build_fn: Callable[[int], nn.Module] = field(repr=False, compare=False)
    input_kind: str = "image"
    note: str = ""

    @property
    def model_name(self) -> str:
        return self.name.split(":", 1)[1]


ENTRIES: dict[str, Entry] = {}


def _add(entry: Entry) -> None:
    assert entry.name not in ENTRIES, entry.name
    ENTRIES[entry.name] = entry


# ---- torchvision: the 18 classification families of issue 16 ---------------------------
def _tv_builder(name: str, **kw):
    def build(size: int) -> nn.Module:
        import torchvision
        extra = dict(kw)
        if name == "vit_b_16":
            extra["image_size"] = size       # position embeddings are sized at construction
        if name == "maxvit_t":
            extra["input_size"] = (size, size)
        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **extra)
    return build


# (name, family, native size, smallest accepted size, note). Smallest: by probing forward
# passes (maxvit_t needs multiples of 7*32 = 224 for its 7x7 partitions).
_TORCHVISION = [
    ("vgg16", "vgg", 224, 32, ""),
    ("vgg11_bn", "vgg", 224, 32, ""),
    ("alexnet", "alexnet", 224, 64, ""),
    ("resnet18", "resnet", 224, 32, ""),
    ("resnet50", "resnet", 224, 32, ""),
    ("densenet121", "densenet", 224, 32, ""),
    ("mobilenet_v2", "mobilenet", 224, 32, ""),
    ("mobilenet_v3_small", "mobilenet", 224, 32, "squeeze-excitation (hardsigmoid)"),
    ("efficientnet_b0", "efficientnet", 224, 32, "squeeze-excitation (sigmoid), stochastic depth"),
    ("regnet_y_400mf", "regnet", 224, 32, "squeeze-excitation (sigmoid)"),
    ("squeezenet1_0", "squeezenet", 224, 32, ""),
    ("googlenet", "googlenet", 224, 32, "aux_logits=False"),
    ("shufflenet_v2_x0_5", "shufflenet", 224, 32, "chunk, channel shuffle"),
    ("mnasnet0_5", "mnasnet", 224, 32, ""),
    ("convnext_tiny", "convnext", 224, 32, "LayerNorm2d, LayerScale, stochastic depth"),
    ("swin_t", "swin", 224, 32, "shifted windows, relative position bias"),
    ("vit_b_16", "vit", 224, 32, "image_size set at construction"),
    ("maxvit_t", "maxvit", 224, 224, "input_size set at construction; multiples of 224 only"),
]
for _n, _fam, _size, _min, _note in _TORCHVISION:
    _kw = {"aux_logits": False, "init_weights": True} if _n == "googlenet" else {}
    _add(Entry(f"tv:{_n}", "torchvision", _fam, _size, _min, _tv_builder(_n, **_kw), note=_note))


# ---- timm: one small model per family ---------------------------------------------------
def _timm_builder(name: str, size_kw: str | None = None, **kw):
    def build(size: int) -> nn.Module:
        import timm
        extra = dict(kw)
        if size_kw is not None:
            extra[size_kw] = size            # fixed-size models: build them for this size
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **extra)
    return build


_SMALL_BEIT = dict(embed_dim=192, depth=4, num_heads=3)
# (family, timm model, native size, smallest size, size keyword or None, extra kwargs, note).
# Smallest sizes: by probing; models built for a size (size keyword) take that size exactly.
_TIMM = [
    ("resnet", "resnet18", 224, 32, None, {}, ""),
    ("resnext", "resnext26ts", 256, 32, None, {}, "byobnet ResNeXt, SiLU"),
    ("seresnet", "seresnet18", 224, 32, None, {}, "squeeze-excitation (sigmoid)"),
    ("senet", "legacy_seresnet18", 224, 32, None, {}, "legacy SENet SE module"),
    ("efficientnet", "efficientnet_b0", 224, 32, None, {}, "SE (sigmoid), SiLU"),
    ("mobilenetv3", "mobilenetv3_small_050", 224, 32, None, {}, "SE (hardsigmoid), hardswish"),
    ("mobilenetv4", "mobilenetv4_conv_small", 224, 32, None, {}, "universal inverted bottleneck"),
    ("regnet", "regnety_002", 224, 32, None, {}, "SE (sigmoid)"),
    ("rexnet", "rexnet_100", 224, 32, None, {}, "SE, partial residual (slice add)"),
    ("ghostnet", "ghostnet_050", 224, 32, None, {}, "ghost modules (cat + slice), SE hard_sigmoid"),
    ("dla", "dla46_c", 224, 32, None, {}, "tree aggregation"),
    ("dpn", "dpn48b", 224, 32, None, {}, "dual path (split + cat)"),
    ("hrnet", "hrnet_w18_small", 224, 32, None, {}, "multi-resolution fusion, upsample"),
    ("cspnet", "cspresnet50", 256, 32, None, {}, "cross-stage split"),
    ("darknet", "darknet17", 256, 32, None, {}, "LeakyReLU"),
    ("vovnet", "ese_vovnet19b_slim_dw", 224, 32, None, {}, "effective SE (hard_sigmoid)"),
    ("res2net", "res2net50_26w_4s", 224, 32, None, {}, "torch.split hierarchy"),
    ("resnest", "resnest14d", 224, 32, None, {}, "split attention (radix softmax)"),
    ("sknet", "skresnet18", 224, 32, None, {}, "selective kernel (softmax over branches)"),
    ("byobnet", "gernet_s", 256, 32, None, {}, ""),
    ("selecsls", "selecsls42b", 224, 32, None, {}, ""),
    ("xception", "xception41", 299, 32, None, {}, "separable convs"),
    ("mixnet", "mixnet_s", 224, 32, None, {}, "mixed kernels (torch.split)"),
    ("lcnet", "lcnet_050", 224, 32, None, {}, "SE (hardsigmoid)"),
    ("hgnet", "hgnetv2_b0", 224, 32, None, {}, "learnable affine, ESE"),
    ("repvit", "repvit_m0_9", 224, 32, None, {}, "SE, reparameterisable convs"),
    ("fastvit", "fastvit_t8", 256, 32, None, {}, "RepMixer, MobileOne blocks"),
    ("resnetv2_bit", "resnetv2_50x1_bit", 224, 32, None, {}, "GroupNorm, weight-standardised convs"),
    ("nfnet", "nf_resnet26", 224, 32, None, {}, "normalizer-free: ScaledStdConv, gamma act"),
    ("convnext", "convnext_atto", 224, 32, None, {}, "LayerNorm2d, LayerScale"),
    ("convmixer", "convmixer_768_32", 224, 32, None, {}, "GELU + BatchNorm residual mixer"),
    ("poolformer", "poolformer_s12", 224, 32, None, {}, "GroupNorm(1), pooling token mixer"),
    ("mambaout", "mambaout_femto", 224, 32, None, {}, "gated CNN (product of two branches)"),
    ("starnet", "starnet_s1", 224, 32, None, {}, "star operation (product of two branches)"),
    ("botnet", "botnet26t_256", 256, 32, "img_size", {}, "self-attention in a ResNet"),
    ("mlp_mixer", "mixer_s32_224", 224, 32, "img_size", {}, "token-mixing MLP, LayerNorm"),
    ("resmlp", "resmlp_12_224", 224, 32, "img_size", {}, "Affine (addcmul), LayerScale"),
    ("gmlp", "gmlp_ti16_224", 224, 32, "img_size", {}, "spatial gating unit (chunk + product)"),
    ("vit", "vit_tiny_patch16_224", 224, 32, "img_size", {}, "attention (F.sdpa), class token"),
    ("deit", "deit_tiny_distilled_patch16_224", 224, 32, "img_size", {}, "distillation token, two heads"),
    ("cait", "cait_xxs24_224", 224, 32, "img_size", {}, "talking heads, class attention, LayerScale"),
    ("xcit", "xcit_nano_12_p16_224", 224, 32, "img_size", {}, "cross-covariance attention, F.normalize"),
    ("beit", "beit_base_patch16_224", 224, 32, "img_size", _SMALL_BEIT,
     "relative position bias; beit_base shrunk to dim 192, depth 4"),
    ("eva", "eva02_tiny_patch14_224", 224, 32, "img_size", {}, "rotary embedding, SwiGLU"),
    ("swin", "swin_tiny_patch4_window7_224", 224, 32, "img_size", {}, "shifted windows (roll, mask)"),
    ("pit", "pit_ti_224", 224, 32, "img_size", {}, "pooling-based ViT (depthwise conv on tokens)"),
    ("levit", "levit_128s", 224, 32, "img_size", {}, "attention bias, hardswish, BN on tokens"),
    ("coat", "coat_lite_tiny", 224, 32, "img_size", {}, "conv-attentional (factorised attention)"),
    ("crossvit", "crossvit_tiny_240", 240, 32, None, {}, "two branches, cross attention"),
    ("twins", "twins_pcpvt_small", 224, 32, "img_size", {}, "spatial-reduction attention, PEG"),
    ("pvt_v2", "pvt_v2_b0", 224, 32, None, {}, "spatial-reduction attention, DWConv MLP"),
    ("mobilevit", "mobilevit_xxs", 256, 32, None, {}, "unfold/fold patches + transformer"),
    ("convit", "convit_tiny", 224, 32, "img_size", {}, "gated positional self-attention"),
    ("tiny_vit", "tiny_vit_5m_224", 224, 32, None, {}, "windowed attention with bias"),
    ("efficientvit", "efficientvit_b0", 224, 32, None, {}, "ReLU linear attention (MIT)"),
    ("edgenext", "edgenext_xx_small", 256, 32, None, {}, "split depthwise + XCA"),
    ("efficientformer", "efficientformer_l1", 224, 224, None, {}, "pooling mixer + attention"),
    ("swiftformer", "swiftformer_xs", 224, 32, None, {}, "efficient additive attention"),
    ("gcvit", "gcvit_xxtiny", 224, 32, "img_size", {}, "global-context attention"),
    ("davit", "davit_tiny", 224, 32, None, {}, "channel + spatial window attention"),
    ("focalnet", "focalnet_tiny_srf", 224, 32, None, {}, "focal modulation (gated aggregation)"),
    ("volo", "volo_d1_224", 224, 32, "img_size", {}, "outlook attention (unfold/fold)"),
    ("hiera", "hiera_tiny_224", 224, 32, "img_size", {}, "mask-unit attention"),
    ("sequencer", "sequencer2d_s", 224, 32, "img_size", {}, "bidirectional LSTMs over rows/cols"),
    ("metaformer", "caformer_s18", 224, 32, None, {}, "StarReLU (relu(x) ** 2), conv + attention mixers"),
    ("halonet", "halonet26t", 256, 256, None, {}, "blocked local attention with halos (Tensor.unfold)"),
    ("mobilevitv2", "mobilevitv2_050", 256, 32, None, {}, "separable linear attention (expand_as)"),
    ("tnt", "tnt_s_patch16_224", 224, 32, "img_size", {}, "transformer in transformer (pixel patches as a batch)"),
    ("mvitv2", "mvitv2_tiny", 224, 32, "img_size", {}, "pooling attention, relative position (in-place copy_)"),
]
for _fam, _n, _size, _min, _skw, _kw, _note in _TIMM:
    _add(Entry(f"timm:{_n}", "timm", _fam, _size, _min, _timm_builder(_n, _skw, **_kw), note=_note))


# ---- text: token ids in, decomposed from the embeddings --------------------------------
class TokenModel(nn.Module):
    """``body(embed(tokens))``: a text classifier split at its embedding.

    CD for text selects tokens: the relevant input is the embedding of the chosen tokens,
    so the engine sees ``body`` with the (1, T, E) embeddings as its input.
    """

    def __init__(self, embed: nn.Module, body: nn.Module):
        super().__init__()
        self.embed, self.body = embed, body

    def forward(self, tokens):
        return self.body(self.embed(tokens))


class _RecurrentBody(nn.Module):
    def __init__(self, cell: nn.Module, hidden: int, classes: int):
        super().__init__()
        self.rnn, self.head = cell, nn.Linear(hidden, classes)

    def forward(self, e):
        out, _ = self.rnn(e)
        return self.head(out[:, -1])        # the output at the last token


class _EncoderBody(nn.Module):
    def __init__(self, dim: int, max_len: int, classes: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, e):
        h = self.encoder(e + self.pos[:, :e.shape[1]])
        return self.head(h.mean(1))


class _BertBody(nn.Module):
    """A ``transformers`` sequence classifier called with ``inputs_embeds``."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, e):
        return self.bert(inputs_embeds=e).logits


VOCAB, EMBED, TEXT_LEN = 50, 16, 12


def _lstm(size):
    return TokenModel(nn.Embedding(VOCAB, EMBED), _RecurrentBody(nn.LSTM(EMBED, 24, batch_first=True), 24, 3))


def _gru(size):
    return TokenModel(nn.Embedding(VOCAB, EMBED), _RecurrentBody(nn.GRU(EMBED, 24, batch_first=True), 24, 3))


def _encoder(size):
    return TokenModel(nn.Embedding(VOCAB, 32), _EncoderBody(32, 64, 3))


def _bert(attn: str):
    def build(size):
        from transformers import BertConfig, BertForSequenceClassification
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=3,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg._attn_implementation = attn
        bert = BertForSequenceClassification(cfg)
        return TokenModel(bert.bert.embeddings.word_embeddings, _BertBody(bert))
    return build


_add(Entry("text:lstm", "text", "lstm", TEXT_LEN, 8, _lstm, "tokens", "embedding -> nn.LSTM -> linear"))
_add(Entry("text:gru", "text", "gru", TEXT_LEN, 8, _gru, "tokens", "embedding -> nn.GRU -> linear"))
_add(Entry("text:transformer_encoder", "text", "transformer_encoder", TEXT_LEN, 8, _encoder, "tokens",
           "nn.TransformerEncoder (2 layers, d 32), mean pooling"))
_add(Entry("text:bert_tiny", "text", "bert", TEXT_LEN, 8, _bert("eager"), "tokens",
           "transformers BertForSequenceClassification, 2 layers, hidden 32, eager attention"))
_add(Entry("text:bert_tiny_sdpa", "text", "bert", TEXT_LEN, 8, _bert("sdpa"), "tokens",
           "the same BERT with F.scaled_dot_product_attention"))


# --------------------------------------------------------------------------------------
# Building models and inputs
# --------------------------------------------------------------------------------------
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial statistics and shifts, so the CD splits of norms and biases are exercised.

    Fresh models have batchnorm statistics (0, 1), norm affines (1, 0) and often zero biases,
    which make the bias and shift splits trivial; trained models have none of that.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            is_norm = "norm" in type(m).__name__.lower()
            for pname, p in m.named_parameters(recurse=False):
                if is_norm and p.dim() == 1 and pname == "weight":
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                elif pname == "bias" and p.dim() == 1 and bool((p == 0).all()):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                elif p.dim() >= 2 and bool((p == 0).all()):
                    # zero-initialised heads (timm's MLP-Mixer family) make the logits constant
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def seed_of(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2 ** 31)


INITS = ("trained-like", "own")


def build(entry: Entry, size: int | None = None, dtype=torch.float32, init: str = "trained-like") -> nn.Module:
    """The entry's model: random init from its seed, eval, ``dtype``.

    ``init="own"`` keeps the library's own initialisation (what a new user gets from
    ``pretrained=False``); ``"trained-like"`` adds ``randomize``'s statistics and shifts.
    """
    torch.manual_seed(seed_of(entry.name))
    model = entry.build_fn(size or entry.size)
    if init == "trained-like":
        randomize(model, seed_of(entry.name))
    return model.eval().to(dtype)


def decomposed_model(entry: Entry, model: nn.Module) -> nn.Module:
    """What the engine decomposes: the model, or a token model's body (input: embeddings)."""
    return model.body if entry.input_kind == "tokens" else model


def make_input(entry: Entry, model: nn.Module, size: int | None = None, dtype=torch.float32):
    """(x, tokens): the engine's float input (1, 3, H, W) or (1, T, E), and the token ids or None."""
    size = size or entry.size
    g = torch.Generator().manual_seed(seed_of(entry.name) + 1)
    if entry.input_kind == "tokens":
        tokens = torch.randint(0, VOCAB, (1, size), generator=g)
        with torch.no_grad():
            return model.embed(tokens).to(dtype), tokens
    return torch.randn(1, 3, size, size, generator=g).to(dtype), None


def block_masks(entry: Entry, x: torch.Tensor) -> torch.Tensor:
    """4 block masks: the image quadrants (M, H, W), or 4 runs of tokens (M, T, E)."""
    if entry.input_kind == "tokens":
        t, e = x.shape[1], x.shape[2]
        m = torch.zeros(4, t, e, dtype=x.dtype)
        for k, part in enumerate(torch.arange(t).chunk(4)):
            m[k, part] = 1
        return m
    h, w = x.shape[-2:]
    m = torch.zeros(4, h, w, dtype=x.dtype)
    m[0, :h // 2, :w // 2] = 1
    m[1, :h // 2, w // 2:] = 1
    m[2, h // 2:, :w // 2] = 1
    m[3, h // 2:, w // 2:] = 1
    return m


def random_block_masks(entry: Entry, x: torch.Tensor, n: int) -> torch.Tensor:
    """n random square blocks of a quarter of the side (tokens: random runs), for timing."""
    g = torch.Generator().manual_seed(seed_of(entry.name) + 2)
    if entry.input_kind == "tokens":
        t, e = x.shape[1], x.shape[2]
        m = torch.zeros(n, t, e, dtype=x.dtype)
        for k in range(n):
            a = int(torch.randint(0, t, (1,), generator=g))
            m[k, a:a + max(1, t // 4)] = 1
        return m
    h, w = x.shape[-2:]
    s = max(1, h // 4)
    m = torch.zeros(n, h, w, dtype=x.dtype)
    for k in range(n):
        i = int(torch.randint(0, h - s + 1, (1,), generator=g))
        j = int(torch.randint(0, w - s + 1, (1,), generator=g))
        m[k, i:i + s, j:j + s] = 1
    return m


# --------------------------------------------------------------------------------------
# Op names and inventories
# --------------------------------------------------------------------------------------
_PREFIXES = (("torch.nn.functional", "F"), ("torch.nn.modules", "nn"), ("_operator", "operator"),
             ("torch._C._nn", "F"), ("torch._C._VariableFunctions", "torch"), ("torch.functional", "torch"))


def _qual(obj) -> str:
    """``F.layer_norm``, ``nn.LayerNorm``, ``operator.mul``, ``torch.sigmoid``, ``timm.layers....``."""
    mod = getattr(obj, "__module__", None) or ""
    name = (getattr(obj, "__qualname__", None) if isinstance(obj, type) else None) \
        or getattr(obj, "__name__", None) or repr(obj)  # torch.flatten, not _VariableFunctionsClass.flatten
    for long, short in _PREFIXES:
        if mod == long or mod.startswith(long + "."):
            mod = short
            break
    return name if mod in ("builtins", "") else f"{mod}.{name}"


def op_name(node: fx.Node) -> str:
    """A short, stable name for the op of a graph node (fx or export)."""
    if node.op == "call_module":
        owner = node.graph.owning_module
        return _qual(type(owner.get_submodule(node.target))) if owner is not None else str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):           # export: aten.layer_norm.default
        return f"aten.{target._schema.name.split('::')[-1]}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"aten.{target.__name__}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"hop.{target.name()}"
    return _qual(target)


def inventory(gm: fx.GraphModule) -> dict:
    """The set of call_module types, call_function targets and call_method names of a graph."""
    inv = {"call_module": set(), "call_function": set(), "call_method": set()}
    for node in gm.graph.nodes:
        if node.op in inv:
            inv[node.op].add(op_name(node))
    return {k: sorted(v) for k, v in inv.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:400] if text else ""


def _error(exc: BaseException) -> dict:
    return {"ok": False, "error_type": type(exc).__name__, "error": _first_line(exc)}


def unsupported_ops(model: nn.Module, rules=None, gm: fx.GraphModule | None = None) -> list[dict] | None:
    """Every input-dependent op of ``model`` fastacd has no rule for, in graph order.

    fastacd's capture stops at the first such node; this runs the capture itself with a copy
    of the rule set (``rules``, default: fastacd's) whose ``claim`` records a refusal and
    answers with a placeholder step, so the capture walks on (the node taken to give a
    decomposed tensor) and a model's full list of missing ops is known. With ``gm`` (fastacd's
    torch.export capture, ``export_module``) it walks that graph instead of torch.fx's. Returns None
    when the capture's interfaces are not there or the model cannot be captured (the first
    error from ``Decomposer`` is recorded either way).
    """
    try:
        import fastacd.rules as R
        from fastacd.capture.graph import CapturedGraph
        from fastacd.capture.nodes import Step, UnsupportedOpError, describe_node
        recording = R.resolve(rules).replace()  # a copy: the patched claim stays here
        real_claim = recording.claim
        placeholder = type("Missing", (R.Rule,), {"kind": "zoo:missing"})()
    except Exception:  # noqa: BLE001 - interfaces moved: report the first error only
        return None
    found = []

    def claim(graph, node, dep):
        try:
            return real_claim(graph, node, dep)
        except UnsupportedOpError as exc:
            msg = str(exc).splitlines()[0]
            why = re.search(r"\(graph node '[^']*'\) \((.*)\)\.$", msg)
            found.append({"op": op_name(node), "reason": why.group(1) if why else "",
                          "where": describe_node(node), "factors": _dependent_args(node, graph.dependent)})
            return Step(node, placeholder, dep)

    recording.claim = claim
    try:
        CapturedGraph(model, recording, gm)
    except UnsupportedOpError as exc:
        msg = _first_line(exc)
        if "could not trace" in msg:
            return None
        found.append({"op": "capture: " + msg[:80], "reason": msg, "where": ""})
    except Exception as exc:  # noqa: BLE001 - a rule that breaks on this model: record it
        found.append({"op": f"capture: {type(exc).__name__}", "reason": _first_line(exc), "where": ""})
    return _dedupe(found)


def _dependent_args(node: fx.Node, dependent: set) -> int:
    """How many of the node's arguments (with repeats: x * x counts 2) depend on the input."""
    count = 0

    def visit(a):
        nonlocal count
        count += a in dependent
        return a
    fx.node.map_arg((node.args, node.kwargs), visit)
    return count


_PRODUCTS = {"operator.mul", "operator.truediv", "operator.matmul", "torch.mul", "torch.div", "torch.matmul",
             "torch.bmm", "torch.einsum", ".mul()", ".div()", ".matmul()", ".bmm()", "operator.imul",
             "aten.mul", "aten.div", "aten.matmul", "aten.bmm", "aten.mm", "aten.einsum", "aten.baddbmm"}
_SOFTMAXES = {"aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"}


def export_unsupported(ep) -> list[dict]:
    """The input-dependent ATen ops of an export graph without a counterpart rule (approximate).

    fastacd has no export capture yet; this lists what one would need beyond the ops the fx
    capture covers today (``ATEN_WITH_RULE``), with products of two input-dependent values
    and softmax inside the network told apart, as in the fx walk.
    """
    gm = ep.graph_module
    user = set(ep.graph_signature.user_inputs)
    nodes = list(gm.graph.nodes)
    dependent = {n for n in nodes if n.op == "placeholder" and n.name in user}
    output = next(n for n in nodes if n.op == "output")
    found = []
    for node in nodes:
        if node.op != "call_function" or not any(a in dependent for a in node.all_input_nodes):
            continue
        dependent.add(node)
        name = op_name(node)
        if name.startswith("aten.") and name.endswith("_") and not name.endswith("__"):
            name = name[:-1]  # in-place variants: the same rule
        factors = _dependent_args(node, dependent)
        item = {"op": name, "reason": "", "where": f"export node {node.name!r}", "factors": factors}
        if has_counterpart(name):  # the fx capture's rule for its namesake covers it
            continue
        if name in _PRODUCTS and (factors >= 2 or (name == "aten.div" and len(node.args) > 1
                                                   and node.args[1] in dependent)):
            item["reason"] = "a product or quotient of two input-dependent values"
        elif name in _SOFTMAXES and list(node.users) != [output]:
            item["reason"] = "a softmax inside the network"
        found.append(item)
    return _dedupe(found)


def _dedupe(found: list[dict]) -> list[dict]:
    """One item per op key, in order of first occurrence, with its count and first place."""
    out: dict[str, dict] = {}
    for item in found:
        key = op_key(item)
        if key in out:
            out[key]["count"] += 1
        else:
            out[key] = dict(item, count=1)
    return list(out.values())


def op_key(item: dict) -> str:
    """The key of a missing op in the ops-needed table: the op, plus why when that matters."""
    reason = item.get("reason", "")
    if "product or quotient of two input-dependent" in reason or (
            item["op"] in _PRODUCTS and item.get("factors", 0) >= 2):
        return f"{item['op']} (two input-dependent factors)"
    if "softmax inside the network" in reason:
        return f"{item['op']} (inside the network)"
    if "methods whose arguments" in reason or "a method whose arguments" in reason:
        return f"{item['op']} (input-dependent argument)"
    if "indexing with an index computed" in reason:
        return f"{item['op']} (input-dependent index)"
    if reason and reason.startswith(("add/sub with alpha",)):
        return f"{item['op']} (alpha)"
    return item["op"]


# Rule groups: the ops one rule (or one capture feature) would cover, for prioritising. The
# first pattern that matches an op key wins; an op matching none is its own group.
RULE_GROUPS = [
    (r"aten\.copy_|aten\.\w+_\.", "in-place writes into a view (MViTv2's attention bias)"),
    (r"^capture", "capture: torch.export where torch.fx fails"),
    (r"layer_norm|LayerNorm", "LayerNorm (nn.LayerNorm, F.layer_norm)"),
    (r"group_norm|GroupNorm", "GroupNorm (nn.GroupNorm, F.group_norm)"),
    (r"rms_norm|RmsNorm|RMSNorm", "RMSNorm"),
    (r"F\.normalize|vector_norm|linalg_norm", "F.normalize (L2 norm; XCiT, SwiftFormer)"),
    (r"hardsigmoid|Hardsigmoid|hard_sigmoid", "hardsigmoid (gates)"),
    (r"sigmoid|Sigmoid", "sigmoid (gates)"),
    (r"(matmul|bmm|einsum|aten\.mm).*two input-dependent", "matmul of two input-dependent values (attention)"),
    (r"two input-dependent", "element-wise product of two input-dependent values (gates, SwiGLU)"),
    (r"scaled_dot_product_attention", "F.scaled_dot_product_attention"),
    (r"MultiheadAttention", "nn.MultiheadAttention"),
    (r"shifted_window_attention", "torchvision swin shifted_window_attention (fx-wrapped function)"),
    (r"[Ss]oftmax.*inside", "softmax inside the network (attention, split attention)"),
    (r"split|chunk|unbind", "split / chunk / unbind"),
    (r"pad|Pad", "pad (F.pad, nn.ConstantPad2d, swin's patch-merging pad)"),
    (r"stochastic_depth|drop_path", "stochastic depth / drop path (eval)"),
    (r"matmul|einsum|bmm", "matmul / einsum with a constant"),
    (r"LSTM", "nn.LSTM in the general engine"),
    (r"GRU", "nn.GRU"),
    (r"TransformerEncoder", "nn.TransformerEncoder"),
    (r"\broll\b", "roll (shifted windows)"),
    (r"stack", "stack"),
    (r"addcmul", "addcmul (ResMLP's affine)"),
    (r"[Ff]old|[Uu]nfold|im2col|col2im", "fold / unfold"),
    (r"\.to\(\)|type_as|_to_copy", "dtype casts (.to(), .type_as())"),
    (r"expand|repeat", "expand / repeat"),
]


def rule_group(key: str) -> str:
    for pattern, group in RULE_GROUPS:
        if re.search(pattern, key):
            return group
    return key


# ATen ops (export graphs) with a counterpart rule in fastacd's fx capture today; the rest of
# an export-only model's ATen ops are the ones its decomposition would need (approximate:
# the export capture does not exist yet).
ATEN_WITH_RULE = {
    "aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten.linear", "aten.addmm",
    "aten.batch_norm", "aten._native_batch_norm_legit_no_training", "aten.relu", "aten.relu6",
    "aten.hardtanh", "aten.leaky_relu", "aten.elu", "aten.celu", "aten.selu", "aten.gelu", "aten.silu",
    "aten.hardswish", "aten.tanh", "aten.mish", "aten.max_pool1d", "aten.max_pool2d",
    "aten.max_pool2d_with_indices", "aten.avg_pool1d", "aten.avg_pool2d", "aten.adaptive_avg_pool1d",
    "aten.adaptive_avg_pool2d", "aten.adaptive_max_pool2d", "aten.add", "aten.sub", "aten.rsub", "aten.mul",
    "aten.div", "aten.neg", "aten.view", "aten.reshape", "aten.flatten", "aten.unflatten", "aten.permute",
    "aten.transpose", "aten.t", "aten.cat", "aten.concat", "aten.slice", "aten.select", "aten.mean",
    "aten.sum", "aten.dropout", "aten.clone", "aten.contiguous", "aten.unsqueeze", "aten.squeeze",
    "aten.upsample_nearest2d", "aten.upsample_bilinear2d", "aten.pixel_shuffle", "aten.pixel_unshuffle",
    "aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten.size", "aten.sym_size",
    "aten.sym_numel", "aten.alias", "aten.detach", "aten._assert_tensor_metadata",
}




def has_counterpart(aten: str, rules=None) -> bool:
    """Whether an ATen op (``aten.layer_norm``) has a rule in fastacd's fx capture: listed in
    ``ATEN_WITH_RULE``, or its torch / functional / method namesake is claimed by a rule of the
    set (so the list follows the rules as they land)."""
    if aten in ATEN_WITH_RULE or aten == "operator.getitem":
        return True
    base = aten.split(".", 1)[-1].lstrip("_")
    base = {"split_with_sizes": "split", "unsafe_split": "split", "unsafe_chunk": "chunk"}.get(base, base)
    try:
        import fastacd.rules as R
        rules = R.resolve(rules)
        functions, methods = rules._functions, rules._methods
    except Exception:  # noqa: BLE001 - the rule set's internals moved: the static list only
        return False
    for f in (getattr(torch, base, None), getattr(torch.nn.functional, base, None)):
        try:
            if f is not None and f in functions:
                return True
        except TypeError:  # unhashable
            pass
    return base in methods


# --------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_network():
    """Refuse every socket connection (the zoo must run offline)."""
    def refuse(*a, **k):
        raise RuntimeError("the model zoo must not touch the network")
    saved = socket.socket.connect, socket.create_connection
    socket.socket.connect, socket.create_connection = refuse, refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.create_connection = saved


def _gap(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a.double() - b.double()).abs().max()) / scale


def _best(fn, repeats: int) -> tuple[float, float]:
    """Best wall and best process CPU time of ``fn()`` (seconds). On a shared machine the CPU
    time of a one-thread run depends much less on the neighbours' load than the wall time."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def check(entry: Entry, size: int | None = None, *, timing_masks: int = TIMING_MASKS,
          do_export: bool = True, numbers: bool = True, init: str = "trained-like") -> dict:
    """Run every check on one entry; never raises for a failure of the model (records it)."""
    import fastacd
    size = size or entry.size
    t_start = time.perf_counter()
    rec: dict[str, Any] = {"name": entry.name, "source": entry.source, "family": entry.family,
                           "input_kind": entry.input_kind, "size": size, "note": entry.note}
    full = build(entry, size, init=init)
    model = decomposed_model(entry, full)
    x, tokens = make_input(entry, full, size)
    rec["input_shape"] = list(x.shape) if tokens is None else list(tokens.shape)
    rec["decomposed_input_shape"] = list(x.shape)
    rec["params_m"] = round(sum(p.numel() for p in full.parameters()) / 1e6, 3)
    with torch.no_grad():
        logits = model(x)
    rec["output_shape"] = list(logits.shape)

    # capture: torch.fx, then torch.export
    gm = None
    try:
        gm = fx.GraphModule(model, fx.Tracer().trace(model))
        rec["fx"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001
        rec["fx"] = _error(exc)
    ep = None
    if do_export and gm is None:  # fastacd's capture='auto' falls back to torch.export here
        t = time.perf_counter()
        try:
            from fastacd.capture.export import export_module
            ep = export_module(model, x)  # fastacd's export capture (an fx.GraphModule of ATen ops)
            rec["export"] = {"ok": True}
        except Exception as exc:  # noqa: BLE001
            rec["export"] = _error(exc)
        rec["export"]["seconds"] = round(time.perf_counter() - t, 2)
    if gm is not None:
        rec["inventory"] = dict(inventory(gm), graph="fx")
        rec["unsupported"] = unsupported_ops(model)
    elif ep is not None:
        rec["inventory"] = dict(inventory(ep), graph="export")
        rec["unsupported"] = unsupported_ops(model, gm=ep)
    else:
        rec["inventory"] = None
        rec["unsupported"] = [{"op": "capture: torch.fx cannot trace", "reason": rec["fx"]["error"], "where": ""}]

    # fastacd: construction and 4 block masks
    masks = block_masks(entry, x)
    stage = "construct"
    try:
        with warnings.catch_warnings():  # capture='auto' says when it falls back to torch.export
            warnings.simplefilter("ignore")
            dec = fastacd.Decomposer(model)
        stage = "cd"
        with torch.no_grad():
            res = dec.cd(x, masks)
        rec["fastacd"] = {"ok": True, "capture": dec.capture}
    except Exception as exc:  # noqa: BLE001
        rec["fastacd"] = dict(_error(exc), stage=stage)
        rec["fastacd"]["op"] = first_failing_op(rec)
        if stage == "cd" and not rec.get("unsupported"):
            rec["unsupported"] = [{"op": f"runtime: {type(exc).__name__}", "reason": _first_line(exc), "where": ""}]
    if entry.input_kind == "tokens":
        rec["text_api"] = _text_api(entry, full, tokens)
    if rec["fastacd"]["ok"] and numbers:
        try:
            rec["numbers"] = _numbers(entry, model, x, masks, res, logits, dec, timing_masks)
        except Exception as exc:  # noqa: BLE001
            rec["numbers"] = dict(_error(exc), trace=traceback.format_exc()[-2000:])
    rec["seconds"] = round(time.perf_counter() - t_start, 2)
    return rec


def first_failing_op(rec: dict) -> str:
    """The op named by fastacd's first error (from the full list when the walk had one)."""
    fa = rec.get("fastacd", {})
    msg = fa.get("error", "")
    for item in rec.get("unsupported") or []:
        if item.get("where") and item["where"] in msg:
            return op_key(item)
    m = re.search(r"no CD rule for (module '[^']*' \((\w+)\)|function (\S+)|method (\.\w+\(\))|ATen op (\S+))", msg)
    if m:
        aten = m.group(5)
        return ".".join(aten.split(".")[:2]) if aten else (m.group(2) or m.group(3) or m.group(4))
    if "could not trace" in msg:
        return "capture: torch.fx cannot trace"
    return f"{fa.get('error_type', '?')}: {msg[:120]}"


def _numbers(entry, model, x, masks, res, logits, dec, timing_masks) -> dict:
    """Completeness, batched = one mask, f32 vs f64, f64 engine vs reference, CD/forward."""
    import fastacd
    scale = max(float(logits.abs().max()), 1e-30)
    out = {"logit_scale": scale}
    out["complete"] = _gap(res.relevant + res.irrelevant, logits.expand_as(res.relevant), scale)
    # the masks select different inputs: near 0, the output does not depend on the input
    out["mask_spread"] = _gap(res.relevant, res.relevant[:1].expand_as(res.relevant), scale)
    with torch.no_grad():
        one = torch.cat([dec.cd(x, masks[k:k + 1]).relevant for k in range(masks.shape[0])])
    out["batched_vs_one"] = _gap(res.relevant, one, scale)

    model64 = copy.deepcopy(model).double()
    x64, masks64 = x.double(), masks.double()
    with torch.no_grad():
        logits64 = model64(x64)
        dec64 = fastacd.Decomposer(model64, capture=dec.capture)
        res64 = dec64.cd(x64, masks64)
        rel_ref, irrel_ref = _reference(dec64, model64, x64, masks64)
    scale64 = max(float(logits64.abs().max()), 1e-300)
    out["complete_f64"] = _gap(res64.relevant + res64.irrelevant, logits64.expand_as(res64.relevant), scale64)
    out["f32_vs_f64"] = _gap(res.relevant, res64.relevant, scale64)
    out["f64_vs_reference"] = _gap(res64.relevant, rel_ref, scale64)
    out["reference_complete"] = _gap(rel_ref + irrel_ref, logits64.expand_as(rel_ref), scale64)
    del model64, res64

    if timing_masks:
        with torch.no_grad():
            fwd, fwd_cpu = _best(lambda: model(x), 5)
            warm = random_block_masks(entry, x, 4)
            per_mask = _best(lambda: dec.cd(x, warm), 1)[0] / 4
            n = int(max(4, min(timing_masks, TIMING_BUDGET_S / 2 / max(per_mask, 1e-9))))
            tm = random_block_masks(entry, x, n)
            cd_t, cd_cpu = _best(lambda: dec.cd(x, tm), 2)
        out.update(timing_masks=n, forward_s=fwd, cd_s=cd_t, cd_per_mask_s=cd_t / n,
                   forward_cpu_s=fwd_cpu, cd_cpu_s=cd_cpu,
                   cd_per_mask_over_forward=cd_cpu / n / fwd_cpu,  # CPU time: robust to the load
                   cd_per_mask_over_forward_wall=cd_t / n / fwd, threads=torch.get_num_threads())
    return out


def _reference(dec, model, x, masks):
    """``fastacd.reference.cd``; on the engine's graph where it is torch.export's (the
    reference's own capture is torch.fx)."""
    import fastacd
    from fastacd.capture.inputs import check_masks
    from fastacd.reference.cd import cd_relevant_input
    if dec.capture == "fx":
        return fastacd.reference.cd(model, x, masks)
    return cd_relevant_input(dec.graph, x, check_masks(x, masks) * x)


def _sizes_note(entries: dict) -> str:
    """Which entries ran below their native input size (``--small`` runs, merged)."""
    small = sorted({entries[n]["source"] for n in entries
                    if n in ENTRIES and entries[n].get("size") != ENTRIES[n].size})
    if not small:
        return ""
    k = sum(1 for n in entries if n in ENTRIES and entries[n].get("size") != ENTRIES[n].size)
    return (f" {k} entries ({', '.join(small)}) ran at their smallest input size (`--small`, to fit the "
            "machine time; the **input** column gives each size), the rest at their native size.")


def _text_api(entry: Entry, model: nn.Module, tokens: torch.Tensor) -> dict:
    """fastacd's text API (``TextDecomposer.from_model``) on a token model: ok, completeness."""
    import fastacd
    t = tokens.shape[1]
    masks = torch.zeros(4, t)
    for k, part in enumerate(torch.arange(t).chunk(4)):
        masks[k, part] = 1
    try:
        dec = fastacd.TextDecomposer.from_model(model)
        with torch.no_grad():
            res = dec.cd(tokens[0], masks=masks)
            logits = model(tokens)
        scale = max(float(logits.abs().max()), 1e-30)
        total = res.relevant + res.irrelevant + (0 if res.bias is None else res.bias)  # parts exclude the head's bias
        return {"ok": True, "complete": _gap(total.to(logits.dtype), logits.expand_as(res.relevant), scale)}
    except Exception as exc:  # noqa: BLE001
        return _error(exc)


# --------------------------------------------------------------------------------------
# Survey: one subprocess per entry
# --------------------------------------------------------------------------------------
def select(patterns: list[str] | None) -> list[Entry]:
    if not patterns:
        return list(ENTRIES.values())
    chosen = [e for e in ENTRIES.values()
              if any(fnmatch.fnmatch(e.name, p) or fnmatch.fnmatch(e.model_name, p) or e.family == p
                     or e.source == p for p in patterns)]
    if not chosen:
        raise SystemExit(f"no zoo entry matches {patterns}; see --list")
    return chosen


def run_isolated(entry: Entry, args: argparse.Namespace) -> dict:
    """``check`` in a fresh process with a timeout; a crash or hang becomes a record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", entry.name, "--worker-out", str(out),
               "--timing-masks", str(args.timing_masks)]
        if args.small:
            cmd.append("--small")
        if args.no_export:
            cmd.append("--no-export")
        cmd += ["--init", args.init]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   PYTHONWARNINGS="ignore")
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            if out.exists():
                return json.loads(out.read_text())
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            why = f"worker exited with {proc.returncode}: {' | '.join(tail)}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {args.timeout} s"
        return {"name": entry.name, "source": entry.source, "family": entry.family,
                "input_kind": entry.input_kind, "size": entry.size, "note": entry.note,
                "crashed": why, "fastacd": {"ok": False, "error_type": "Crash", "error": why,
                                            "op": f"harness: {why[:60]}"},
                "unsupported": [], "seconds": round(time.perf_counter() - t, 2)}


def _worker(name: str, out: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    entry = ENTRIES[name]
    with no_network():
        rec = check(entry, entry.min_size if args.small else None, timing_masks=args.timing_masks,
                    do_export=not args.no_export, init=args.init)
    Path(out).write_text(json.dumps(rec, default=str))


def _meta(args) -> dict:
    import timm
    import torchvision
    import transformers
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    return {"commit": commit, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "transformers": transformers.__version__,
            "machine": platform.machine(), "threads": args.threads, "small": args.small,
            "timing_masks": args.timing_masks, "init": args.init, "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def survey(args: argparse.Namespace) -> dict:
    path = Path(args.json)
    data = json.loads(path.read_text()) if (args.merge and path.exists()) else {"entries": {}}
    for rec in data["entries"].values():  # entries kept by a merge ran at the file's last commit
        rec.setdefault("commit", data.get("meta", {}).get("commit"))
    meta = _meta(args)
    for k, entry in enumerate(select(args.only), 1):
        rec = run_isolated(entry, args)
        rec["commit"] = meta["commit"]
        data["entries"][entry.name] = rec
        fa = rec.get("fastacd", {})
        nums = rec.get("numbers") or {}
        status = "ok" if fa.get("ok") else f"{fa.get('stage', '?')}: {fa.get('op', fa.get('error', ''))}"
        ratio = nums.get("cd_per_mask_over_forward")
        print(f"[{k}] {entry.name:44s} fx={'ok' if rec.get('fx', {}).get('ok') else 'FAIL'} "
              f"export={('ok' if rec['export'].get('ok') else 'FAIL') if 'export' in rec else '-'} fastacd={status}"
              + (f" cd/fwd={ratio:.2f}" if ratio else "") + f" ({rec.get('seconds')} s)", flush=True)
        data["meta"] = meta
        data["summary"] = summary(data["entries"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)  # written after every model: an interrupted survey keeps its results
    return data


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def _commits(entries: dict, meta: dict) -> str:
    """The commits the entries ran at (a merged survey mixes them), most entries first."""
    counts: dict[str, int] = {}
    for rec in entries.values():
        c = rec.get("commit") or meta.get("commit")
        counts[c] = counts.get(c, 0) + 1
    if len(counts) == 1:
        return f"commit `{next(iter(counts))}`"
    return "commits " + ", ".join(f"`{c}` ({n} {'entry' if n == 1 else 'entries'})"
                                  for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _missing(rec: dict, key: Callable[[dict], str]) -> set[str]:
    keys = {key(i) for i in rec.get("unsupported") or []}
    return keys or {rec.get("fastacd", {}).get("op", "?")}


def by_op(item: dict) -> str:
    return op_key(item)


def by_group(item: dict) -> str:
    return rule_group(op_key(item))


def needed_ops(entries: dict, key: Callable[[dict], str] = by_op) -> dict[str, list[str]]:
    """op key (or rule group, ``key=by_group``) -> the failing entries that need it (from each
    entry's full missing list, not only its first failure)."""
    need: dict[str, list[str]] = {}
    for name, rec in entries.items():
        if rec.get("fastacd", {}).get("ok"):
            continue
        for k in _missing(rec, key):
            need.setdefault(k, []).append(name)
    return need


def unblock_order(entries: dict, key: Callable[[dict], str] = by_op, limit: int = 30) -> list[tuple[str, int, int]]:
    """Greedy: the op (or rule group) whose rule, with those before it, lets the most entries
    decompose; ties go to the one more entries need.

    Returns (op, entries unblocked by this step, cumulative working entries). An entry counts
    as unblocked when every op on its missing list has a rule. Steps that unblock nothing yet
    (parts of a model's list) come in the order of how many entries need them.
    """
    todo = {n: _missing(r, key) for n, r in entries.items() if not r.get("fastacd", {}).get("ok")}
    working = sum(1 for r in entries.values() if r.get("fastacd", {}).get("ok"))
    have: set[str] = set()
    order = []
    while todo and len(order) < limit:
        ops = {o for s in todo.values() for o in s} - have
        if not ops:
            break

        def gain(o):
            done = sum(1 for s in todo.values() if s <= have | {o})
            return done, sum(1 for s in todo.values() if o in s)
        best = max(sorted(ops), key=gain)
        have.add(best)
        done = [n for n, s in todo.items() if s <= have]
        for n in done:
            del todo[n]
        working += len(done)
        order.append((best, len(done), working))
    return order


def summary(entries: dict) -> dict:
    """The figures of the report, for programs (stored in the JSON beside the entries)."""
    ok = {n for n, r in entries.items() if r.get("fastacd", {}).get("ok")}
    sources = sorted({r["source"] for r in entries.values()})
    return {
        "decompose": {s: [sum(1 for n, r in entries.items() if r["source"] == s and n in ok),
                          sum(1 for r in entries.values() if r["source"] == s)] for s in sources},
        "rules_needed": {g: sorted(v) for g, v in sorted(needed_ops(entries, by_group).items(),
                                                         key=lambda kv: (-len(kv[1]), kv[0]))},
        "ops_needed": {k: sorted(v) for k, v in sorted(needed_ops(entries).items(),
                                                       key=lambda kv: (-len(kv[1]), kv[0]))},
        "unblock_order": unblock_order(entries, by_group),
        "fx_fails": sorted(n for n, r in entries.items() if not r.get("fx", {}).get("ok", True)),
    }


CHECK_TOLERANCES = {"complete": 1e-4, "batched_vs_one": 1e-4, "f32_vs_f64": 1e-4, "f64_vs_reference": 1e-10}


def passes_checks(rec: dict) -> bool:
    """Decomposes, and every check is within the test tolerances (fractions of the logit scale)."""
    nums = rec.get("numbers") or {}
    return bool(rec.get("fastacd", {}).get("ok")) and all(
        nums.get(k) is not None and nums[k] <= tol for k, tol in CHECK_TOLERANCES.items())


def _own_init_section(data: dict) -> list[str]:
    """A summary of the ``--init own`` survey, when this report is the trained-like one and it exists."""
    if data.get("meta", {}).get("init", "trained-like") != "trained-like" or not OWN_INIT_JSON.exists():
        return []
    own = json.loads(OWN_INIT_JSON.read_text())
    entries, meta = own["entries"], own.get("meta", {})
    L = ["", f"With each library's own initialisation (`--init own`: what `pretrained=False` gives a new user, "
         f"no randomised statistics; `{OWN_INIT_JSON.relative_to(ROOT)}`, {_commits(entries, meta)}, "
         f"{meta.get('when')}, {'smallest' if meta.get('small') else 'native'} input sizes):", ""]
    for src in sorted({r["source"] for r in entries.values()}):
        names = [n for n, r in entries.items() if r["source"] == src]
        worst = {k: max(((entries[n].get("numbers") or {}).get(k) or 0.0) for n in names) for k in CHECK_TOLERANCES}
        L.append(f"- {src}: **{sum(bool(entries[n].get('fastacd', {}).get('ok')) for n in names)} / {len(names)}** "
                 f"decompose, **{sum(passes_checks(entries[n]) for n in names)} / {len(names)}** within every "
                 f"tolerance; worst complete {_fmt(worst['complete'])}, batched {_fmt(worst['batched_vs_one'])}, "
                 f"f32/f64 {_fmt(worst['f32_vs_f64'])}, ref {_fmt(worst['f64_vs_reference'])}")
    refused = sorted(_short(n) for n, r in entries.items() if not r.get("fastacd", {}).get("ok"))
    failing = sorted(_short(n) for n, r in entries.items() if r.get("fastacd", {}).get("ok") and not passes_checks(r))
    if refused:
        L.append(f"- refused (see Rules needed): {', '.join(refused)}")
    if failing:
        L.append(f"- beyond a tolerance: {', '.join(failing)}. On these CD amplifies rounding whatever the "
                 "statistics (convmixer_768_32: about 5x a block, in the float64 engine and the reference alike; "
                 "docs/engine.md \"When float32 is not enough\"; efficientvit_b0 runs its attention in float32 even "
                 "in the float64 copy, so its float64 numbers carry float32 rounding); "
                 "`Decomposer.rounding_gap(x, masks)` measures it for any model and input.")
    return L


def _fmt(v, digits=1) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.{digits}e}" if (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.{digits + 1}g}"
    return str(v)


def _tol(v, tol: float) -> str:
    return f"**{_fmt(v)}**" if isinstance(v, float) and v > tol else _fmt(v)


def _short(name: str) -> str:
    return name.split(":", 1)[-1]


def _fmt_duration(data: dict) -> str:
    total = sum(float(r.get("seconds") or 0) for r in data["entries"].values())
    return f"{total / 60:.0f} min of model time ({len(data['entries'])} entries, plus ~6 s of start-up each)"


def markdown(data: dict) -> str:
    entries, meta = data["entries"], data.get("meta", {})
    order = [n for n in ENTRIES if n in entries] + sorted(n for n in entries if n not in ENTRIES)
    ok = lambda r: r.get("fastacd", {}).get("ok", False)  # noqa: E731
    by_source = {}
    for n in order:
        by_source.setdefault(entries[n]["source"], []).append(n)
    L = ["# Model zoo", "",
         "Which architectures fastacd decomposes (issue 16), how well, and which rules the rest need.",
         "Generated by `python tools/zoo.py --markdown docs/zoo.md` from `bench/results/zoo.json`; do not",
         "edit by hand.", "",
         "- Survey: `OMP_NUM_THREADS=1 python tools/zoo.py` runs every entry in its own process (timeout "
         "per model, so one hang or crash is recorded, not fatal) and writes `bench/results/zoo.json` after "
         "each model. `--only tv:resnet18 'timm:vit*' swin` picks entries (names, globs, families, sources) "
         "and `--merge` updates them in the existing JSON; `--small` runs each model at its smallest input "
         "size; `--init own` builds each model with its library's own initialisation instead of trained-like "
         "statistics (into `bench/results/zoo_own_init.json`); `--list` prints the registry. On a shared 2-core machine the whole survey took "
         f"{_fmt_duration(data)}.",
         "- Report: `python tools/zoo.py --markdown docs/zoo.md` (from the JSON; no model is run).",
         "- Tests: `pytest tests/test_zoo.py` runs a fast subset that decomposes today (smallest inputs, "
         "~35 s of CPU on one thread): completeness, batched = one mask, float32 = float64, float64 engine = "
         "reference, each its own test, xfail (not strict) where rounding decides the split today "
         "(design.md section 9, issue 17); the same models with their libraries' own initialisation "
         "(`test_zoo_subset_own_init`) pass every check, none expected to fail. `pytest tests/test_zoo.py --zoo` (or `FASTACD_ZOO=1`) runs the "
         "whole zoo at the survey's sizes, xfail (not strict) wherever this JSON records a failure (the "
         "reason names the op), so entries turn to XPASS as rules land: rerun the survey then.",
         "- Adding a model: one line in `_TORCHVISION` / `_TIMM` (or an `_add(Entry(...))` for other "
         "sources) in `tools/zoo.py`, then `python tools/zoo.py --only <name> --merge` and regenerate.", "",
         f"Run: {_commits(entries, meta)}, torch {meta.get('torch')}, torchvision {meta.get('torchvision')}, "
         f"timm {meta.get('timm')}, transformers {meta.get('transformers')}, {meta.get('threads')} thread(s), "
         f"{meta.get('when')}." + _sizes_note(entries), "",
         "Every model is built with **random initialisation** (nothing is downloaded; the worker refuses "
         "network connections), in eval mode, from a seed fixed per entry, with "
         f"{NUM_CLASSES} classes. " + (
             "Batchnorm statistics, norm scales and zero-initialised biases are "
             "randomised (`zoo.randomize`, `--init trained-like`, the default) so the bias and shift splits "
             "of CD are exercised." if meta.get("init", "trained-like") == "trained-like" else
             "Each library's own initialisation (`--init own`: what `pretrained=False` gives a new user; "
             "batchnorm statistics 0 and 1, norm affines 1 and 0, biases as the library sets them).")
         + " Text models take token ids; they are decomposed from their embeddings (the masks select tokens).", "",
         "## Summary", ""]
    for src, names in by_source.items():
        no_fx = [n for n in names if not entries[n].get("fx", {}).get("ok")]
        via_export = sum(ok(entries[n]) for n in no_fx)
        how = (f"torch.fx traces {len(names) - len(no_fx)}; of the {len(no_fx)} it cannot, fastacd's "
               f"torch.export capture takes {sum(bool(entries[n].get('export', {}).get('ok')) for n in no_fx)} "
               f"and {via_export} decompose through it") if no_fx else f"torch.fx traces all {len(names)}"
        L.append(f"- {src}: **{sum(ok(entries[n]) for n in names)} / {len(names)}** decompose ({how}); "
                 f"within every tolerance of the checks below: {sum(passes_checks(entries[n]) for n in names)} / {len(names)}")
    L += _own_init_section(data)
    L += ["", "Checks, for the 4 quadrant masks (text: 4 runs of tokens), as fractions of the largest |logit|: "
          "**complete** = max |relevant + irrelevant - logits| (float32); **batched** = max gap between the "
          "4-mask call and 4 one-mask calls; **f32/f64** = max gap between the float32 and the float64 "
          "engines' relevant parts; **ref** = float64 engine vs `fastacd.reference.cd`. **CD/fwd** = CPU time "
          f"of CD per mask over one plain forward (1 thread, best of 2 calls of up to {meta.get('timing_masks')} "
          f"random block masks, fewer where 64 would take over {TIMING_BUDGET_S / 2:.0f} s; forward best of 5; CPU time because "
          "the machine is shared, wall-clock ratios are in the JSON). Gaps in **bold** are beyond the test tolerances (1e-4 of the scale in float32, 1e-10 "
          "for ref). With numerical zero (docs/engine.md) no split jumps, but on deep batchnorm networks "
          "with these trained-like statistics CD's splits amplify a rounding difference by orders of "
          "magnitude from layer to layer, so float32 rounding reaches the logits; on the deepest of them "
          "(convmixer_768_32, xception41, starnet_s1) even float64 rounding does, and the float64 "
          "engine's backends (torch, compiled) and the reference disagree with each other as much "
          "(checked by hand): issue 17, not rule bugs. **fx** = torch.fx "
          "traces the model; **export** = fastacd's torch.export capture (`fastacd.capture.export`), tried "
          "where torch.fx cannot trace (`Decomposer(capture='auto')` falls back to it); \"yes (export)\" = "
          "decomposed through that capture.", ""]
    for src, names in by_source.items():
        L += [f"## {src}", "",
              "| model | family | input | works | first failing op | fx | export | complete | batched | f32/f64 | ref | CD/fwd |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in names:
            r = entries[n]
            nums = r.get("numbers") or {}
            shape = "x".join(map(str, r.get("input_shape", [])[1:])) or str(r.get("size"))
            if r.get("input_kind") == "tokens":
                shape = f"{shape} tokens"
            fa = r.get("fastacd", {})
            if ok(r):
                works, op = ("yes" if "error" not in nums else "yes (checks failed: " + nums["error"][:60] + ")"), ""
                if fa.get("capture") == "export":
                    works = works.replace("yes", "yes (export)", 1)
            else:
                works, op = f"no ({fa.get('stage', '?')})", f"`{fa.get('op', '?')}`"
            L.append(f"| {_short(n)} | {r['family']} | {shape} | {works} | {op} | "
                     f"{'ok' if r.get('fx', {}).get('ok') else 'fails'} | "
                     f"{'ok' if r.get('export', {}).get('ok') else ('fails' if 'export' in r else '')} | "
                     f"{_tol(nums.get('complete'), 1e-4)} | {_tol(nums.get('batched_vs_one'), 1e-4)} | "
                     f"{_tol(nums.get('f32_vs_f64'), 1e-4)} | {_tol(nums.get('f64_vs_reference'), 1e-10)} | "
                     f"{_fmt(nums.get('cd_per_mask_over_forward'), 2)} |")
        L.append("")
    text_api = {n: entries[n]["text_api"] for n in order if "text_api" in entries[n]}
    if text_api:
        L += ["Text API (`fastacd.TextDecomposer.from_model` on the token model):", ""]
        for n, t in text_api.items():
            L.append(f"- {_short(n)}: " + (f"ok (complete {_fmt(t.get('complete'))})" if t.get("ok")
                                           else f"{t.get('error_type')}: {t.get('error', '')[:150]}"))
        L.append("")

    failing = [n for n in order if not ok(entries[n])]

    def fams(names):
        return ", ".join(sorted({f"{entries[n]['family']} ({entries[n]['source'][:4]})" for n in names}))

    def alone(names, k, key):
        return sum(1 for n in names if _missing(entries[n], key) == {k})

    groups, ops = needed_ops(entries, by_group), needed_ops(entries)
    if not failing:
        L += ["## Rules needed", "", "None: every model of the zoo decomposes."]
    else:
        L += ["## Rules needed", "",
              f"What the {len(failing)} models that do not decompose need, as rules (each row groups the ops one "
              "rule would cover: `tools/zoo.py` `RULE_GROUPS`), sorted by how many models need it. A model's list "
              "is complete, not only its first failure: the survey walks past each unsupported node (taking it to "
              "give an input-dependent tensor). **alone** = models for which this is the only thing missing. "
              "Models torch.fx cannot trace are walked on fastacd's torch.export capture with the same rules "
              "(their ops are ATen ops).", "",
              "| rule | models | alone | ops | families |", "|---|---|---|---|---|"]
        members: dict[str, set[str]] = {}
        for k in ops:
            members.setdefault(rule_group(k), set()).add(k)
        for g, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            L.append(f"| {g} | {len(v)} | {alone(v, g, by_group)} | "
                     f"{', '.join(f'`{m}`' for m in sorted(members.get(g, {g})))} | {fams(v)} |")
        L += ["", "### Order of rules that unblocks the most models", "",
              "Greedy: each row adds the rule that makes the most further models decompose (ties: the rule more "
              "models need). A model counts once everything on its list has a rule.", "",
              "| step | add | models unblocked | decompose then |", "|---|---|---|---|"]
        for k, (o, d, w) in enumerate(unblock_order(entries, by_group), 1):
            L.append(f"| {k} | {o} | {d} | {w} / {len(entries)} |")
        L += ["", "### Ops needed", "",
              "The same, op by op (function targets, module types, `.method()` names, as the graph has them).", "",
              "| op | rule | models | alone | families |", "|---|---|---|---|---|"]
        for k, v in sorted(ops.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            L.append(f"| `{k}` | {rule_group(k)} | {len(v)} | {alone(v, k, by_op)} | {fams(v)} |")
    exp_only = [n for n in order if not entries[n].get("fx", {}).get("ok", True)]
    if exp_only:
        L += ["", "## Where torch.fx fails", "",
              "fastacd captures these through `torch.export` (`fastacd.capture.export`; `Decomposer` falls "
              "back to it with a warning). What their export graphs still miss, as ATen ops:",
              "", "| model | export | decomposes | fx error | missing ATen ops |", "|---|---|---|---|---|"]
        for n in exp_only:
            r = entries[n]
            aten = ", ".join(f"`{op_key(i)}`" for i in r.get("unsupported") or [] if not op_key(i).startswith("capture"))
            err = r.get("fx", {}).get("error", "").replace("|", "\\|")[:140]
            L.append(f"| {_short(n)} | {'ok' if r.get('export', {}).get('ok') else 'fails'} | "
                     f"{'yes' if ok(r) else 'no'} | {err} | {aten} |")
    L += ["", "## Entries", "",
          "The survey input size is the model's native one; `min` is the smallest size it accepts (the fast "
          "tests use it). Models built for a size (fixed position embeddings) are built for the size used.", "",
          "| model | source | family | size | min | params (M) | notes |", "|---|---|---|---|---|---|---|"]
    for n in order:
        r, e = entries[n], ENTRIES.get(n)
        L.append(f"| {_short(n)} | {r['source']} | {r['family']} | {r.get('size')} | "
                 f"{e.min_size if e else ''} | {r.get('params_m', '')} | {r.get('note', '')} |")
    L += ["", "## Op inventory", "",
          "Per model, the ops of its graph (fx, or export where fx fails): modules, functions, methods.", ""]
    for n in order:
        inv = entries[n].get("inventory")
        if not inv:
            continue
        parts = [", ".join(inv.get("call_module", [])), ", ".join(inv.get("call_function", [])),
                 ", ".join(inv.get("call_method", []))]
        L.append(f"- **{_short(n)}** ({inv.get('graph')}): modules: {parts[0] or '-'}; functions: "
                 f"{parts[1] or '-'}; methods: {parts[2] or '-'}")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="entry names, model names, globs, families or sources")
    p.add_argument("--list", action="store_true", help="print the registry and exit")
    p.add_argument("--json", help="results file (default bench/results/zoo.json; with --init own "
                                  "bench/results/zoo_own_init.json)")
    p.add_argument("--merge", action="store_true", help="update the entries run in an existing JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the report from --json and exit "
                                                      "(no survey unless --run is given too)")
    p.add_argument("--run", action="store_true", help="with --markdown: run the survey first")
    p.add_argument("--small", action="store_true", help="each model at its smallest input size")
    p.add_argument("--timing-masks", type=int, default=TIMING_MASKS, help="0: no timing")
    p.add_argument("--no-export", action="store_true", help="skip torch.export")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", choices=INITS, default="trained-like",
                   help="trained-like: randomised statistics and shifts (zoo.randomize); own: each library's init")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per model")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.json = args.json or str(RESULTS_JSON if args.init == "trained-like" else OWN_INIT_JSON)
    if args.worker:
        _worker(args.worker, args.worker_out, args)
        return 0
    if args.list:
        for e in select(args.only):
            print(f"{e.name:44s} {e.family:18s} size {e.size:4d} min {e.min_size:4d} {e.input_kind:6s} {e.note}")
        return 0
    if args.markdown and not args.run:
        data = json.loads(Path(args.json).read_text())
    else:
        data = survey(args)
    if args.markdown:
        Path(args.markdown).write_text(markdown(data))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

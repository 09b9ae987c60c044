"""A small generated sentiment task with negation and contrast, and an LSTM, a GRU and a small
transformer trained on it in seconds on the CPU: a self-contained text example for CD and ACD
(nothing downloaded).

Sentences follow a few templates::

    the movie was very good              -> positive
    the movie was not good               -> negative   (negation flips the adjective)
    the plot is good but the acting is boring -> negative   (the clause after "but" wins)

>>> model, vocab = train_toy_model()            # a few seconds on one CPU core
>>> batch = vocab.batch("the movie was not good")
>>> model(batch).argmax(1)                      # tensor([0]): negative
>>> tmodel, _ = train_toy_model(arch="transformer")   # nn.TransformerEncoder, mean readout

Labels: 0 = negative, 1 = positive. Token id 0 is ``<pad>``, the blank the 1-D
agglomeration's occlusion and build-up tiles use.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..capture.phrases import Batch

POSITIVE = ["good", "great", "excellent", "wonderful", "fun", "brilliant", "enjoyable"]
NEGATIVE = ["bad", "boring", "awful", "terrible", "dull", "poor", "weak"]
SUBJECTS = [("the", "movie"), ("the", "film"), ("the", "plot"), ("the", "acting"),
            ("this", "story"), ("the", "ending")]
VERBS = ["was", "is"]
INTENSIFIERS = ["very", "really", "quite"]
WORDS = (["<pad>", "not", "but"] + POSITIVE + NEGATIVE + INTENSIFIERS + VERBS
         + sorted({w for pair in SUBJECTS for w in pair}))
NEG, POS = 0, 1


@dataclass
class Vocab:
    words: list[str]

    def __post_init__(self):
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self):
        return len(self.words)

    def encode(self, sentence: str) -> list[int]:
        unknown = [w for w in sentence.split() if w not in self.index]
        if unknown:
            raise ValueError(f"words not in the toy vocabulary: {unknown}; known: {self.words}")
        return [self.index[w] for w in sentence.split()]

    def decode(self, ids) -> list[str]:
        return [self.words[int(i)] for i in ids]

    def batch(self, sentence: str) -> Batch:
        """A ``Batch`` whose ``.text`` is the sentence's (seq_len, 1) token ids."""
        return Batch(torch.tensor(self.encode(sentence)))


VOCAB = Vocab(WORDS)


def _clause(rng: random.Random) -> tuple[list[str], int]:
    det, noun = rng.choice(SUBJECTS)
    words = [det, noun, rng.choice(VERBS)]
    positive = rng.random() < 0.5
    negated = rng.random() < 0.4
    if negated:
        words.append("not")
    if rng.random() < 0.3:
        words.append(rng.choice(INTENSIFIERS))
    words.append(rng.choice(POSITIVE if positive else NEGATIVE))
    return words, int(positive != negated)


def generate(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` labelled sentences: one clause, or two joined by "but" (the second decides)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, label = _clause(rng)
        if rng.random() < 0.35:
            second, label = _clause(rng)
            words = words + ["but"] + second
        out.append((" ".join(words), label))
    return out


class SentimentLSTM(nn.Module):
    """embedding -> one-layer LSTM -> linear on the last hidden state (the original package's
    text model: attributes ``.embed``, ``.lstm``, ``.hidden_to_label``, ``.hidden_dim``).

    ``forward`` takes a batch with ``.text`` (seq_len, N) token ids (or that tensor) and
    returns (N, 2) logits.
    """

    def __init__(self, vocab_size: int = len(WORDS), embed_dim: int = 16, hidden_dim: int = 24,
                 num_classes: int = 2):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim)
        self.hidden_to_label = nn.Linear(hidden_dim, num_classes)

    def forward(self, batch):
        text = getattr(batch, "text", batch)
        out, _ = self.lstm(self.embed(text))
        return self.hidden_to_label(out[-1])


class SentimentGRU(SentimentLSTM):
    """``SentimentLSTM`` with an ``nn.GRU`` (attribute names kept: ``.lstm`` is the GRU, as
    the original's text model shape that ``cd_text`` reads)."""

    def __init__(self, vocab_size: int = len(WORDS), embed_dim: int = 16, hidden_dim: int = 24,
                 num_classes: int = 2):
        super().__init__(vocab_size, embed_dim, hidden_dim, num_classes)
        self.lstm = nn.GRU(embed_dim, hidden_dim)


class SentimentTransformer(nn.Module):
    """embedding + learned position embedding -> [CLS] token prepended ->
    ``nn.TransformerEncoder`` (batch_first, pre-norm, a final LayerNorm) -> the mean of the
    words' outputs (``readout="mean"``) or the [CLS] output (``"cls"``) -> linear. With the
    [CLS] readout and attention weights from the total, CD credits mostly the few words the
    [CLS] token attends to (on the toy task "not" takes the whole score of "not good" and
    "good" alone gets ~0); the mean readout keeps each word's own path to the output.
    ``forward`` takes a batch with ``.text`` (seq_len, N) token ids (or that
    tensor), as the LSTM, and returns (N, 2) logits. No dropout (CD is defined on eval
    behaviour; the toy task does not need it)."""

    def __init__(self, vocab_size: int = len(WORDS), d_model: int = 32, nhead: int = 2,
                 num_layers: int = 1, dim_feedforward: int = 64, max_len: int = 32,
                 num_classes: int = 2, readout: str = "mean"):
        super().__init__()
        if readout not in ("cls", "mean"):
            raise ValueError(f"readout must be 'cls' or 'mean', got {readout!r}")
        self.readout = readout
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len + 1, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        # pre-norm (norm_first) trains stably on this task from any seed; post-norm did not
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, batch):
        ids = getattr(batch, "text", batch).t()                        # (N, T)
        x = self.embed(ids) + self.pos(torch.arange(1, ids.shape[1] + 1, device=ids.device))
        x = torch.cat([self.cls.expand(ids.shape[0], -1, -1) + self.pos.weight[0], x], dim=1)
        h = self.encoder(x)
        return self.classifier(h[:, 0] if self.readout == "cls" else h[:, 1:].mean(1))


ARCHS = {"lstm": (SentimentLSTM, 250, 0.02), "gru": (SentimentGRU, 250, 0.02),
         "transformer": (SentimentTransformer, 600, 0.003)}   # class, default steps, lr


def train_toy_model(seed: int = 0, steps: int | None = None, n_train: int = 3000,
                    batch_size: int = 64, lr: float | None = None, arch: str = "lstm",
                    **model_kwargs) -> tuple[nn.Module, Vocab]:
    """Train the toy model ``arch`` ("lstm": ``SentimentLSTM``, "gru": ``SentimentGRU``,
    "transformer": ``SentimentTransformer``) on ``generate(n_train, seed)``; returns
    (model in eval, vocab). ``steps`` and ``lr`` default per architecture (250 / 0.02 for
    the recurrent models, 600 / 0.003 for the transformer). ``model_kwargs`` go to the
    model's class (e.g. ``readout="cls"`` for the transformer).

    Deterministic for a given seed (single-threaded CPU training). Sentences are bucketed
    by length so that the last position is always a real word (no padding).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    cls, default_steps, default_lr = ARCHS[arch]
    steps = default_steps if steps is None else steps
    lr = default_lr if lr is None else lr
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(**model_kwargs)
    data = generate(n_train, seed)
    buckets: dict[int, list[tuple[list[int], int]]] = {}
    for sentence, label in data:
        ids = VOCAB.encode(sentence)
        buckets.setdefault(len(ids), []).append((ids, label))
    tensors = [(torch.tensor([ids for ids, _ in b]).T, torch.tensor([lab for _, lab in b]))
               for b in buckets.values()]
    sizes = torch.tensor([float(len(b)) for b in buckets.values()])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    # one thread: the tensors are tiny (threads only add overhead, worse on a busy machine)
    # and the result does not depend on the machine's thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            k = int(torch.multinomial(sizes, 1, generator=gen))
            text, labels = tensors[k]
            idx = torch.randint(0, text.shape[1], (min(batch_size, text.shape[1]),),
                                generator=gen)
            loss = nn.functional.cross_entropy(model(text[:, idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), VOCAB


def accuracy(model: nn.Module, n: int = 500, seed: int = 1) -> float:
    """Accuracy on ``n`` fresh generated sentences."""
    correct = 0
    with torch.no_grad():
        for sentence, label in generate(n, seed):
            correct += int(model(VOCAB.batch(sentence)).argmax(1).item() == label)
    return correct / n


_CACHE: dict[tuple[int, str], tuple[nn.Module, Vocab]] = {}


def toy_model(seed: int = 0, arch: str = "lstm") -> tuple[nn.Module, Vocab]:
    """``train_toy_model(seed, arch=arch)``, trained once per process and cached (do not
    modify it)."""
    if (seed, arch) not in _CACHE:
        _CACHE[(seed, arch)] = train_toy_model(seed, arch=arch)
    return _CACHE[(seed, arch)]

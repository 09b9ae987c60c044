"""A small generated sentiment task with negation and contrast, and an LSTM trained on it
in seconds on the CPU: a self-contained text example for CD and ACD (nothing downloaded).

Sentences follow a few templates::

    the movie was very good              -> positive
    the movie was not good               -> negative   (negation flips the adjective)
    the plot is good but the acting is boring -> negative   (the clause after "but" wins)

>>> model, vocab = train_toy_model()            # a few seconds on one CPU core
>>> batch = vocab.batch("the movie was not good")
>>> model(batch).argmax(1)                      # tensor([0]): negative

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


def train_toy_model(seed: int = 0, steps: int = 250, n_train: int = 3000, batch_size: int = 64,
                    lr: float = 0.02) -> tuple[SentimentLSTM, Vocab]:
    """Train ``SentimentLSTM`` on ``generate(n_train, seed)``; returns (model in eval, vocab).

    Deterministic for a given seed (single-threaded CPU training). Sentences are bucketed
    by length so that the last position is always a real word (no padding).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SentimentLSTM()
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


_CACHE: dict[int, tuple[SentimentLSTM, Vocab]] = {}


def toy_model(seed: int = 0) -> tuple[SentimentLSTM, Vocab]:
    """``train_toy_model(seed)``, trained once per process and cached (do not modify it)."""
    if seed not in _CACHE:
        _CACHE[seed] = train_toy_model(seed)
    return _CACHE[seed]

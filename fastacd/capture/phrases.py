"""Text inputs: a sentence's token ids and its phrases (inclusive ``start..stop`` spans),
checked once for the text engine, the reference and the agglomeration."""
from __future__ import annotations

import warnings

import numpy as np
import torch


class Batch:
    """A minimal stand-in for a torchtext batch: ``.text`` is a (seq_len, 1) LongTensor.

    >>> batch = Batch([4, 17, 9])          # token ids of one sentence
    >>> batch.text.shape
    torch.Size([3, 1])
    """

    def __init__(self, text):
        t = torch.as_tensor(text)
        if t.dim() == 1:
            t = t.unsqueeze(1)
        self.text = t

    def __repr__(self):
        return f"Batch(text={tuple(self.text.shape)})"


def tokens_of(batch_or_tokens, vocab_size: int | None = None) -> torch.Tensor:
    """The token ids of one sentence as a 1-d LongTensor, checked.

    Accepts an object with ``.text`` (seq_len, 1) (a torchtext batch or ``Batch``), a
    (seq_len,) or (seq_len, 1) integer tensor, or a list of ints.
    """
    text = getattr(batch_or_tokens, "text", batch_or_tokens)
    if isinstance(text, np.ndarray) or isinstance(text, (list, tuple)):
        text = torch.as_tensor(np.asarray(text))
    if not isinstance(text, torch.Tensor):
        raise TypeError("expected a batch with a .text (seq_len, 1) LongTensor, a token tensor or "
                        f"a list of token ids, got {type(batch_or_tokens).__name__}")
    if text.dtype.is_floating_point or text.dtype == torch.bool or text.is_complex():
        raise TypeError(f"token ids must be integers, got dtype {text.dtype}")
    if text.dim() == 2:
        if text.shape[1] != 1:
            raise ValueError(f"text CD explains one sentence: .text must be (seq_len, 1), got "
                             f"{tuple(text.shape)}; pass the sentences one at a time")
        text = text[:, 0]
    elif text.dim() != 1:
        raise ValueError(f".text must be (seq_len, 1) or (seq_len,), got {tuple(text.shape)}")
    if text.numel() == 0:
        raise ValueError("the sentence is empty (seq_len 0): CD needs at least one token")
    text = text.long()
    if vocab_size is not None:
        bad = (text < 0) | (text >= vocab_size)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0])
            raise ValueError(f"token id {int(text[pos])} at position {pos} is outside the "
                             f"embedding's vocabulary [0, {vocab_size}); map unknown words to "
                             "a valid id (e.g. <unk>) first")
    return text


def _integers(start, stop) -> tuple[int, int]:
    """start and stop as ints (Python or numpy integers, one-element integer tensors)."""
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point:
                continue
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(start), int(stop)


def check_phrase(start, stop, length: int) -> tuple[int, int]:
    """Validate an inclusive phrase ``start..stop`` of a sentence of ``length`` tokens."""
    start, stop = _integers(start, stop)
    if start < 0:
        raise ValueError(f"start={start} is negative: phrases are 0-based positions")
    if start > stop:
        raise ValueError(f"start={start} > stop={stop}: the phrase is start..stop, stop inclusive")
    if stop >= length:
        raise ValueError(f"stop={stop} is beyond the sentence ({length} tokens, positions "
                         f"0..{length - 1}); stop is inclusive")
    return start, stop


def original_phrase(start, stop, length: int) -> np.ndarray:
    """The tokens the original ``acd.cd_text`` takes as the phrase ``start..stop``: the
    positions i with ``start <= i <= stop``, as a (length,) boolean mask.

    So a ``stop`` at or beyond the end reads "to the end" (the original's own tests pass
    ``stop=len(sentence)``). A negative ``start`` counts from position 0 and a ``start``
    after ``stop`` or after the end is an empty phrase (relevant part 0), as in the
    original; both warn, since they are more likely a slip (a Python negative index, swapped
    bounds) than meant. ``start`` and ``stop`` must be integers.
    """
    start, stop = _integers(start, stop)
    if start < 0:
        warnings.warn(f"start={start} is negative: read as position 0, as the original acd.cd_text "
                      "does (positions are 0-based, not Python negative indices)", stacklevel=3)
    if start > stop or start >= length:
        warnings.warn(f"the phrase start={start}..stop={stop} holds no token of the sentence "
                      f"({length} tokens): its relevant part is 0, as in the original acd.cd_text",
                      stacklevel=3)
    pos = np.arange(length)
    return (pos >= start) & (pos <= stop)


def check_phrases(phrases, length: int) -> list[tuple[int, int]]:
    """``check_phrase`` for every inclusive ``(start, stop)`` pair: a list of int pairs."""
    if isinstance(phrases, torch.Tensor):
        phrases = phrases.tolist()
    pairs = [tuple(p) for p in phrases]
    ok = all(len(p) == 2 and type(p[0]) is int and type(p[1]) is int and 0 <= p[0] <= p[1] < length
             for p in pairs)  # the common case, without the per-phrase checks' overhead
    return pairs if ok else [check_phrase(st, e, length) for st, e in pairs]


def _pair_masks(pairs: list[tuple[int, int]], length: int) -> np.ndarray:
    """(M, length) boolean masks of checked inclusive pairs."""
    se = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    pos = np.arange(length)
    return (pos >= se[:, :1]) & (pos <= se[:, 1:])


def check_token_masks(masks, length: int) -> torch.Tensor:
    """Token masks as given, checked: (T,) or (M, T) 0/1 values -> an (M, T) tensor."""
    mask = torch.as_tensor(masks)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.dim() != 2 or mask.shape[1] != length:
        raise ValueError(f"masks must be (T,) or (M, T) with T={length} tokens, got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("masks must hold 0/1 values (1 = token is relevant)")
    return mask


def phrase_masks(phrases, length: int, dtype=torch.float64) -> torch.Tensor:
    """(M, length) 0/1 masks of inclusive ``(start, stop)`` phrases."""
    return torch.from_numpy(_pair_masks(check_phrases(phrases, length), length)).to(dtype)


def all_phrases(length: int) -> list[tuple[int, int]]:
    """Every contiguous phrase of a sentence: T (T + 1) / 2 inclusive ``(start, stop)`` pairs."""
    return [(s, e) for s in range(length) for e in range(s, length)]

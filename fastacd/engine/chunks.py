"""How many masks a pass runs: the memory budget, the CPU cache caps, the segmented plan.

Everything here depends only on the model, the input's shape, the number of masks and the
budget (never on timings), so the same call always runs the same chunks; results do not
depend on the chunks. The constants were measured (docs/engine.md, "Chunks").
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.fx as fx

from .. import ops

CPU_DEFAULT_BUDGET = 1 << 30       # bytes of activations for one chunk's masks on the CPU
BYTES_PER_MASK_FACTOR = 6          # live copies of the largest activation per mask during a step
CPU_CHUNK_ACTIVATION_BYTES = 32 << 20    # a chunk's largest activation stays near the caches...
CPU_MIN_CHUNK = 2                  # ...but a linear head re-reads its weights once per chunk
CPU_SEGMENT_ACTIVATION_BYTES = 16 << 20  # the same cap per segment of the segmented pass


def default_memory_budget(device: torch.device) -> int:
    """Bytes of activations for the masks of one chunk: 1 GiB on the CPU, half the free GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return CPU_DEFAULT_BUDGET


def parse_budget(budget) -> int | None:
    """A memory budget in bytes from an int or a string like '512M' / '2G' (None: the default)."""
    if budget is None:
        return None
    if isinstance(budget, str):
        s = budget.strip().upper().removesuffix("B")
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        try:
            value = float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s)
        except ValueError:
            raise ValueError(f"memory_budget {budget!r} is not a size; use bytes (an int) or a "
                             "string such as '512M' or '2G'") from None
        budget = int(value)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"memory_budget must be bytes (an int) or a string such as '2G', got "
                        f"{type(budget).__name__}")
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget}")
    return int(budget)


def chunk_for(largest: int, device: torch.device, budget: int | None,
              cpu_cap: int = CPU_CHUNK_ACTIVATION_BYTES) -> int:
    """Masks per pass for steps whose largest activation is ``largest`` bytes a mask: the
    budget's share, and on the CPU at most ``cpu_cap`` bytes of that activation a pass."""
    budget = budget or default_memory_budget(device)
    step = max(1, int(budget // (max(1, largest) * BYTES_PER_MASK_FACTOR)))
    if device.type == "cpu":
        step = min(step, max(CPU_MIN_CHUNK, cpu_cap // max(1, largest)))
    return step


def largest_bytes(values: dict) -> int:
    """Bytes of the largest tensor among a pass's activations."""
    return max((v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor)),
               default=1)


def pass_plan(g, values: dict, x: torch.Tensor, m: int, budget: int | None, *,
              chunk_size: int | None = None) -> list[tuple[int, fx.Node, int]]:
    """How the relevant pass of m masks runs: segments ``(start, source, chunk)``.

    Segment k runs the graph positions from its ``start`` to the next segment's, on the
    relevant part of ``source`` (the input for the first; for the others the only value
    the rest of the graph reads, see ``cut_points``), at most ``chunk`` masks at a time.
    Each stretch between two cuts gets the chunk its own largest activation allows, so the
    layers after the large maps run more masks per pass than the first ones. A segment's
    chunk is split evenly into those of the segment before; stretches with the same chunk
    are one segment. ``chunk_size`` given: one segment with that chunk.
    """
    if chunk_size:
        return [(0, g.input_node, min(chunk_size, m))]
    cuts = cut_points(g)
    # the chunks' parts are concatenated along dim 0: only where the batch of 1 is dim 0
    # (not an attention's (3, M, ...) stack or a torch.stack along dim 0)
    bounds = [i for i in sorted(cuts) if cuts[i] is not g.input_node and _batch_first(values.get(cuts[i]))]
    starts, sources = [0] + bounds, [g.input_node] + [cuts[i] for i in bounds]
    stops = bounds + [len(g.nodes)]

    def nbytes(n: fx.Node) -> int:
        v = values.get(n) if n is not g.input_node else x
        return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0

    chunks = []
    for start, src, stop in zip(starts, sources, stops):
        largest = max([nbytes(src)] + [nbytes(n) for n in g.nodes[start:stop] if n in g.steps])
        chunks.append(chunk_for(largest, x.device, budget, CPU_SEGMENT_ACTIVATION_BYTES))
    # from the last segment back: each one's chunk is split evenly into passes of the one before
    effective = [min(chunks[-1], m)]
    for c in reversed(chunks[:-1]):
        effective.insert(0, balanced_chunk(effective[0], c))
    plan = []
    for start, src, c in zip(starts, sources, effective):
        if plan and plan[-1][2] == c:
            continue  # the same chunk as the segment before: no cut here
        plan.append((start, src, c))
    return plan


def _batch_first(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1


_CUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cut_points(g) -> dict[int, fx.Node]:
    """{graph position i: node d} where d is the only input-dependent value that node i or a
    later node reads: a relevant pass can stop before position i and go on from d alone.

    A value is live from after its own position to its last reader (the output: to the end);
    positions covered by exactly one such interval are cuts (counted with prefix sums).
    """
    if g not in _CUTS:
        n = len(g.nodes)
        count, owner = [0] * (n + 1), [0] * (n + 1)  # per position: live values, sum of their ids
        ids = {}
        for pos, node in enumerate(g.nodes):
            if node is not g.input_node and node not in g.steps:
                continue
            last = n - 1 if node is g.result_node else g.last_use.get(node, pos)
            if last <= pos:
                continue
            ids[pos] = node
            count[pos + 1] += 1
            count[last + 1] -= 1
            owner[pos + 1] += pos
            owner[last + 1] -= pos
        cuts, live, who = {}, 0, 0
        for i in range(n):
            live, who = live + count[i], who + owner[i]
            if live == 1:
                cuts[i] = ids[who]
        _CUTS[g] = cuts
    return _CUTS[g]


def passes(lo: int, hi: int, step: int):
    """[lo, hi) cut into as few ranges of at most ``step`` as possible, of equal size (+-1)."""
    count = -(-(hi - lo) // max(1, step))
    size, extra = divmod(hi - lo, count) if count else (0, 0)
    a = lo
    for k in range(count):
        b = a + size + (k < extra)
        yield a, b
        a = b


def balanced_chunk(m: int, step: int) -> int:
    """Masks per pass for m masks in passes of at most ``step``: as many passes as ``step``
    needs, of equal size (64 masks at most 43 a pass: 32 + 32, not 43 + 21), so that every
    pass allocates the same activations and the reused buffers fit them."""
    count = -(-m // max(1, step))
    return -(-m // count)


def reuse_buffers(device: torch.device, budget: int | None = None):
    """A scope in which the large CPU blocks the chunks free are reused by the next chunk
    (``fastacd.ops.reuse_cpu_buffers``, at most ``budget`` bytes held): it saves the page
    faults of fresh activations. A no-op off the CPU or without the compiled extension."""
    if device.type != "cpu" or not ops.HAS_COMPILED:
        return contextlib.nullcontext(False)
    return ops.reuse_cpu_buffers(budget or default_memory_budget(device))


@contextlib.contextmanager
def denormals_flushed():
    """Denormal floats read as zero inside (CPU): the relevant part far from a mask is often
    tiny (an eps-sized bias share times small weights), and denormal arithmetic is 2-3x
    slower (random-init ConvNeXt: CD twice as slow). torch has no getter for the flag: it is
    restored to torch's default, off."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)

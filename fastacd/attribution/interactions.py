"""Feature interactions: integrated / expected Hessians, and CD interactions of segments.

* ``PathExplainer(model).attributions(...)`` / ``.interactions(...)`` follow path_explain's
  ``PathExplainerTorch`` argument conventions (``baseline``, ``num_samples``,
  ``use_expectation``, ``output_indices``, ``interaction_index``): integrated gradients /
  Hessians with ``use_expectation=False``, expected gradients / Hessians with ``True``
  (Janizek, Sturmfels & Lee, JMLR 2021). All path points of all inputs go through the model
  in one batch; the second derivatives come from double backprop, with one backward per
  requested row (or per segment) batched with ``is_grads_batched`` (torch.func.vmap).
* ``cd_interactions(model, x, segments)``: CD(A u B) - CD(A) - CD(B) for every pair of
  segments, all single and pair masks in one batched ``Decomposer`` call.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .baselines import check_classes, output_indices as _output_indices, segment_labels, segment_masks
from ..api import decomposer_for


def _gather_output(out: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    if out.dim() == 1:
        out = out[:, None]
    if idx is None:
        if out.shape[1] != 1:
            raise ValueError(f"the model has {out.shape[1]} outputs: pass output_indices (one output "
                             "index per input, or an int) to say which one to explain")
        return out[:, 0]
    check_classes(idx, out.shape[1], "output_indices")
    return out.gather(1, idx[:, None])[:, 0]


class PathExplainer:
    """Path attributions and interactions with path_explain's conventions, batched.

    baseline: with ``use_expectation=False`` one reference, shape (1, ...) or (...), or one per
        input (N, ...); with ``use_expectation=True`` a reference distribution (K, ...) from
        which ``num_samples`` references per input are drawn at random.
    num_samples: points per path (``linspace(0, 1, num_samples)``, endpoints included, plain
        mean) or random samples for the expectation; interactions use round(sqrt(num_samples))
        points on each of the two nested paths, as path_explain.
    output_indices: None for a single-output model, an int, or (N,) indices.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int | None = None,
                 generator: torch.Generator | None = None):
        self.model = model
        self.batch_size = batch_size
        self.generator = generator

    # ---- helpers ----------------------------------------------------------------------------
    def _indices(self, x: torch.Tensor, output_indices):
        if output_indices is None:
            return None
        return _output_indices(output_indices, x.shape[0], x.device, "output_indices")

    def _check_baseline(self, x: torch.Tensor, baseline, use_expectation: bool) -> torch.Tensor:
        b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
        if tuple(b.shape) == tuple(x.shape[1:]):
            b = b[None]
        if b.dim() != x.dim() or b.shape[1:] != x.shape[1:]:
            raise ValueError(f"baseline has shape {tuple(b.shape)}; expected (K, "
                             f"{', '.join(map(str, x.shape[1:]))}) with K references "
                             f"({'any K' if use_expectation else 'K = 1 or K = N'})")
        if not use_expectation and b.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"with use_expectation=False the baseline needs 1 or N={x.shape[0]} rows, "
                             f"got {b.shape[0]}; pass use_expectation=True for a reference distribution")
        return b

    def _path(self, x, b, k, use_expectation):
        """Points (N, k, ...) from a reference to x, and x - reference (N, k or 1, ...).

        b: the reference distribution (expectation: k references drawn per input), or one
        baseline row for all inputs, or one row per input."""
        n, shape = x.shape[0], tuple(x.shape[1:])
        if use_expectation:
            idx = torch.randint(b.shape[0], (n * k,), generator=self.generator).to(x.device)
            ref = b[idx].reshape((n, k) + shape)
            alpha = torch.rand(n, k, generator=self.generator, dtype=torch.float64).to(x)
        else:
            ref = b.expand((n,) + shape)[:, None]
            grid = torch.linspace(0, 1, k, dtype=torch.float64) if k > 1 else torch.ones(1, dtype=torch.float64)
            alpha = grid.to(x)[None].expand(n, k)
        alpha = alpha.reshape((n, k) + (1,) * len(shape))
        return ref + alpha * (x[:, None] - ref), x[:, None] - ref

    def _grads(self, points: torch.Tensor, idx, create_graph: bool) -> torch.Tensor:
        """Gradient of the selected output at each point (points require grad)."""
        out = _gather_output(self.model(points), idx)
        (g,) = torch.autograd.grad(out.sum(), points, create_graph=create_graph)
        return g

    # ---- path_explain API --------------------------------------------------------------------
    def attributions(self, input_tensor, baseline, num_samples: int = 50, use_expectation: bool = True,
                     output_indices=None) -> torch.Tensor:
        """(N, ...) integrated (``use_expectation=False``) or expected gradients."""
        x = torch.as_tensor(input_tensor).detach()
        b = self._check_baseline(x, baseline, use_expectation)
        idx = self._indices(x, output_indices)
        n, shape = x.shape[0], tuple(x.shape[1:])
        points, delta = self._path(x, b, num_samples, use_expectation)
        idx_rep = None if idx is None else idx.repeat_interleave(num_samples)
        flat = points.reshape((n * num_samples,) + shape)
        step = self.batch_size or flat.shape[0]
        grads = []
        with torch.enable_grad():
            for s in range(0, flat.shape[0], step):
                p = flat[s:s + step].detach().requires_grad_(True)
                grads.append(self._grads(p, None if idx_rep is None else idx_rep[s:s + step], False))
        grads = torch.cat(grads).reshape((n, num_samples) + shape)
        return (grads * delta).mean(1)

    def interactions(self, input_tensor, baseline, num_samples: int = 50, use_expectation: bool = True,
                     output_indices=None, interaction_index=None, segments=None,
                     verbose: bool = False) -> torch.Tensor:
        """Integrated (``use_expectation=False``) or expected Hessians.

        Returns (N, *F, *F) with ``[n, i, j]`` the interaction of features i and j (the diagonal
        holds each feature's main effect; summing over j gives the attributions). With
        ``interaction_index`` (an index into one input): (N, *F), the row of that feature.
        With ``segments`` (a label map over the features, or over the spatial positions of an
        image): (N, S, S), the interactions summed over the features of each pair of segments,
        at the cost of S backward passes instead of F.
        """
        del verbose  # one batched pass: nothing to report progress on
        x = torch.as_tensor(input_tensor).detach()
        b = self._check_baseline(x, baseline, use_expectation)
        idx = self._indices(x, output_indices)
        n, shape = x.shape[0], tuple(x.shape[1:])
        nf = int(np.prod(shape))
        k = max(1, int(round(np.sqrt(num_samples))))
        # outer path: z between a reference and x
        z, delta_outer = self._path(x, b, k, use_expectation)              # (n, k, ...), (n, k|1, ...)
        z = z.reshape((n * k,) + shape)
        # rows of the interaction matrix to compute: one cotangent per feature / segment / index
        if segments is not None:
            labels, s = segment_labels(x, segments)
            rows = segment_masks(labels, s, x.dtype).reshape(s, nf)
        elif interaction_index is not None:
            rows = torch.zeros(1, nf, dtype=x.dtype, device=x.device)
            rows.reshape((1,) + shape)[(0,) + tuple(np.atleast_1d(interaction_index))] = 1
        else:
            rows = torch.eye(nf, dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            # inner path: the attributions of every z, kept differentiable in z
            inner_b = b if use_expectation or b.shape[0] == 1 else b.repeat_interleave(k, 0)
            inner, delta_inner = self._path(z, inner_b, k, use_expectation)
            idx_rep = None if idx is None else idx.repeat_interleave(k * k)
            g = self._grads(inner.reshape((n * k * k,) + shape), idx_rep, True)
            ig = (g.reshape((n * k, k) + shape) * delta_inner).mean(1).reshape(n * k, nf)
            cot = rows[:, None, :].expand(rows.shape[0], n * k, nf)
            second = _batched_vjp(ig, z, cot).reshape(rows.shape[0], n, k, nf)
        delta = delta_outer.expand((n, k) + shape).reshape(n, k, nf)
        inter = (second * delta[None]).mean(2)                                # (rows, n, F)
        inter = inter.permute(1, 0, 2)
        if segments is not None:
            return torch.einsum("nrf,sf->nrs", inter, rows).detach()
        if interaction_index is not None:
            return inter[:, 0].reshape((n,) + shape).detach()
        return inter.reshape((n,) + shape + shape).detach()


def _batched_vjp(out: torch.Tensor, inp: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """d(sum cot * out)/d inp for each cotangent: one vmapped backward, or a loop if an op in
    the graph has no batching rule."""
    try:
        (g,) = torch.autograd.grad(out, inp, grad_outputs=cotangents, is_grads_batched=True,
                                   retain_graph=True)
        return g
    except RuntimeError:
        return torch.stack([torch.autograd.grad(out, inp, grad_outputs=c, retain_graph=True)[0]
                            for c in cotangents])


def integrated_hessians(model, x, baseline=None, num_samples: int = 50, output_indices=None,
                        segments=None, interaction_index=None) -> torch.Tensor:
    """Integrated Hessians (path_explain ``interactions(..., use_expectation=False)``); the
    baseline defaults to zeros."""
    x = torch.as_tensor(x)
    b = torch.zeros_like(x[:1]) if baseline is None else baseline
    return PathExplainer(model).interactions(x, b, num_samples, False, output_indices,
                                             interaction_index, segments)


def expected_hessians(model, x, references, num_samples: int = 50, output_indices=None,
                      segments=None, interaction_index=None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Expected Hessians (path_explain ``interactions(..., use_expectation=True)``) over a
    reference distribution (K, ...)."""
    return PathExplainer(model, generator=generator).interactions(
        torch.as_tensor(x), references, num_samples, True, output_indices, interaction_index, segments)


# ---- CD interactions ---------------------------------------------------------------------------
@dataclass
class CDInteractions:
    """CD interactions of S segments for one input.

    single: (S, K) CD relevant scores of each segment alone.
    pair: (S, S, K) CD relevant scores of each union A u B (diagonal: the segment alone).
    interaction: (S, S, K) pair - single[A] - single[B]; the diagonal holds the main effects
        (single), as in path_explain's interaction matrices.
    """
    single: torch.Tensor
    pair: torch.Tensor
    interaction: torch.Tensor
    segments: torch.Tensor

    def matrix(self, target: int) -> torch.Tensor:
        """(S, S) interactions for one output."""
        return self.interaction[..., target]

    def to_json(self) -> dict:
        return {"single": self.single.tolist(), "pair": self.pair.tolist(),
                "interaction": self.interaction.tolist(), "segments": self.segments.tolist()}


def cd_interactions(model, x: torch.Tensor, segments=None, *, masks=None,
                    decomposer=None) -> CDInteractions:
    """CD(A u B) - CD(A) - CD(B) for every pair of segments, in one batched Decomposer call.

    x: (1, C, H, W) or (1, F). segments: a label map (as in ``fastacd.attribution``), or
    ``masks``: (S, ...) 0/1 masks the Decomposer accepts (their union is the elementwise max).
    """
    if decomposer is None:
        decomposer = decomposer_for(model)
    if masks is None:
        labels, s = segment_labels(x, segments)
        masks = segment_masks(labels, s, x.dtype)
    else:
        masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
        masks = masks.to(device=x.device, dtype=x.dtype)
        labels = torch.empty(0, dtype=torch.long)
        s = masks.shape[0]
    if s < 1:
        raise ValueError("need at least one segment")
    pairs = list(itertools.combinations(range(s), 2))
    union = [torch.maximum(masks[a], masks[b]) for a, b in pairs]
    everything = torch.cat([masks] + ([torch.stack(union)] if union else []))
    rel = decomposer.cd(x, everything).relevant
    single, pair_rel = rel[:s], rel[s:]
    k = rel.shape[1]
    pair = single.new_zeros(s, s, k)
    pair[range(s), range(s)] = single
    if pairs:
        a, b = (torch.tensor(v) for v in zip(*pairs))
        pair[a, b] = pair_rel
        pair[b, a] = pair_rel
    inter = pair - single[:, None] - single[None, :]
    inter[range(s), range(s)] = single
    return CDInteractions(single=single, pair=pair, interaction=inter, segments=labels)

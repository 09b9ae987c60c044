"""The input-gradient penalties CDEP is compared with: RRR and expected gradients.

Both take the same masks as ``CDEPPenalty`` (1 = the feature must not matter; per example,
K per example, or shared; see ``fastacd.cdep.canonical_masks``) and penalise an attribution
of the model's output to the masked features:

* ``RRRPenalty`` ("right for the right reasons", Ross, Hughes & Doshi-Velez, IJCAI 2017): the
  squared input gradient of the log-probabilities on the masked region. Default: the CDEP
  repository's ``gradient_sum`` (the comparison in the CDEP paper): the gradient of the mean
  negative log-likelihood of the labels, summed over channels, squared and summed over the
  masked positions. ``target="all", channels="each"``: Ross et al.'s own form, the gradient of
  the sum of all log-probabilities, each input element squared.
* ``ExpectedGradientsPenalty`` (expected gradients, Erion et al. 2019, as the CDEP
  repository's ``eg_scores_2d``): for image n with label y, S reference images x' drawn from
  the batch and S points ``x' (1 - a) + a x`` (a ~ U(0, 1)) between them, the attribution
  ``sum_s |d softmax(f(point_s))_y / d point_s * (x - x'_s)|``, summed over channels and over
  the masked positions and over the batch (the repository's training scripts sum over the
  images of a batch).

Like ``CDEPPenalty``, both are defined on the model's eval behaviour (dropout off, batchnorm
running statistics; the model's own mode is restored afterwards), and ``forward_with_penalty``
returns the logits of the same forward for a model that behaves the same in train and eval
mode. With K masks per example the penalties of the K masks are averaged
(``reduction="mean"``) or summed; the gradients themselves are computed once.

Text (embedding -> LSTM -> linear models): give ``embed=`` (the embedding module) and the
gradients are taken with respect to its output, the word vectors (T, N, E), or (N, T, E) with
``batch_first=True``; masks are token masks (N, T) or (K, N, T) as for ``TextCDEPPenalty``,
and the embedding dimension plays the channels' part (``channels="each"`` by default there:
the squared gradient of each vector component; expected-gradients references are other
sentences of the batch, which must have the same padded length).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cdep import REDUCTIONS, _TRAIN_DIFFERENT, canonical_masks, eval_mode

RRR_TARGETS = ("label", "all")
CHANNELS = ("sum", "each")


class _InputGradientPenalty:
    """What RRR and expected gradients share: the model's inputs (images, or the word vectors
    of an embedding), the masks, the eval-mode forward and the reduction over masks."""

    def __init__(self, model: nn.Module, reduction: str, embed: nn.Module | None, batch_first: bool):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if embed is not None and not any(m is embed for m in model.modules()):
            raise ValueError("embed must be a module of the model (its output is the input to explain)")
        self.model, self.reduction, self.embed, self.batch_first = model, reduction, embed, batch_first

    # ---- inputs and masks
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.embed is None and not x.is_floating_point():
            raise TypeError(f"x must be floating point (images), got {x.dtype}; for token ids give embed=")
        if self.embed is not None and (x.is_floating_point() or x.dim() != 2):
            raise TypeError(f"with embed=, x must be integer token ids (T, N) (or (N, T) with batch_first), "
                            f"got {x.dtype} {tuple(x.shape)}")
        return x

    def _n(self, x: torch.Tensor) -> int:
        return x.shape[0] if self.embed is None or self.batch_first else x.shape[1]

    def _masks(self, x: torch.Tensor, vectors: torch.Tensor, masks) -> tuple[torch.Tensor, int]:
        """Masks broadcastable against (K, *inputs' shape), and the channel dimension there."""
        if self.embed is None:
            return canonical_masks(x, masks), 2
        m = torch.as_tensor(masks).to(device=vectors.device, dtype=vectors.dtype)
        n, t = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        if m.dim() == 2:
            m = m[None]
        if m.dim() != 3 or tuple(m.shape[1:]) != (n, t):
            raise ValueError(f"masks must be (N, T) = ({n}, {t}) or (K, {n}, {t}) token masks (1 = the "
                             f"token must not matter), got {tuple(m.shape)}")
        return (m if self.batch_first else m.transpose(1, 2))[..., None], -1

    def _reduce(self, per_mask: torch.Tensor) -> torch.Tensor:
        return per_mask.mean() if self.reduction == "mean" else per_mask.sum()

    # ---- the forward on given inputs
    def _run(self, x: torch.Tensor, inputs: torch.Tensor | None = None):
        """(logits, the inputs the gradients are taken with respect to). Images: ``inputs``
        (default x, made a leaf that requires grad if it does not). Text: the embedding's
        output for x, or ``inputs`` in its place (x then only gives the batch's shape)."""
        if self.embed is None:
            if inputs is None:
                inputs = x if x.requires_grad else x.detach().requires_grad_()
            return self.model(inputs), inputs
        seen = []

        def swap(module, args, out):
            if inputs is not None:
                out = inputs
            elif not out.requires_grad:  # a frozen embedding: still differentiate w.r.t. its output
                out = out.detach().requires_grad_()
            seen.append(out)
            return out
        handle = self.embed.register_forward_hook(swap)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(f"the embedding was called {len(seen)} times in the model's forward, expected once")
        return logits, seen[0]

    def _vectors(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.embed is None else self.embed(x)

    def _refuse_train_mode(self) -> None:
        odd = [type(m).__name__ for m in self.model.modules() if isinstance(m, _TRAIN_DIFFERENT) and m.training]
        if odd:
            raise ValueError(
                f"the model has modules that behave differently in training ({', '.join(odd[:3])}); "
                "its eval-mode logits are not its training forward. Use "
                "`loss(model(x), y) + lam * penalty(x, masks, labels)` instead of forward_with_penalty.")


class RRRPenalty(_InputGradientPenalty):
    """Right for the right reasons: the squared input gradient of the log-probabilities on
    the masked features (Ross, Hughes & Doshi-Velez, IJCAI 2017).

    >>> rrr = RRRPenalty(model)
    >>> loss = F.cross_entropy(model(x), y) + lam * rrr(x, masks, y)
    >>> logits, p = rrr.forward_with_penalty(x, masks, y)    # one forward for both

    For the input gradient G (N, C, *S) and a mask m (N, 1 or C, *S), the penalty is
    ``sum_{n, s} (sum_c m G)^2`` (``channels="sum"``) or ``sum (m G)^2`` (``"each"``);
    ``target="label"``: G is the gradient of the mean negative log-likelihood of the labels
    (``F.cross_entropy``, the CDEP repository's ``gradient_sum``); ``"all"``: of the sum of
    the log-probabilities of every class and example (Ross et al.; needs no labels).
    Defaults: ``target="label"``, ``channels="sum"`` for images (the CDEP repository) and
    ``"each"`` for word vectors (``embed=``). Training through it differentiates the
    gradient (double backward): about 3-4x a plain step.
    """

    def __init__(self, model: nn.Module, target: str = "label", channels: str | None = None,
                 reduction: str = "mean", embed: nn.Module | None = None, batch_first: bool = False):
        super().__init__(model, reduction, embed, batch_first)
        if target not in RRR_TARGETS:
            raise ValueError(f"target must be one of {RRR_TARGETS}, got {target!r}")
        channels = channels or ("sum" if embed is None else "each")
        if channels not in CHANNELS:
            raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
        self.target, self.channels = target, channels

    def gradients(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """(G, logits): the input gradient (x's shape, or the word vectors' (T, N, E)) of the
        objective (differentiable when gradients are enabled), and the logits (N, classes)."""
        x = self._check(x)
        create = torch.is_grad_enabled()  # train through G (double backward) when the caller records
        with eval_mode(self.model), torch.enable_grad():
            logits, inputs = self._run(x)
            logp = F.log_softmax(logits, dim=-1)
            if self.target == "label":
                if labels is None:
                    raise ValueError("target='label' differentiates the labels' log-likelihood: pass labels (N,)")
                labels = torch.as_tensor(labels, device=logits.device).long()
                f = F.nll_loss(logp, labels)
            else:
                f = logp.sum()
            (grad,) = torch.autograd.grad(f, inputs, create_graph=create)
        return grad, (logits if create else logits.detach())

    def forward_with_penalty(self, x: torch.Tensor, masks, labels: torch.Tensor | None = None,
                             _need_logits: bool = True):
        """(logits (N, classes), penalty) from one forward pass in eval behaviour."""
        if _need_logits:
            self._refuse_train_mode()
        grad, logits = self.gradients(x, labels)
        m, ch = self._masks(x, grad, masks)
        masked = m * grad[None]
        per_mask = (masked.sum(ch) ** 2 if self.channels == "sum" else masked ** 2).flatten(1).sum(1)
        return logits, self._reduce(per_mask)

    def __call__(self, x: torch.Tensor, masks, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_penalty(x, masks, labels, _need_logits=False)[1]


class ExpectedGradientsPenalty(_InputGradientPenalty):
    """Expected-gradients attributions of the masked features (the CDEP repository's
    ``eg_scores_2d``, summed over a batch as its training scripts do).

    >>> eg = ExpectedGradientsPenalty(model, samples=4, generator=torch.Generator().manual_seed(0))
    >>> loss = F.cross_entropy(model(x), y) + lam * eg(x, masks, y)

    For image n with label y, references ``x'_s = x[j_s]`` (s = 1..S, j_s drawn uniformly from
    the batch, as the repository does) and ``a_s ~ U(0, 1)``: points ``p_s = x'_s (1 - a_s) +
    a_s x_n``, attribution ``A_n = sum_s |d softmax(f(p_s))_y / d p_s * (x_n - x'_s)|``; the
    penalty of a mask is ``sum_n sum m A_n`` (over channels and positions). The repository
    uses S = 200 (DecoyMNIST) or 50 (ColorMNIST) per image; each sample is one more row in the
    forward and double-backward pass, so S = 1-4 is what a CPU affords.

    references (S, N) indices into the batch and alphas (S, N) may be given to
    ``forward_with_penalty`` / ``__call__`` (e.g. to compare implementations); otherwise
    they are drawn with ``generator``.
    """

    def __init__(self, model: nn.Module, samples: int = 4, reduction: str = "mean",
                 embed: nn.Module | None = None, batch_first: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__(model, reduction, embed, batch_first)
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.samples, self.generator = int(samples), generator

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(references (S, N) indices into the batch, alphas (S, N) in [0, 1))."""
        refs = torch.randint(0, n, (self.samples, n), generator=self.generator)
        return refs, torch.rand(self.samples, n, generator=self.generator, dtype=torch.float64)

    def attributions(self, x: torch.Tensor, labels: torch.Tensor, references: torch.Tensor | None = None,
                     alphas: torch.Tensor | None = None, with_logits: bool = False):
        """A (x's shape, or the word vectors' (T, N, E)), differentiable when gradients are
        enabled; with ``with_logits`` also the logits of x (N, classes) from the same forward."""
        x = self._check(x)
        n = self._n(x)
        if references is None or alphas is None:
            references, alphas = self.draw(n)
        s = references.shape[0]
        if tuple(references.shape) != (s, n) or tuple(alphas.shape) != (s, n):
            raise ValueError(f"references and alphas must be (S, N) = (S, {n}), got "
                             f"{tuple(references.shape)} and {tuple(alphas.shape)}")
        labels = torch.as_tensor(labels).long()
        create = torch.is_grad_enabled()
        with eval_mode(self.model), torch.enable_grad():
            vec = self._vectors(x)
            bdim = 0 if self.embed is None or self.batch_first else 1
            dev = vec.device
            refs = references.to(dev).reshape(-1)                              # (S*N,) sample-major
            own = torch.arange(n, device=dev).repeat(s)
            a = alphas.to(device=dev, dtype=vec.dtype).reshape(-1)
            a = a.reshape((1,) * bdim + (-1,) + (1,) * (vec.dim() - bdim - 1))
            ref_vec, own_vec = vec.index_select(bdim, refs), vec.index_select(bdim, own)
            points = ref_vec * (1 - a) + a * own_vec
            if not points.requires_grad:  # images: a leaf to differentiate against
                points.requires_grad_()
            both = torch.cat([vec, points], bdim) if with_logits else points
            if self.embed is None:
                out, _ = self._run(x, both)
            else:  # the model runs on the batch repeated; the embedding's output is replaced
                tokens = x.repeat((1, s + with_logits) if bdim == 1 else (s + with_logits, 1))
                out, _ = self._run(tokens, both)
            logits = out[:n] if with_logits else None
            prob = torch.softmax(out[n:] if with_logits else out, dim=-1)
            y = labels.to(prob.device).repeat(s)
            p = prob.gather(1, y[:, None]).abs().sum()                         # L1 of the probabilities
            (grad,) = torch.autograd.grad(p, points, create_graph=create)
            attr = (grad * (own_vec - ref_vec)).abs()
            shape = attr.shape
            attr = attr.reshape(shape[:bdim] + (s, n) + shape[bdim + 1:]).sum(bdim)
        if not create:
            attr, logits = attr.detach(), (None if logits is None else logits.detach())
        return (attr, logits) if with_logits else attr

    def forward_with_penalty(self, x: torch.Tensor, masks, labels: torch.Tensor,
                             references: torch.Tensor | None = None, alphas: torch.Tensor | None = None,
                             _need_logits: bool = True):
        """(logits (N, classes), penalty): the logits come from the same forward pass (x's rows
        next to the S*N interpolated points), in eval behaviour."""
        if _need_logits:
            self._refuse_train_mode()
        if labels is None:
            raise ValueError("expected gradients attribute the labels' probabilities: pass labels (N,)")
        if _need_logits:
            attr, logits = self.attributions(x, labels, references, alphas, with_logits=True)
        else:
            attr, logits = self.attributions(x, labels, references, alphas), None
        m, _ = self._masks(x, attr, masks)
        per_mask = (m * attr[None]).flatten(1).sum(1)
        return logits, self._reduce(per_mask)

    def __call__(self, x: torch.Tensor, masks, labels: torch.Tensor, references: torch.Tensor | None = None,
                 alphas: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_penalty(x, masks, labels, references, alphas, _need_logits=False)[1]

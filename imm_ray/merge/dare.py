"""DARE (Drop And REscale) and the task-vector core shared by imm / task_arithmetic / dare_linear.

MergeLM semantics (Yu et al., ICML 2024; ``mask_input_with_mask_rate``)::

    mask      ~ Bernoulli(p) elementwise          (1 = drop), drawn from a seeded generator
    delta_hat = (1 - mask) * delta / (1 - p)       ("exact" rescale)

All functions are pure tensor functions; callers pass fp32 tensors and one shared ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .errors import MergeError

Rescale = Literal["exact", "l1", "none"]
RESCALE_MODES: tuple[str, ...] = ("exact", "l1", "none")


def drop_mask(like: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Boolean mask, True where an entry is dropped; entries are i.i.d. Bernoulli(``p``).

    Drawn exactly as MergeLM does (``torch.bernoulli(torch.full_like(x, p))``) so the random stream
    consumed per tensor is one Bernoulli draw per element.
    """
    probs = torch.full(like.shape, float(p), dtype=torch.float32, device=like.device)
    return torch.bernoulli(probs, generator=generator).bool()


def dare_drop(
    delta: torch.Tensor,
    p: float,
    generator: torch.Generator | None,
    rescale: Rescale = "exact",
) -> torch.Tensor:
    """Randomly drop a fraction ``p`` of ``delta``'s entries and rescale the kept ones.

    rescale:
      * ``"exact"`` (MergeLM / the paper): kept entries become exactly ``delta / (1 - p)``.
      * ``"l1"`` (mergekit-style "rescale to the L1 norm"): kept entries are scaled so the L1 norm of
        the result equals the L1 norm of ``delta`` (no scaling if either norm is ~0).
      * ``"none"``: kept entries are left as they are (DARE without rescale).

    ``p == 0`` returns ``delta`` unchanged and consumes no random numbers.
    """
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise MergeError(f"drop_rate must be in [0, 1), got {p}")
    if rescale not in RESCALE_MODES:
        raise MergeError(f"rescale must be one of {RESCALE_MODES}, got {rescale!r}")
    if p == 0.0:
        return delta
    dropped = drop_mask(delta, p, generator)
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    if rescale == "exact":
        return torch.where(dropped, zero, torch.div(delta, 1.0 - p))
    kept = torch.where(dropped, zero, delta)
    if rescale == "l1":
        old = delta.abs().sum(dtype=torch.float64)
        new = kept.abs().sum(dtype=torch.float64)
        if old >= 1e-8 and new >= 1e-8:
            kept = kept * (old / new).to(delta.dtype)
    return kept


def task_vector_merge(
    anchor: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    drop_rate: float = 0.0,
    rescale: Rescale = "exact",
    normalize: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``anchor + sum_i w_i * DARE_p(model_i - anchor)`` (divided by ``sum w_i`` if ``normalize``).

    Covers imm (one model, w = lam), task_arithmetic (p = 0, w_i = lam) and dare_linear.
    Masks are drawn model by model, in the given order, from ``generator``.
    """
    if len(models) != len(weights):
        raise MergeError(f"got {len(models)} models but {len(weights)} weights")
    if not models:
        raise MergeError("task_vector_merge needs at least one model")
    total = torch.zeros_like(anchor)
    for model, weight in zip(models, weights):
        delta = dare_drop(model - anchor, drop_rate, generator, rescale)
        total.add_(delta, alpha=float(weight))
    if normalize:
        wsum = float(sum(weights))
        if wsum == 0.0:
            raise MergeError("normalize=True needs weights with a non-zero sum")
        total.div_(wsum)
    return anchor + total


def weighted_average(
    models: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    """``sum_i w_i * model_i`` (divided by ``sum w_i`` if ``normalize``)."""
    if len(models) != len(weights):
        raise MergeError(f"got {len(models)} models but {len(weights)} weights")
    if not models:
        raise MergeError("weighted_average needs at least one model")
    out = torch.zeros_like(models[0])
    for model, weight in zip(models, weights):
        out.add_(model, alpha=float(weight))
    if normalize:
        wsum = float(sum(weights))
        if wsum == 0.0:
            raise MergeError("normalize=True needs weights with a non-zero sum")
        out.div_(wsum)
    return out

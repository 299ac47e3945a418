"""Tensor-level merge formulas on fp32 tensors. Inputs are left alone unless ``inplace=True``, which
lets a function reuse the model tensors' memory (the engine passes scratch buffers it owns).

``task_vector_merge`` is the one parameterised core behind imm, task_arithmetic, ties, dare_linear,
dare_ties and breadcrumbs::

    d_i   = sparsify(model_i - anchor)                       (none | random | magnitude | breadcrumbs)
    mixed = sum_i w_i d_i                                     (consensus "none")
          | sum_i w_i d_i [sign(w_i d_i) == elected sign]     (consensus "ties": sign of sum_i w_i d_i,
                                                              ties go to +; zero entries never agree)
    mixed = mixed / sum_i w_i [agree_i]      if normalize    (TIES disjoint mean; no-op where 0)
    out   = anchor + lam * mixed
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import MergeError
from .rng import TensorRNG
from .sparsify import Rescale, sparsify

CONSENSUS_MODES: tuple[str, ...] = ("none", "ties")


def _check_lengths(what: str, models: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(models) != len(weights):
        raise MergeError(f"got {len(models)} models but {len(weights)} weights")
    if not models:
        raise MergeError(f"{what} needs at least one model")


def task_vector_merge(
    anchor: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    sparsification: str = "none",
    density: float = 1.0,
    drop_rate: float = 0.0,
    gamma: float = 0.0,
    rescale: Rescale = "exact",
    consensus: str = "none",
    normalize: bool = False,
    rng: TensorRNG | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """The task-vector core (see the module doc). Model ``i`` uses random stream ``i`` of ``rng``.
    ``inplace`` lets it overwrite (and return) the ``models`` tensors."""
    _check_lengths("task_vector_merge", models, weights)
    if consensus not in CONSENSUS_MODES:
        raise MergeError(f"consensus must be one of {CONSENSUS_MODES}, got {consensus!r}")
    weighted = []
    for i, (model, weight) in enumerate(zip(models, weights)):
        delta = model.sub_(anchor) if inplace else torch.sub(model, anchor)
        delta = sparsify(delta, sparsification, density=density, drop_rate=drop_rate, gamma=gamma,
                         rescale=rescale, rng=rng, stream=i, inplace=True)
        weighted.append(delta if weight == 1.0 else delta.mul_(float(weight)))
    if consensus == "ties":
        mixed = _ties_mean(weighted, weights, normalize)
    else:
        mixed = weighted[0]
        for other in weighted[1:]:
            mixed.add_(other)
        if normalize:
            mixed.div_(_nonzero_sum(weights))
    return mixed.mul_(float(lam)).add_(anchor) if lam != 1.0 else mixed.add_(anchor)


def _ties_mean(weighted: list[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Sign election + disjoint (weighted) mean over the agreeing entries."""
    stacked = torch.stack(weighted)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == elected
    mixed = (stacked * agree).sum(0)
    if not normalize:
        return mixed
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype).reshape(-1, *[1] * (stacked.dim() - 1))
    divisor = (agree * w).sum(0)
    return mixed / torch.where(divisor == 0, 1.0, divisor)


def _nonzero_sum(weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total == 0.0:
        raise MergeError("normalize=True needs weights with a non-zero sum")
    return total


def weighted_average(
    models: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True, inplace: bool = False
) -> torch.Tensor:
    """``sum_i w_i * model_i`` (divided by ``sum w_i`` if ``normalize``); ``inplace`` reuses ``models[0]``."""
    _check_lengths("weighted_average", models, weights)
    w0 = float(weights[0])
    out = (models[0].mul_(w0) if w0 != 1.0 else models[0]) if inplace else torch.mul(models[0], w0)
    for model, weight in zip(models[1:], weights[1:]):
        out.add_(model, alpha=float(weight))
    if normalize:
        total = _nonzero_sum(weights)
        if total != 1.0:
            out.div_(total)
    return out


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), over the flattened tensors.

    Same formula as mergekit: the angle comes from the normalised tensors, the result combines the
    unnormalised ones; nearly colinear tensors (|cos| > ``dot_threshold``) fall back to lerp.
    The endpoints are returned exactly.
    """
    t = float(t)
    if t == 0.0:
        return v0.clone()
    if t == 1.0:
        return v1.clone()
    n0 = float(torch.linalg.vector_norm(v0, dtype=torch.float64))
    n1 = float(torch.linalg.vector_norm(v1, dtype=torch.float64))
    dot = float(torch.dot(v0.reshape(-1).double(), v1.reshape(-1).double())) / (max(n0, eps) * max(n1, eps))
    if abs(dot) > dot_threshold:
        return torch.lerp(v0, v1, t)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s0 = math.sin((1.0 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return torch.add(torch.mul(v0, s0), v1, alpha=s1)

"""Tensor-level merge formulas on float32 numpy arrays. Inputs are left alone unless ``inplace=True``, which
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

import numpy as np

from .errors import MergeError
from .rng import TensorRNG
from .sparsify import Rescale, sparsify

CONSENSUS_MODES: tuple[str, ...] = ("none", "ties")


def _check_lengths(what: str, models: Sequence[np.ndarray], weights: Sequence[float]) -> None:
    if len(models) != len(weights):
        raise MergeError(f"got {len(models)} models but {len(weights)} weights")
    if not models:
        raise MergeError(f"{what} needs at least one model")


def task_vector_merge(
    anchor: np.ndarray,
    models: Sequence[np.ndarray],
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
) -> np.ndarray:
    """The task-vector core (see the module doc). Model ``i`` uses random stream ``i`` of ``rng``.
    ``inplace`` lets it overwrite (and return) the ``models`` tensors."""
    _check_lengths("task_vector_merge", models, weights)
    if consensus not in CONSENSUS_MODES:
        raise MergeError(f"consensus must be one of {CONSENSUS_MODES}, got {consensus!r}")
    weighted = []
    for i, (model, weight) in enumerate(zip(models, weights)):
        delta = np.subtract(model, anchor, out=model if inplace else None)
        delta = sparsify(delta, sparsification, density=density, drop_rate=drop_rate, gamma=gamma,
                         rescale=rescale, rng=rng, stream=i, inplace=True)
        if weight != 1.0:
            delta *= np.float32(weight)
        weighted.append(delta)
    if consensus == "ties":
        mixed = _ties_mean(weighted, weights, normalize)
    else:
        mixed = weighted[0]
        for other in weighted[1:]:
            mixed += other
        if normalize:
            mixed /= np.float32(_nonzero_sum(weights))
    if lam != 1.0:
        mixed *= np.float32(lam)
    mixed += anchor
    return mixed


def _ties_mean(weighted: list[np.ndarray], weights: Sequence[float], normalize: bool) -> np.ndarray:
    """Sign election + disjoint (weighted) mean over the agreeing entries."""
    stacked = np.stack(weighted)
    elected = np.where(stacked.sum(0) >= 0, np.float32(1.0), np.float32(-1.0))
    agree = np.sign(stacked) == elected
    mixed = (stacked * agree).sum(0)
    if not normalize:
        return mixed
    w = np.asarray(weights, dtype=np.float32).reshape(-1, *[1] * (stacked.ndim - 1))
    divisor = (agree * w).sum(0)
    return mixed / np.where(divisor == 0, np.float32(1.0), divisor)


def _nonzero_sum(weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total == 0.0:
        raise MergeError("normalize=True needs weights with a non-zero sum")
    return total


def weighted_average(
    models: Sequence[np.ndarray], weights: Sequence[float], *, normalize: bool = True, inplace: bool = False
) -> np.ndarray:
    """``sum_i w_i * model_i`` (divided by ``sum w_i`` if ``normalize``); ``inplace`` reuses ``models[0]``
    (the other models' arrays may then serve as scratch)."""
    _check_lengths("weighted_average", models, weights)
    out = np.multiply(models[0], np.float32(weights[0]), out=models[0] if inplace else None)
    for model, weight in zip(models[1:], weights[1:]):
        if float(weight) != 1.0:
            model = np.multiply(model, np.float32(weight), out=model if inplace else None)
        out += model
    if normalize:
        total = _nonzero_sum(weights)
        if total != 1.0:
            out /= np.float32(total)
    return out


def slerp(
    t: float, v0: np.ndarray, v1: np.ndarray, *, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> np.ndarray:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), over the flattened tensors.

    Same formula as mergekit: the angle comes from the normalised tensors, the result combines the
    unnormalised ones; nearly colinear tensors (|cos| > ``dot_threshold``) fall back to lerp.
    The endpoints are returned exactly.
    """
    t = float(t)
    if t == 0.0:
        return v0.copy()
    if t == 1.0:
        return v1.copy()
    a, b = v0.reshape(-1).astype(np.float64), v1.reshape(-1).astype(np.float64)
    n0, n1 = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    dot = float(np.dot(a, b)) / (max(n0, eps) * max(n1, eps))
    if abs(dot) > dot_threshold:
        return v0 + np.float32(t) * (v1 - v0)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s0 = math.sin((1.0 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return v0 * np.float32(s0) + v1 * np.float32(s1)

"""Sparsification of task vectors (``delta = model - anchor``).

* ``random`` (DARE, MergeLM semantics): drop each entry with probability ``p`` and rescale the kept
  ones; ``rescale="exact"`` divides by exactly ``1 - p`` (MergeLM, the paper), ``"l1"`` matches the
  tensor's L1 norm (mergekit's ``rescale``), ``"none"`` leaves them.
* ``magnitude`` (TIES trim): keep exactly ``k = int(density * n)`` entries of largest ``|delta|``.
* ``breadcrumbs`` (Model Breadcrumbs): drop the ``int(gamma * n)`` largest entries (outliers) and keep
  the next ``int(density * n)``; the rest are dropped.

Magnitude ties are broken by flat index (earlier first), so every result is deterministic.
"""

from __future__ import annotations

import threading
from typing import Literal

import numpy as np

from .errors import MergeError
from .rng import TensorRNG

Rescale = Literal["exact", "l1", "none"]
RESCALE_MODES: tuple[str, ...] = ("exact", "l1", "none")
SPARSIFY_MODES: tuple[str, ...] = ("none", "random", "magnitude", "breadcrumbs")
_SCRATCH_MAX = 1 << 22  # masks up to this size reuse a per-thread buffer
_scratch = threading.local()


def _mask_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape``: a view of a reused per-thread buffer for block-sized masks."""
    numel = int(np.prod(shape, dtype=np.int64))
    if numel > _SCRATCH_MAX:
        return np.empty(shape, dtype=np.float32)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < numel:
        buf = _scratch.buf = np.empty(max(numel, 1 << 20), dtype=np.float32)
    return buf[:numel].reshape(shape)


def dare_drop(
    delta: np.ndarray,
    p: float,
    rng: TensorRNG | None,
    rescale: Rescale = "exact",
    stream: int = 0,
    inplace: bool = False,
) -> np.ndarray:
    """DARE: drop a fraction ``p`` of ``delta`` at random (stream ``stream`` of ``rng``) and rescale.

    ``p == 0`` returns ``delta`` itself and draws nothing. Dropped entries become (signed) zero.
    ``inplace`` overwrites and returns ``delta``.
    """
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise MergeError(f"drop_rate must be in [0, 1), got {p}")
    if rescale not in RESCALE_MODES:
        raise MergeError(f"rescale must be one of {RESCALE_MODES}, got {rescale!r}")
    if p == 0.0:
        return delta
    if rng is None:
        raise MergeError("DARE with drop_rate > 0 needs a random source")
    keep = rng.keep_mask(stream, delta.shape, p, out=_mask_buffer(delta.shape))
    if rescale == "exact":
        out = np.divide(delta, np.float32(1.0 - p), out=delta if inplace else None)
        out *= keep
        return out
    kept = delta * keep
    if rescale == "l1":
        _match_l1(kept, delta)
    if inplace:
        delta[...] = kept
        return delta
    return kept


def _match_l1(kept: np.ndarray, original: np.ndarray) -> None:
    """Scale ``kept`` in place so its L1 norm equals ``original``'s (no-op if either is ~0)."""
    old = float(np.abs(original).sum(dtype=np.float64))
    new = float(np.abs(kept).sum(dtype=np.float64))
    if old >= 1e-8 and new >= 1e-8:
        kept *= np.float32(old / new)


def top_k_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of exactly ``k`` largest entries of ``values`` (ties: lower flat index first)."""
    flat = values.reshape(-1)
    n = flat.size
    if k <= 0:
        return np.zeros(values.shape, dtype=bool)
    if k >= n:
        return np.ones(values.shape, dtype=bool)
    threshold = np.partition(flat, n - k)[n - k]
    keep = flat > threshold
    need = k - int(np.count_nonzero(keep))
    ties = flat == threshold
    keep |= ties & (np.cumsum(ties, dtype=np.int64) <= need)
    return keep.reshape(values.shape)


def magnitude_mask(delta: np.ndarray, density: float, gamma: float = 0.0) -> np.ndarray:
    """Keep-mask: drop the top ``int(gamma*n)`` by ``|delta|``, keep the next ``int(density*n)``."""
    n = delta.size
    n_top = int(gamma * n)
    n_keep = min(int(density * n), n - n_top)
    magnitude = np.abs(delta)
    keep = top_k_mask(magnitude, n_top + n_keep)
    if n_top:
        keep &= ~top_k_mask(magnitude, n_top)
    return keep


def sparsify(
    delta: np.ndarray,
    mode: str,
    *,
    density: float = 1.0,
    drop_rate: float = 0.0,
    gamma: float = 0.0,
    rescale: Rescale = "exact",
    rng: TensorRNG | None = None,
    stream: int = 0,
    inplace: bool = False,
) -> np.ndarray:
    """Apply sparsification ``mode`` to ``delta``: ``random`` uses ``drop_rate`` (and ``rescale``),
    ``magnitude`` / ``breadcrumbs`` use ``density`` (fraction kept) and ``gamma``. ``inplace`` may
    overwrite ``delta``."""
    if mode == "none":
        return delta
    if mode == "random":
        return dare_drop(delta, drop_rate, rng, rescale, stream, inplace)
    if not 0.0 <= density <= 1.0:
        raise MergeError(f"density must be in [0, 1], got {density}")
    if mode in ("magnitude", "breadcrumbs"):
        keep = magnitude_mask(delta, density, gamma if mode == "breadcrumbs" else 0.0)
        if inplace:
            delta *= keep
            return delta
        return delta * keep
    raise MergeError(f"sparsification must be one of {SPARSIFY_MODES}, got {mode!r}")

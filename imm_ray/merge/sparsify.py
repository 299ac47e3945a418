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

import torch

from .errors import MergeError
from .rng import TensorRNG

Rescale = Literal["exact", "l1", "none"]
RESCALE_MODES: tuple[str, ...] = ("exact", "l1", "none")
SPARSIFY_MODES: tuple[str, ...] = ("none", "random", "magnitude", "breadcrumbs")
_SCRATCH_MAX = 1 << 22  # masks up to this size reuse a per-thread buffer
_scratch = threading.local()


def _mask_buffer(shape: torch.Size) -> torch.Tensor:
    """A float32 tensor of ``shape``: a view of a reused per-thread buffer for block-sized masks."""
    numel = shape.numel()
    if numel > _SCRATCH_MAX:
        return torch.empty(shape, dtype=torch.float32)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(max(numel, 1 << 20), dtype=torch.float32)
    return buf[:numel].view(shape)


def dare_drop(
    delta: torch.Tensor,
    p: float,
    rng: TensorRNG | None,
    rescale: Rescale = "exact",
    stream: int = 0,
    inplace: bool = False,
) -> torch.Tensor:
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
        return (delta.div_(1.0 - p) if inplace else torch.div(delta, 1.0 - p)).mul_(keep)
    kept = delta * keep
    if rescale == "l1":
        _match_l1(kept, delta)
    return delta.copy_(kept) if inplace else kept


def _match_l1(kept: torch.Tensor, original: torch.Tensor) -> None:
    """Scale ``kept`` in place so its L1 norm equals ``original``'s (no-op if either is ~0)."""
    old = original.abs().sum(dtype=torch.float64)
    new = kept.abs().sum(dtype=torch.float64)
    if old >= 1e-8 and new >= 1e-8:
        kept.mul_((old / new).to(kept.dtype))


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly ``k`` largest entries of ``values`` (ties: lower flat index first)."""
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool)
    if k >= n:
        return torch.ones(values.shape, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    keep = flat > threshold
    need = k - int(keep.sum())
    ties = flat == threshold
    keep |= ties & (torch.cumsum(ties, 0, dtype=torch.int64) <= need)
    return keep.reshape(values.shape)


def magnitude_mask(delta: torch.Tensor, density: float, gamma: float = 0.0) -> torch.Tensor:
    """Keep-mask: drop the top ``int(gamma*n)`` by ``|delta|``, keep the next ``int(density*n)``."""
    n = delta.numel()
    n_top = int(gamma * n)
    n_keep = min(int(density * n), n - n_top)
    magnitude = delta.abs()
    keep = top_k_mask(magnitude, n_top + n_keep)
    if n_top:
        keep &= ~top_k_mask(magnitude, n_top)
    return keep


def sparsify(
    delta: torch.Tensor,
    mode: str,
    *,
    density: float = 1.0,
    drop_rate: float = 0.0,
    gamma: float = 0.0,
    rescale: Rescale = "exact",
    rng: TensorRNG | None = None,
    stream: int = 0,
    inplace: bool = False,
) -> torch.Tensor:
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
        return delta.mul_(keep) if inplace else delta * keep
    raise MergeError(f"sparsification must be one of {SPARSIFY_MODES}, got {mode!r}")

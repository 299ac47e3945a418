"""Rank statistics: average ranks with ties and Spearman's rank correlation (no scipy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["rankdata", "spearman"]


def rankdata(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        average = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = average
        i = j + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks) over the pairs where both values
    are finite numbers; None when fewer than 2 such pairs or either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 2:
        return None
    xs, ys = zip(*pairs)
    rho = _pearson(rankdata(xs), rankdata(ys))
    return None if rho is None else max(-1.0, min(1.0, rho))

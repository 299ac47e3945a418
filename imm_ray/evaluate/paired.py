"""Paired comparison of two models scored on the same questions: the accuracy difference with a
95% interval, and McNemar's exact test on the questions where exactly one of them is right."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["PairedDifference", "mcnemar_exact", "paired_difference"]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``only_a`` successes in
    ``only_a + only_b`` discordant pairs against p = 1/2.

    p = min(1, 2 * sum_{i <= min(only_a, only_b)} C(n, i) / 2^n) with n = only_a + only_b,
    computed in exact integer arithmetic; 1.0 when there is no discordant pair.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class PairedDifference:
    """Model A against model B on the questions both were scored on.

    difference = accuracy A - accuracy B = (only_a - only_b) / n; ci95 is its Wald interval on
    the paired per-question differences (see paired_difference); p_value is McNemar's exact test.
    """

    n: int
    accuracy_a: float
    accuracy_b: float
    only_a: int
    only_b: int
    difference: float
    ci95: tuple[float, float]
    p_value: float


def paired_difference(a: Mapping[str, bool], b: Mapping[str, bool]) -> PairedDifference | None:
    """Compare two {question id: correct} maps on the ids they share (None when they share none).

    The interval is the Wald interval of the mean of the paired differences d_i = a_i - b_i
    (each -1, 0 or 1): difference +- 1.96 * sqrt((only_a + only_b) / n - difference^2) / sqrt(n),
    clipped to [-1, 1]. It accounts for the pairing (the questions both get right or both get
    wrong add no variance) and is accurate for the few hundred questions of a study; it
    collapses to the point when no question is discordant or all go the same way (tiny sets).
    """
    common = [q for q in a if q in b]
    if not common:
        return None
    n = len(common)
    only_a = sum(bool(a[q]) and not b[q] for q in common)
    only_b = sum(bool(b[q]) and not a[q] for q in common)
    diff = (only_a - only_b) / n
    half = Z95 * math.sqrt(max(0.0, (only_a + only_b) / n - diff**2) / n)
    return PairedDifference(
        n=n,
        accuracy_a=sum(bool(a[q]) for q in common) / n,
        accuracy_b=sum(bool(b[q]) for q in common) / n,
        only_a=only_a,
        only_b=only_b,
        difference=diff,
        ci95=(max(-1.0, diff - half), min(1.0, diff + half)),
        p_value=mcnemar_exact(only_a, only_b),
    )

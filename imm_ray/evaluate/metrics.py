"""Sampling metrics: unbiased pass@k, majority vote (maj@k), and a seeded bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imm_ray.verify.answers import normalize_answer

__all__ = ["pass_at_k", "mean_pass_at_k", "majority_vote", "maj_at_k", "mean_maj_at_k", "bootstrap_ci"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021) for one question: 1 - C(n-c, k) / C(n, k).

    n samples, c of them correct. Computed as a stable product, 1 - prod_{i=n-c+1..n} (1 - k/i).
    ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct_by_question: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over questions, each given as its samples' correctness (0.0 if none)."""
    if not correct_by_question:
        return 0.0
    return float(np.mean([pass_at_k(len(c), sum(map(bool, c)), k) for c in correct_by_question]))


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample holding the most frequent answer; None if no sample has an answer.

    Answers are compared after normalize_answer ("1,000" == "1000"); None (unparseable) never
    votes. Ties go to the answer that appears first in sample order (deterministic), and the
    index returned is that answer's first occurrence.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        key = normalize_answer(answer)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, index)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int | None = None) -> bool:
    """Whether the majority answer of the first k samples (all when k is None) is correct."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    k = len(answers) if k is None else k
    winner = majority_vote(answers[:k])
    return winner is not None and bool(correct[winner])


def mean_maj_at_k(
    answers_by_question: Sequence[Sequence[str | None]],
    correct_by_question: Sequence[Sequence[bool]],
    k: int | None = None,
) -> float:
    """maj@k averaged over questions (0.0 if none)."""
    if not answers_by_question:
        return 0.0
    votes = [maj_at_k(a, c, k) for a, c in zip(answers_by_question, correct_by_question, strict=True)]
    return float(np.mean(votes))


def bootstrap_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval for the mean of values (e.g. per-question 0/1 correctness).

    Resamples the values with replacement `resamples` times from numpy's default_rng(seed), so
    the same inputs and seed give the same interval. The interval is widened, if needed, to
    contain the point estimate. None for an empty input.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return None
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    point = float(data.mean())
    return min(float(lo), point), max(float(hi), point)

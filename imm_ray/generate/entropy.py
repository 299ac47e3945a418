"""The entropy of one next-token distribution: what the engines record per generated token and
what the diversity metrics average (pure: no torch or vLLM)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["token_entropy"]


def token_entropy(distribution: Mapping[Any, float] | Sequence[float]) -> float:
    """Entropy (nats) of one next-token distribution given as log-probabilities.

    Accepts a {token: logprob} mapping (vLLM's per-position logprobs) or a list of logprobs.
    A truncated top-k distribution is renormalised to sum to 1 first.
    """
    logprobs = list(distribution.values()) if isinstance(distribution, Mapping) else list(distribution)
    finite = [lp for lp in logprobs if lp is not None and math.isfinite(lp)]
    if not finite:
        return 0.0
    top = max(finite)
    log_z = top + math.log(sum(math.exp(lp - top) for lp in finite))
    return -sum(math.exp(lp - log_z) * (lp - log_z) for lp in finite)

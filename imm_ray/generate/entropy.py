"""Token entropies of whole sequences at once, from flat top-k log-probability arrays (numpy).

Per position, the entropy (nats) of the top-k next-token distribution renormalised to sum to 1:
the same value as :func:`imm_ray.evaluate.diversity.token_entropy` on that position's top-k
log-probs, computed for every position of a sequence in a few vectorised passes instead of one
Python loop (and one dict of ``Logprob`` objects) per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["flat_entropies"]


def flat_entropies(starts: Sequence[int], ends: Sequence[int], logprobs: Sequence[float],
                   ranks: Sequence[int | None] | None = None, top_k: int | None = None,
                   sampled_first: bool = False) -> tuple[float, ...]:
    """Entropy of each position ``p`` over ``logprobs[starts[p]:ends[p]]``.

    With ``ranks`` and ``top_k``, entries whose rank is above ``top_k`` (or None) are left out.
    ``sampled_first``: each position's first entry is the sampled token, followed by the top k
    (vLLM's flat log-probs: the sampled token appears twice when it is among the top k), so the
    first entry is left out. Non-finite log-probs are ignored; a position with nothing left has
    entropy 0.
    """
    starts_a, ends_a = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    n_pos = len(starts_a)
    if n_pos == 0:
        return ()
    if starts_a[0] != 0 or np.any(starts_a[1:] != ends_a[:-1]) or ends_a[-1] != len(logprobs):
        raise ValueError("flat_entropies needs contiguous positions: starts[0] == 0, starts[p + 1] == ends[p], "
                         "ends[-1] == len(logprobs)")
    lp = np.asarray(logprobs, dtype=np.float64)
    pos = np.repeat(np.arange(n_pos), ends_a - starts_a)
    keep = np.isfinite(lp)
    if sampled_first:
        keep[starts_a[ends_a > starts_a]] = False
    if ranks is not None and top_k is not None:
        keep &= np.array([top_k + 1 if x is None else x for x in ranks], dtype=np.int64) <= top_k
    lp, pos = lp[keep], pos[keep]
    top = np.full(n_pos, -np.inf)
    np.maximum.at(top, pos, lp)
    shifted = lp - top[pos]
    z = np.bincount(pos, weights=np.exp(shifted), minlength=n_pos)
    log_z = np.where(z > 0, np.log(np.where(z > 0, z, 1.0)), 0.0)
    norm = shifted - log_z[pos]  # log of the renormalised probabilities
    ent = -np.bincount(pos, weights=np.exp(norm) * norm, minlength=n_pos)
    return tuple(float(e) + 0.0 for e in ent)

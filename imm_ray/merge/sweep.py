"""A merge sweep: the candidate merges of a round, the rule that picks one from their accuracies on
the probe split, and which candidates lie on the in-domain / out-of-domain frontier (pure: no Ray,
no I/O).

``merge.select: frontier`` picks, among the candidates whose in-domain (ID) probe gain over the
round's start model is at least half the best candidate's gain, the one with the highest mean
out-of-domain (OOD) probe accuracy. When no candidate gains on ID, the candidates with the best ID
probe accuracy compete on OOD. Ties go to the higher ID accuracy, then to the earlier candidate.
``merge.select: fixed`` keeps merge.params, whatever the probe says.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["SELECT_RULES", "ProbeScore", "choose_candidate", "frontier_choice", "pareto_front",
           "sweep_candidates"]

Select = Literal["fixed", "frontier"]

SELECT_RULES: dict[str, str] = {
    "fixed": "fixed: merge.params, whatever the probe says",
    "frontier": "frontier: the highest mean OOD probe accuracy among the candidates that keep at least half "
                "of the best candidate's ID probe gain over the round's start model (none gains: those with "
                "the best ID probe accuracy); ties: higher ID, then the earlier candidate",
}


@dataclass(frozen=True)
class ProbeScore:
    """A model's accuracy on the probe split: the in-domain set's, and the mean over the OOD sets."""

    id: float
    ood: float


def sweep_candidates(params: Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
                     keep: bool = False) -> list[dict[str, Any]]:
    """Every combination of ``grid``'s values (parameter -> values, the last parameter varying fastest)
    laid over ``params``; with ``keep``, ``params`` itself is added last unless it is a combination."""
    names = list(grid)
    out = [{**params, **dict(zip(names, values))} for values in itertools.product(*(grid[n] for n in names))]
    if keep and dict(params) not in out:
        out.append(dict(params))
    return out


def frontier_choice(start: ProbeScore, candidates: Sequence[ProbeScore]) -> int:
    """The index of the candidate the frontier rule picks (see the module docstring)."""
    if not candidates:
        raise ValueError("a sweep needs at least one candidate")
    gains = [c.id - start.id for c in candidates]
    best = max(gains)
    floor = min(best, best / 2)  # half the best gain; the best itself when no candidate gains
    eligible = [i for i, g in enumerate(gains) if g >= floor - 1e-12]
    return min(eligible, key=lambda i: (-candidates[i].ood, -candidates[i].id, i))


def choose_candidate(select: Select, params: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]],
                     start: ProbeScore, scores: Sequence[ProbeScore]) -> int:
    """The index of the round's merge among ``candidates`` (their probe ``scores``) by ``select``."""
    if select == "fixed":
        return list(candidates).index(dict(params))
    if select == "frontier":
        return frontier_choice(start, scores)
    raise ValueError(f"unknown merge selection {select!r} (known: {', '.join(SELECT_RULES)})")


def pareto_front(scores: Sequence[ProbeScore]) -> list[bool]:
    """Whether each score lies on the ID/OOD frontier: no other is at least as good on both and
    better on one."""
    def dominated(a: ProbeScore) -> bool:
        return any(b.id >= a.id and b.ood >= a.ood and (b.id > a.id or b.ood > a.ood) for b in scores)

    return [not dominated(s) for s in scores]

"""The probe split of an evaluation set: a seeded share of its questions that a merge sweep scores its
candidates on, and the held-back rest that every reported evaluation uses, so that a merge weight
chosen on the probe never flatters the numbers reported.

A question's side depends only on the seed, the set's name and the question's id (a hash), not on
the order or the other questions of the set: the same seed always draws the same probe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imm_ray.data.problems import Problem

__all__ = ["ProbeSplit", "probe_split"]


@dataclass(frozen=True)
class ProbeSplit:
    """One evaluation set cut in two, each part in the set's order."""

    dataset: str
    probe: list[Problem]
    held_back: list[Problem]

    def record(self) -> dict[str, Any]:
        """What the run keeps of the split: the probe's question ids and both sizes."""
        return {"probe": [p.id for p in self.probe], "probe_n": len(self.probe), "held_back_n": len(self.held_back)}


def _rank(seed: int, dataset: str, qid: str) -> str:
    return hashlib.sha256(f"{seed}\0{dataset}\0{qid}".encode()).hexdigest()


def probe_split(dataset: str, problems: Sequence[Problem], fraction: float, seed: int) -> ProbeSplit:
    """Put round(fraction * n) of the set's questions (at least one, and at least one fewer than all)
    in the probe: those whose hash of (seed, dataset, id) ranks lowest. ValueError for a set of fewer
    than two questions or a fraction outside (0, 1)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the probe fraction must lie strictly between 0 and 1, got {fraction}")
    if len(problems) < 2:
        raise ValueError(f"evaluation set {dataset!r} has {len(problems)} question(s): a probe split needs at least 2")
    size = min(len(problems) - 1, max(1, round(fraction * len(problems))))
    order = sorted(range(len(problems)), key=lambda i: (_rank(seed, dataset, problems[i].id), i))
    in_probe = set(order[:size])
    return ProbeSplit(dataset, [p for i, p in enumerate(problems) if i in in_probe],
                      [p for i, p in enumerate(problems) if i not in in_probe])

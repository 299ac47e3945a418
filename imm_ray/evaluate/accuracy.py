"""Accuracy of greedy completions (one per problem) against gold answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from imm_ray.data.problems import Problem
from imm_ray.verify.verifiers import Verdict, Verifier, verify_batch

__all__ = ["DatasetScore", "score_completions", "score_verdicts"]


@dataclass
class DatasetScore:
    """Accuracy on one dataset.

    unparseable counts completions with no extractable answer; timeouts counts those whose
    verification hit the verifier's hard timeout (scored wrong, and not counted as unparseable).
    """

    dataset: str
    n: int
    correct: int
    accuracy: float
    unparseable: int
    timeouts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_verdicts(dataset: str, verdicts: Sequence[Verdict]) -> DatasetScore:
    """DatasetScore from already computed verdicts (accuracy is 0.0 for an empty set)."""
    n = len(verdicts)
    correct = sum(v.correct for v in verdicts)
    timeouts = sum(v.timed_out for v in verdicts)
    unparseable = sum(v.extracted is None and not v.timed_out for v in verdicts)
    return DatasetScore(
        dataset=dataset,
        n=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        unparseable=unparseable,
        timeouts=timeouts,
    )


def score_completions(
    problems: Sequence[Problem],
    completions: Sequence[str],
    verifier: str | Verifier = "numeric",
    dataset: str | None = None,
) -> DatasetScore:
    """Score one completion per problem; ValueError when the two lists differ in length.

    dataset defaults to the problems' dataset name ("+"-joined if they come from several).
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if dataset is None:
        dataset = "+".join(sorted({p.dataset for p in problems}))
    verdicts = verify_batch(
        [(completion, problem.answer) for problem, completion in zip(problems, completions)],
        verifier=verifier,
    )
    return score_verdicts(dataset, verdicts)

"""Self-consistency without gold answers: the answer most of a question's k samples reach becomes its
pseudo-label, and the samples that reach it are accepted.

Answers are read with :func:`extract_answer` and compared by :func:`normalize_answer` ("1,000" and
"1000.0" are one vote). Tie rule: among the answers with the most votes, the one reached first (in
sample order) wins, so the label never depends on dict or set ordering. A question whose top answer
has fewer than ``min_agreement`` of its k samples (unparseable samples count in k) gets no label and
accepts nothing. The gold answer is never read here; :func:`label_precision` uses it afterwards,
only to report how often the pseudo-labels were right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imm_ray.verify.answers import answers_match, extract_answer, normalize_answer
from imm_ray.verify.verifiers import Verdict, register_verifier, rows_by_question

__all__ = ["MajorityVerifier", "MajorityVote", "label_precision", "majority_vote"]


@dataclass(frozen=True)
class MajorityVote:
    """The pseudo-label of one question (None: no answer reached the minimum agreement)."""

    label: str | None
    votes: int
    samples: int


def majority_vote(answers: Sequence[str | None], min_agreement: float = 0.5) -> MajorityVote:
    """The most common non-None answer of ``answers`` (ties: the first reached), if its share of all
    ``len(answers)`` samples is at least ``min_agreement``."""
    counts: dict[str, int] = {}  # insertion order = the order answers are first reached
    for answer in answers:
        if answer is not None:
            key = normalize_answer(answer)
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return MajorityVote(None, 0, len(answers))
    label = max(counts, key=counts.__getitem__)  # max keeps the first of equal counts
    votes = counts[label]
    return MajorityVote(label if votes >= min_agreement * len(answers) else None, votes, len(answers))


class MajorityVerifier:
    """Accept the samples of a question that agree with its majority answer (no gold needed)."""

    name = "majority"
    needs_gold = False

    def __init__(self, min_agreement: float = 0.5) -> None:
        if not 0.0 <= min_agreement <= 1.0:
            raise ValueError(f"min_agreement must lie in [0, 1], got {min_agreement}")
        self.min_agreement = min_agreement

    def verify_rows(self, rows: Sequence[dict[str, Any]]) -> list[Verdict]:
        """Verdicts for sample rows (``problem_id``, ``completion``), voting within each question.

        Every sample of a question must be in ``rows``: the vote is over the samples given.
        """
        extracted = [extract_answer(r["completion"]) for r in rows]
        verdicts: list[Verdict | None] = [None] * len(rows)
        for indices in rows_by_question(rows).values():
            label = majority_vote([extracted[i] for i in indices], self.min_agreement).label
            for i in indices:
                agrees = label is not None and extracted[i] is not None and normalize_answer(extracted[i]) == label
                verdicts[i] = Verdict(agrees, extracted[i])
        return verdicts  # type: ignore[return-value]


def label_precision(rows: Sequence[dict[str, Any]], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """How often the accepted answers were right, where the rows carry a gold answer (``gold``).

    ``labelled``: questions with an accepted sample; ``label_precision``: of those with gold, the
    share whose first accepted answer matches gold (for ``majority``: its pseudo-label);
    ``accepted_precision``: of the accepted samples with gold, the share that match it. A precision
    is None when no accepted sample has gold.
    """
    first: dict[Any, tuple[str | None, str | None]] = {}
    right = with_gold = 0
    for row, verdict in zip(rows, verdicts):
        if not verdict.correct:
            continue
        first.setdefault(row["problem_id"], (verdict.extracted, row.get("gold")))
        if row.get("gold") is not None:
            with_gold += 1
            right += answers_match(verdict.extracted, row["gold"])
    labels = [answers_match(answer, gold) for answer, gold in first.values() if gold is not None]
    return {
        "labelled": len(first),
        "label_precision": sum(labels) / len(labels) if labels else None,
        "accepted_precision": right / with_gold if with_gold else None,
    }


register_verifier(MajorityVerifier.name, MajorityVerifier)

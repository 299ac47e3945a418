"""The per-question ledger of an evaluation: one samples-file row per completion (written by
``imm eval --save-samples`` and by the loop's evaluate stage as ``eval_samples.jsonl``), read
back as which questions a model got right, and what changed between two models.

A row holds dataset, problem_id, gold, kind ("greedy", or "sample" for one of the k samples at
the evaluation temperature), sample (its index), completion, finish_reason, num_tokens,
extracted, correct and timed_out. Rows without a kind are greedy (the loop's first format).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imm_ray.data.problems import Problem
from imm_ray.evaluate.metrics import mean_pass_at_k
from imm_ray.evaluate.scoring import DatasetEvaluation
from imm_ray.generate.engine import Completion
from imm_ray.run.records import EvalSampleRow

__all__ = ["Changes", "Ledger", "question_changes", "read_ledger", "sample_rows"]

_NEEDED = ("dataset", "problem_id", "correct")


def sample_rows(name: str, problems: Sequence[Problem], evaluation: DatasetEvaluation,
                greedy: Sequence[Completion], sampled: Sequence[Sequence[Completion]] | None) -> list[dict]:
    """The samples-file rows of one dataset: each greedy completion, then each of the k samples."""
    def row(p: Problem, kind: str, j: int, c: Completion, v: Any) -> dict:
        return EvalSampleRow(dataset=name, problem_id=p.id, gold=p.answer, kind=kind, sample=j, completion=c.text,
                             finish_reason=c.finish_reason, num_tokens=c.num_tokens, extracted=v.extracted,
                             correct=v.correct, timed_out=v.timed_out).to_json()

    rows = [row(p, "greedy", 0, c, v) for p, c, v in zip(problems, greedy, evaluation.greedy_verdicts)]
    if sampled is not None and evaluation.sample_verdicts is not None:
        rows += [row(p, "sample", j, c, v)
                 for p, comps, verdicts in zip(problems, sampled, evaluation.sample_verdicts)
                 for j, (c, v) in enumerate(zip(comps, verdicts))]
    return rows


@dataclass
class Ledger:
    """Per dataset: {question id: greedy answer correct}, and with k samples per question
    {question id: (samples correct, samples)}."""

    greedy: dict[str, dict[str, bool]]
    samples: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    def k(self, dataset: str) -> int:
        """Samples per question of a dataset (the fewest any question has; 0 without samples)."""
        counts = self.samples.get(dataset)
        return min(n for _, n in counts.values()) if counts else 0

    def pass_at(self, dataset: str, k: int) -> float | None:
        """Unbiased pass@k over the dataset's questions (see pass_at_k); None without k samples."""
        counts = self.samples.get(dataset)
        if not counts or not 1 <= k <= self.k(dataset):
            return None
        return mean_pass_at_k([[True] * c + [False] * (n - c) for c, n in counts.values()], k)


def read_ledger(rows: Iterable[Mapping[str, Any]]) -> Ledger | None:
    """The ledger of a samples file's rows; None when a row lacks dataset, problem_id or correct
    (a file from before per-question records) or there is no greedy row."""
    greedy: dict[str, dict[str, bool]] = {}
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for row in rows:
        if any(row.get(key) is None for key in _NEEDED):
            return None
        dataset, qid, correct = str(row["dataset"]), str(row["problem_id"]), bool(row["correct"])
        if row.get("kind", "greedy") == "greedy":
            greedy.setdefault(dataset, {})[qid] = correct
        else:
            c, n = samples.setdefault(dataset, {}).get(qid, (0, 0))
            samples[dataset][qid] = (c + correct, n + 1)
    return Ledger(greedy, samples) if greedy else None


@dataclass(frozen=True)
class Changes:
    """Questions (of those both models answered) that the later model gets right and the earlier
    did not (gained), and the reverse (lost); n counts the shared questions."""

    gained: list[str]
    lost: list[str]
    n: int

    @property
    def net(self) -> int:
        return len(self.gained) - len(self.lost)


def question_changes(before: Mapping[str, bool], after: Mapping[str, bool]) -> Changes:
    """Gained and lost questions from ``before`` to ``after`` (ids sorted)."""
    common = [q for q in after if q in before]
    return Changes(gained=sorted(q for q in common if after[q] and not before[q]),
                   lost=sorted(q for q in common if before[q] and not after[q]), n=len(common))

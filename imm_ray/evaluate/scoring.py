"""One dataset's evaluation record from its completions: greedy accuracy with a bootstrap
interval, pass@k / maj@k over k samples, unparseable answers, verifier timeouts, diversity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imm_ray.data.problems import Problem
from imm_ray.evaluate.accuracy import score_verdicts
from imm_ray.evaluate.diversity import diversity_metrics
from imm_ray.evaluate.metrics import bootstrap_ci, mean_maj_at_k, mean_pass_at_k
from imm_ray.verify.answers import parse_number
from imm_ray.verify.verifiers import Verdict, Verifier, verify_batch

__all__ = ["DatasetEvaluation", "evaluate_completions", "pick_verifier"]


@dataclass
class DatasetEvaluation:
    """The metrics record of one dataset plus the verdicts behind it (for a samples file)."""

    metrics: dict[str, Any]
    greedy_verdicts: list[Verdict]
    sample_verdicts: list[list[Verdict]] | None


def pick_verifier(problems: Sequence[Problem], requested: str = "auto") -> str:
    """The verifier name to use: `requested`, or for "auto" numeric when every gold answer
    is a number and math (math-verify) otherwise (e.g. MATH-500's LaTeX answers)."""
    if requested != "auto":
        return requested
    return "numeric" if all(parse_number(p.answer) is not None for p in problems) else "math"


def _regroup(flat: Sequence[Verdict], k: int) -> list[list[Verdict]]:
    return [list(flat[i : i + k]) for i in range(0, len(flat), k)]


def evaluate_completions(
    dataset: str,
    problems: Sequence[Problem],
    greedy: Sequence[str],
    samples: Sequence[Sequence[str]] | None = None,
    verifier: str | Verifier = "numeric",
    seed: int = 0,
    resamples: int = 1000,
) -> DatasetEvaluation:
    """Score one greedy completion per problem and, optionally, k samples per problem.

    Metrics: accuracy (greedy), n, correct, unparseable, timeouts, accuracy_ci95 (percentile
    bootstrap over questions, seeded), k, pass@1, pass@k, maj@k and, with k > 1, diversity
    (see diversity_metrics). Without samples k = 1 and pass@1 = pass@k = maj@k = accuracy.
    With samples, sample_unparseable / sample_timeouts count over all k*n samples. All texts
    go through one verify_batch call (a process-pool verifier starts its workers once).
    """
    if len(greedy) != len(problems):
        raise ValueError(f"{len(problems)} problems but {len(greedy)} greedy completions")
    k = len(samples[0]) if samples else 0
    if samples is not None and (len(samples) != len(problems) or any(len(s) != k for s in samples)):
        raise ValueError(f"samples must hold the same number (k) of texts for each of the {len(problems)} problems")
    items = [(text, p.answer) for text, p in zip(greedy, problems)]
    if samples:
        items += [(text, p.answer) for texts, p in zip(samples, problems) for text in texts]
    verdicts = verify_batch(items, verifier=verifier)
    greedy_verdicts = verdicts[: len(problems)]
    score = score_verdicts(dataset, greedy_verdicts)
    ci = bootstrap_ci([float(v.correct) for v in greedy_verdicts], resamples=resamples, seed=seed)
    metrics: dict[str, Any] = {
        "accuracy": score.accuracy,
        "n": score.n,
        "correct": score.correct,
        "unparseable": score.unparseable,
        "timeouts": score.timeouts,
        "accuracy_ci95": list(ci) if ci is not None else None,
    }
    if not samples:
        metrics.update({"k": 1, "pass@1": score.accuracy, "pass@k": score.accuracy, "maj@k": score.accuracy})
        return DatasetEvaluation(metrics, greedy_verdicts, None)

    grouped = _regroup(verdicts[len(problems) :], k)
    correct = [[v.correct for v in group] for group in grouped]
    answers = [[v.extracted for v in group] for group in grouped]
    metrics.update({
        "k": k,
        "pass@1": mean_pass_at_k(correct, 1),
        "pass@k": mean_pass_at_k(correct, k),
        "maj@k": mean_maj_at_k(answers, correct, k),
        "sample_unparseable": sum(v.extracted is None and not v.timed_out for g in grouped for v in g),
        "sample_timeouts": sum(v.timed_out for g in grouped for v in g),
    })
    if k > 1:
        metrics["diversity"] = diversity_metrics(
            {p.id: list(texts) for p, texts in zip(problems, samples)},
            {p.id: a for p, a in zip(problems, answers)},
        )
    return DatasetEvaluation(metrics, greedy_verdicts, grouped)

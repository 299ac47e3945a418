"""Score a model on eval sets: the one evaluation path of the round loop and of ``imm eval``.

One greedy pass over every prompt (accuracy) and, when asked, one sampled pass (pass@k, maj@k,
diversity), split back into the sets and scored per set with the verifier each set's gold answers
call for. Generation goes through a callable, so that the caller decides where it runs (a Ray
generator pool, an in-process engine, a fake in a unit test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imm_ray.data.problems import Problem
from imm_ray.evaluate.ledger import sample_rows
from imm_ray.evaluate.scoring import DatasetEvaluation, evaluate_completions, pick_verifier
from imm_ray.generate.engine import Completion, SamplingSpec
from imm_ray.verify.verifiers import Verifier

Generate = Callable[[list[list[int]], SamplingSpec, str], list[list[Completion]]]
"""(prompt token ids, sampling, progress label) -> the completions of each prompt."""


@dataclass(frozen=True)
class SetScore:
    """One eval set's completions and their scores."""

    name: str
    problems: Sequence[Problem]
    verifier: str  # the verifier name that scored it
    evaluation: DatasetEvaluation
    greedy: list[Completion]
    sampled: list[list[Completion]] | None

    def rows(self) -> list[dict]:
        """The set's ``EvalSampleRow`` rows (the per-question ledger): each greedy completion, then the samples."""
        return sample_rows(self.name, self.problems, self.evaluation, self.greedy, self.sampled)


def _keep_name(name: str) -> str | Verifier:
    return name


def score_sets(
    generate: Generate,
    sets: Sequence[tuple[str, Sequence[Problem]]],
    prompts: Sequence[list[int]],
    greedy: SamplingSpec,
    sampled: SamplingSpec | None = None,
    verifier: str = "auto",
    desc: str = "evaluate",
    verifier_of: Callable[[str], str | Verifier] = _keep_name,
    seed: int = 0,
    resamples: int = 1000,
) -> list[SetScore]:
    """Each set of ``sets`` scored on ``generate``'s answers to ``prompts`` (the sets' prompts in order).

    verifier: ``auto`` or a verifier name (:func:`pick_verifier` per set); verifier_of: what to
    score with for a name (the name itself, or an instance the caller keeps open across sets).
    seed and resamples: the accuracy CI's bootstrap.
    """
    if sum(len(problems) for _, problems in sets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for {sum(len(p) for _, p in sets)} problems")
    outs = [o[0] for o in generate(list(prompts), greedy, desc)]
    samples = generate(list(prompts), sampled, f"{desc} k={sampled.n}") if sampled is not None else None
    scores, start = [], 0
    for name, problems in sets:
        span = slice(start, start + len(problems))
        start += len(problems)
        chunk = samples[span] if samples is not None else None
        picked = pick_verifier(problems, verifier)
        evaluation = evaluate_completions(
            name, problems, [c.text for c in outs[span]],
            [[c.text for c in comps] for comps in chunk] if chunk is not None else None,
            verifier=verifier_of(picked), seed=seed, resamples=resamples)
        scores.append(SetScore(name, problems, picked, evaluation, outs[span], chunk))
    return scores

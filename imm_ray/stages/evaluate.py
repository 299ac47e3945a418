"""The evaluate stage: a model's greedy accuracy on every eval set and, with k samples per
question, pass@k; written to the round's ``eval.json`` and its per-question ledger."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imm_ray.data import Problem
from imm_ray.evaluate.sets import score_sets
from imm_ray.generate.engine import Completion, SamplingSpec
from imm_ray.run import layout
from imm_ray.run.infos import EvaluateInfo
from imm_ray.stages.ports import Generator
from imm_ray.storage import Location, write_json, write_jsonl

# What a round's eval.json keeps per data set (score_sets computes more).
EVAL_KEYS = ("accuracy", "accuracy_ci95", "n", "correct", "unparseable", "timeouts")
SAMPLED_KEYS = ("k", "pass@1", "pass@k", "maj@k", "diversity")  # with samples > 1


@dataclass(frozen=True)
class EvalSpec:
    """How the loop evaluates: greedy answers and, with ``samples`` > 1, that many more per question."""

    max_tokens: int
    stop: tuple[str, ...]
    verifier: str = "auto"
    samples: int = 1
    temperature: float = 0.0  # of the sampled pass
    seed: int = 0  # of the sampled pass


@dataclass(frozen=True)
class Scores:
    """A model's scores on eval sets: the metrics per set, the ledger rows and what generation cost."""

    results: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]
    tokens: int
    seconds: float
    retries: int  # generator actors replaced


def score(generator: Generator, sets: Sequence[tuple[str, Sequence[Problem]]], prompts: Sequence[list[int]],
          spec: EvalSpec, desc: str) -> Scores:
    """The model ``generator`` serves, scored on ``sets`` (``prompts``: their prompts' ids, in order)."""
    stats = []

    def generate(ids: list[list[int]], sampling: SamplingSpec, label: str) -> list[list[Completion]]:
        outs = generator.generate(ids, sampling, desc=label)
        stats.append(generator.last_stats)
        return outs

    greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=spec.max_tokens, stop=spec.stop, seed=None)
    sampled = (SamplingSpec(n=spec.samples, temperature=spec.temperature, max_tokens=spec.max_tokens,
                            stop=spec.stop, seed=spec.seed) if spec.samples > 1 else None)
    scored = score_sets(generate, sets, prompts, greedy, sampled, spec.verifier, desc=desc)
    keys = EVAL_KEYS + (SAMPLED_KEYS if sampled is not None else ())
    done = [st for st in stats if st is not None]
    return Scores(
        results={s.name: {k: s.evaluation.metrics[k] for k in keys if k in s.evaluation.metrics} for s in scored},
        rows=[row for s in scored for row in s.rows()],
        tokens=sum(st.tokens for st in done), seconds=sum(st.seconds for st in done),
        retries=sum(st.retries for st in done))


def evaluate(generator: Generator, sets: Sequence[tuple[str, Sequence[Problem]]], prompts: Sequence[list[int]],
             spec: EvalSpec, model: str, folder: Location, questions: str = "all",
             desc: str = "evaluate") -> EvaluateInfo:
    """Score ``model`` (served by ``generator``) on ``sets`` and write ``folder``'s evaluation and
    ledger. ``questions``: ``all``, or ``held_back`` when a merge sweep keeps a probe part out."""
    scores = score(generator, sets, prompts, spec, desc)
    write_jsonl(folder / layout.EVAL_SAMPLES, scores.rows)
    write_json(folder / layout.EVAL, {"model": model, "questions": questions, "datasets": scores.results})
    return EvaluateInfo(
        model=model, questions=questions, datasets=scores.results, tokens=scores.tokens,
        tokens_per_s=round(scores.tokens / scores.seconds, 1) if scores.seconds > 0 else 0.0,
        actor_retries=scores.retries)

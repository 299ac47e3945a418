"""evaluate_model: load datasets, generate with an engine, score, and return the report."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from imm_ray.data import DataError, DatasetSpec, LoadResult, load_problems
from imm_ray.data.prompts import DEFAULT_INSTRUCTION_SUFFIX, default_stop_strings, encode_prompt, render_prompt
from imm_ray.evaluate.generation import Generator, open_generator
from imm_ray.evaluate.sets import score_sets
from imm_ray.evaluate.settings import EvalSettings
from imm_ray.evaluate.specs import parse_dataset_arg
from imm_ray.generate.engine import Completion, SamplingSpec
from imm_ray.generate.settings import EngineSettings
from imm_ray.storage import write_jsonl
from imm_ray.verify.verifiers import Verifier, get_verifier

__all__ = ["EvalRun", "evaluate_model"]

logger = logging.getLogger(__name__)


class EvalRun(EvalSettings):
    """One ``imm eval`` run: the evaluation settings and how to generate (defaults: the paper's
    zero-shot greedy evaluation)."""

    engine: str = "vllm"
    """The text-generation engine: vllm or hf."""
    template: str = "chat"
    """The prompt template."""
    system_prompt: str | None = None
    """A system message before each question."""
    instruction_suffix: str | None = DEFAULT_INSTRUCTION_SUFFIX
    """Text after each question (None: the template's own)."""
    top_p: float = 1.0
    """Nucleus sampling of the sampled answers."""
    verify_timeout_s: float = 5.0
    """Longest math verification of one answer, in seconds."""
    seed: int = 0
    """Seed of the sampled answers and of the bootstrap."""
    bootstrap_resamples: int = 1000
    """Resamples of the accuracy's bootstrap confidence interval."""
    engine_options: EngineSettings = Field(default_factory=lambda: EngineSettings(dtype="auto"))
    """The engine's own settings."""
    ray_address: str | None = None
    """Generate on this Ray cluster (None: in this process)."""
    actors: int = 1
    """Generator actors on Ray."""
    num_gpus: float = 0.0
    """GPUs per generator actor on Ray."""
    progress: bool = True
    """Show progress bars."""

    def summary(self) -> dict[str, Any]:
        """The settings that shape the completions (recorded with every dataset's metrics)."""
        keys = ("engine", "template", "system_prompt", "instruction_suffix", "samples", "temperature",
                "top_p", "max_tokens", "seed")
        return {k: getattr(self, k) for k in keys}


class _Verifiers:
    """Verifier instances shared across datasets (a math pool starts once), closed at the end."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.instances: dict[str, Verifier] = {}

    def get(self, name: str) -> Verifier:
        if name not in self.instances:
            kwargs = {"timeout_s": self.timeout_s} if name == "math" else {}
            self.instances[name] = get_verifier(name, **kwargs)
        return self.instances[name]

    def close(self) -> None:
        for instance in self.instances.values():
            close = getattr(instance, "close", None)
            if close is not None:
                close()


def _load(specs: Sequence[DatasetSpec], data_dir: str | Path | None) -> list[tuple[DatasetSpec, LoadResult]]:
    loaded = []
    for spec in specs:
        result = load_problems(spec, data_dir=data_dir)
        if not result.problems:
            raise DataError(f"dataset {spec.name!r} ({result.source}) has no usable problems")
        logger.info("%s: %d problems from %s (%d malformed rows skipped)",
                    spec.name, len(result.problems), result.source, result.malformed)
        loaded.append((spec, result))
    return loaded


def _evaluate_set(generator: Generator, tokenizer: Any, model: str, name: str, loaded: LoadResult,
                  settings: EvalRun, verifiers: _Verifiers) -> tuple[dict[str, Any], list[dict]]:
    """One data set's metrics (with the settings and timings) and its ledger rows, scored by :func:`score_sets`."""
    problems = loaded.problems
    t0 = time.perf_counter()
    generate_s = 0.0

    def generate(prompts: list[list[int]], spec: SamplingSpec, desc: str) -> list[list[Completion]]:
        nonlocal generate_s
        start = time.perf_counter()
        outs = generator.generate(prompts, spec, desc=desc)
        generate_s += time.perf_counter() - start
        return outs

    stop = tuple(default_stop_strings(settings.template))
    prompts = [encode_prompt(tokenizer, render_prompt(p.question, settings.template, tokenizer,
                                                      settings.system_prompt, settings.instruction_suffix))
               for p in problems]
    greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=settings.max_tokens, stop=stop, seed=None)
    sampled = (SamplingSpec(n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_tokens, stop=stop, seed=settings.seed)
               if settings.temperature > 0 else None)
    (score,) = score_sets(generate, [(name, problems)], prompts, greedy, sampled, settings.verifier, desc=name,
                          verifier_of=verifiers.get, seed=settings.seed, resamples=settings.bootstrap_resamples)
    metrics = score.evaluation.metrics
    metrics.update({
        "truncated": sum(c.finish_reason == "length" for c in score.greedy),
        "verifier": score.verifier, "source": loaded.source, "malformed": loaded.malformed,
        "generate_seconds": round(generate_s, 2), "seconds": round(time.perf_counter() - t0, 2),
        "model": model, "settings": settings.summary(),
    })
    logger.info("%s: accuracy %.1f%% [%.1f, %.1f] (n=%d, unparseable %d, timeouts %d) in %.1f s",
                name, 100 * metrics["accuracy"], *(100 * x for x in metrics["accuracy_ci95"]),
                metrics["n"], metrics["unparseable"], metrics["timeouts"], metrics["seconds"])
    return metrics, score.rows()


def evaluate_model(
    model: str | Path,
    datasets: Sequence[str | DatasetSpec],
    settings: EvalRun | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    samples_path: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate a model on datasets; returns {dataset name: metrics} (see evaluate_completions).

    model: any reference resolve_model accepts. datasets: DatasetSpecs or ``--dataset`` strings
    (see parse_dataset_arg). Every dataset gets one greedy pass (accuracy); with temperature > 0
    also a pass of `settings.samples` samples per question (pass@k, maj@k, diversity).
    samples_path: write every completion with its verdict as JSONL there.
    Raises DataError / ModelError / ValueError before any model is loaded when inputs are bad.
    """
    from imm_ray.models import resolve_model

    settings = settings or EvalRun()
    specs = [parse_dataset_arg(d, limit) if isinstance(d, str) else d for d in datasets]
    model_path = resolve_model(str(model), cache_dir)  # first: a missing model fails before any data is read
    loaded = _load(specs, data_dir)
    from transformers import AutoTokenizer  # after the checks: a bad input fails without loading transformers

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    verifiers = _Verifiers(settings.verify_timeout_s)
    generator: Generator | None = None
    results: dict[str, dict[str, Any]] = {}
    rows: list[dict] = []
    try:
        generator = open_generator(
            settings.engine, model_path, settings.engine_options, settings.ray_address, settings.actors,
            num_gpus=settings.num_gpus, progress=settings.progress,
        )
        for spec, result in loaded:
            metrics, set_rows = _evaluate_set(generator, tokenizer, str(model), spec.name, result, settings,
                                              verifiers)
            results[spec.name] = metrics
            rows += set_rows
    finally:
        verifiers.close()
        if generator is not None:
            generator.close()
    if samples_path is not None:
        write_jsonl(samples_path, rows)
    return results


"""The layer analysis of a run: parameter change per model, layer importance, rank correlation.

Work is expressed as independent calls handed to a ``Runner`` (sequential here; Ray tasks in
imm_ray.analysis.remote), so this module stays free of Ray.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imm_ray.analysis.change import parameter_change
from imm_ray.analysis.importance import (
    LayerScore,
    ProbeSpec,
    importance_table,
    layer_importance,
)
from imm_ray.analysis.probes import ModelEntry, references_from_completions
from imm_ray.analysis.stats import spearman
from imm_ray.registry import Registry
from imm_ray.storage import Location, materialize

__all__ = [
    "IMPORTANCE_MEASURES",
    "AnalysisPlan",
    "Call",
    "Runner",
    "local_runner",
    "run_analysis",
    "split_layers",
]

logger = logging.getLogger(__name__)

# Importance measure -> the column of the layer table it fills.
IMPORTANCE_MEASURES: Registry[str] = Registry("importance measure")
IMPORTANCE_MEASURES.add("accuracy", "accuracy_drop")
IMPORTANCE_MEASURES.add("loss", "loss_rise")

Call = tuple[Callable[..., Any], tuple[Any, ...]]
Runner = Callable[[Sequence[Call]], list[Any]]


def local_runner(calls: Sequence[Call]) -> list[Any]:
    """Run the calls one after another in this process."""
    return [fn(*args) for fn, args in calls]


@dataclass
class AnalysisPlan:
    """What to analyse: the original, the models to compare with it, and the importance probe.

    probe None skips layer importance; importance_model defaults to the original.
    """

    original: str | Path  # a local folder or a URI (each task materializes it)
    models: list[ModelEntry]
    probe: ProbeSpec | None = None
    measures: tuple[str, ...] = ("accuracy", "loss")
    importance_model: str | Path | None = None
    reference_size: int = 32
    references_source: str = ""
    num_tasks: int = 1
    run_dir: str | Path | Location | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def split_layers(num_layers: int, parts: int) -> list[list[int]]:
    """Layers 0..n-1 in at most ``parts`` contiguous, near-equal chunks."""
    parts = max(1, min(parts, num_layers))
    size, rest = divmod(num_layers, parts)
    chunks, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < rest else 0)
        chunks.append(list(range(start, stop)))
        start = stop
    return [c for c in chunks if c]


def change_of(original: str | Path, model: str | Path) -> dict[str, Any]:
    """Parameter change summary of one model (a runner call)."""
    return parameter_change(original, model).to_dict()


def _num_layers(model_dir: str | Path) -> int:
    from imm_ray.analysis.change import _num_layers as read

    n = read(materialize(model_dir))
    if n is None:
        raise ValueError(f"{model_dir}/config.json has no num_hidden_layers")
    return n


def _own_references(plan: AnalysisPlan, probe: ProbeSpec, base: LayerScore) -> ProbeSpec:
    """The probe with the baseline's correct greedy completions as its reference solutions."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(materialize(plan.importance_model or plan.original)))
    prompts = [probe.prompt.render(p.question, tokenizer) for p in probe.problems]
    refs = references_from_completions(probe.problems, base.completions, prompts, probe.verifier,
                                       plan.reference_size)
    logger.info("layer importance: %d reference solutions from the baseline's correct completions",
                len(refs))
    return replace(probe, references=tuple(refs))


def _importance(plan: AnalysisPlan, runner: Runner, change_calls: list[Call]
                ) -> tuple[dict[str, Any] | None, list[Any]]:
    """Run the unmodified model's probe (together with change_calls), then every skipped layer."""
    probe = plan.probe
    if probe is None:
        return None, runner(change_calls)
    model = plan.importance_model or plan.original
    gen, loss = "accuracy" in plan.measures, "loss" in plan.measures
    source = plan.references_source
    # Without given references the baseline generates first: its correct completions become them.
    own_refs = loss and not probe.references
    first = runner([(layer_importance, (model, [None], probe, gen, loss and not own_refs))]
                   + change_calls)
    base, changes = first[0][0], first[1:]
    if own_refs:
        probe = _own_references(plan, probe, base)
        source = "baseline greedy completions (correct ones)"
        if not probe.references:
            logger.warning("layer importance: no reference solutions (give --references, or keep "
                           "'accuracy' in the measures so correct probe completions can serve); "
                           "the loss proxy is skipped")
    chunks: list[list[int | None]] = list(split_layers(_num_layers(model), plan.num_tasks))
    if own_refs and probe.references:
        chunks[0] = [None] + chunks[0]  # the baseline loss on the new references
    results = runner([(layer_importance, (model, chunk, probe, gen, loss)) for chunk in chunks])
    scores = [score for chunk in results for score in chunk]
    for score in scores:
        if score.layer is None:
            base.loss = score.loss
    info = {
        "model": str(model),
        "probe": {
            "dataset": probe.problems[0].dataset if probe.problems else None,
            "problems": len(probe.problems), "references": len(probe.references),
            "references_source": source, "max_new_tokens": probe.max_new_tokens,
            "prompt_template": probe.prompt.template, "verifier": probe.verifier,
            "measures": list(plan.measures),
        },
        "baseline": {"accuracy": base.accuracy, "correct": base.correct, "loss": base.loss},
        "layers": importance_table(base, [s for s in scores if s.layer is not None]),
    }
    return info, changes


def _correlations(change: dict[str, Any], importance: dict[str, Any] | None) -> dict[str, Any]:
    if importance is None:
        return {}
    per_layer = change["per_layer"]
    out = {}
    for column in IMPORTANCE_MEASURES.values():
        values = [row[column] for row in importance["layers"]]
        if all(v is None for v in values) or len(values) != len(per_layer):
            continue
        out[column] = spearman(values, per_layer)
    return out


def run_analysis(plan: AnalysisPlan, runner: Runner = local_runner) -> dict[str, Any]:
    """Parameter change of every model, layer importance, and Spearman rho per model."""
    t0 = time.perf_counter()
    change_calls: list[Call] = [(change_of, (plan.original, m.path)) for m in plan.models]
    importance, changes = _importance(plan, runner, change_calls)
    models = []
    for entry, change in zip(plan.models, changes):
        models.append({
            "arm": entry.arm, "round": entry.round, "kind": entry.kind, "model": str(entry.path),
            "change": change, "spearman": _correlations(change, importance),
        })
        logger.info("%s: total relative change %s, spearman %s", entry.label,
                    _fmt(change["total"]), models[-1]["spearman"])
    return {
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(plan.run_dir) if plan.run_dir else None,
        "original": str(plan.original),
        "importance": importance,
        "models": models,
        "seconds": round(time.perf_counter() - t0, 3),
        **plan.extra,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"

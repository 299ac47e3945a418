"""Reading the files of a run directory: run.yaml's text, metrics.jsonl, analysis.json and each
evaluation's per-question ledger (eval_samples.jsonl); and where a study keeps its runs' layer
analyses combined across seeds. Absent files read as None (or no rows): a run that has not got
that far, or one from before the file existed."""

from __future__ import annotations

import json
from typing import Any

from imm_ray.run import layout
from imm_ray.storage import Location, parse_jsonl, read_text


def _read_optional(loc: Location) -> str | None:
    try:
        return read_text(loc)
    except FileNotFoundError:
        return None


def read_config_text(root: Location) -> str | None:
    """``run.yaml`` as saved, or None before the run's first start."""
    return _read_optional(root / layout.CONFIG)


def read_metrics(root: Location) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (none before the first finished round)."""
    loc = root / layout.METRICS
    text = _read_optional(loc)
    return parse_jsonl(text, str(loc)) if text else []


def read_analysis(root: Location) -> dict[str, Any] | None:
    """``analysis.json`` (written by ``imm analyze``), or None."""
    text = _read_optional(root / layout.ANALYSIS)
    return json.loads(text) if text else None


def seed_analysis_location(runs: list[Location]) -> Location | None:
    """Where ``imm analyze --combine`` writes by default: ``analysis_seeds.json`` in the folder that
    holds all ``runs`` (a study's), or None when they lie in different folders."""
    parents = {run.parent.uri for run in runs}
    return runs[0].parent / layout.ANALYSIS_SEEDS if len(parents) == 1 else None


def eval_samples_location(root: Location, arm: str, round_idx: int) -> Location:
    """Where the evaluation of round ``round_idx`` of ``arm`` keeps its per-question records."""
    return root / layout.round_folder(arm, round_idx) / layout.EVAL_SAMPLES


def read_eval_samples(root: Location, arm: str, round_idx: int) -> list[dict[str, Any]] | None:
    """The rows of an evaluation's ``eval_samples.jsonl``, or None where it is missing."""
    loc = eval_samples_location(root, arm, round_idx)
    text = _read_optional(loc)
    return None if text is None else parse_jsonl(text, str(loc))

"""Probe sets for layer importance: problems, prompt style and reference solutions.

From a run directory the probe follows the run: the in-domain test set (data.eval[0]), its
prompt template, verifier, stop strings and evaluation length; reference solutions are the
accepted (verified-correct) samples of round 1, which the original model wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imm_ray.analysis.importance import ProbeSpec, PromptStyle
from imm_ray.config import load_run_config
from imm_ray.data import Problem, load_problems
from imm_ray.data.prompts import default_stop_strings
from imm_ray.run import layout
from imm_ray.storage import Location, exists, is_published, read_jsonl, resolve
from imm_ray.storage.fs import list_files, list_names
from imm_ray.train.sft_data import SFTRow

__all__ = ["ModelEntry", "discover_models", "probe_from_run", "read_references",
           "references_from_completions"]

logger = logging.getLogger(__name__)

MODEL_KINDS = (layout.SFT, layout.MERGED)


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint to compare with the original: which arm and round, and sft or merged."""

    arm: str
    round: int
    kind: str
    path: str | Path  # a local folder or a URI

    @property
    def label(self) -> str:
        return f"{self.arm}/r{self.round}/{self.kind}"


def discover_models(run_dir: str | Path | Location) -> list[ModelEntry]:
    """Every RUN_DIR/<arm>/round-NNN/{sft,merged} folder holding a config.json, sorted (on object
    storage: published ones only, so a half upload is never analysed); paths are URIs there."""
    root = resolve(run_dir)
    entries = []
    for arm in list_names(root):
        for round_name in list_names(root / arm):
            round_idx = layout.parse_round_folder(round_name)
            if round_idx is None:
                continue
            for kind in MODEL_KINDS:
                folder = root / arm / round_name / kind
                if exists(folder / "config.json") and (folder.is_local or is_published(folder)):
                    entries.append(ModelEntry(arm, round_idx, kind, folder.uri))
    return sorted(entries, key=lambda e: (e.arm, e.round, MODEL_KINDS.index(e.kind)))


def read_references(path: str | Path | Location, limit: int | None = None,
                    style: PromptStyle | None = None, tokenizer: Any = None) -> list[SFTRow]:
    """Reference solutions from JSONL (a path or a URI): rows with prompt + completion
    (accepted.jsonl), or question + solution (rendered with ``style``, which then needs ``tokenizer``).

    One reference per problem_id when rows carry one; at most ``limit``.
    """
    refs: list[SFTRow] = []
    seen: set[str] = set()
    for row in read_jsonl(path):
        pid = row.get("problem_id")
        if pid is not None and pid in seen:
            continue
        solution = row.get("completion", row.get("solution"))
        prompt = row.get("prompt")
        if prompt is None and "question" in row and style is not None:
            prompt = style.render(row["question"], tokenizer)
        if not isinstance(prompt, str) or not isinstance(solution, str):
            continue
        if pid is not None:
            seen.add(pid)
        refs.append(SFTRow(prompt, solution))
        if limit is not None and len(refs) >= limit:
            break
    return refs


def references_from_completions(problems: Sequence[Problem], completions: Sequence[str],
                                prompts: Sequence[str], verifier: str = "numeric",
                                limit: int | None = None) -> list[SFTRow]:
    """The model's own correct greedy completions as reference solutions."""
    from imm_ray.verify.verifiers import verify_batch

    verdicts = verify_batch([(c, p.answer) for p, c in zip(problems, completions)], verifier=verifier)
    refs = [SFTRow(prompt, text) for prompt, text, v in zip(prompts, completions, verdicts)
            if v.correct]
    return refs[:limit] if limit is not None else refs


def _first_accepted(root: Location) -> Location | None:
    for arm in list_names(root):
        folder = root / layout.round_folder(arm, 1)
        if list_files(folder).get(layout.ACCEPTED):
            return folder / layout.ACCEPTED
    return None


def probe_from_run(run_dir: str | Path | Location, probe_size: int = 32, reference_size: int = 32,
                   max_new_tokens: int | None = None, **overrides: Any) -> tuple[ProbeSpec, str]:
    """The probe a run implies (see module doc) and a note on where its references came from.

    ``overrides`` replace ProbeSpec fields (batch_size, dtype, device, ...).
    """
    run_dir = resolve(run_dir)
    cfg = load_run_config(run_dir)
    data = cfg.data
    problems = load_problems(data.eval[0], data_dir=data.dir).problems[:probe_size]
    stop = cfg.generate.stop
    probe = ProbeSpec(
        problems=tuple(problems),
        prompt=PromptStyle(data.prompt_template, data.system_prompt, data.instruction_suffix),
        max_new_tokens=max_new_tokens or min(cfg.evaluate.max_tokens, 256),
        verifier=cfg.verify.verifier,
        stop_strings=tuple(stop if stop is not None else default_stop_strings(data.prompt_template)),
    )
    source = "baseline greedy completions (correct ones)"
    accepted = _first_accepted(run_dir)
    if accepted is not None and reference_size > 0:
        refs = read_references(accepted, reference_size)
        if refs:
            probe = replace(probe, references=tuple(refs))
            source = str(accepted)
    return replace(probe, **overrides), source

"""The run-directory layout: file names, round folders and stage keys, built and parsed here only.

::

    RUN/run.yaml                      resolved config
    RUN/state.json (+ state.json.bak) which stage of which round is done (+ its summary)
    RUN/metrics.jsonl                 one line per round and arm (derived from state.json)
    RUN/driver.log                    the driver's log, appended across resumes
    RUN/votes.jsonl                   the web page's side-by-side preferences, one line per vote
    RUN/report.md, RUN/plots/         the report and its plots (derived from metrics.jsonl)
    RUN/analysis.json                 layer analysis (imm analyze)
    STUDY/analysis_seeds.json         beside a study's runs: their layer analyses across seeds (imm analyze --combine)
    RUN/tensorboard/                  the TensorBoard sink's events (derived from metrics.jsonl)
    RUN/baseline/eval.json            the original model's evaluation (round 0)
    RUN/original/                     object storage only: the starting model, published once
    RUN/teacher/, RUN/anchor/         object storage only: the distillation teacher, a merge anchor
    RUN/probe_split.json              with merge.sweep: each eval set's probe questions (the rest is reported)
    RUN/<arm>/round-NNN/samples.jsonl, verdicts.jsonl, accepted.jsonl, sft/, merged/, eval.json, eval_samples.jsonl
    RUN/<arm>/round-NNN/sweep/        with merge.sweep: start.json and NN.json, each candidate's probe scores
                                      (its checkpoint NN/ lives only until it is scored)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

CONFIG = "run.yaml"
STATE = "state.json"
STATE_BACKUP = "state.json.bak"
METRICS = "metrics.jsonl"
DRIVER_LOG = "driver.log"
VOTES = "votes.jsonl"
REPORT = "report.md"
PLOTS = "plots"
ANALYSIS = "analysis.json"
ANALYSIS_SEEDS = "analysis_seeds.json"
TENSORBOARD = "tensorboard"
LOCAL_LOCK = ".lock"
LEASE = ".lease.json"
BASELINE = "baseline"
ORIGINAL = "original"
TEACHER = "teacher"
ANCHOR = "anchor"
JUDGE = "judge"  # the verify.judge.model, copied into an object-storage run directory
SAMPLES = "samples.jsonl"
ACCEPTED = "accepted.jsonl"
VERDICTS = "verdicts.jsonl"  # every sample's verdict: problem_id, sample, extracted, correct (+ a judge's text)
SFT = "sft"
MERGED = "merged"
EVAL = "eval.json"
EVAL_SAMPLES = "eval_samples.jsonl"
SWEEP = "sweep"
PROBE_SPLIT = "probe_split.json"
# The files of the run's root that only the holder of its lock writes, each atomically: taking the
# lock clears what a killed holder's writes of them left (a stage's outputs are cleared when it reruns).
LOCK_HOLDER_FILES = (CONFIG, STATE, STATE_BACKUP, METRICS, LEASE, PROBE_SPLIT)


@dataclass(frozen=True)
class Stage:
    """One stage of a round and the names (in the round directory) it writes."""

    name: str
    outputs: tuple[str, ...]  # cleared before the stage runs (a half-finished stage is redone)
    merge_only: bool = False  # runs only for arms that merge, and only when SFT trained
    sweep_only: bool = False  # runs only with merge.sweep


# The stages of a round, in the order they run.
ROUND_STAGES: tuple[Stage, ...] = (
    Stage("generate", (SAMPLES,)),
    Stage("verify", (ACCEPTED, VERDICTS)),
    Stage("sft", (SFT,)),  # clearing it clears its temp siblings (Ray Train's run folder too)
    # Nothing cleared: a resumed sweep keeps the candidates it scored and redoes only the rest.
    Stage("sweep", (), merge_only=True, sweep_only=True),
    Stage("merge", (MERGED,), merge_only=True),
    Stage("evaluate", (EVAL, EVAL_SAMPLES)),
)
STAGES = tuple(s.name for s in ROUND_STAGES)

BASELINE_ROUND = 0
BASELINE_ARM = "base"

_ROUND = re.compile(r"^round-(\d{3,})$")
_KEY = re.compile(r"^(?P<arm>[^/]+)/round-(?P<round>\d{3,})/(?P<stage>[a-z]+)$")


class StageKey(NamedTuple):
    """One stage of one round of one arm (the baseline is arm ``base``, round 0, ``evaluate``)."""

    arm: str
    round: int
    stage: str


def round_folder(arm: str, round_idx: int) -> str:
    """The folder of a round, relative to the run directory (``imm/round-001``)."""
    if round_idx == BASELINE_ROUND:
        return BASELINE
    return f"{arm}/round-{round_idx:03d}"


def parse_round_folder(name: str) -> int | None:
    """The round number of a folder name like ``round-003``, else None."""
    m = _ROUND.match(name)
    return int(m.group(1)) if m else None


def stage_key(arm: str, round_idx: int, stage: str) -> str:
    """The key of a stage in ``state.json`` (``imm/round-001/sft``, ``baseline/evaluate``)."""
    return f"{round_folder(arm, round_idx)}/{stage}"


def parse_stage_key(key: str) -> StageKey:
    """Inverse of :func:`stage_key`; ValueError for anything else."""
    if key == f"{BASELINE}/evaluate":
        return StageKey(BASELINE_ARM, BASELINE_ROUND, "evaluate")
    m = _KEY.match(key)
    if not m or m.group("stage") not in STAGES:
        raise ValueError(f"not a stage key: {key!r}")
    return StageKey(m.group("arm"), int(m.group("round")), m.group("stage"))


# Which stages a config key influences: a finished one of them pins the key on resume.
# (Keys not listed here change what every stage does.)
_KEY_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("data.eval", ("sweep", "evaluate")),
    ("evaluate.", ("sweep", "evaluate")),
    ("generate.", ("generate", "sweep", "evaluate")),
    ("data.train", ("generate", "verify", "sft")),
    ("verify.", ("verify",)),
    ("train.", ("sft",)),
    # the sweep's probe split decides which questions every evaluation reports
    ("merge.sweep", ("sweep", "merge", "evaluate")),
    ("merge.probe_fraction", ("sweep", "evaluate")),
    ("merge.probe_seed", ("sweep", "evaluate")),
    ("merge.", ("sweep", "merge")),
    ("model.teacher", ("generate",)),
)


def pinning_stage(config_key: str, done_keys: list[str]) -> str | None:
    """The first finished stage (of ``done_keys``, in order) whose output depends on ``config_key``."""
    stages = next((s for prefix, s in _KEY_STAGES if config_key == prefix.rstrip(".")
                   or config_key.startswith(prefix if prefix.endswith(".") else prefix + ".")), STAGES)
    for key in done_keys:
        try:
            if parse_stage_key(key).stage in stages:
                return key
        except ValueError:
            continue
    return None

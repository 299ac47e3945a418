"""A typed, read-only view of ``state.json``: which stage of which round finished, and what it recorded.

``state.json`` is ``{"stages": {key: record}, "inputs": {...}, "lease_generation": N}`` where a key
is a :func:`~imm_ray.run.layout.stage_key` and a record is ``{"status": "started", "started_at": T}``
or ``{"status": "done", "seconds": S, "finished_at": T, "info": {...}}``. :class:`RunDir` writes it;
serving, the report and the summary read it through :class:`RunState`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imm_ray.run import layout
from imm_ray.run.infos import EvaluateInfo
from imm_ray.storage.fs import Location, read_bytes

DONE = "done"
STARTED = "started"


class StateFormatError(ValueError):
    """The bytes are not a run's stage state; the message says what is wrong."""


@dataclass(frozen=True)
class StageRecord:
    """One stage's record: its status, and once done its duration and the summary (``info``) it left."""

    key: str
    status: str
    seconds: float | None = None
    info: Mapping[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.status == DONE

@dataclass(frozen=True)
class RunState:
    """The stage records of a run, in the order they were first written."""

    stages: Mapping[str, StageRecord]
    inputs: Mapping[str, str] | None = None
    lease_generation: int = 0

    @classmethod
    def from_json(cls, data: Any) -> RunState:
        """The view of a parsed ``state.json``; StateFormatError for anything else."""
        check_state(data)
        stages = {key: StageRecord(key, rec.get("status", ""), rec.get("seconds"),
                                   rec.get("info") if isinstance(rec.get("info"), Mapping) else None)
                  for key, rec in data["stages"].items()}
        return cls(stages, data.get("inputs"), int(data.get("lease_generation", 0)))

    @classmethod
    def parse(cls, raw: bytes | str) -> RunState:
        """The view of the bytes of ``state.json``; StateFormatError when they are not one."""
        return cls.from_json(parse_state(raw))

    def __iter__(self) -> Iterator[StageRecord]:
        return iter(self.stages.values())

    def record(self, key: str) -> StageRecord | None:
        return self.stages.get(key)

    def is_done(self, key: str) -> bool:
        rec = self.stages.get(key)
        return rec is not None and rec.done

    def done_keys(self) -> list[str]:
        """Keys of the finished stages, in order."""
        return [rec.key for rec in self if rec.done]

    def done_infos(self) -> dict[str, Mapping[str, Any]]:
        """Stage key -> the info it recorded, for every finished stage (what a resume plans from)."""
        return {rec.key: rec.info or {} for rec in self if rec.done}

    def done_rounds(self, arm: str) -> dict[int, EvaluateInfo]:
        """Round -> the info of its finished evaluation, for ``arm`` (round 0: the baseline, for any arm)."""
        out: dict[int, EvaluateInfo] = {}
        for rec in self:
            if not rec.done:
                continue
            try:
                key = layout.parse_stage_key(rec.key)
            except ValueError:
                continue
            if key.stage == "evaluate" and (key.arm == arm or key.round == layout.BASELINE_ROUND):
                out[key.round] = EvaluateInfo.from_json(rec.info or {})
        return out


def check_state(data: Any) -> None:
    """Raise StateFormatError unless ``data`` is a stage state (a mapping of mapping records)."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise StateFormatError("holds no 'stages' mapping")
    if not all(isinstance(rec, dict) for rec in data["stages"].values()):
        raise StateFormatError("holds stage records that are not mappings")


def parse_state(raw: bytes | str) -> dict[str, Any]:
    """The mapping in the bytes of ``state.json``; StateFormatError when they are not a stage state."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StateFormatError(f"is not JSON ({exc})") from None
    check_state(data)
    return data


def read_state(run_dir: Location) -> RunState | None:
    """The state of the run in ``run_dir``, None before its first stage; StateFormatError if unreadable."""
    try:
        raw = read_bytes(run_dir / layout.STATE)
    except FileNotFoundError:
        return None
    return RunState.parse(raw)

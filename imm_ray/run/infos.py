"""What each stage records in ``state.json`` when it finishes (a stage record's ``info``), typed.

One class per stage, each with one JSON form: ``to_json`` gives the fields that are set (read ones:
exactly the keys that were read, in their order, with the keys this version does not know kept as
they were), so a record read from an older run writes back unchanged. Fields are None where a run
did not record them (a skipped SFT has no checkpoint; older runs lack the token counts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

I = TypeVar("I", bound="StageInfo")  # noqa: E741


@dataclass(frozen=True)
class StageInfo:
    """The JSON form shared by the stage infos."""

    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True)  # keys this version does not know
    keys: tuple[str, ...] = field(default=(), kw_only=True, compare=False, repr=False)  # the order read

    stage: ClassVar[str]

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("extra", "keys")]

    @classmethod
    def from_json(cls: type[I], info: Mapping[str, Any]) -> I:
        names = set(cls._names())
        return cls(**{k: v for k, v in info.items() if k in names},
                   extra={k: v for k, v in info.items() if k not in names}, keys=tuple(info))

    def to_json(self) -> dict[str, Any]:
        if self.keys:
            return {k: self.extra[k] if k in self.extra else getattr(self, k) for k in self.keys}
        return {**{k: getattr(self, k) for k in self._names() if getattr(self, k) is not None}, **self.extra}


@dataclass(frozen=True)
class GenerateInfo(StageInfo):
    stage: ClassVar[str] = "generate"
    generated: int | None = None  # completions written
    questions: int | None = None
    model: str | None = None  # the model that generated them
    generator: str | None = None  # "student" or "teacher"
    sampling: Mapping[str, Any] | None = None
    truncated: int | None = None  # completions cut at max_tokens
    tokens: int | None = None
    tokens_per_s: float | None = None
    actor_retries: int | None = None


@dataclass(frozen=True)
class VerifyInfo(StageInfo):
    stage: ClassVar[str] = "verify"
    generated: int | None = None
    correct: int | None = None
    unparseable: int | None = None
    timeouts: int | None = None
    accepted: int | None = None  # rows written to accepted.jsonl
    questions_solved: int | None = None
    verifier: str | None = None  # the verify.verifier that judged them
    actor_retries: int | None = None  # verifier actors replaced mid-stage
    gold_check: Mapping[str, Any] | None = None  # a verifier without gold: its labels checked where gold exists
    diversity: Mapping[str, Any] | None = None  # collapse metrics of the k samples per question
    # train_pass@k (k: samples per question) is kept in ``extra`` under its own name.


@dataclass(frozen=True)
class SFTInfo(StageInfo):
    stage: ClassVar[str] = "sft"
    skipped: bool | None = None  # nothing was accepted: the round's model is unchanged
    reason: str | None = None
    init_model: str | None = None
    examples: int | None = None
    dropped: int | None = None
    steps: int | None = None
    final_loss: float | None = None
    checkpoint: str | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    restarts: int | None = None
    timings: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class MergeInfo(StageInfo):
    stage: ClassVar[str] = "merge"
    method: str | None = None
    params: Mapping[str, Any] | None = None
    seed: int | None = None
    anchor: str | None = None
    checkpoint: str | None = None


@dataclass(frozen=True)
class SweepInfo(StageInfo):
    stage: ClassVar[str] = "sweep"
    select: str | None = None  # merge.select
    rule: str | None = None  # the selection rule in words
    probe_n: Mapping[str, int] | None = None  # probe questions per eval set
    start: Mapping[str, Any] | None = None  # the round's start model and its probe scores
    candidates: list[Any] | None = None  # each candidate's params and probe scores
    chosen: Mapping[str, Any] | None = None  # index and params of the merge the round keeps


@dataclass(frozen=True)
class EvaluateInfo(StageInfo):
    stage: ClassVar[str] = "evaluate"
    model: str | None = None  # the evaluated model: the one the round serves
    questions: str | None = None  # "all", or "held_back" with a merge sweep (the probe questions left out)
    datasets: Mapping[str, Any] | None = None  # per data set: accuracy, its CI, pass@k, diversity...
    tokens: int | None = None
    tokens_per_s: float | None = None
    actor_retries: int | None = None


INFO_TYPES: dict[str, type[StageInfo]] = {t.stage: t for t in (GenerateInfo, VerifyInfo, SFTInfo, MergeInfo,
                                                               SweepInfo, EvaluateInfo)}

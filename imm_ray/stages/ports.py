"""What the stages ask of the parts that run on the cluster: the round driver passes Ray pools and
tasks that fit these, a unit test passes in-memory fakes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from imm_ray.generate.engine import Completion, SamplingSpec
from imm_ray.storage import Location
from imm_ray.verify.verifiers import Verdict


class GenerationStats(Protocol):
    """What one generation call did (a generator pool's ``last_stats``)."""

    tokens: int
    seconds: float
    retries: int  # actors replaced mid-call

    @property
    def tokens_per_s(self) -> float: ...


class Generator(Protocol):
    """A generator pool that already serves the model to generate with."""

    @property
    def last_stats(self) -> GenerationStats | None: ...

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec,
                 desc: str = "generate") -> list[list[Completion]]: ...


class Verifiers(Protocol):
    """The verifier pool: one verdict per sample row."""

    last_retries: int  # actors replaced during the last call

    def verify(self, rows: list[dict[str, Any]], batch_size: int) -> list[Verdict]: ...


class SFTOutcome(Protocol):
    """What an SFT run reports (:class:`imm_ray.train.SFTResult` fits)."""

    examples: int
    dropped: int
    steps: int
    final_loss: float
    tokens: int
    restarts: int
    timings: dict[str, float]

    @property
    def tokens_per_second(self) -> float: ...


Train = Callable[[str, Location, Location], SFTOutcome]
"""(initial model, accepted.jsonl, checkpoint out) -> the SFT run's outcome; it publishes the checkpoint."""

Merge = Callable[[str, str, Location, Mapping[str, Any]], str]
"""(anchor, SFT checkpoint, out, merge params) -> the merged checkpoint's location."""

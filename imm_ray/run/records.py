"""The rows that stages hand each other through a round folder, each with its one JSON form.

``samples.jsonl`` holds :class:`SampleRow` (generate), ``accepted.jsonl`` :class:`AcceptedRow`
(verify: the samples judged correct, with the answer extracted), ``eval_samples.jsonl``
:class:`EvalSampleRow` (evaluate: every greedy and sampled completion with its verdict, the
per-question ledger). ``to_json`` gives the keys in the order the files have always had them;
``from_json`` reads rows of this form (keys it does not know are ignored).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

R = TypeVar("R", bound="_Row")


class _Row:
    """JSON form shared by the rows: the fields in order, optional ones left out when None."""

    _OPTIONAL: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()  # type: ignore[call-overload]
                if not (k in self._OPTIONAL and v is None)}

    @classmethod
    def from_json(cls: type[R], row: Mapping[str, Any]) -> R:
        """The row of a parsed JSON line; TypeError when it lacks a required field."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass(frozen=True)
class SampleRow(_Row):
    """One completion of a training question (``samples.jsonl``)."""

    problem_id: str
    dataset: str
    question: str
    gold: str
    prompt: str  # the rendered prompt the completion follows
    sample: int  # which of the question's samples
    completion: str
    finish_reason: str | None
    num_tokens: int
    token_entropies: list[float] | None = None  # per generated token, when measured

    _OPTIONAL = ("token_entropies",)


@dataclass(frozen=True)
class AcceptedRow(SampleRow):
    """A sample the verifier accepted (``accepted.jsonl``): what SFT trains on."""

    extracted: str | None = None  # the answer found in the completion

    _OPTIONAL = ("token_entropies",)


@dataclass(frozen=True)
class EvalSampleRow(_Row):
    """One evaluated completion and its verdict (``eval_samples.jsonl``)."""

    dataset: str
    problem_id: str
    gold: str
    kind: str  # "greedy" or "sample"
    sample: int
    completion: str
    finish_reason: str | None
    num_tokens: int
    extracted: str | None
    correct: bool
    timed_out: bool

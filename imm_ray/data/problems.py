"""Core data records: a benchmark problem, the result of loading a set, and the data error."""

from __future__ import annotations

from dataclasses import dataclass, field

from imm_ray.errors import UserError

__all__ = ["Problem", "LoadResult", "DataError"]


class DataError(UserError, RuntimeError):
    """A dataset could not be found or read, or (strict mode) one of its rows is malformed."""


@dataclass(frozen=True)
class Problem:
    """One question with its gold final answer (a normalised number string when numeric; None in a
    training set loaded for a verifier that needs no gold)."""

    id: str
    question: str
    answer: str | None
    dataset: str


@dataclass
class LoadResult:
    """Problems loaded from one source, the count of malformed rows skipped, and the source used."""

    problems: list[Problem]
    malformed: int
    source: str
    malformed_examples: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)

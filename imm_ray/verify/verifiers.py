"""Verifiers: decide whether a completion reaches the gold answer, plus batch helpers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from imm_ray.registry import Registry
from imm_ray.verify.answers import answers_match, extract_answer

__all__ = [
    "Verdict",
    "Verifier",
    "NumericVerifier",
    "VERIFIERS",
    "register_verifier",
    "get_verifier",
    "verify_batch",
    "verify_rows",
    "needs_gold",
    "question_chunks",
    "rows_by_question",
    "select_accepted",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one completion: correctness and the answer that was extracted.

    timed_out marks a verification that was cut off by its verifier's hard timeout: it counts
    as not correct, and callers report it separately (it is neither right nor unparseable).
    note keeps a model-based verifier's own words (the judge's text), None for the others.
    """

    correct: bool
    extracted: str | None
    timed_out: bool = False
    note: str | None = None


@runtime_checkable
class Verifier(Protocol):
    """Anything with a name and verify(completion, gold) -> Verdict."""

    name: str

    def verify(self, completion: str, gold: str) -> Verdict: ...


class NumericVerifier:
    """Extract the final answer (see extract_answer) and compare it with gold numerically."""

    name = "numeric"

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> None:
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol

    def verify(self, completion: str, gold: str) -> Verdict:
        """Verdict for one completion against one gold answer."""
        extracted = extract_answer(completion)
        correct = answers_match(extracted, gold, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return Verdict(correct=correct, extracted=extracted)


VERIFIERS: Registry[Callable[..., Verifier]] = Registry("verifier")


def register_verifier(
    name: str, factory: Callable[..., Verifier] | None = None, *, overwrite: bool = False
) -> Any:
    """Register a verifier class/factory under name; usable as a decorator when factory is None."""

    def _register(f: Callable[..., Verifier]) -> Callable[..., Verifier]:
        return VERIFIERS.add(name, f, overwrite=overwrite)

    return _register if factory is None else _register(factory)


register_verifier(NumericVerifier.name, NumericVerifier)


def get_verifier(name: str | Verifier, **kwargs: Any) -> Verifier:
    """Instantiate the registered verifier `name` with kwargs (an instance is returned as is); an
    UnknownNameError names the registered ones."""
    if not isinstance(name, str):
        if kwargs:
            raise ValueError("verifier options are only accepted with a verifier name")
        return name
    return VERIFIERS.lookup(name)(**kwargs)


def verify_batch(
    items: Sequence[tuple[str, str]], verifier: str | Verifier = "numeric", **kwargs: Any
) -> list[Verdict]:
    """Verify (completion, gold) pairs with one verifier; kwargs go to its constructor.

    A verifier with a ``verify_many(items)`` method (e.g. the process-pool ``math`` verifier)
    gets the whole batch at once. A verifier built here from its name is closed afterwards
    when it has a ``close()`` method; an instance passed in stays open for its owner.
    """
    instance = get_verifier(verifier, **kwargs)
    try:
        verify_many = getattr(instance, "verify_many", None)
        if verify_many is not None:
            return list(verify_many(items))
        return [instance.verify(completion, gold) for completion, gold in items]
    finally:
        close = getattr(instance, "close", None)
        if isinstance(verifier, str) and close is not None:
            close()


def needs_gold(name: str) -> bool:
    """Whether the registered verifier ``name`` checks samples against a gold answer (``majority``
    and ``judge`` do not: a training set may then lack its answer field)."""
    return bool(getattr(VERIFIERS[name], "needs_gold", True))


def verify_rows(verifier: Verifier | Any, rows: Sequence[dict[str, Any]]) -> list[Verdict]:
    """Verdicts for sample rows (``problem_id``, ``question``, ``completion``, ``gold``) with an open
    verifier: one that reads whole rows (``verify_rows``: majority, judge) gets them as they are,
    a gold verifier gets the (completion, gold) pairs (see :func:`verify_batch`)."""
    by_rows = getattr(verifier, "verify_rows", None)
    if by_rows is not None:
        return list(by_rows(rows))
    return verify_batch([(r["completion"], r["gold"]) for r in rows], verifier)


def rows_by_question(rows: Sequence[dict[str, Any]]) -> dict[Any, list[int]]:
    """{problem_id: indices of its rows}, questions and rows in the order they first appear."""
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["problem_id"], []).append(i)
    return groups


def question_chunks(rows: Sequence[dict[str, Any]], size: int) -> list[list[int]]:
    """Row indices in chunks of about ``size`` rows that never split a question (``problem_id``): a
    chunk closes once it holds ``size`` rows, so the samples a majority vote needs stay together."""
    chunks: list[list[int]] = [[]]
    for indices in rows_by_question(rows).values():
        if len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].extend(indices)
    return [c for c in chunks if c]


def _dedup_key(text: str) -> str:
    return " ".join(text.split())


def select_accepted(
    records: Sequence[dict[str, Any]],
    verdicts: Sequence[Verdict],
    dedup: bool = True,
    text_field: str = "completion",
) -> list[dict[str, Any]]:
    """Keep the records whose verdict is correct, in order, each copied with "extracted" added.

    With dedup, a completion whose whitespace-normalised text (record[text_field]) was already
    accepted for the same record["problem_id"] is dropped. Input records are not modified.
    """
    if len(records) != len(verdicts):
        raise ValueError(f"{len(records)} records but {len(verdicts)} verdicts")
    accepted: list[dict[str, Any]] = []
    seen: set[tuple[Any, str]] = set()
    duplicates = 0
    for index, (record, verdict) in enumerate(zip(records, verdicts)):
        if not verdict.correct:
            continue
        if dedup:
            try:
                key = (record["problem_id"], _dedup_key(record[text_field]))
            except KeyError as exc:
                raise KeyError(
                    f"record {index} lacks {exc.args[0]!r}, needed for dedup "
                    f"(fields 'problem_id' and {text_field!r})"
                ) from None
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        accepted.append({**record, "extracted": verdict.extracted})
    logger.debug(
        "accepted %d of %d records (%d duplicates dropped)", len(accepted), len(records), duplicates
    )
    return accepted

"""The ``math`` verifier: MATH-style answers checked with Hugging Face's ``math-verify``.

math-verify parses LaTeX/plain expressions into sympy and compares them symbolically
(\\frac{1}{2} == 0.5, \\sqrt{2}/2 == \\frac{\\sqrt2}{2}). sympy can hang on pathological input, and
math-verify's own timeouts use signal.alarm (main thread only) and turn a timeout into a silent
False. So its timeouts are switched off and every answer runs in a TimeoutPool worker with a hard
per-answer timeout; a timed-out answer comes back as Verdict(correct=False, timed_out=True).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from imm_ray.verify.answers import normalize_answer, normalize_number
from imm_ray.verify.timeout_pool import TimeoutPool
from imm_ray.verify.verifiers import Verdict, register_verifier

__all__ = ["MathVerifier", "math_verify_pair"]

logger = logging.getLogger(__name__)

VerifyFn = Callable[[str, str], "tuple[bool, str | None]"]


def _gold_text(gold: str) -> str:
    """Gold answers are bare expressions ("\\frac{1}{2}"): wrap them so math-verify reads LaTeX."""
    return gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"


def _answer_key(parsed: list) -> str:
    """A canonical text for a parsed answer (numbers normalised: 1/2 and 0.5 both give "0.5")."""
    text = str(parsed[0])
    number = normalize_number(text)
    return number if number is not None else text


def math_verify_pair(completion: str, gold: str) -> tuple[bool, str | None]:
    """(correct, extracted answer) of one completion under math-verify, without timeouts.

    Run it under a hard timeout (TimeoutPool): it may not return on pathological input.
    """
    from math_verify import parse, verify

    predicted = parse(completion, parsing_timeout=None)  # type: ignore[arg-type]
    if not predicted:
        return False, None
    extracted = _answer_key(predicted)
    gold_parsed = parse(_gold_text(gold), parsing_timeout=None)  # type: ignore[arg-type]
    if not gold_parsed:  # a gold math-verify cannot read: compare the normalised texts
        return normalize_answer(extracted) == normalize_answer(gold), extracted
    return bool(verify(gold_parsed, predicted, timeout_seconds=None)), extracted


def _quiet_math_verify_pair(completion: str, gold: str) -> tuple[bool, str | None]:
    # math-verify warns once per process that its timeouts are off: the pool handles them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify_pair(completion, gold)


class MathVerifier:
    """Verify completions with math-verify in worker processes, each answer under a hard timeout.

    Options: timeout_s (per answer, default 5 s), workers (default min(4, CPU count)),
    verify_fn (a picklable (completion, gold) -> (correct, extracted); for tests). Use it as a
    context manager or call close() to stop the workers; verify_batch does this for you.
    """

    name = "math"

    def __init__(
        self,
        timeout_s: float = 5.0,
        workers: int | None = None,
        verify_fn: VerifyFn = _quiet_math_verify_pair,
    ) -> None:
        self.timeout_s = timeout_s
        self.pool = TimeoutPool(
            verify_fn,
            workers=workers or min(4, os.cpu_count() or 1),
            timeout_s=timeout_s,
            warmup=("The answer is $\\frac{1}{2}$", "0.5"),
        )

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()

    def verify(self, completion: str, gold: str) -> Verdict:
        """Verdict for one completion against one gold answer."""
        return self.verify_many([(completion, gold)])[0]

    def verify_many(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for (completion, gold) pairs, in order; timeouts are flagged and logged."""
        outcomes = self.pool.map([(completion, gold) for completion, gold in items])
        verdicts: list[Verdict] = []
        timeouts = errors = 0
        for (completion, _), outcome in zip(items, outcomes):
            if outcome.status == "ok":
                correct, extracted = outcome.value
                verdicts.append(Verdict(bool(correct), extracted))
                continue
            if outcome.status == "timeout":
                timeouts += 1
                verdicts.append(Verdict(False, None, timed_out=True))
            else:
                errors += 1
                verdicts.append(Verdict(False, None))
            logger.debug("math verifier %s on %r: %s", outcome.status, completion[-120:], outcome.error)
        if timeouts or errors:
            logger.warning(
                "math verifier: %d of %d answers timed out (> %g s), %d failed",
                timeouts, len(items), self.timeout_s, errors,
            )
        return verdicts


register_verifier(MathVerifier.name, MathVerifier)

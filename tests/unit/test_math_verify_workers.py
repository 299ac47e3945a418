"""The hard-timeout process pool and the `math` verifier's timeout path (with injected functions).

Worker processes import this module to unpickle the injected functions, so its top level stays
light: no imm_ray.evaluate, no math_verify.
"""

from __future__ import annotations

import time

import pytest

from imm_ray.verify import MathVerifier, TimeoutPool, Verdict


def slow_on_hang(completion: str, gold: str) -> tuple[bool, str | None]:
    """A verify function that hangs on completions containing "HANG"."""
    if "HANG" in completion:
        time.sleep(600)
    return completion.strip() == gold, completion.strip()


def fail_on_boom(completion: str, gold: str) -> tuple[bool, str | None]:
    if completion == "BOOM":
        raise ZeroDivisionError("boom")
    return True, completion


def test_timeout_pool_kills_hung_tasks_and_keeps_order() -> None:
    # 2 s: room for an instant task on a loaded machine; 600 s: a task that cannot end in time.
    with TimeoutPool(time.sleep, workers=2, timeout_s=2.0) as pool:
        outcomes = pool.map([(0.0,), (600,), (0.0,), (600,), (0.0,)])
        assert [o.status for o in outcomes] == ["ok", "timeout", "ok", "timeout", "ok"]  # cut off
        assert (pool.timeouts, pool.restarts) == (2, 2)
        assert [o.status for o in pool.map([(0.0,)])] == ["ok"]  # replaced workers serve on
    assert pool.map([]) == []


def test_timeout_pool_reports_errors() -> None:
    with TimeoutPool(fail_on_boom, workers=1, timeout_s=5) as pool:
        outcomes = pool.map([("ok", "x"), ("BOOM", "x")])
    assert outcomes[0].status == "ok" and outcomes[0].value == (True, "ok")
    assert outcomes[1].status == "error" and "ZeroDivisionError" in outcomes[1].error
    with pytest.raises(ValueError):
        TimeoutPool(fail_on_boom, workers=0)


def test_math_verifier_flags_timeouts_instead_of_silently_failing() -> None:
    from imm_ray.evaluate import DatasetScore, score_verdicts

    with MathVerifier(timeout_s=2.0, workers=2, verify_fn=slow_on_hang) as verifier:
        verdicts = verifier.verify_many([("7", "7"), ("HANG 7", "7"), ("8", "7")])
    assert verdicts == [Verdict(True, "7"), Verdict(False, None, timed_out=True), Verdict(False, "8")]
    score = score_verdicts("d", verdicts)
    assert score == DatasetScore("d", 3, 1, pytest.approx(1 / 3), unparseable=0, timeouts=1)

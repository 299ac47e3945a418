"""The per-question ledger, pass@k from its counts, and the paired comparison, against numbers
worked out by hand."""

from __future__ import annotations

import pytest

from imm_ray.data.problems import Problem
from imm_ray.evaluate import (
    evaluate_completions,
    mcnemar_exact,
    paired_difference,
    question_changes,
    read_ledger,
    sample_rows,
)
from imm_ray.generate.engine import Completion

# Ten questions. Both right: q0 q1; only A right: q2 q3 q4 q5; only B right: q6; both wrong: q7 q8 q9.
A = {f"q{i}": i in (0, 1, 2, 3, 4, 5) for i in range(10)}
B = {f"q{i}": i in (0, 1, 6) for i in range(10)}


@pytest.mark.parametrize(("only_a", "only_b", "expected"), [
    (4, 1, 0.375),  # n = 5 discordant: 2 * (C(5,0) + C(5,1)) / 2^5 = 2 * 6 / 32
    (1, 4, 0.375),  # symmetric
    (6, 0, 0.03125),  # 2 * C(6,0) / 2^6 = 2 / 64
    (3, 3, 1.0),  # 2 * (1 + 6 + 15 + 20) / 64 = 1.3125, capped at 1
    (0, 0, 1.0),  # no discordant question: no evidence either way
])
def test_mcnemar_exact_by_hand(only_a: int, only_b: int, expected: float) -> None:
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected)


def test_mcnemar_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 2)


def test_paired_difference_by_hand() -> None:
    # accuracy A = 6/10, B = 3/10, difference (4 - 1) / 10 = 0.3.
    # Paired differences d_i: four +1, one -1, five 0: mean 0.3, E[d^2] = 5/10 = 0.5,
    # variance 0.5 - 0.3^2 = 0.41, standard error sqrt(0.41 / 10) = 0.202485,
    # half width 1.959964 * 0.202485 = 0.396862: interval [-0.096862, 0.696862].
    pd = paired_difference(A, B)
    assert pd is not None
    assert (pd.n, pd.only_a, pd.only_b) == (10, 4, 1)
    assert (pd.accuracy_a, pd.accuracy_b, pd.difference) == pytest.approx((0.6, 0.3, 0.3))
    assert pd.ci95 == pytest.approx((-0.096862, 0.696862), abs=1e-6)
    assert pd.p_value == pytest.approx(0.375)


def test_paired_difference_uses_shared_questions_only() -> None:
    # q9 is only in A: the comparison is on q0..q8; swapping the arms flips the sign.
    b = {q: v for q, v in B.items() if q != "q9"}
    pd = paired_difference(b, A)
    assert pd is not None and pd.n == 9 and pd.difference == pytest.approx(-3 / 9)
    assert paired_difference({"x": True}, {"y": True}) is None


def test_question_changes() -> None:
    before = {"q0": True, "q1": False, "q2": True, "q3": False}
    after = {"q0": False, "q1": True, "q2": True, "q3": False, "new": True}  # "new" is not in before
    changes = question_changes(before, after)
    assert (changes.gained, changes.lost, changes.n, changes.net) == (["q1"], ["q0"], 4, 0)


def _completion(right: bool) -> Completion:
    return Completion(text=f"The answer is {7 if right else 8}.", finish_reason="stop", num_tokens=5)


def test_ledger_round_trip_and_pass_at_k_by_hand() -> None:
    # Three questions, gold 7, k = 4 samples each with 1, 0 and 4 right.
    # pass@2 per question: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; 1 - C(4,2)/C(4,2) = 0; 1 (c > n - k).
    # Mean pass@2 = 1.5 / 3 = 0.5; pass@1 = mean(1/4, 0, 4/4) = 1.25 / 3; pass@4 = (1 + 0 + 1) / 3.
    problems = [Problem(id=f"p{i}", question="?", answer="7", dataset="set") for i in range(3)]
    greedy = [_completion(r) for r in (True, False, True)]
    sampled = [[_completion(j < c) for j in range(4)] for c in (1, 0, 4)]
    ev = evaluate_completions("set", problems, [c.text for c in greedy], [[c.text for c in s] for s in sampled])
    ledger = read_ledger(sample_rows("set", problems, ev, greedy, sampled))
    assert ledger is not None
    assert ledger.greedy == {"set": {"p0": True, "p1": False, "p2": True}}
    assert ledger.samples == {"set": {"p0": (1, 4), "p1": (0, 4), "p2": (4, 4)}}
    assert ledger.k("set") == 4 and ledger.k("other") == 0
    assert ledger.pass_at("set", 2) == pytest.approx(0.5)
    assert ledger.pass_at("set", 1) == pytest.approx(1.25 / 3) == pytest.approx(ev.metrics["pass@1"])
    assert ledger.pass_at("set", 4) == pytest.approx(2 / 3) == pytest.approx(ev.metrics["pass@k"])
    assert ledger.pass_at("set", 5) is None and ledger.pass_at("other", 1) is None


def test_ledger_of_older_files() -> None:
    # The loop's first eval_samples.jsonl rows had no kind: they are greedy answers.
    old = [{"dataset": "set", "problem_id": "p0", "gold": "7", "completion": "7", "extracted": "7", "correct": True}]
    ledger = read_ledger(old)
    assert ledger is not None and ledger.greedy == {"set": {"p0": True}} and ledger.samples == {}
    assert read_ledger([{"dataset": "set", "problem_id": "p0", "completion": "7"}]) is None  # no correctness
    assert read_ledger([]) is None

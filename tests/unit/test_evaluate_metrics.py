"""pass@k, maj@k, bootstrap interval, dataset specs and the per-dataset evaluation record."""

from __future__ import annotations

from math import comb

import pytest

from imm_ray.data import Problem
from imm_ray.evaluate import (
    bootstrap_ci,
    evaluate_completions,
    maj_at_k,
    majority_vote,
    mean_maj_at_k,
    mean_pass_at_k,
    parse_dataset_arg,
    parse_dataset_args,
    pass_at_k,
    pick_verifier,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 0, 1, 0.0),
        (5, 5, 3, 1.0),
        (5, 2, 1, 0.4),  # pass@1 = c / n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (3, 1, 3, 1.0),  # k = n: any correct sample passes
    ],
)
def test_pass_at_k_hand_worked(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomial_formula_and_rejects_bad_input() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    assert mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)
    assert mean_pass_at_k([], 1) == 0.0


def test_majority_vote_counts_normalised_answers_and_breaks_ties_by_first_occurrence() -> None:
    assert majority_vote(["3", "1,000", "1000", None]) == 1  # "1,000" == "1000": 2 votes
    assert majority_vote(["7", "8", "8", "7"]) == 0  # 2-2 tie: "7" appears first
    assert majority_vote(["8", "7", "7", "8"]) == 0
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_maj_at_k() -> None:
    answers, correct = ["5", "4", "4", "5", "5"], [True, False, False, True, True]
    assert maj_at_k(answers, correct) is True  # "5": 3 votes
    assert maj_at_k(answers, correct, k=3) is False  # first 3: "4" wins 2-1
    assert maj_at_k(answers, correct, k=4) is True  # 2-2 tie: "5" came first
    assert maj_at_k([None, None], [False, False]) is False
    assert mean_maj_at_k([answers, ["1", "2", "2"]], [correct, [True, False, False]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False])


def test_bootstrap_ci_contains_point_and_is_deterministic_by_seed() -> None:
    values = [1.0] * 30 + [0.0] * 20  # accuracy 0.6
    lo, hi = bootstrap_ci(values, seed=0)
    assert lo <= 0.6 <= hi
    assert 0.4 < lo < 0.6 < hi < 0.8  # roughly +-1.96 * sqrt(0.6*0.4/50) = +-0.136
    assert bootstrap_ci(values, seed=0) == (lo, hi)
    spread = [float(i % 7) / 7 for i in range(50)]
    assert bootstrap_ci(spread, seed=0) == bootstrap_ci(spread, seed=0)
    assert bootstrap_ci(spread, seed=0) != bootstrap_ci(spread, seed=1)
    narrow = bootstrap_ci(values * 20, seed=0)
    assert narrow[1] - narrow[0] < (hi - lo) / 2
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci([]) is None


def test_bootstrap_ci_hand_worked_two_points() -> None:
    # Means of 2 resampled points from {0, 1} are 0, 0.5 or 1 with chances 1/4, 1/2, 1/4: the
    # 2.5% and 97.5% quantiles of many resamples are exactly 0 and 1.
    assert bootstrap_ci([0.0, 1.0], resamples=4000, seed=3) == (0.0, 1.0)


def test_parse_dataset_arg(tmp_path) -> None:
    spec = parse_dataset_arg("gsm8k", limit=5)
    assert (spec.name, spec.preset, spec.split, spec.limit) == ("gsm8k", "gsm8k", "test", 5)
    spec = parse_dataset_arg("data/mawps.jsonl:input:target")
    assert (spec.name, spec.path, spec.question_field, spec.answer_field) == (
        "mawps", "data/mawps.jsonl", "input", "target")
    spec = parse_dataset_arg("x/gsm_hard.parquet:input:target:numeric")
    assert (spec.name, spec.answer_format) == ("gsm_hard", "numeric")
    assert parse_dataset_arg("some/folder").name == "folder"
    spec = parse_dataset_arg("s3://bucket/sets/mawps.jsonl:input:target")
    assert (spec.name, spec.path, spec.answer_field) == ("mawps", "s3://bucket/sets/mawps.jsonl", "target")
    for bad in ("a.jsonl:q", "a.jsonl::a", "a.jsonl:q:a:weird", "a:b:c:d:e"):
        with pytest.raises(ValueError):
            parse_dataset_arg(bad)
    with pytest.raises(ValueError, match="named"):
        parse_dataset_args(["a/test.jsonl", "b/test.jsonl"])


def test_pick_verifier() -> None:
    numeric = [Problem("1", "q", "18", "d"), Problem("2", "q", "0.5", "d")]
    latex = numeric + [Problem("3", "q", "\\sqrt{2}", "d")]
    assert pick_verifier(numeric) == "numeric"
    assert pick_verifier(latex) == "math"
    assert pick_verifier(latex, "numeric") == "numeric"


PROBLEMS = [Problem("p0", "q", "5", "toy"), Problem("p1", "q", "3", "toy"), Problem("p2", "q", "12", "toy")]


def test_evaluate_completions_greedy_only() -> None:
    result = evaluate_completions(
        "toy", PROBLEMS, ["The answer is 5.", "no idea", "The answer is 11."], seed=0
    ).metrics
    assert (result["accuracy"], result["n"], result["correct"], result["unparseable"]) == (
        pytest.approx(1 / 3), 3, 1, 1)
    assert result["k"] == 1 and result["pass@k"] == result["maj@k"] == result["accuracy"]
    lo, hi = result["accuracy_ci95"]
    assert lo <= 1 / 3 <= hi
    assert result["timeouts"] == 0 and "diversity" not in result


def test_evaluate_completions_with_samples() -> None:
    samples = [
        ["The answer is 5.", "The answer is 5.", "The answer is 4."],  # maj right, pass
        ["The answer is 2.", "The answer is 2.", "The answer is 3."],  # maj wrong, pass
        ["The answer is 1.", "nothing", "The answer is 7."],  # fail
    ]
    evaluation = evaluate_completions("toy", PROBLEMS, ["The answer is 5.", "x", "y"], samples, seed=0)
    m = evaluation.metrics
    assert m["k"] == 3
    assert m["pass@1"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert m["pass@k"] == pytest.approx(2 / 3)
    assert m["maj@k"] == pytest.approx(1 / 3)
    assert m["sample_unparseable"] == 1 and m["sample_timeouts"] == 0
    assert m["diversity"]["distinct_answers"] == pytest.approx((2 + 2 + 2) / 3)
    assert len(evaluation.sample_verdicts) == 3 and len(evaluation.sample_verdicts[0]) == 3
    with pytest.raises(ValueError):
        evaluate_completions("toy", PROBLEMS, ["a", "b"])
    with pytest.raises(ValueError):
        evaluate_completions("toy", PROBLEMS, ["a", "b", "c"], [["x"], ["y", "z"], ["w"]])

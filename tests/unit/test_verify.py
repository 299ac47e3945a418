"""Answer extraction, number parsing, matching, verifiers and accepted-sample selection."""

from __future__ import annotations

import pytest

from imm_ray.errors import UnknownNameError
from imm_ray.verify import (
    VERIFIERS,
    NumericVerifier,
    Verdict,
    answers_match,
    extract_answer,
    get_verifier,
    normalize_number,
    parse_number,
    register_verifier,
    select_accepted,
    verify_batch,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So she has 42 left.\nThe answer is 42.", "42"),
        ("The answer is: $1,234", "1234"),
        ("the ANSWER is 7", "7"),
        ("**The answer is: 1,234.50**.", "1234.5"),
        ("The final answer is 12 dollars.", "12"),
        ("The answer is -5.", "-5"),
        ("The answer is \u22123", "-3"),
        ("The answer is 3/4", "0.75"),
        ("The answer is $\\boxed{\\frac{3}{4}}$", "0.75"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("We get \\boxed{12}.", "12"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{\\pi}", "\\pi"),
        ("first \\boxed{1} then \\boxed{\\text{2}}", "2"),
        ("I have 3 apples and 5 pears", "5"),
        ("5-3=2", "2"),
        ("It costs $2.50 each.", "2.5"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer_forms(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_last_answer_is_wins_and_beats_other_markers() -> None:
    text = "The answer is 5.\nWait, recheck: \\boxed{9}\n#### 8\nThe answer is 7.\nThen 100 more."
    assert extract_answer(text) == "7"


def test_answer_is_without_number_falls_through() -> None:
    assert extract_answer("The answer is 4.\nThe answer is unclear.") == "4"
    assert extract_answer("The answer is unclear. #### 6") == "6"


def test_hashes_beat_boxed_and_boxed_beats_last_number() -> None:
    assert extract_answer("\\boxed{3} and #### 4 then 99") == "4"
    assert extract_answer("\\boxed{3} and then 99") == "3"


def test_boxed_nested_braces() -> None:
    assert extract_answer("so \\boxed{\\frac{1}{2}} done 7") == "0.5"
    assert extract_answer("\\boxed{\\sqrt{2}}") == "\\sqrt{2}"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", 1234.0),
        ("1,234.50", 1234.5),
        ("$5", 5.0),
        ("50%", 50.0),
        ("-3", -3.0),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("\\frac{1}{2}", 0.5),
        ("0.5", 0.5),
        (".5", 0.5),
        ("42.", 42.0),
        ("**17**", 17.0),
    ],
)
def test_parse_number(text: str, value: float) -> None:
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "1 1/2", "3/0", "12 apples", "1,23", "--4"])
def test_parse_number_rejects(text: str) -> None:
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1,234", "1234"), (5.0, "5"), ("3.50", "3.5"), (51.0, "51"), (7, "7"), ("-0", "0"),
     ("1e3", "1000"), (0.1, "0.1"), ("abc", None)],
)
def test_normalize_number(value: object, expected: str | None) -> None:
    assert normalize_number(value) == expected


def test_answers_match_tolerance() -> None:
    assert answers_match("18", "18")
    assert answers_match("18.0", "18")
    assert answers_match("1,234", "1234")
    assert answers_match("0.75", "3/4")
    assert answers_match("0.3333333", "1/3", rel_tol=1e-6)
    assert not answers_match("0.333", "1/3")
    assert answers_match("0.333", "1/3", rel_tol=1e-2)
    assert not answers_match("18.01", "18")
    assert answers_match("18.0000001", "18")
    assert not answers_match(None, "18")
    assert not answers_match("18", "eighteen")
    assert answers_match("\\pi", " \\pi ")


def test_numeric_verifier_and_registry() -> None:
    verdict = NumericVerifier().verify("3 + 4 = 7. The answer is 7.", "7")
    assert verdict == Verdict(correct=True, extracted="7")
    assert NumericVerifier().verify("The answer is 8.", "7") == Verdict(False, "8")
    assert NumericVerifier().verify("I do not know", "7") == Verdict(False, None)
    assert VERIFIERS["numeric"] is NumericVerifier
    assert get_verifier("numeric", rel_tol=0.1).rel_tol == 0.1
    with pytest.raises(UnknownNameError, match="unknown verifier 'nope'; choose from .*numeric"):
        get_verifier("nope")


def test_register_verifier_decorator_and_duplicate() -> None:
    @register_verifier("always-true-test")
    class AlwaysTrue:
        name = "always-true-test"

        def verify(self, completion: str, gold: str) -> Verdict:
            return Verdict(True, None)

    try:
        assert verify_batch([("x", "1")], verifier="always-true-test") == [Verdict(True, None)]
        with pytest.raises(ValueError, match="already exists"):
            register_verifier("always-true-test", NumericVerifier)
    finally:
        VERIFIERS.pop("always-true-test")


def test_verify_batch_kwargs_and_instances() -> None:
    items = [("The answer is 10.", "10"), ("The answer is 10.5", "10"), ("nothing", "3")]
    assert [v.correct for v in verify_batch(items)] == [True, False, False]
    loose = verify_batch(items, verifier="numeric", rel_tol=0.1)
    assert [v.correct for v in loose] == [True, True, False]
    assert verify_batch(items, verifier=NumericVerifier()) == verify_batch(items)


def test_select_accepted_dedup_order_and_extracted() -> None:
    records = [
        {"problem_id": "a", "completion": "x = 1.  The answer is 1."},
        {"problem_id": "a", "completion": "x = 1.\nThe answer is 1. "},  # same after whitespace
        {"problem_id": "b", "completion": "x = 1.  The answer is 1."},  # other problem: kept
        {"problem_id": "a", "completion": "The answer is 2."},  # wrong
        {"problem_id": "a", "completion": "Then: the answer is 1."},
    ]
    golds = {"a": "1", "b": "1"}
    verdicts = verify_batch([(r["completion"], golds[r["problem_id"]]) for r in records])
    kept = select_accepted(records, verdicts)
    assert [r["completion"] for r in kept] == [
        records[0]["completion"],
        records[2]["completion"],
        records[4]["completion"],
    ]
    assert all(r["extracted"] == "1" for r in kept)
    assert "extracted" not in records[0]  # inputs untouched
    assert len(select_accepted(records, verdicts, dedup=False)) == 4


def test_select_accepted_errors() -> None:
    with pytest.raises(ValueError):
        select_accepted([{"problem_id": "a", "completion": "1"}], [])
    with pytest.raises(KeyError, match="problem_id"):
        select_accepted([{"completion": "1"}], [Verdict(True, "1")])


"""Verifiers without gold: majority votes and pseudo-label precision, judge verdict parsing, training
sets without answers, question-preserving chunks, and where the report names the verifier."""

from __future__ import annotations

import json

import pytest

from imm_ray.config import ConfigError, load_config
from imm_ray.data import DatasetSpec, load_problems
from imm_ray.loop.summary import metrics_rows
from imm_ray.report.metrics import RunMetrics
from imm_ray.report.tables import rounds_table
from imm_ray.run.state import RunState
from imm_ray.storage import Location
from imm_ray.verify import (
    MajorityVerifier,
    Verdict,
    label_precision,
    majority_vote,
    needs_gold,
    parse_verdict,
    question_chunks,
    verify_rows,
)


@pytest.mark.parametrize(("answers", "min_agreement", "label", "votes"), [
    (["3", "3", "4", None], 0.5, "3", 2),
    (["1,000", "1000.0", "7", "7"], 0.5, "1000", 2),  # one vote per normalised answer; tie: first reached
    (["7", "1000", "1000", "7"], 0.5, "7", 2),
    (["3", "4", "5", None], 0.5, None, 1),  # 1 of 4 < half: no pseudo-label
    (["3", "4", "5", None], 0.0, "3", 1),
    ([None, None], 0.0, None, 0),
])
def test_majority_vote(answers, min_agreement, label, votes) -> None:
    vote = majority_vote(answers, min_agreement)
    assert (vote.label, vote.votes, vote.samples) == (label, votes, len(answers))


def _rows(*questions: tuple[str, str | None, list[str]]) -> list[dict]:
    return [{"problem_id": pid, "question": "q", "gold": gold, "sample": j, "completion": c}
            for pid, gold, completions in questions for j, c in enumerate(completions)]


def test_majority_accepts_the_samples_that_agree_and_never_reads_gold() -> None:
    rows = _rows(("a", "5", ["The answer is 5.", "so 6", "The answer is 5.0", "x"]),
                 ("b", None, ["The answer is 2", "The answer is 3", "4", "nothing"]))
    for row in rows[4:]:
        del row["gold"]  # a training set without answers
    verdicts = verify_rows(MajorityVerifier(min_agreement=0.5), rows)
    assert [v.correct for v in verdicts] == [True, False, True, False] + [False] * 4
    assert [v.extracted for v in verdicts[:4]] == ["5", "6", "5", None]
    assert not needs_gold("majority") and needs_gold("numeric")


def test_label_precision_counts_only_questions_with_gold() -> None:
    rows = _rows(("a", "5", ["5", "5"]), ("b", "2", ["3", "3"]), ("c", None, ["1", "1"]), ("d", "9", ["7", "8"]))
    verdicts = [Verdict(r["completion"] in ("5", "3", "1"), r["completion"]) for r in rows]
    assert label_precision(rows, verdicts) == {"labelled": 3, "label_precision": 0.5, "accepted_precision": 0.5}
    assert label_precision(rows[4:6], verdicts[4:6])["label_precision"] is None


def test_question_chunks_never_split_a_question() -> None:
    rows = _rows(("a", "1", ["x"] * 3), ("b", "1", ["x"] * 3), ("c", "1", ["x"] * 2))
    assert question_chunks(rows, 4) == [[0, 1, 2, 3, 4, 5], [6, 7]]
    assert question_chunks(rows, 1) == [[0, 1, 2], [3, 4, 5], [6, 7]]


@pytest.mark.parametrize(("text", "verdict"), [
    ("The steps add up.\nVerdict: yes", True),
    ("Verdict: yes at first... no, the sum is wrong.\nVerdict: **No**", False),
    ("I cannot tell.", None),
])
def test_parse_verdict_reads_the_last_verdict(text: str, verdict: bool | None) -> None:
    assert parse_verdict(text) is verdict


def test_training_set_without_answers_loads_only_for_a_verifier_without_gold(tmp_path) -> None:
    path = tmp_path / "own.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"question": "1+1?"}, {"question": "2+2?", "answer": "4"}]))
    spec = DatasetSpec(name="own", path=str(path))
    assert [p.answer for p in load_problems(spec, require_answer=False).problems] == [None, "4"]
    strict = load_problems(spec)
    assert ([p.answer for p in strict.problems], strict.malformed) == (["4"], 1)


def test_evaluation_refuses_a_verifier_without_gold() -> None:
    assert load_config(overrides=["verify.verifier=majority", "verify.min_agreement=0.75"]).verify.min_agreement == 0.75
    with pytest.raises(ConfigError, match="evaluation verifier"):
        load_config(overrides=["evaluate.verifier=majority"])


def test_report_names_the_verifier_and_its_label_precision() -> None:
    ev = {"status": "done", "seconds": 1.0, "info": {"datasets": {"gsm8k": {"accuracy": 0.5}}, "model": "m"}}
    ver = {"status": "done", "seconds": 1.0, "info": {
        "accepted": 3, "verifier": "majority", "gold_check": {"labelled": 2, "label_precision": 0.5}}}
    state = RunState.from_json({"stages": {"si/round-001/verify": ver, "si/round-001/evaluate": ev}})
    rows = metrics_rows(state, ["si"], 1)
    assert rows[0]["verifier"] == "majority" and rows[0]["gold_check"]["label_precision"] == 0.5
    head, _, line = rounds_table(RunMetrics(run_dir=Location("/tmp/run"), rows=rows, config=None)).splitlines()[:3]
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in line.strip("|").split("|")]))
    assert (cells["verifier"], cells["label precision"]) == ("majority", "50.0%")

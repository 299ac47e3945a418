"""Scoring greedy completions: counts, accuracy, unparseable, errors; the pure packages avoid Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imm_ray.data import DATA_DIR_ENV, DatasetSpec, Problem, load_problems
from imm_ray.evaluate import DatasetScore, score_completions, score_verdicts
from imm_ray.verify import NumericVerifier, Verdict

PROBLEMS = [
    Problem("t-0", "q0", "18", "toy"),
    Problem("t-1", "q1", "3", "toy"),
    Problem("t-2", "q2", "1234", "toy"),
    Problem("t-3", "q3", "0.5", "toy"),
    Problem("t-4", "q4", "7", "toy"),
]
COMPLETIONS = [
    "9 * 2 = 18. The answer is 18.",  # correct
    "The answer is 4.",  # wrong
    "The total is $1,234.",  # correct via last-number fallback
    "I cannot tell.",  # unparseable
    "#### 7.0",  # correct
]


def test_score_completions_counts() -> None:
    score = score_completions(PROBLEMS, COMPLETIONS)
    assert score == DatasetScore(dataset="toy", n=5, correct=3, accuracy=0.6, unparseable=1)
    assert score.to_dict()["accuracy"] == pytest.approx(0.6)


def test_score_completions_verifier_instance_and_dataset_name() -> None:
    loose = NumericVerifier(rel_tol=0.5)
    score = score_completions(PROBLEMS, COMPLETIONS, verifier=loose, dataset="named")
    assert (score.dataset, score.correct) == ("named", 4)  # 4 is within 50% of 3


def test_score_completions_length_mismatch_and_empty() -> None:
    with pytest.raises(ValueError, match="5 problems but 4 completions"):
        score_completions(PROBLEMS, COMPLETIONS[:4])
    assert score_completions([], []) == DatasetScore("", 0, 0, 0.0, 0)
    with pytest.raises(KeyError):
        score_completions(PROBLEMS, COMPLETIONS, verifier="unknown")


def test_score_verdicts() -> None:
    verdicts = [Verdict(True, "1"), Verdict(False, None), Verdict(False, "2"), Verdict(True, "3")]
    assert score_verdicts("x", verdicts) == DatasetScore("x", 4, 2, 0.5, 1)


def test_gold_rationales_score_perfectly_on_gsm8k_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference solutions end in '#### N': scoring them must give 100% (the whole test split
    is bundled with the package)."""
    import json

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    result = load_problems(DatasetSpec(name="gsm8k", preset="gsm8k"))
    problems = result.problems
    rationales = [json.loads(line)["answer"] for line in Path(result.source).read_text().splitlines()]
    score = score_completions(problems, rationales)
    assert (score.n, score.correct, score.unparseable) == (1319, 1319, 0)
    shifted = score_completions(problems, rationales[1:] + rationales[:1])
    assert shifted.correct < 100  # answers belong to their own question


def test_pure_packages_do_not_import_ray() -> None:
    code = (
        "import sys, imm_ray.data, imm_ray.verify, imm_ray.evaluate; "
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
        "sys.exit(1 if bad else 0)"
    )
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()

"""Synthetic arithmetic problems: determinism, answers recomputed from the numbers, the preset."""

from __future__ import annotations

import json

import pytest

from imm_ray.data import DataError, DatasetSpec, load_problems
from imm_ray.data.synthetic import (
    FAMILIES,
    SPLITS,
    apply_steps,
    generate_items,
    generate_problems,
    load_synthetic,
    split_items,
    write_synthetic_dataset,
)
from imm_ray.verify import extract_answer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deterministic_and_seed_dependent(family):
    first = generate_problems(family, seed=7, n=40)
    assert first == generate_problems(family, seed=7, n=40)
    assert generate_problems(family, seed=7, n=10) == first[:10]
    assert [p.question for p in generate_problems(family, seed=8, n=40)] != [p.question for p in first]
    assert len({p.question for p in first}) == 40
    assert [p.id for p in first[:2]] == [f"{family}-0", f"{family}-1"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_answers_recomputed_from_numbers(family):
    for item in generate_items(family, seed=3, n=60):
        answer = int(item.problem.answer)
        assert answer == apply_steps(item.start, item.steps)
        assert answer >= 0
        for number in [item.start] + [operand for _, operand in item.steps]:
            assert str(number) in item.problem.question or str(number) in item.solution
        # the reference solution ends with the answer the verifier extracts
        assert extract_answer(item.solution) == item.problem.answer
        # every intermediate value is a non-negative integer
        value = item.start
        for op, operand in item.steps:
            value = apply_steps(value, [(op, operand)])
            assert value >= 0


def test_family_operations():
    ops = {name: {op for item in generate_items(name, 0, 80) for op, _ in item.steps}
           for name in FAMILIES}
    assert ops["add-sub"] == {"+", "-"} and ops["reworded"] == {"+", "-"}
    assert ops["mul-div"] == {"*", "/"}
    assert all(len(item.steps) == 2 for item in generate_items("two-step", 0, 30))


def test_apply_steps_rejects_inexact_division():
    assert apply_steps(12, [("/", 4), ("*", 3), ("+", 1), ("-", 2)]) == 8
    with pytest.raises(ValueError):
        apply_steps(7, [("/", 2)])


def test_splits_are_disjoint_and_sized():
    train = {i.problem.question for i in split_items("train")}
    test = {i.problem.question for i in split_items("test")}
    assert len(train) == SPLITS["train"].n and len(test) == SPLITS["test"].n
    assert not train & test
    assert split_items("mul-div")[0].problem.dataset == "synthetic-mul-div"  # bare family name
    # a larger split keeps the problems a smaller one had first (earlier runs' sets are its prefix)
    assert [i.problem for i in split_items("test")[:200]] == \
        [i.problem for i in generate_items("add-sub", 1, 200, exclude=train, dataset="synthetic-test")]
    with pytest.raises(DataError, match="unknown synthetic split"):
        split_items("nope")


def test_load_synthetic_honours_window():
    spec = DatasetSpec(name="syn-test", preset="synthetic", split="test", offset=5, limit=3)
    result = load_synthetic(spec)
    assert [p.id for p in result.problems] == ["syn-test-5", "syn-test-6", "syn-test-7"]
    assert result.source == "synthetic:test"


def test_preset_reads_written_files(tmp_path):
    folder = write_synthetic_dataset(tmp_path, ["test", "ood-two-step"])
    row = json.loads((folder / "test.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"id", "question", "answer", "solution"}
    loaded = load_problems(DatasetSpec(name="syn", preset="synthetic", split="test", limit=4),
                           data_dir=tmp_path)
    expected = split_items("test")[:4]
    assert [p.question for p in loaded.problems] == [i.problem.question for i in expected]
    assert [p.answer for p in loaded.problems] == [i.problem.answer for i in expected]

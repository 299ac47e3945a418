"""Run directory: atomic writes, stage state, locking, metrics rows and the summary table."""

import json

import pytest

from imm_ray.loop.rundir import RunDir, RunLockedError, atomic_write_json, read_jsonl, write_jsonl
from imm_ray.loop.summary import format_table, metrics_rows


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    write_jsonl(tmp_path / "r.jsonl", [{"i": 1}, {"i": 2}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "x.json"]
    assert read_jsonl(tmp_path / "r.jsonl") == [{"i": 1}, {"i": 2}]


def test_failed_write_keeps_the_old_file(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"a": object()})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_stage_state_persists_and_started_is_not_done(tmp_path):
    rd = RunDir(tmp_path)
    rd.mark_started("imm/round-001/generate")
    assert not rd.is_done("imm/round-001/generate")
    rd.mark_done("imm/round-001/generate", 1.5, {"generated": 8})
    again = RunDir(tmp_path)
    assert again.is_done("imm/round-001/generate")
    assert again.stage("imm/round-001/generate")["info"] == {"generated": 8}
    assert again.round_dir("imm", 3) == tmp_path.resolve() / "imm" / "round-003"


def test_second_driver_is_refused(tmp_path):
    a, b = RunDir(tmp_path), RunDir(tmp_path)
    a.lock()
    with pytest.raises(RunLockedError, match="in use"):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()


def _done(info, seconds=1.0):
    return {"status": "done", "seconds": seconds, "info": info}


def test_metrics_rows_and_table_stop_at_the_first_unfinished_round():
    ev = {"model": "m", "datasets": {"gsm8k": {"accuracy": 0.25, "n": 4, "correct": 1, "unparseable": 0}}}
    stages = {
        "baseline/evaluate": _done(ev),
        "imm/round-001/generate": _done({"generated": 8}),
        "imm/round-001/verify": _done({"accepted": 3, "correct": 4, "questions_solved": 2}),
        "imm/round-001/sft": _done({"steps": 2}),
        "imm/round-001/merge": _done({}),
        "imm/round-001/evaluate": _done(ev, 2.0),
        "imm/round-002/generate": _done({"generated": 8}),
    }
    rows = metrics_rows({"stages": stages}, ["imm"], 2)
    assert [(r["arm"], r["round"]) for r in rows] == [("base", 0), ("imm", 1)]
    assert rows[1]["accepted"] == 3 and rows[1]["accuracy"] == {"gsm8k": 0.25}
    assert rows[1]["seconds"]["evaluate"] == 2.0
    table = format_table(rows)
    assert "25.0%" in table and "imm" in table

"""The per-round metrics rows and the log table carry each stage's seconds, tokens and tokens/s."""

from __future__ import annotations

from imm_ray.loop.summary import format_table, metrics_rows
from imm_ray.report.metrics import RunMetrics
from imm_ray.report.tables import rounds_table
from imm_ray.run.state import RunState
from imm_ray.storage import Location


def _done(seconds: float, **info) -> dict:
    return {"status": "done", "seconds": seconds, "info": info}


def _state() -> RunState:
    ev = {"datasets": {"gsm8k": {"accuracy": 0.25}}, "model": "m", "tokens": 400, "tokens_per_s": 200.0}
    return RunState.from_json({"stages": {
        "imm/round-001/generate": _done(10.0, generated=8, tokens=3000, tokens_per_s=300.0),
        "imm/round-001/verify": _done(1.0, accepted=3),
        "imm/round-001/sft": _done(20.0, skipped=False, tokens=1500, tokens_per_s=75.0),
        "imm/round-001/merge": _done(2.0),
        "imm/round-001/evaluate": _done(2.0, **ev),
    }})


def test_rows_record_tokens_and_rates_per_stage() -> None:
    (row,) = metrics_rows(_state(), ["imm"], 1)
    assert row["tokens"] == {"generate": 3000, "sft": 1500, "evaluate": 400}
    assert row["tokens_per_s"] == {"generate": 300.0, "sft": 75.0, "evaluate": 200.0}
    assert row["seconds"]["sft"] == 20.0


def test_log_table_shows_tokens_per_second() -> None:
    table = format_table(metrics_rows(_state(), ["imm"], 1))
    head, _, line = table.splitlines()
    assert "generate tok/s" in head and "sft tok/s" in head
    assert line.split()[-3:] == ["300", "75", "200"]


def test_report_table_shows_where_the_time_went() -> None:
    run = RunMetrics(run_dir=Location("/tmp/run"), rows=metrics_rows(_state(), ["imm"], 1),
                     config=None)
    table = rounds_table(run)
    head, _, line = table.splitlines()[:3]
    assert "sft tok/s" in head
    assert [c.strip() for c in line.strip("|").split("|")][-3:] == ["300", "75", "200"]

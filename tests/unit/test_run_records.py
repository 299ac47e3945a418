"""The records between stages keep the JSON form of the files the code before them wrote
(tests/fixtures/old_run), line for line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imm_ray.run import layout
from imm_ray.run.infos import INFO_TYPES, SFTInfo, VerifyInfo
from imm_ray.run.records import AcceptedRow, EvalSampleRow, SampleRow

OLD_RUN = Path(__file__).parents[1] / "fixtures" / "old_run"


@pytest.mark.parametrize(("name", "record"), [
    (layout.SAMPLES, SampleRow), (layout.ACCEPTED, AcceptedRow), (layout.EVAL_SAMPLES, EvalSampleRow)])
def test_rows_read_back_to_the_same_json(name: str, record: type) -> None:
    lines = [line for path in sorted(OLD_RUN.rglob(name)) for line in path.read_text().splitlines()]
    assert lines
    for line in lines:
        assert json.dumps(record.from_json(json.loads(line)).to_json()) == line


def test_a_sample_without_entropies_leaves_the_key_out() -> None:
    row = SampleRow("p", "d", "q?", "1", "<q?>", 0, "1.", "stop", 2)
    assert "token_entropies" not in row.to_json()
    assert SampleRow.from_json(row.to_json()) == row
    with pytest.raises(TypeError):
        SampleRow.from_json({"problem_id": "p"})


def test_stage_infos_read_back_to_the_same_json() -> None:
    state = json.loads((OLD_RUN / layout.STATE).read_text())
    for key, rec in state["stages"].items():
        info_type = INFO_TYPES[layout.parse_stage_key(key).stage]
        info = info_type.from_json(rec["info"])
        assert json.dumps(info.to_json()) == json.dumps(rec["info"]), key
    sft = SFTInfo.from_json(state["stages"]["imm/round-001/sft"]["info"])
    assert sft.skipped is False and sft.checkpoint.endswith("round-001/sft")
    assert VerifyInfo.from_json(state["stages"]["imm/round-001/verify"]["info"]).extra == {"train_pass@2": 1.0}


def test_a_built_info_writes_only_what_is_set() -> None:
    info = SFTInfo(skipped=True, reason="no accepted samples", examples=0)
    assert info.to_json() == {"skipped": True, "reason": "no accepted samples", "examples": 0}
    assert SFTInfo.from_json(info.to_json()) == info

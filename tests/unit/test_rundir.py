"""Run directory as the driver uses it: config changes on resume, run names, metrics rows, the summary table."""

import shutil

import pytest

from imm_ray.config import ConfigError, config_from_dict, config_to_yaml, load_run_config
from imm_ray.loop.driver import RoundDriver
from imm_ray.loop.summary import format_table, metrics_rows
from imm_ray.run import RunDir
from imm_ray.run.state import RunState
from imm_ray.storage import StorageError


def _save(cfg_tree: dict, run_dir) -> None:
    RoundDriver(config_from_dict(cfg_tree), run_dir)._save_config()


def test_config_may_change_freely_until_a_stage_that_uses_it_is_done(tmp_path):
    """Defect 10: a config that failed before any stage finished could never be fixed."""
    _save({"merge": {"seed": 1}}, tmp_path)
    _save({"merge": {"seed": 2}, "generate": {"temperature": 0.9}}, tmp_path)  # nothing done yet
    RunDir(tmp_path).mark_done("imm/round-001/generate", 1.0, {})
    _save({"merge": {"seed": 3}, "generate": {"temperature": 0.9}}, tmp_path)  # no merge done yet
    with pytest.raises(ConfigError, match="generate.temperature differs and finished stage "
                                          "imm/round-001/generate used it") as err:
        _save({"merge": {"seed": 4}, "generate": {"temperature": 0.5}}, tmp_path)
    assert "merge.seed" not in str(err.value)
    assert load_run_config(tmp_path).merge.seed == 3


@pytest.mark.parametrize("name", ["a/b", "..", "/etc", "~x", ""])
def test_run_name_must_be_one_folder(name):
    """Defect 13: run.name accepted '/', '..' and absolute paths."""
    with pytest.raises(ConfigError, match="run.name"):
        config_from_dict({"run": {"name": name}})


def test_run_yaml_reads_back_as_the_typed_config(tmp_path):
    cfg = config_from_dict({"run": {"rounds": 3}, "merge": {"seed": 4}})
    rd = RunDir(tmp_path)
    rd.write_config(config_to_yaml(cfg))
    assert load_run_config(tmp_path) == cfg


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
    rows = metrics_rows(RunState.from_json({"stages": stages}), ["imm"], 2)
    assert [(r["arm"], r["round"]) for r in rows] == [("base", 0), ("imm", 1)]
    assert rows[1]["accepted"] == 3 and rows[1]["accuracy"] == {"gsm8k": 0.25}
    assert rows[1]["seconds"]["evaluate"] == 2.0
    table = format_table(rows)
    assert "25.0%" in table and "imm" in table


def test_resume_with_other_inputs_is_refused(tmp_path, tiny_model_dir, tiny_data_dir):
    """Defect 14: the original model and the data files were not pinned, so a resume elsewhere could
    silently change them."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    cfg = config_from_dict({"model": {"ref": str(tiny_model_dir)}, "data": {
        "dir": str(data), "train": {"name": "t", "preset": "gsm8k", "split": "train"},
        "eval": [{"name": "e", "preset": "gsm8k", "split": "test"}]}})

    def pin() -> None:
        driver = RoundDriver(cfg, tmp_path / "run")
        driver.original = str(tiny_model_dir)
        driver._pin_inputs()

    pin()
    RunDir(tmp_path / "run").mark_done("baseline/evaluate", 1.0, {})
    pin()  # same inputs: fine
    test_file = data / "gsm8k" / "test.jsonl"
    test_file.write_text("".join(test_file.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(StorageError, match=r"inputs .* changed .*\(data:e\)"):
        pin()

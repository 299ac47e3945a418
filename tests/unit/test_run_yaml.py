"""run.yaml is a config you can run again: it reloads to the same data sets, old full-form run.yaml files
still read back right and resume, and ``imm analyze`` probes a run with the gold answers it ran with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from imm_ray.analysis.probes import probe_from_run
from imm_ray.config import (
    ConfigError,
    ImmConfig,
    config_from_dict,
    config_to_yaml,
    effective_tree,
    load_config,
    load_run_config,
)
from imm_ray.data import DataError, DatasetSpec, load_problems
from imm_ray.data.loaders import _field_map
from imm_ray.data.presets import get_dataset_preset
from imm_ray.loop.driver import RoundDriver
from imm_ray.run import RunDir
from tiny_model import TINY_PROBLEMS, write_tiny_dataset

SHIPPED = sorted((Path(__file__).resolve().parents[2] / "jobs/configs").glob("*.yaml"))


def _shipped_sets() -> list:
    """(config file, index of the data set in [train, *eval]) for every data set of every shipped config."""
    return [pytest.param(path, i, id=f"{path.stem}-{spec.name}")
            for path in SHIPPED
            for i, spec in enumerate(_specs(load_config(path)))]


def _specs(cfg: ImmConfig) -> list[DatasetSpec]:
    return [cfg.data.train, *cfg.data.eval]


def _rows(spec: DatasetSpec, data_dir: str | None) -> list[tuple[str, str, str]]:
    return [(p.id, p.question, p.answer) for p in load_problems(spec, data_dir=data_dir).problems]


def _old_run_yaml(cfg: ImmConfig) -> str:
    """run.yaml as written before it kept data sets as given: every field of every model written out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub source fails at once, as on a machine that cannot reach the hub."""
    def refuse(hub_id: str, config: str | None, split: str) -> list[dict]:
        raise ConnectionError("the hub is unreachable in tests")

    monkeypatch.setattr("imm_ray.data.loaders.iter_hub_rows", refuse)


@pytest.mark.parametrize("path, index", _shipped_sets())
def test_run_yaml_of_a_shipped_config_reloads_to_the_same_data_set(path, index, tmp_path, offline_hub):
    """The driver's run.yaml, read back by the run-dir reader and by ``imm run --config``, names the same
    data set: the same field values and field mapping, and (where it loads offline) the same problems."""
    cfg = load_config(path)
    (tmp_path / "run.yaml").write_text(config_to_yaml(cfg))
    spec = _specs(cfg)[index]
    preset = get_dataset_preset(spec.preset) if spec.preset else None
    for again in (load_run_config(tmp_path), load_config(tmp_path / "run.yaml")):
        assert effective_tree(again) == effective_tree(cfg)
        reloaded = _specs(again)[index]
        assert reloaded.model_dump() == spec.model_dump()
        for hub in (False, True):
            assert _field_map(reloaded, preset, hub) == _field_map(spec, preset, hub)
    try:
        rows = _rows(spec, cfg.data.dir)
    except DataError as exc:
        pytest.skip(f"{spec.name} does not load offline here: {exc}")
    assert rows and _rows(_specs(load_run_config(tmp_path))[index], cfg.data.dir) == rows


@pytest.fixture
def preset_data(tmp_path: Path) -> Path:
    """A data root with GSM8K-format (solution text, then '#### N') and SVAMP-format (input/target) sets."""
    root = tmp_path / "data"
    write_tiny_dataset(root / "gsm8k/train.jsonl", TINY_PROBLEMS)
    write_tiny_dataset(root / "gsm8k/test.jsonl", TINY_PROBLEMS[:4])
    (root / "svamp").mkdir()
    (root / "svamp/test.jsonl").write_text("".join(json.dumps({"input": q, "target": float(gold)}) + "\n"
                                                   for q, _, gold in TINY_PROBLEMS[4:]))
    return root


def _gsm8k_run(data_dir: Path, **sections: dict) -> ImmConfig:
    return config_from_dict({**sections, "data": {
        "dir": str(data_dir),
        "train": {"name": "gsm8k-train", "preset": "gsm8k", "split": "train"},
        "eval": [{"name": "gsm8k", "preset": "gsm8k", "split": "test", "limit": 3},
                 {"name": "svamp", "preset": "svamp", "split": "test"}]}})


def test_an_old_full_run_yaml_reads_back_with_the_presets_gold_answers(preset_data, tmp_path):
    cfg = _gsm8k_run(preset_data)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text(_old_run_yaml(cfg))
    golds = [gold for _, _, gold in TINY_PROBLEMS]
    for again in (load_run_config(run), load_config(run / "run.yaml")):
        assert effective_tree(again) == effective_tree(cfg)
        answers = [[p.answer for p in load_problems(spec, again.data.dir).problems] for spec in _specs(again)]
        assert answers == [golds, golds[:3], golds[4:]]


def test_a_resume_of_an_old_run_yaml_is_refused_only_for_a_real_change(preset_data, tmp_path):
    cfg = _gsm8k_run(preset_data)
    rd = RunDir(tmp_path / "run")
    for stage in ("generate", "verify", "sft", "merge", "evaluate"):
        rd.mark_done(f"imm/round-001/{stage}", 1.0, {})
    rd.write_config(_old_run_yaml(cfg))
    with pytest.raises(ConfigError, match=r"merge\.seed differs and finished stage imm/round-001/merge used it"):
        RoundDriver(_gsm8k_run(preset_data, merge={"seed": 1}), rd.root.uri)._save_config()
    explicit = _gsm8k_run(preset_data)
    explicit.data.eval[1].question_field = "question"  # the DatasetSpec default, no longer the preset's
    with pytest.raises(ConfigError, match=r"data\.eval differs and finished stage imm/round-001/evaluate"):
        RoundDriver(explicit, rd.root.uri)._save_config()
    RoundDriver(cfg, rd.root.uri)._save_config()  # the same run: resumes, and run.yaml takes the new form
    assert "question_field" not in rd.read_config_text() and effective_tree(load_run_config(rd.root)) == \
        effective_tree(cfg)


def test_load_run_config_names_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml does not exist: .* is not an imm run directory"):
        load_run_config(tmp_path)
    (tmp_path / "run.yaml").write_text("merge: {seed: [\n")
    with pytest.raises(ConfigError, match=r"run\.yaml is not valid YAML"):
        load_run_config(tmp_path)


def test_analyze_probes_a_gsm8k_run_with_numeric_gold_answers(preset_data, tmp_path):
    """The probe of ``imm analyze RUN_DIR`` comes from the run.yaml the driver wrote: GSM8K's gold answers
    are the numbers after '####', not the solution texts."""
    run = tmp_path / "run"
    RoundDriver(_gsm8k_run(preset_data), run)._save_config()
    probe, _ = probe_from_run(run, probe_size=8)
    assert [p.answer for p in probe.problems] == [gold for _, _, gold in TINY_PROBLEMS[:3]] == ["5", "3", "12"]

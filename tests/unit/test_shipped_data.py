"""The shipped configs' data sets load on a clean clone: no data folder, no IMM_DATA_DIR, no hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from imm_ray.config import load_config
from imm_ray.data import DATA_DIR_ENV, DatasetSpec, get_dataset_preset, load_problems
from imm_ray.data.bundled import bundled_split
from imm_ray.evaluate.probe import probe_split

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No data folder and a hub that refuses every call (as HF_HUB_OFFLINE=1 on a clean clone)."""
    def refuse(hub_id: str, config: str | None, split: str) -> list[dict]:
        raise AssertionError(f"the hub was asked for {hub_id} ({split})")

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("imm_ray.data.readers.load_hub_rows", refuse)


@pytest.mark.parametrize("name", ["demo", "compare-cpu", "study-cpu", "gpu-qwen2.5-0.5b"])
def test_every_data_set_of_a_local_config_loads_offline(name: str, offline: None) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.dir is None
    for spec in [cfg.data.train, *cfg.data.eval]:
        result = load_problems(spec, cfg.data.dir)
        expected = spec.limit if spec.limit is not None else len(result.problems)
        assert len(result.problems) == expected > 0 and result.malformed == 0, (spec.name, result.source)


def _reachable_from_a_node(spec: DatasetSpec) -> bool:
    """Bundled rows, a generated preset or a hub set: nothing that needs a file on the driver's disk."""
    if spec.path:
        return "://" in spec.path
    if spec.hub_id:
        return True
    preset = get_dataset_preset(spec.preset) if spec.preset else None
    if preset is None:
        return False
    bundled = bundled_split(preset.folder, spec.split)
    return bool(preset.hub_id or preset.builder or (bundled and bundled.holds(spec.offset, spec.limit)))


def test_the_paper_config_names_only_sets_a_cluster_reaches() -> None:
    cfg = load_config(CONFIGS / "paper-qwen2.5-0.5b.yaml")
    assert cfg.data.dir is None
    assert [s.name for s in [cfg.data.train, *cfg.data.eval] if not _reachable_from_a_node(s)] == []
    assert cfg.generate.temperature > 0 and cfg.generate.samples_per_question > 1


def test_the_study_reports_300_held_back_questions_per_set_for_four_arms(offline: None) -> None:
    """jobs/configs/study-cpu.yaml and the overrides `make study` gives its frontier runs: 5+ rounds,
    the in-domain set and 3+ OOD sets (a benchmark among them), each with 300+ questions besides the
    probe split the sweep scores its candidates on."""
    base = load_config(CONFIGS / "study-cpu.yaml")
    frontier = load_config(CONFIGS / "study-cpu.yaml", ["run.arms=[imm]", "merge.select=frontier"])
    assert "'run.arms=[imm]' merge.select=frontier" in (CONFIGS.parents[1] / "Makefile").read_text()
    assert base.run.rounds >= 5 and base.run.arms == ["si", "rest", "imm"] and base.merge.select == "fixed"
    assert frontier.run.arms == ["imm"] and frontier.merge.select == "frontier" and frontier.merge.sweep
    assert len(base.data.eval) >= 4 and any(s.preset != "synthetic" for s in base.data.eval[1:])
    for spec in base.data.eval:
        problems = load_problems(spec, base.data.dir).problems
        split = probe_split(spec.name, problems, base.merge.probe_fraction, base.merge.probe_seed)
        assert len(split.held_back) >= 300, spec.name

"""A run directory written by the code before the run layer (tests/fixtures/old_run) still reports,
serves and plans its resume: the run directory's files keep their format."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imm_ray.cli import main as imm_main
from imm_ray.config import ConfigError, config_from_run_yaml, load_run_config
from imm_ray.loop.driver import RoundDriver
from imm_ray.run import RunDir, layout
from imm_ray.run.arms import plan_round
from imm_ray.serve.catalog import read_catalog

OLD_RUN = Path(__file__).parents[1] / "fixtures" / "old_run"
_RESULTS = "## Results by round"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A writable copy of the fixture run directory."""
    return Path(shutil.copytree(OLD_RUN, tmp_path / "old_run"))


def test_imm_report_writes_the_same_report(old_run: Path) -> None:
    """The report's body (all but the header naming the folder and the date) is what the old code wrote."""
    before = (OLD_RUN / layout.REPORT).read_text()
    assert imm_main(["report", "--run-dir", str(old_run)]) == 0
    after = (old_run / layout.REPORT).read_text()
    assert _RESULTS in before
    assert after[after.index(_RESULTS):] == before[before.index(_RESULTS):]
    assert sorted(p.name for p in (old_run / layout.PLOTS).iterdir()) == [
        "accuracy.png", "accuracy_by_dataset.png", "diversity.png"]


def test_the_serve_catalog_offers_every_evaluated_round() -> None:
    catalog = read_catalog(OLD_RUN, arm="imm")
    assert catalog.ids() == ["old_run/round-0", "old_run/round-1", "old_run/round-2", "old_run/latest"]
    assert catalog.rounds[0] == Path("/OLD/model")
    assert catalog.resolve("old_run/latest") == (2, Path("/OLD/run/imm/round-002/merged"))


def test_the_resume_plan_reads_every_finished_stage(old_run: Path) -> None:
    rd = RunDir(old_run)
    state = rd.view()
    assert len(state.done_keys()) == 11  # the baseline and 5 stages of each of 2 rounds
    done = state.done_infos()
    for t in (1, 2):
        plan = plan_round("imm", t, done, current="prev", original="orig", round_output=lambda name: name)
        assert plan.next is None and plan.sft_skipped is False and plan.model == layout.MERGED
    plan = plan_round("imm", 3, done, current="r2", original="orig", round_output=lambda name: name)
    assert [s.name for s in plan.remaining] == ["generate", "verify", "sft", "merge", "evaluate"]


def test_a_resume_accepts_the_saved_config_and_refuses_a_changed_one(old_run: Path) -> None:
    cfg = load_run_config(old_run)
    assert cfg == config_from_run_yaml((OLD_RUN / layout.CONFIG).read_text())
    RoundDriver(cfg, old_run)._save_config()  # the same config: the resume goes on
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 3e-4})})
    with pytest.raises(ConfigError, match="train.lr differs and finished stage imm/round-001/sft used it"):
        RoundDriver(changed, old_run)._save_config()

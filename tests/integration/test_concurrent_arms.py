"""Two arms at once on a local cluster with room for both (``run.concurrent_arms``), each with its
own generator pool and SFT: the same samples, models and accuracies as one arm after another."""

from __future__ import annotations

import json

import pytest
from checkpoint_files import checkpoint_files
from tiny_run import tiny_run_config

from imm_ray.config import config_from_dict
from imm_ray.loop.driver import RoundDriver

pytestmark = pytest.mark.slow


def test_two_arms_at_once_equal_the_sequential_run(ray_local, tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    # ray_local has 4 CPUs: each arm holds its generator (1 CPU) and its SFT worker or merge (1 CPU).
    runs = {}
    for mode, concurrent in (("sequential", 1), ("concurrent", 0)):
        # fp32 SFT: with bf16 autocast on this CPU the two runs' SFT weights differed (max 2.8e-4).
        # No baseline: it is evaluated before any arm starts, alone, whatever concurrent_arms says.
        cfg = config_from_dict(tiny_run_config(tiny_model_dir, tiny_data_dir, train={"precision": "fp32"},
                                               run={"arms": ["imm", "si"], "concurrent_arms": concurrent},
                                               evaluate={"baseline": False}))
        with caplog.at_level("INFO", logger="imm_ray.loop.driver"):
            runs[mode] = RoundDriver(cfg, tmp_path / mode).run()
    assert "arms imm, si: 2 arms at once" in caplog.text

    seq, conc = runs["sequential"], runs["concurrent"]
    assert [(r["arm"], r["round"]) for r in conc] == [("imm", 1), ("si", 1)]
    assert [r["accuracy"] for r in conc] == [r["accuracy"] for r in seq]
    for arm in ("imm", "si"):
        folder = f"{arm}/round-001"
        assert (tmp_path / "concurrent" / folder / "samples.jsonl").read_text() == \
            (tmp_path / "sequential" / folder / "samples.jsonl").read_text()
        assert (tmp_path / "concurrent" / folder / "sft/model.safetensors").read_bytes() == \
            (tmp_path / "sequential" / folder / "sft/model.safetensors").read_bytes()
    assert checkpoint_files(tmp_path / "concurrent/imm/round-001/merged") == \
        checkpoint_files(tmp_path / "sequential/imm/round-001/merged")

    stages = json.loads((tmp_path / "concurrent/state.json").read_text())["stages"]
    started = {key: s["finished_at"] - s["seconds"] for key, s in stages.items()}
    # The arms overlapped: each generated while the other was still in its round.
    assert started["si/round-001/generate"] < stages["imm/round-001/evaluate"]["finished_at"]
    assert started["imm/round-001/generate"] < stages["si/round-001/evaluate"]["finished_at"]

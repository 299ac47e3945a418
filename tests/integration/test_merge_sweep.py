"""merge.sweep + merge.select: frontier on the tiny model: the candidates scored on the probe split in the
running engine, the chosen merge recorded and reported, the reported accuracy on the held-back rest, and
a sweep interrupted mid-way resumed without redoing the candidates it scored."""

from __future__ import annotations

import json
import logging

import pytest
from tiny_run import tiny_run_config

from imm_ray.config import config_from_dict
from imm_ray.loop import driver as driver_mod
from imm_ray.loop.driver import RoundDriver
from imm_ray.storage import read_jsonl

pytestmark = pytest.mark.slow

LAMS = [0.0, 0.5, 1.0]


def test_a_frontier_sweep_is_recorded_reported_and_resumed(ray_local, tiny_model_dir, tiny_data_dir, tmp_path,
                                                          monkeypatch, caplog):
    eval_sets = [{"name": "tiny-id", "path": str(tiny_data_dir / "gsm8k/train.jsonl"), "answer_format": "gsm8k"},
                 {"name": "tiny-ood", "path": str(tiny_data_dir / "gsm8k/test.jsonl"), "answer_format": "gsm8k"}]
    cfg = config_from_dict(tiny_run_config(tiny_model_dir, tiny_data_dir, data={"eval": eval_sets},
                                           merge={"sweep": LAMS, "select": "frontier"}))
    merges = []

    def merge_then_die(*args, **kwargs):
        if len(merges) == 1:
            raise RuntimeError("killed during the sweep")
        merges.append(args)
        return real_merge(*args, **kwargs)

    real_merge = driver_mod.merge_remote
    monkeypatch.setattr(driver_mod, "merge_remote", merge_then_die)
    with pytest.raises(RuntimeError, match="killed during the sweep"):
        RoundDriver(cfg, tmp_path).run()
    sweep = tmp_path / "imm/round-001/sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.suffix == ".json") == ["00.json", "start.json"]
    scored = {name: (sweep / name).stat().st_mtime_ns for name in ("00.json", "start.json")}
    monkeypatch.undo()

    with caplog.at_level(logging.INFO, logger="imm_ray.generate.actors"):
        rows = RoundDriver(cfg, tmp_path).run()
    # One engine start for the rest of the sweep, the merge and the evaluation: each model swapped in.
    assert sum(r.getMessage().startswith("starting ") for r in caplog.records) == 1
    assert sum(r.getMessage().startswith("moving generator actors") for r in caplog.records) >= 2
    assert {name: (sweep / name).stat().st_mtime_ns for name in scored} == scored  # not scored again
    assert sorted(p.name for p in sweep.iterdir()) == ["00.json", "01.json", "02.json", "start.json"]  # no checkpoint

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    base, imm = lines
    swept = imm["sweep"]
    assert swept["select"] == "frontier" and "half" in swept["rule"]
    assert [c["params"]["lam"] for c in swept["candidates"]] == LAMS
    assert all(0 <= c["id"] <= 1 and 0 <= c["ood"] <= 1 for c in [swept["start"], *swept["candidates"]])
    chosen = swept["chosen"]["params"]
    assert chosen == swept["candidates"][swept["chosen"]["index"]]["params"]
    state = json.loads((tmp_path / "state.json").read_text())["stages"]
    assert state["imm/round-001/merge"]["info"]["params"] == chosen  # the round's model is the chosen merge

    # The reported evaluations (baseline and round) hold the held-back questions only.
    split = json.loads((tmp_path / "probe_split.json").read_text())["sets"]
    assert split["tiny-id"]["probe_n"] == 4 and split["tiny-ood"]["probe_n"] == 2
    assert swept["probe_n"] == {"tiny-id": 4, "tiny-ood": 2}
    for row, folder in ((base, "baseline"), (imm, "imm/round-001")):
        evaluated = {(r["dataset"], r["problem_id"]) for r in read_jsonl(tmp_path / folder / "eval_samples.jsonl")}
        probe = {(name, qid) for name, s in split.items() for qid in s["probe"]}
        assert evaluated and not evaluated & probe
        assert {name: d["n"] for name, d in row["eval"].items()} == {"tiny-id": 4, "tiny-ood": 2}
    assert rows == lines

    report = (tmp_path / "report.md").read_text()
    assert "## Merge sweep" in report and "frontier.png" in report and (tmp_path / "plots/frontier.png").is_file()
    marked = [line for line in report.splitlines() if line.startswith("| imm | 1 |") and line.endswith("| chosen |")]
    assert len(marked) == 1 and marked[0].startswith(f"| imm | 1 | lam={chosen['lam']:g} |")

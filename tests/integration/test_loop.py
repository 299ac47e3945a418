"""One full IMM round through real Ray actors, Ray Train and a Ray merge task; resume after failure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from imm_ray.config import ConfigError, config_from_dict
from imm_ray.loop import driver as driver_mod
from imm_ray.loop.driver import RoundDriver
from imm_ray.loop.rundir import read_jsonl

pytestmark = pytest.mark.slow


def tiny_config(model_dir: Path, data_dir: Path, **over) -> dict:
    """A run config on the tiny memorising model: 1 round, all arms, the hf engine."""
    tree = {
        "run": {"name": "tiny", "rounds": 1, "arms": ["imm", "si", "rest"], "progress": False},
        "model": {"ref": str(model_dir)},
        "data": {
            "dir": str(data_dir),
            "train": {"name": "tiny-train", "preset": "gsm8k", "split": "train"},
            "eval": [
                {"name": "tiny-test", "preset": "gsm8k", "split": "test"},
                {"name": "tiny-ood", "path": str(data_dir / "gsm8k" / "test.jsonl"), "answer_format": "gsm8k"},
            ],
            "instruction_suffix": "",
        },
        "generate": {
            "engine": {"name": "hf", "dtype": "float32", "batch_size": 16},
            "samples_per_question": 2, "temperature": 0.7, "max_tokens": 40, "chunk_size": 4,
        },
        "train": {"epochs": 2, "lr": 1e-4, "micro_batch_size": 4, "effective_batch_size": 4, "max_length": 128},
        "merge": {"params": {"lam": 0.5, "drop_rate": 0.2}},
        "evaluate": {"max_tokens": 40},
    }
    for key, value in over.items():
        tree[key] = {**tree[key], **value}
    return tree


@pytest.fixture(scope="module")
def one_round(ray_local, tiny_model_dir, tiny_data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = config_from_dict(tiny_config(tiny_model_dir, tiny_data_dir))
    rows = RoundDriver(cfg, run_dir).run()
    return run_dir, rows


def test_one_round_of_every_arm(one_round, tiny_model_dir):
    run_dir, rows = one_round
    assert [(r["arm"], r["round"]) for r in rows] == [("base", 0), ("imm", 1), ("si", 1), ("rest", 1)]
    base, imm, si, rest = rows
    assert base["accuracy"]["tiny-test"] >= 0.5  # the tiny model memorised its problems
    for row in (imm, si, rest):
        assert row["generated"] == 16 and 0 < row["accepted"] <= 16
        assert set(row["accuracy"]) == {"tiny-test", "tiny-ood"}
        assert row["sft"]["steps"] >= 1
        assert set(row["seconds"]) >= {"generate", "verify", "sft", "evaluate"}
        assert 0 < row["diversity"]["distinct_1"] <= 1 and row["diversity"]["distinct_answers"] >= 1
        assert 0 <= row["diversity"]["mean_token_entropy"] <= math.log(20)  # top-20 entropy, on by default
        lo, hi = row["eval"]["tiny-test"]["accuracy_ci95"]
        assert lo <= row["accuracy"]["tiny-test"] <= hi
    assert "merge" in imm["seconds"] and "merge" not in si["seconds"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(rows))

    accepted = read_jsonl(run_dir / "imm/round-001/accepted.jsonl")
    assert accepted and all(r["extracted"] is not None for r in accepted)
    merged = run_dir / "imm/round-001/merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    # The merge moved the weights towards the SFT model without landing on either end.
    orig = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(run_dir / "imm/round-001/sft").state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    merged_w = model.state_dict()[name]
    assert not torch.equal(merged_w, orig[name]) and not torch.equal(merged_w, sft[name])
    assert (run_dir / "run.yaml").exists() and (run_dir / "baseline/eval.json").exists()


def test_resume_redoes_only_the_interrupted_stage(one_round, tiny_model_dir, tiny_data_dir, monkeypatch):
    run_dir, _ = one_round
    round1 = run_dir / "imm/round-001/samples.jsonl"
    mtime = round1.stat().st_mtime_ns
    cfg = config_from_dict(tiny_config(tiny_model_dir, tiny_data_dir, run={"rounds": 2}))

    def broken_sft(*args, **kwargs):
        (run_dir / "imm/round-002/sft").mkdir(parents=True)
        (run_dir / "imm/round-002/sft/half-written.bin").write_bytes(b"x")
        raise RuntimeError("killed during SFT")

    monkeypatch.setattr(driver_mod, "run_sft", broken_sft)
    with pytest.raises(RuntimeError, match="killed during SFT"):
        RoundDriver(cfg, run_dir).run()
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    assert state["imm/round-002/verify"]["status"] == "done"
    assert state["imm/round-002/sft"]["status"] == "started"
    gen2 = (run_dir / "imm/round-002/samples.jsonl").stat().st_mtime_ns

    monkeypatch.undo()
    rows = RoundDriver(cfg, run_dir).run()
    assert [(r["arm"], r["round"]) for r in rows] == [
        ("base", 0), ("imm", 1), ("imm", 2), ("si", 1), ("si", 2), ("rest", 1), ("rest", 2)]
    sft_from = {(r["arm"], r["round"]): Path(r["sft"]["init_model"]) for r in rows if r["round"]}
    assert sft_from[("imm", 2)] == run_dir / "imm/round-001/merged"  # IMM: from the merged model
    assert sft_from[("si", 2)] == run_dir / "si/round-001/sft"  # SI: from the previous SFT
    assert sft_from[("rest", 2)] == sft_from[("rest", 1)] == Path(tiny_model_dir).resolve()  # ReST: original
    gen = json.loads((run_dir / "state.json").read_text())["stages"]["rest/round-002/generate"]["info"]
    assert Path(gen["model"]) == run_dir / "rest/round-001/sft"  # ...on data the current model wrote
    assert round1.stat().st_mtime_ns == mtime  # round 1 never redone
    assert (run_dir / "imm/round-002/samples.jsonl").stat().st_mtime_ns == gen2  # nor round 2's generation
    assert not (run_dir / "imm/round-002/sft/half-written.bin").exists()
    assert (run_dir / "imm/round-002/merged/config.json").exists()


def test_resume_with_another_config_is_refused(one_round, tiny_model_dir, tiny_data_dir):
    run_dir, _ = one_round
    cfg = config_from_dict(tiny_config(tiny_model_dir, tiny_data_dir, merge={"seed": 7}))
    with pytest.raises(ConfigError, match="merge.seed"):
        RoundDriver(cfg, run_dir).run()


def test_distillation_teacher_writes_the_data(ray_local, tiny_model_dir, scrambled_model, tiny_data_dir, tmp_path):
    """A teacher that knows the answers writes the data for a student that knows nothing."""
    tree = tiny_config(scrambled_model, tiny_data_dir, run={"arms": ["imm"]}, evaluate={"baseline": False})
    tree["model"]["teacher"] = str(tiny_model_dir)
    rows = RoundDriver(config_from_dict(tree), tmp_path).run()
    gen = json.loads((tmp_path / "state.json").read_text())["stages"]["imm/round-001/generate"]["info"]
    assert gen["generator"] == "teacher" and Path(gen["model"]) == Path(tiny_model_dir).resolve()
    assert rows[0]["accepted"] > 0  # the scrambled student alone would get nothing right
    assert Path(rows[0]["sft"]["init_model"]) == Path(scrambled_model).resolve()
    merge = json.loads((tmp_path / "state.json").read_text())["stages"]["imm/round-001/merge"]["info"]
    assert Path(merge["anchor"]) == Path(scrambled_model).resolve()  # merged with the student's own weights

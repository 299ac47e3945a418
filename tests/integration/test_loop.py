"""One full IMM round through real Ray actors, Ray Train and a Ray merge task; resume after failure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from checkpoint_files import checkpoint_files
from tiny_run import tiny_run_config
from transformers import AutoModelForCausalLM

from imm_ray.config import ConfigError, config_from_dict, deep_merge
from imm_ray.evaluate import read_ledger
from imm_ray.loop import driver as driver_mod
from imm_ray.loop.driver import RoundDriver
from imm_ray.report import write_report
from imm_ray.storage import (
    is_published,
    materialize,
    read_jsonl,
    read_text,
    resolve,
)
from imm_ray.storage.fs import list_files

pytestmark = pytest.mark.slow


def tiny_config(model_dir: Path, data_dir: Path, **over: dict) -> dict:
    """The tiny run (tests/tiny_run.py) with all arms, an OOD eval set beside the in-domain one and
    2 evaluation samples per question (pass@k)."""
    eval_sets = [{"name": "tiny-test", "preset": "gsm8k", "split": "test"},
                 {"name": "tiny-ood", "path": str(data_dir / "gsm8k" / "test.jsonl"), "answer_format": "gsm8k"}]
    return tiny_run_config(model_dir, data_dir, **deep_merge(
        {"run": {"arms": ["imm", "si", "rest"]}, "data": {"eval": eval_sets},
         "evaluate": {"samples": 2, "temperature": 1.0}}, over))


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
    verdicts = {(v["problem_id"], v["sample"]): v for v in read_jsonl(run_dir / "imm/round-001/verdicts.jsonl")}
    assert len(verdicts) == 16 and all(verdicts[r["problem_id"], r["sample"]]["correct"] for r in accepted)
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

    # The per-question ledger: greedy verdicts and 2 samples per question, matching eval.json's metrics.
    ledger = read_ledger(read_jsonl(run_dir / "imm/round-001/eval_samples.jsonl"))
    assert ledger is not None and set(ledger.greedy) == {"tiny-test", "tiny-ood"} and ledger.k("tiny-test") == 2
    test_eval = imm["eval"]["tiny-test"]
    assert test_eval["k"] == 2 and test_eval["pass@k"] == pytest.approx(ledger.pass_at("tiny-test", 2))
    assert sum(ledger.greedy["tiny-test"].values()) == test_eval["correct"]
    text = read_text(write_report(run_dir))
    assert all(f"## {s}" in text for s in ("Per-question ledger", "pass@k", "Paired comparison of arms"))


def test_resume_redoes_only_the_interrupted_stage(one_round, tiny_model_dir, tiny_data_dir, monkeypatch):
    run_dir, _ = one_round
    round1 = run_dir / "imm/round-001/samples.jsonl"
    mtime = round1.stat().st_mtime_ns
    cfg = config_from_dict(tiny_config(tiny_model_dir, tiny_data_dir, run={"rounds": 2}))

    def broken_sft(*args, **kwargs):
        (run_dir / "imm/round-002/sft").mkdir(parents=True)
        (run_dir / "imm/round-002/sft/half-written.bin").write_bytes(b"x")
        # What a kill -9 leaves: rank 0's work folder and Ray Train's run folder (removed on a plain error).
        (run_dir / "imm/round-002/.sft.tmp-killed").mkdir(parents=True)
        (run_dir / "imm/round-002/.sft.tmp-ray-train/sft-killed/checkpoint_000000").mkdir(parents=True)
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
    assert not list((run_dir / "imm/round-002").glob(".*tmp*"))  # defect 12: no temp sibling left
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



@pytest.fixture(scope="module")
def s3_round(one_round, s3_endpoint, tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The imm arm's round on s3:// (same seeds as one_round), with its own node cache and scratch."""
    import boto3

    work = tmp_path_factory.mktemp("s3-node")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": s3_endpoint, "IMM_FORWARD_CREDENTIALS": "1",  # the loopback server's keys
           "IMM_NODE_CACHE_DIR": str(work / "cache"),
           "IMM_SCRATCH_DIR": str(work / "scratch")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="imm-loop")
        uri = "s3://imm-loop/runs/tiny"
        cfg = config_from_dict(tiny_config(tiny_model_dir, tiny_data_dir, run={"arms": ["imm"]}))
        rows = RoundDriver(cfg, uri).run()
        yield uri, rows, work, mp


def test_round_on_s3_is_byte_identical_to_the_local_round(one_round, s3_round, record_property):
    run_dir, local_rows = one_round
    uri, rows, work, _ = s3_round
    assert [(r["arm"], r["round"]) for r in rows] == [("base", 0), ("imm", 1)]
    root = resolve(uri)
    assert is_published(root / "imm/round-001/merged") and is_published(root / "imm/round-001/sft")
    merged = materialize(root / "imm/round-001/merged")
    assert checkpoint_files(merged) == checkpoint_files(run_dir / "imm/round-001/merged")
    files = set(list_files(root))
    assert {"run.yaml", "state.json", "state.json.bak", "metrics.jsonl", "driver.log", "report.md",
            "baseline/eval.json", "imm/round-001/samples.jsonl", "imm/round-001/accepted.jsonl",
            "imm/round-001/eval.json", "original/manifest.json"} <= files
    assert not [f for f in files if ".tmp" in f or "ray-train" in f or f.startswith(".lease")]
    assert not list((work / "scratch").glob("*"))  # no work folder left on the driver node (if it made one)
    state = json.loads(read_text(root / "state.json"))["stages"]
    assert state["imm/round-001/merge"]["info"]["checkpoint"] == f"{uri}/imm/round-001/merged"
    assert rows[1]["accuracy"] == local_rows[1]["accuracy"]
    record_property("seconds_local", local_rows[1]["seconds"])  # what storage adds, per stage (--junitxml)
    record_property("seconds_s3", rows[1]["seconds"])

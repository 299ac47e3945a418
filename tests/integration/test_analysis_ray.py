"""`imm analyze` through Ray tasks on the tiny model with a fabricated run directory, then the report."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from imm_ray.analysis.cli import add_analyze_arguments, run_analyze_cli
from imm_ray.config import config_from_dict, config_to_yaml
from imm_ray.report import write_report
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow  # ray_local: tests/integration/conftest.py


def _round_model(src: Path, dst: Path, scale: float, layer: str) -> None:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    for name, tensor in weights.items():
        if layer in name:
            weights[name] = tensor + scale * torch.randn(tensor.shape, generator=gen)
    save_file(weights, str(dst / "model.safetensors"))


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysis-run")
    (root / "run.yaml").write_text(config_to_yaml(config_from_dict({  # as the driver writes it
        "run": {"name": "tiny-analysis", "rounds": 1, "arms": ["imm", "si"]},
        "model": {"ref": str(tiny_model_dir)},
        "data": {"dir": str(tiny_data_dir), "prompt_template": "chat", "instruction_suffix": "",
                 "eval": [{"name": "tiny-test", "preset": "gsm8k", "split": "test"}]},
        "evaluate": {"max_tokens": 16},
    })))
    _round_model(tiny_model_dir, root / "imm/round-001/sft", 0.02, ".layers.1.")
    _round_model(tiny_model_dir, root / "imm/round-001/merged", 0.01, ".layers.1.")
    _round_model(tiny_model_dir, root / "si/round-001/sft", 0.02, ".layers.0.")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"problem_id": f"p{i}", "prompt": tok.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True), "completion": s}
        for i, (q, s, _) in enumerate(TINY_PROBLEMS)]
    (root / "imm/round-001/accepted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [{"round": 0, "arm": "base", "accuracy": {"tiny-test": 1.0},
                "eval": {"tiny-test": {"accuracy": 1.0, "n": 4}}, "seconds": {"evaluate": 1.0}}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return root


def test_analyze_run_through_ray_tasks(ray_local, run_dir, tiny_model_dir):
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    assert run_analyze_cli(parser.parse_args([str(run_dir), "--probe-size", "4"])) == 0
    result = json.loads((run_dir / "analysis.json").read_text())
    assert result["original"] == str(tiny_model_dir)
    imp = result["importance"]
    assert imp["baseline"]["accuracy"] == 1.0
    assert imp["probe"]["references"] == len(TINY_PROBLEMS)
    assert imp["probe"]["references_source"].endswith("accepted.jsonl")
    assert [row["layer"] for row in imp["layers"]] == [0, 1]
    assert all(row["loss_rise"] > 0 for row in imp["layers"])
    labels = [(m["arm"], m["round"], m["kind"]) for m in result["models"]]
    assert labels == [("imm", 1, "sft"), ("imm", 1, "merged"), ("si", 1, "sft")]
    imm_sft, imm_merged, si_sft = (m["change"] for m in result["models"])
    assert imm_sft["per_layer"][0] == 0.0 and imm_sft["per_layer"][1] > imm_merged["per_layer"][1] > 0
    assert si_sft["per_layer"][1] == 0.0 and si_sft["per_layer"][0] > 0
    assert set(result["models"][0]["spearman"]) == {"accuracy_drop", "loss_rise"}

    text = write_report(run_dir).local_path().read_text()
    assert "## Layer analysis" in text
    assert (run_dir / "plots" / "layer_change.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_and_report_a_run_on_s3(ray_local, run_dir, s3_bucket, tiny_model_dir):
    """The same run on S3: the Ray tasks materialize the published checkpoints (never a half-uploaded
    one), and analysis.json, report.md and the plots are written back to the bucket."""
    from imm_ray.storage import publish_dir, read_json, resolve
    from imm_ray.storage.fs import list_files, upload_file

    root = resolve(s3_bucket) / "analysis-run"
    publish_dir(tiny_model_dir, root / "original")
    for rel in ("imm/round-001/sft", "imm/round-001/merged", "si/round-001/sft"):
        publish_dir(run_dir / rel, root / rel)
    for name in ("run.yaml", "metrics.jsonl", "imm/round-001/accepted.jsonl"):
        upload_file(run_dir / name, root / name)
    for f in (run_dir / "si/round-001/sft").iterdir():  # an upload that never finished: no manifest
        upload_file(f, root / "si/round-002/sft" / f.name)

    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    assert run_analyze_cli(parser.parse_args([root.uri, "--probe-size", "4"])) == 0
    result = read_json(root / "analysis.json")
    assert result["original"] == (root / "original").uri and result["run_dir"] == root.uri
    assert [(m["arm"], m["round"], m["kind"], m["model"]) for m in result["models"]] == [
        ("imm", 1, "sft", f"{root.uri}/imm/round-001/sft"), ("imm", 1, "merged", f"{root.uri}/imm/round-001/merged"),
        ("si", 1, "sft", f"{root.uri}/si/round-001/sft")]
    from imm_ray.analysis.change import parameter_change

    local = parameter_change(tiny_model_dir, run_dir / "imm/round-001/merged").to_dict()
    merged = result["models"][1]["change"]  # the same bytes: the same numbers (summed in another order)
    assert merged["per_layer"] == pytest.approx(local["per_layer"], rel=1e-9) and merged["per_layer"][1] > 0
    assert merged["total"] == pytest.approx(local["total"], rel=1e-9)
    assert result["importance"]["probe"]["references_source"] == f"{root.uri}/imm/round-001/accepted.jsonl"
    assert result["importance"]["baseline"]["accuracy"] == 1.0

    assert write_report(root.uri).uri == f"{root.uri}/report.md"
    assert {"report.md", "plots/layer_change.png"} <= set(list_files(root))

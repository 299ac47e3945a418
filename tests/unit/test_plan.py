"""`imm plan`: parameter counts against real models, the per-worker SFT terms, node types, the
shipped 7B config's verdict, and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from imm_ray.cli import main
from imm_ray.config import load_config
from imm_ray.errors import UserError
from imm_ray.plan import GIB, KNOWN_MODELS, ModelDims, model_dims, node_type_for, plan_stages, sft_parts

REPO = Path(__file__).resolve().parents[2]


def real_params(folder: Path) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("ref", ["tiny", "embedded:smollm2-135m-instruct"])
def test_parameter_count_matches_the_model(ref, tiny_model_dir):
    folder = tiny_model_dir if ref == "tiny" else None
    dims = model_dims(str(folder) if folder else ref)
    if folder is None:
        from imm_ray.models import resolve_model

        folder = resolve_model(ref)
    assert dims.params == real_params(folder)


def test_known_qwen_sizes_are_the_published_ones():
    # Qwen2.5 model cards: 0.49B and 7.61B parameters; the config numbers give them exactly.
    assert model_dims("Qwen/Qwen2.5-0.5B-Instruct").params == 494_032_768
    assert model_dims("Qwen/Qwen2.5-7B-Instruct").params == 7_615_616_512
    with pytest.raises(UserError, match="give model.ref as a local folder"):
        model_dims("someone/unknown-model")


def test_fsdp_shards_weights_grads_and_optimizer_over_the_workers():
    dims = ModelDims.from_config(KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"])
    args = dict(micro_batch_size=2, max_length=512, bf16=True, checkpointing=True, device="gpu")
    ddp = sft_parts(dims, "ddp", 8, **args)
    fsdp = [sft_parts(dims, "fsdp", n, **args) for n in (2, 8)]
    assert ddp["optimizer"] == pytest.approx(8 * dims.params / GIB)
    assert fsdp[0]["optimizer"] == pytest.approx(4 * fsdp[1]["optimizer"])
    assert fsdp[1]["grads"] == pytest.approx(4 * dims.params / 8 / GIB)
    assert ddp["activations"] == fsdp[1]["activations"]
    unchecked = sft_parts(dims, "fsdp", 8, **{**args, "checkpointing": False})
    assert unchecked["activations"] > 2 * fsdp[1]["activations"]


def test_node_type_is_the_first_that_offers_the_request():
    types = {"cpu-node": {"CPU": 16}, "gpu-node": {"CPU": 8, "GPU": 1}}
    assert node_type_for({"CPU": 4, "GPU": 1}, types) == "gpu-node"
    assert node_type_for({"CPU": 4, "GPU": 0}, types) == "cpu-node"
    assert node_type_for({"CPU": 4, "GPU": 2}, types).startswith("none offers")
    assert node_type_for({"CPU": 4}, {}) == "any"


def test_7b_config_ddp_does_not_fit_24gb_and_fsdp_over_8_does():
    cfg = load_config(str(REPO / "jobs/configs/paper-qwen2.5-7b.yaml"), [])
    sft = {e.strategy: e for e in plan_stages(cfg, model_dims(cfg.model.ref), 24.0, 256.0, False)
           if e.stage == "sft"}
    assert (sft["ddp"].workers, sft["fsdp"].workers) == (8, 8)
    assert not sft["ddp"].fits and sft["ddp"].total_gb > 100
    assert sft["fsdp"].fits and 15 < sft["fsdp"].total_gb <= 24


def test_serve_engines_sharing_a_gpu_beyond_95_percent_do_not_fit():
    cfg = load_config(None, ["serve.num_gpus=1", "serve.engine.gpu_memory_utilization=0.4"])
    serve = [e for e in plan_stages(cfg, model_dims("Qwen/Qwen2.5-0.5B-Instruct"), 80.0, 64.0, False)
             if e.stage == "serve"][0]
    assert not serve.fits and "GPU share 1.20" in serve.note  # resident 2 + 1 spare, 0.4 each


def test_imm_plan_prints_every_stage(capsys):
    assert main(["plan", "--config", str(REPO / "jobs/configs/paper-qwen2.5-7b.yaml"), "--host-gb", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model Qwen/Qwen2.5-7B-Instruct: 7.616B parameters")
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:]}
    assert rows[("sft", "ddp")][6] == "NO" and rows[("sft", "fsdp")][6] == "yes"
    assert {row[0] for row in rows.values()} == {"sft", "generate+evaluate", "merge", "serve"}


def test_the_merge_is_planned_as_streamed_not_whole_models():
    """The merge engine streams tensors: a 7B merge fits a 16 GiB host (whole fp32 models would need 85 GiB)."""
    cfg = load_config(REPO / "jobs/configs/paper-qwen2.5-7b.yaml")
    merge = [e for e in plan_stages(cfg, model_dims("Qwen/Qwen2.5-7B-Instruct"), 24.0, 16.0, False)
             if e.stage == "merge"][0]
    assert merge.fits and 4 < merge.total_gb < 16


def test_imm_plan_unknown_hub_model_is_one_line(capsys):
    assert main(["plan", "model.ref=someone/unknown-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imm plan: error:") and "local folder" in err[0]

"""One engine-settings model: validation, and command-line flags generated from its fields."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from imm_ray.evaluate.cli import add_eval_arguments, settings_from_args
from imm_ray.generate.settings import EngineSettings, add_settings_arguments, settings_from_namespace


def test_engine_settings_validate():
    with pytest.raises(ValidationError, match="unknown engine 'vlm'"):
        EngineSettings(name="vlm")
    with pytest.raises(ValidationError, match="extra"):
        EngineSettings(max_num_seqs=4)
    with pytest.raises(ValidationError):
        EngineSettings(gpu_memory_utilization=1.5)


def test_every_field_has_a_flag_and_round_trips():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = {a.dest for a in parser._actions} - {"help"}
    assert flags == {f"engine_{f}" for f in EngineSettings.model_fields} - {"engine_extra"}
    args = parser.parse_args(["--engine", "hf", "--dtype", "float32", "--max-model-len", "512",
                              "--kv-cache-gb", "1.5", "--no-enforce-eager", "--seed", "7"])
    assert settings_from_namespace(args) == EngineSettings(name="hf", dtype="float32", max_model_len=512,
                                                           kv_cache_gb=1.5, enforce_eager=False, seed=7)
    assert settings_from_namespace(parser.parse_args([])) == EngineSettings()


def test_imm_eval_flags_come_from_the_model():
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--model", "m", "--dataset", "gsm8k", "--engine", "hf", "--batch-size", "4",
                              "--no-enforce-eager", "--seed", "3"])
    settings = settings_from_args(args)
    assert settings.engine == "hf"
    assert settings.engine_options == EngineSettings(name="hf", dtype="auto", batch_size=4, enforce_eager=False, seed=3)


def test_run_config_and_serving_embed_the_same_model():
    from imm_ray.config import load_config
    from imm_ray.serve.settings import ServeSettings

    cfg = load_config(None, ["generate.engine.enforce_eager=false", "serve.engine.enforce_eager=false"])
    assert isinstance(cfg.generate.engine, EngineSettings) and cfg.generate.engine.enforce_eager is False
    assert isinstance(cfg.serve.engine, EngineSettings) and cfg.serve.engine.enforce_eager is False
    # serving's own defaults (a smaller KV cache and GPU share, batch 8), and its shorthands
    assert ServeSettings().engine == EngineSettings(kv_cache_gb=1.0, gpu_memory_utilization=0.3, batch_size=8)
    s = ServeSettings(engine="hf", dtype="float32", max_model_len=256)
    assert s.engine == EngineSettings(name="hf", dtype="float32", max_model_len=256, kv_cache_gb=1.0,
                                      gpu_memory_utilization=0.3, batch_size=8)
    with pytest.raises(ValidationError, match="unknown engine"):
        ServeSettings(engine="nope")


def test_every_vllm_start_gets_the_swap_extension_and_the_cpu_env_without_overriding_the_callers(monkeypatch):
    import torch

    from imm_ray.generate.vllm_engine import cpu_engine_env, prepare_engine
    from imm_ray.generate.vllm_swap import EXTENSION

    if torch.cuda.is_available():
        pytest.skip("the CPU build's environment is set on CPU machines only")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")  # the caller's own setting
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)  # restored after the test
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    options = EngineSettings(kv_cache_gb=3, max_model_len=512, extra={"max_num_seqs": 8, "worker_extension_cls": "a.B"})
    start = prepare_engine(Path("/models/m"), options, disable_log_stats=True)
    assert not start.gpu
    assert start.kwargs["worker_extension_cls"] == EXTENSION  # extra cannot drop the swap's re-pack
    assert (start.kwargs["model"], start.kwargs["max_model_len"], start.kwargs["max_num_seqs"]) == ("/models/m", 512, 8)
    assert start.kwargs["disable_log_stats"] is True and "gpu_memory_utilization" not in start.kwargs
    assert "block_size" not in start.kwargs  # vLLM's own unless set
    assert prepare_engine(Path("/models/m"), EngineSettings(block_size=64)).kwargs["block_size"] == 64
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == cpu_engine_env(3)["VLLM_CPU_OMP_THREADS_BIND"]
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"  # a compiled CPU engine reuses torch.compile's cache


def test_kv_block_size_is_checked_for_the_cpu_engine():
    from imm_ray.generate.vllm_engine import kv_block_size

    assert kv_block_size(EngineSettings(), gpu=False) is None  # vLLM's own default
    assert kv_block_size(EngineSettings(block_size=64), gpu=False) == 64
    assert kv_block_size(EngineSettings(block_size=16), gpu=True) == 16
    with pytest.raises(ValueError, match="CPU attention takes multiples of 32"):
        kv_block_size(EngineSettings(block_size=48), gpu=False)
    with pytest.raises(ValidationError, match="multiple of 16"):
        EngineSettings(block_size=24)
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert settings_from_namespace(parser.parse_args(["--block-size", "64"])).block_size == 64
    assert settings_from_namespace(parser.parse_args([])).block_size is None


def test_enforce_eager_unset_is_eager_on_cpu_and_graphs_on_gpu():
    assert EngineSettings().eager(gpu=False) is True and EngineSettings().eager(gpu=True) is False
    assert EngineSettings(enforce_eager=False).eager(gpu=False) is False
    assert EngineSettings(enforce_eager=True).eager(gpu=True) is True
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert settings_from_namespace(parser.parse_args([])).enforce_eager is None
    assert settings_from_namespace(parser.parse_args(["--enforce-eager"])).enforce_eager is True


@pytest.mark.parametrize("key", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallel_engines_are_refused_when_the_config_loads(key):
    from imm_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"extra.{key}=2 is not supported.*generate.num_actors"):
        load_config(None, [f"generate.engine.extra={{{key}: 2}}"])
    assert EngineSettings(extra={key: 1}).extra == {key: 1}


def test_serve_refuses_gpu_engines_that_claim_more_than_the_gpu():
    from imm_ray.errors import UsageError
    from imm_ray.serve.deploy import build_application
    from imm_ray.serve.settings import ServeSettings, check_gpu_share

    check_gpu_share(ServeSettings(num_gpus=1))  # the defaults: 2 resident + 1 spare x 0.3 = 0.9
    check_gpu_share(ServeSettings(engine={"gpu_memory_utilization": 0.9}))  # CPU replicas: no GPU share
    with pytest.raises(UsageError, match=r"= 1\.20 of a GPU, more than 0\.95 .*serve\.resident_models"):
        build_application(ServeSettings(num_gpus=1, engine={"gpu_memory_utilization": 0.4}), "/nowhere")
    with pytest.raises(UsageError, match=r"= 0\.90 of a GPU, more than 0\.47"):
        check_gpu_share(ServeSettings(num_gpus=0.5))

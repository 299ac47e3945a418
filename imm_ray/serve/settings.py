"""Typed settings of the serving app: the ``serve`` section of the config tree."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imm_ray.errors import UsageError
from imm_ray.generate.settings import EngineSettings

# The most of one GPU a replica's vLLM engines may take together: the rest is the CUDA context,
# activations and the allocator's slack, which gpu_memory_utilization does not count.
GPU_SHARE_LIMIT = 0.95


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of the model replicas (used when ``enabled``)."""

    enabled: bool = False
    """Let Ray Serve add and remove replicas with the load (num_replicas is then ignored)."""
    min_replicas: int = Field(1, ge=0)
    """Fewest replicas."""
    max_replicas: int = Field(2, ge=1)
    """Most replicas."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Requests in flight per replica that autoscaling aims at."""

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class LimitSettings(_Strict):
    """Bounds on what one request may ask for."""

    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body in bytes (larger: 413)."""
    max_prompt_tokens: int = Field(1536, ge=1)
    """Longest prompt in tokens."""
    max_tokens: int = Field(512, ge=1)
    """Upper bound of a request's max_tokens (also its default)."""
    max_n: int = Field(4, ge=1)
    """Most completions per request (n)."""
    max_stop: int = Field(4, ge=0)
    """Most stop strings per request."""


# 0.3 of a GPU each: the default 2 resident engines and 1 spare take 0.9 of it (under GPU_SHARE_LIMIT).
_SERVE_ENGINE = {"kv_cache_gb": 1.0, "gpu_memory_utilization": 0.3, "batch_size": 8}


class ServeSettings(_Strict):
    """Everything ``imm serve`` / ``serve run services.app:app`` / the driver need to serve a run."""

    enabled: bool = False
    """The driver starts the serving app itself and serves every round as it finishes."""
    run_dir: str | None = None
    """Run directory whose rounds are served (default: the driver's run directory)."""
    run_name: str | None = None
    """Model-id prefix (<run_name>/round-N); default: the run directory's name."""
    arm: Literal["imm", "si", "rest"] = "imm"
    """The arm whose rounds are served (as <run_name>/round-N)."""
    host: str = "127.0.0.1"
    """Listen address of the HTTP API."""
    port: int = Field(8000, ge=1, le=65535)
    """Listen port of the HTTP API."""
    app_name: str = "imm"
    """Name of the Ray Serve application."""
    route_prefix: str = "/"
    """URL prefix of the API (the routes are <prefix>v1/...)."""
    engine: EngineSettings = EngineSettings(**_SERVE_ENGINE)
    """Inference engine of the replicas, over serving's defaults (a smaller KV cache and GPU share); engine: hf
    and flat engine keys (dtype: float32) are accepted as shorthand."""
    resident_models: int = Field(2, ge=1)
    """Engines kept loaded per replica (the latest round included)."""
    spare_engines: int = Field(1, ge=0)
    """Idle engines kept warm: a new round is swapped into one in well under a second instead of starting an
    engine (GPU; vLLM on CPU restarts the spare)."""
    load_on_demand: bool = True
    """Load a round that is not resident when a request asks for it (False: 404)."""
    poll_interval_s: float = Field(2.0, gt=0)
    """How often the replicas look for new rounds in the run directory."""
    num_replicas: int = Field(1, ge=1)
    """Model replicas (each with its own engines) when autoscaling is off."""
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    """Ray Serve autoscaling of the replicas."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves for each replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs (fractions allowed) Ray reserves for each replica."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Concurrent requests per replica."""
    max_queued_requests: int = Field(64, ge=-1)
    """Waiting requests per caller before 429 (-1: unbounded)."""
    retry_after_s: int = Field(1, ge=0)
    """Retry-After seconds sent with 429 and 503 answers."""
    api_keys_file: str | None = None
    """File of API keys, one per line (IMM_API_KEYS, comma-separated, adds more); none: no authentication."""
    limits: LimitSettings = LimitSettings()
    """Bounds on what one request may ask for."""

    @model_validator(mode="before")
    @classmethod
    def _engine_shorthand(cls, data: Any) -> Any:
        """``engine: NAME`` and flat engine keys go into ``engine``, over serving's engine defaults."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        engine = data.get("engine", {})
        if isinstance(engine, str):
            engine = {"name": engine}
        if isinstance(engine, dict):
            flat = {k: data.pop(k) for k in list(data) if k in EngineSettings.model_fields}
            data["engine"] = {**_SERVE_ENGINE, **flat, **engine}
        return data


def engines_gpu_share(s: ServeSettings) -> float:
    """The share of one GPU a replica's engines may take together (resident and spare)."""
    return (s.resident_models + s.spare_engines) * s.engine.gpu_memory_utilization


def check_gpu_share(s: ServeSettings) -> None:
    """Refuse, before anything starts, a GPU replica whose vLLM engines together would claim more than
    :data:`GPU_SHARE_LIMIT` of the GPU share it reserves: the last engine to start would fail on memory."""
    if s.num_gpus <= 0 or s.engine.name != "vllm":
        return
    share, limit = engines_gpu_share(s), GPU_SHARE_LIMIT * min(s.num_gpus, 1.0)
    if share > limit:
        raise UsageError(
            f"serve: {s.resident_models} resident + {s.spare_engines} spare engines x "
            f"serve.engine.gpu_memory_utilization {s.engine.gpu_memory_utilization} = {share:.2f} of a GPU, more "
            f"than {limit:.2f} (serve.num_gpus {s.num_gpus} x {GPU_SHARE_LIMIT}); lower "
            "serve.engine.gpu_memory_utilization, serve.resident_models or serve.spare_engines")

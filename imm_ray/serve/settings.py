"""Typed settings of the serving app: the ``serve`` section of the config tree."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imm_ray.generate.settings import EngineSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of the model replicas (used when ``enabled``)."""

    enabled: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class LimitSettings(_Strict):
    """Bounds on what one request may ask for."""

    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_prompt_tokens: int = Field(1536, ge=1)
    max_tokens: int = Field(512, ge=1, description="upper bound of a request's max_tokens (also its default)")
    max_n: int = Field(4, ge=1)
    max_stop: int = Field(4, ge=0)


_SERVE_ENGINE = {"kv_cache_gb": 1.0, "gpu_memory_utilization": 0.4, "batch_size": 8}


class ServeSettings(_Strict):
    """Everything ``imm serve`` / ``serve run services.app:app`` / the driver need to serve a run."""

    enabled: bool = False  # the driver starts the app itself when True
    run_dir: str | None = None  # default: the driver's run directory
    run_name: str | None = None  # model-id prefix; default: the run directory's name
    arm: Literal["imm", "si", "rest"] = "imm"  # whose rounds are ``<run>/round-N``
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "imm"
    route_prefix: str = "/"
    # engines: the one engine-settings model; ``engine: hf`` and flat engine keys (``dtype: float32``)
    # are accepted as shorthand, over serving's defaults (a smaller KV cache and GPU share)
    engine: EngineSettings = EngineSettings(**_SERVE_ENGINE)
    resident_models: int = Field(2, ge=1, description="engines kept loaded per replica (latest included)")
    spare_engines: int = Field(1, ge=0, description="idle engines kept warm: a new round is swapped into one "
                                                     "in well under a second instead of starting an engine "
                                                     "(GPU; vLLM on CPU restarts the spare)")
    load_on_demand: bool = True  # a non-resident round is loaded on request; else 404
    poll_interval_s: float = Field(2.0, gt=0)
    # scaling
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1, description="concurrent requests per replica")
    max_queued_requests: int = Field(64, ge=-1, description="waiting requests per caller before 429; -1 = unbounded")
    retry_after_s: int = Field(1, ge=0)
    # safety
    api_keys_file: str | None = None  # one key per line; IMM_API_KEYS (comma-separated) is added
    limits: LimitSettings = LimitSettings()

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

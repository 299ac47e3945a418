"""SFT settings (defaults = the paper preset) and the stage's error type."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imm_ray.placement import custom_resources


class SFTError(RuntimeError):
    """The SFT stage cannot run or training failed."""


class SFTSettings(BaseModel):
    """Full fine-tune settings; defaults follow the authors' scripts (see docs/method.md)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1)
    lr: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    micro_batch_size: int = Field(4, ge=1)
    effective_batch_size: int = Field(64, ge=1)
    max_length: int = Field(512, ge=2)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    # Custom Ray resources per worker, e.g. {node_2: 0.01} to pin the workers to that node.
    resources: dict[str, float] = {}
    seed: int = 0
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    save_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    log_every_steps: int = Field(10, ge=1)
    # Pack examples into rows of up to max_length tokens (attention and positions restart per
    # example); False pads each micro-batch of micro_batch_size examples to its longest one.
    packing: bool = True
    # Worker failures Ray Train recovers from by restarting the workers from the last resume
    # checkpoint (from the start without one); 0 fails at once and writes no resume checkpoints.
    max_failures: int = Field(1, ge=0)
    # Resume checkpoints every N optimizer steps; 0: at the end of an epoch (not the last), once
    # checkpoint_min_interval_s of training passed since the last checkpoint. A checkpoint is the
    # weights plus optimizer state (1.6 GB for SmolLM2-135M, 7-10 s on 2 CPU cores): a short
    # stage restarted from its start after a failure costs less than writing one every epoch.
    checkpoint_every_steps: int = Field(0, ge=0)
    checkpoint_min_interval_s: float = Field(120.0, ge=0)

    @field_validator("resources")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v)

    def worker_resources(self) -> dict[str, float]:
        """What each Ray Train worker asks of Ray (``ScalingConfig.resources_per_worker``)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {}), **self.resources}

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each worker (at least 1)."""
        return max(1, self.effective_batch_size // (self.micro_batch_size * world_size))

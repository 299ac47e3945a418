"""SFT settings (defaults = the paper preset) and the stage's error type."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imm_ray.placement import custom_resources


class SFTError(RuntimeError):
    """The SFT stage cannot run or training failed."""


class SFTSettings(BaseModel):
    """Full fine-tune settings; the defaults are the paper authors' (3 epochs, lr 2e-5, cosine, warm-up 0.03, no
    weight decay, effective batch 64, length 512: see the paper's appendix and its released scripts)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    epochs: int = Field(3, ge=1)
    """Passes over the round's accepted answers."""
    lr: float = Field(2e-5, gt=0)
    """Peak learning rate (AdamW)."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of the optimizer steps spent warming the learning rate up from 0."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after the warm-up."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples (with packing: packed rows) per forward/backward pass on each worker."""
    effective_batch_size: int = Field(64, ge=1)
    """Examples per optimizer step over all workers (gradient accumulation makes up the difference)."""
    max_length: int = Field(512, ge=2)
    """Longest training example in tokens (prompt + answer); longer ones are truncated."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Training precision (auto: bf16 where the hardware supports it, else fp32); bf16 is autocast under ddp,
    bf16 parameters and gradients with fp32 gradient reductions under fsdp."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (data-parallel)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every worker holds the whole model, gradients and AdamW state (about 16 bytes a parameter);
    fsdp: FSDP2 shards them over the workers (about 16/num_workers bytes a parameter, see `imm plan`)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (less memory,
    about a third more compute)."""
    use_gpu: bool = False
    """Give each worker one GPU."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs Ray reserves for each worker."""
    resources: dict[str, float] = {}
    """Custom Ray resources per worker, e.g. {node_2: 0.01} to pin the workers to that node (flat here,
    unlike the actor stages' <stage>.resources.resources, because CPUs and GPUs have their own keys above)."""
    seed: int = 0
    """Seed of the example order and of torch's random numbers."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the gradient norm to this (0: no clipping)."""
    save_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of the saved checkpoint (auto: the original model's)."""
    log_every_steps: int = Field(10, ge=1)
    """Log the loss every n optimizer steps."""
    packing: bool = True
    """Pack a step's examples into rows no longer than its longest example (attention and positions restart
    per example); False pads each micro-batch of micro_batch_size examples to its longest one."""
    max_failures: int = Field(1, ge=0)
    """Worker failures Ray Train recovers from by restarting the workers from the last resume checkpoint
    (from the start without one); 0 fails at once and writes no resume checkpoints."""
    checkpoint_every_steps: int = Field(0, ge=0)
    """Resume checkpoints every n optimizer steps; 0: at the end of an epoch (not the last), once
    checkpoint_min_interval_s of training passed since the last one (a checkpoint is the weights plus
    optimizer state: 1.6 GB for SmolLM2-135M, 7-10 s on 2 CPU cores)."""
    checkpoint_min_interval_s: float = Field(120.0, ge=0)
    """With checkpoint_every_steps 0: least seconds of training between two end-of-epoch checkpoints (a short
    stage restarted from its start after a failure costs less than writing one every epoch)."""

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

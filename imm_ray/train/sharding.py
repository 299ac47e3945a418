"""How the SFT workers hold the model: DDP replicas or FSDP2 shards, and their checkpoints.

``ddp``: every rank holds the whole fp32 model, its gradients and AdamW state (about 16 bytes a
parameter) and bf16 comes from autocast. ``fsdp``: torch's FSDP2 (``fully_shard``) on every decoder
layer, then on the root (embeddings, final norm and a tied LM head), so each rank keeps 1/world of
the parameters, gradients and optimizer state (DTensors: AdamW's state is sharded with them) and
all-gathers one layer at a time. FSDP2 rather than Ray Train's ``prepare_model(parallel_strategy=
"fsdp")``: Ray's wraps FSDP1 (flat parameters, auto-wrap policies), while FSDP2 is torch's current
API, shards per parameter as DTensors that ``torch.distributed.checkpoint`` saves shard by shard,
and takes mixed precision as a policy (bf16 parameters and gradients, fp32 reductions).

Each worker still loads the whole fp32 model into host memory before sharding it (4 bytes a
parameter per worker, 30 GB for 7B; loading on rank 0 only and broadcasting the shards would not).

Resume checkpoints are ``torch.distributed.checkpoint`` folders for both strategies: each rank
writes its own shards (DDP's replicated tensors once, by rank 0) into its own folder, and Ray Train
merges the ranks' folders into one checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import ray.train.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from imm_ray.train.settings import SFTError


def shard_model(model: PreTrainedModel, strategy: str, device: torch.device, bf16: bool,
                world_size: int) -> torch.nn.Module:
    """The model to train, on ``device``: DDP-wrapped (plain on one worker) for ``ddp``; sharded in
    place with FSDP2 for ``fsdp`` (bf16 parameters and gradients, fp32 reductions when ``bf16``)."""
    if strategy == "ddp":
        return ray.train.torch.prepare_model(model)  # moves to device; DDP when world_size > 1
    # No model.to(device): fully_shard moves one layer at a time, so the whole fp32 model never
    # sits on the accelerator (only in host memory, as loaded).
    mesh = init_device_mesh(device.type, (world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise SFTError(f"train.strategy fsdp: {type(model).__name__} names no decoder layer "
                       "class (_no_split_modules); use train.strategy ddp")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Under DDP, reduce gradients over the workers in this backward pass only if ``enabled``
    (gradient accumulation reduces once, on a step's last micro-batch). FSDP reduce-scatters every
    micro-batch: skipping it would keep whole unsharded gradients on every rank until the last one
    (4 bytes a parameter: the memory sharding saves), for one reduction fewer per micro-batch."""
    if enabled or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm``; returns the norm before clipping (sharded
    gradients give a sharded norm, made whole here)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def save_resume_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       folder: Path) -> None:
    """Write this rank's part of the weights and AdamW state to ``folder`` (a collective)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)


def load_resume_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       folder: Path) -> None:
    """Load this rank's part of the weights and AdamW state from a merged checkpoint ``folder``."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def full_model(model: torch.nn.Module, unwrapped: PreTrainedModel, model_dir: Path,
               rank: int) -> PreTrainedModel | None:
    """The whole trained model as a plain CPU model on rank 0, None on the others (a collective
    under FSDP: rank 0 gathers the shards into a model built without weights, ties re-made)."""
    if not isinstance(model, FSDPModule):
        return unwrapped if rank == 0 else None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    dist.barrier()
    if rank != 0:
        return None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(unwrapped.config, dtype=torch.float32)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    with contextlib.suppress(OSError):  # a model folder without generation_config.json
        plain.generation_config = GenerationConfig.from_pretrained(model_dir)
    return plain

"""The Ray Train worker loop: full fine-tune of a causal LM on tokenized SFT examples.

Config keys (built by `imm_ray.train.trainer.run_sft`): ``model`` (Location of the start
model), ``out`` (Location rank 0 publishes the final HF folder to), ``examples`` (object ref to
a list of TokenizedExample), ``pad_id`` (int), ``save_dtype`` (torch dtype name), ``settings``
(SFTSettings as a dict), ``fit_started`` (wall-clock time the driver started the trainer) and
``crash_after_step`` (test hook, see `CRASH_ENV`). Workers may run on any node: each
materializes ``model`` into its node's cache, and rank 0 builds the output in its node's
scratch space (or a temporary sibling of a local ``out``) and publishes it, manifest last.

Sharding: ``settings.strategy`` (see `imm_ray.train.sharding`): DDP replicas or FSDP2 shards.

Fault tolerance: with ``settings.max_failures > 0`` the workers report a checkpoint (each rank
its shards of weights and optimizer, rank 0 also scheduler and progress; uploaded asynchronously)
every ``checkpoint_every_steps`` steps, or else at the end of an epoch (not the last) once
``checkpoint_min_interval_s`` of training passed since the last one; a restarted worker group
resumes from the latest one (from the start without one).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from imm_ray.devices import cpu_has_bf16
from imm_ray.storage import is_published, materialize, publish_dir, work_dir_for
from imm_ray.train.batches import Batch, micro_batches, plan_epoch, steps_per_epoch
from imm_ray.train.schedule import lr_factor, warmup_steps
from imm_ray.train.settings import SFTSettings
from imm_ray.train.sft_data import IGNORE_INDEX, TokenizedExample
from imm_ray.train.sharding import (
    clip_gradients,
    full_model,
    gradient_sync,
    load_resume_shards,
    save_resume_shards,
    shard_model,
)

logger = logging.getLogger(__name__)

STATE_FILE = "sft_state.json"
RESUME_FILE = "train_state.pt"
# Test hook: "STEP:MARKER" makes rank 0 exit hard once after optimizer step STEP (the marker
# file records that it happened, so the restarted worker trains on).
CRASH_ENV = "IMM_SFT_CRASH_AFTER_STEP"


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to run forward/backward under bf16 autocast ("auto": if the hardware has bf16)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def batch_loss_sum(model: torch.nn.Module, batch: Batch, autocast: bool) -> torch.Tensor:
    """Forward one micro-batch (padded or packed) and return its summed next-token cross entropy
    (fp32) over the response tokens, under bf16 autocast if ``autocast``. The LM head runs only
    at positions that predict a response token in some row (`logits_to_keep`): prompt and padding
    positions cost no vocabulary-sized logits."""
    labels = batch["labels"]
    predicts = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if not len(predicts):  # no response token at all: keep every position (loss 0)
        predicts = torch.arange(labels.size(1) - 1, device=labels.device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast(device_type=labels.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**inputs, use_cache=False, logits_to_keep=predicts).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                           labels[:, predicts + 1].reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _global_sums(values: list[float], device: torch.device, distributed: bool) -> list[float]:
    """Sum scalars across workers (identity on a single worker)."""
    if not distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _accumulate(model: torch.nn.Module, batches: list[Batch], device: torch.device,
                autocast: bool, world_size: int, input_tokens: int) -> tuple[float, float, float]:
    """Forward/backward every micro-batch of one optimizer step; returns (loss sum, response
    tokens, input tokens), each summed over all workers. Gradients end up as the mean over the
    response tokens."""
    distributed = world_size > 1
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    targets, inputs = _global_sums([float(local_targets), float(input_tokens)], device,
                                   distributed)
    targets = max(targets, 1.0)
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        with gradient_sync(model, i == len(batches) - 1):
            micro_loss = batch_loss_sum(model, batch, autocast)
            # DDP and FSDP average gradients over workers, hence the world_size factor.
            (micro_loss * (world_size / targets)).backward()
        loss_sum += micro_loss.item()
    (loss_sum,) = _global_sums([loss_sum], device, distributed)
    return loss_sum, targets, inputs


@dataclass
class Progress:
    """What a resumed worker needs besides weights and optimizer: where it stopped."""

    step: int = 0
    input_tokens: float = 0.0
    epoch_loss: float = 0.0
    epoch_tokens: float = 0.0
    final_loss: float = float("nan")
    resumes: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _checkpoint_due(settings: SFTSettings, step: int, total: int, per_epoch: int,
                    since_last_s: float, device: torch.device, world_size: int) -> bool:
    """Whether to report a resume checkpoint after optimizer step `step` (never after the last):
    every ``checkpoint_every_steps`` steps, or else at an epoch end once some worker has trained
    ``checkpoint_min_interval_s`` since the last checkpoint (redoing less costs less than writing
    weights and optimizer state). Every worker gets the same answer (a collective at epoch ends)."""
    if settings.max_failures == 0 or step >= total:
        return False
    if settings.checkpoint_every_steps:
        return step % settings.checkpoint_every_steps == 0
    if step % per_epoch:
        return False
    waited = float(since_last_s >= settings.checkpoint_min_interval_s)
    return _global_sums([waited], device, world_size > 1)[0] > 0


def _report_resume_checkpoint(rank: int, model: torch.nn.Module,
                              optimizer: torch.optim.Optimizer, scheduler: Any,
                              progress: Progress) -> None:
    """Every rank writes its shards of weights and optimizer state, rank 0 also scheduler and
    progress, into a folder of its own, and reports it (a barrier); Ray Train merges the folders
    into one checkpoint and uploads them while training goes on (and deletes them after)."""
    folder = Path(tempfile.mkdtemp(prefix="imm-sft-resume-"))
    save_resume_shards(model, optimizer, folder)
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "progress": asdict(progress)},
                   folder / RESUME_FILE)
    ray.train.report({"step": progress.step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_dir_name=f"step-{progress.step:06d}",
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)
    if rank == 0:
        logger.info("SFT: resume checkpoint after step %d", progress.step)


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> Progress | None:
    """Load the latest resume checkpoint of this run (after a worker failure) into the model,
    optimizer and scheduler and return its progress; None without one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        load_resume_shards(model, optimizer, Path(folder))
        state = torch.load(Path(folder) / RESUME_FILE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    return Progress(**state["progress"])


def _maybe_crash(spec: str | None, step: int, rank: int) -> None:
    """The CRASH_ENV test hook: exit the worker process hard, once, after the checkpoints reported so far
    are committed. Uploads are asynchronous: a kill while one is in flight loses that checkpoint (the
    group resumes from an earlier one), so without the wait the step a test resumes from would depend on
    how fast the storage is."""
    if not spec or rank != 0:
        return
    at, marker = spec.split(":", 1)
    if step == int(at) and not os.path.exists(marker):
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        Path(marker).touch()
        logger.warning("SFT: test hook %s: worker exits after step %d", CRASH_ENV, step)
        os._exit(1)


def _save_hf(model: PreTrainedModel, model_dir: Path, folder: Path, save_dtype: str) -> None:
    """Write a Hugging Face folder: safetensors weights (ties kept), config, generation config
    and the start model's tokenizer."""
    model.to(getattr(torch, save_dtype))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)


def _peak_rss_mb(device: torch.device, world_size: int) -> list[float]:
    """Every rank's peak resident memory so far, in MiB, by rank (a collective)."""
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if world_size == 1:
        return [mine]
    peaks = torch.zeros(world_size, dtype=torch.float64, device=device)
    peaks[dist.get_rank()] = mine
    dist.all_reduce(peaks)
    return [round(p, 1) for p in peaks.tolist()]


def _publish_final(config: dict[str, Any], model: PreTrainedModel | None, model_dir: Path,
                   rank: int, state: dict[str, Any]) -> None:
    """Rank 0 writes the final HF folder of ``model`` (None on the other ranks), with `state` (plus
    save seconds) as STATE_FILE, on its own node and publishes it to ``config["out"]`` (skipped
    when an earlier attempt of this run already published it). Every rank reports."""
    out = config["out"]
    if rank == 0 and is_published(out):
        logger.warning("SFT: %s was already published by an earlier attempt of this run", out)
    elif rank == 0:
        work = work_dir_for(out)
        try:
            start = time.perf_counter()
            _save_hf(model, model_dir, work, config["save_dtype"])
            state["save_seconds"] = time.perf_counter() - start
            (work / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            publish_dir(work, out, move=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ray.train.report({})


@dataclass
class Trainee:
    """One worker's training objects: the model as loaded (``plain``; sharded in place under
    FSDP), the model to call (``model``: DDP-wrapped or FSDP-sharded), optimizer and schedule."""

    plain: PreTrainedModel
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    progress: Progress


def _build(model_dir: Path, settings: SFTSettings, device: torch.device, bf16: bool,
           world_size: int, total_steps: int) -> Trainee:
    """Load the start model, shard or replicate it, and restore the latest resume checkpoint."""
    plain: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if settings.activation_checkpointing:
        plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = shard_model(plain, settings.strategy, device, bf16, world_size)
    # One fused kernel for all parameters (CPU and CUDA): 0.07 s a step on the 135M model on 2 cores,
    # 0.29 s for the default per-tensor loop. Under FSDP the parameters, hence AdamW's state, are shards.
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total_steps=total_steps,
                           warmup=warmup_steps(total_steps, settings.warmup_ratio),
                           kind=settings.lr_scheduler))
    progress = _resume(model, optimizer, scheduler)
    if progress is not None:
        progress.resumes += 1
    return Trainee(plain, model, optimizer, scheduler, progress or Progress())


def _step(trainee: Trainee, batches: list[Batch], settings: SFTSettings, device: torch.device,
          autocast: bool, world_size: int, input_tokens: int, epoch: int) -> dict[str, float]:
    """One optimizer step over ``batches``; updates the progress and returns the step's record."""
    loss_sum, tokens, inputs = _accumulate(trainee.model, batches, device, autocast, world_size,
                                           input_tokens)
    grad_norm = clip_gradients(trainee.model, settings.grad_clip) if settings.grad_clip > 0 else None
    lr = trainee.scheduler.get_last_lr()[0]
    trainee.optimizer.step()
    trainee.scheduler.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    progress = trainee.progress
    progress.step += 1
    progress.input_tokens += inputs
    progress.epoch_loss += loss_sum
    progress.epoch_tokens += tokens
    record = {"step": progress.step, "epoch": epoch + 1, "loss": loss_sum / tokens, "lr": lr,
              "tokens": tokens, "input_tokens": inputs, "micro_batches": len(batches)}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    progress.history.append(record)
    return record


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune on this worker's share; rank 0 writes the final HF folder."""
    startup_seconds = max(time.time() - config["fit_started"], 0.0)
    settings = SFTSettings.model_validate(config["settings"])
    examples: Sequence[TokenizedExample] = ray.get(config["examples"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(settings.cpus_per_worker)
    torch.manual_seed(settings.seed)
    bf16 = use_bf16(settings.precision, device)
    autocast = bf16 and settings.strategy == "ddp"  # FSDP: bf16 parameters instead

    per_step = settings.micro_batch_size * settings.grad_accum_steps(world_size) * world_size
    per_epoch = steps_per_epoch(len(examples), per_step, world_size)
    total_steps = settings.epochs * per_epoch
    runtime_rss_mb = _peak_rss_mb(device, world_size)  # before the model: torch, Ray, transformers
    load_start = time.perf_counter()
    model_dir = materialize(config["model"])  # this node's cached copy
    trainee = _build(model_dir, settings, device, bf16, world_size, total_steps)
    load_seconds = time.perf_counter() - load_start
    progress = trainee.progress
    if rank == 0 and progress.resumes:
        logger.warning("SFT: restarted after a worker failure; resuming from the checkpoint "
                       "of step %d/%d (restart %d)", progress.step, total_steps, progress.resumes)
    if rank == 0:
        logger.info("SFT: %d examples, %d worker(s) (%s), %d examples per step (micro batch %d, "
                    "%s), %d epochs x %d steps = %d steps (%s), bf16 %s, device %s",
                    len(examples), world_size, settings.strategy, per_step,
                    settings.micro_batch_size, "packed" if settings.packing else "padded",
                    settings.epochs, per_epoch, total_steps, settings.lr_scheduler, bf16, device)

    trainee.model.train()
    crash = config.get("crash_after_step")
    start, trained_here = time.perf_counter(), 0
    last_checkpoint = start
    for epoch in range(progress.step // per_epoch, settings.epochs):
        plan = plan_epoch(len(examples), per_step, world_size, settings.seed, epoch)
        for index, step_ids in enumerate(plan.for_rank(rank, world_size)):
            if epoch * per_epoch + index < progress.step:
                continue  # done before the restart
            step_examples = [examples[i] for i in step_ids]
            batches = micro_batches(step_examples, settings.micro_batch_size, config["pad_id"],
                                    settings.packing)
            record = _step(trainee, batches, settings, device, autocast, world_size,
                           sum(len(ex.input_ids) for ex in step_examples), epoch)
            trained_here += 1
            if rank == 0 and (progress.step % settings.log_every_steps == 0
                              or progress.step in (1, total_steps)):
                logger.info("SFT step %d/%d epoch %d loss %.4f lr %.3g (%.2f s/step)",
                            progress.step, total_steps, epoch + 1, record["loss"], record["lr"],
                            (time.perf_counter() - start) / trained_here)
            if progress.step % per_epoch == 0:
                progress.final_loss = progress.epoch_loss / max(progress.epoch_tokens, 1.0)
                progress.epoch_loss, progress.epoch_tokens = 0.0, 0.0
                if rank == 0:
                    logger.info("SFT epoch %d/%d: mean loss %.4f", epoch + 1, settings.epochs,
                                progress.final_loss)
            if _checkpoint_due(settings, progress.step, total_steps, per_epoch,
                               time.perf_counter() - last_checkpoint, device, world_size):
                _report_resume_checkpoint(rank, trainee.model, trainee.optimizer,
                                          trainee.scheduler, progress)
                last_checkpoint = time.perf_counter()
            _maybe_crash(crash, progress.step, rank)

    train_seconds = time.perf_counter() - start
    final = full_model(trainee.model, trainee.plain, model_dir, rank)  # a collective under FSDP
    metrics = {"steps": progress.step, "final_loss": progress.final_loss,
               "train_seconds": train_seconds, "load_seconds": load_seconds,
               "startup_seconds": startup_seconds, "input_tokens": progress.input_tokens,
               "resumes": progress.resumes, "world_size": world_size, "bf16": bf16,
               "strategy": settings.strategy, "peak_rss_mb": _peak_rss_mb(device, world_size),
               "runtime_rss_mb": runtime_rss_mb}
    _publish_final(config, final, model_dir, rank,
                   {**metrics, "settings": settings.model_dump(), "history": progress.history})

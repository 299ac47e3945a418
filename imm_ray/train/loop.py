"""The Ray Train worker loop: full fine-tune of a causal LM on tokenized SFT examples.

Config keys (built by `imm_ray.train.trainer.run_sft`): ``model_path`` (str), ``examples``
(object ref to a list of TokenizedExample), ``pad_id`` (int), ``save_dtype`` (torch dtype
name), ``settings`` (SFTSettings as a dict).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from imm_ray.train.schedule import lr_factor, warmup_steps
from imm_ray.train.settings import SFTSettings
from imm_ray.train.sft_data import IGNORE_INDEX, TokenizedExample, collate

logger = logging.getLogger(__name__)

STATE_FILE = "sft_state.json"


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to run forward/backward under bf16 autocast ("auto": if the hardware has bf16)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (fp32) over positions whose label is not IGNORE_INDEX."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                           shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _windows(batches: Iterable[dict[str, torch.Tensor]],
             size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Group micro-batches into gradient-accumulation windows (the last one may be shorter)."""
    window: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _global_sum(value: float, device: torch.device, distributed: bool) -> float:
    """Sum a scalar across workers (identity on a single worker)."""
    if not distributed:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item()


def _accumulate(model: torch.nn.Module, window: list[dict[str, torch.Tensor]],
                device: torch.device, bf16: bool, world_size: int) -> tuple[float, float]:
    """Forward/backward every micro-batch of one optimizer step; returns (loss sum, tokens),
    both summed over all workers. Gradients end up as the mean over those tokens."""
    distributed = world_size > 1
    window = [{k: v.to(device) for k, v in b.items()} for b in window]
    local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
    tokens = max(_global_sum(float(local_tokens), device, distributed), 1.0)
    loss_sum = 0.0
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        sync = contextlib.nullcontext() if last or not distributed else model.no_sync()
        with sync:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"], use_cache=False).logits
            micro_loss = token_loss_sum(logits, batch["labels"])
            # DDP averages gradients over workers, hence the world_size factor.
            (micro_loss * (world_size / tokens)).backward()
        loss_sum += micro_loss.item()
    return _global_sum(loss_sum, device, distributed), tokens


def _save_checkpoint(model: PreTrainedModel, model_path: str, out_dir: str, save_dtype: str,
                     state: dict[str, Any]) -> None:
    """Save an HF folder: safetensors weights (ties kept), config, generation config, tokenizer."""
    model.to(getattr(torch, save_dtype))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out_dir)
    (Path(out_dir) / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune on this worker's shard; rank 0 saves and reports the final HF checkpoint."""
    settings = SFTSettings.model_validate(config["settings"])
    examples: Sequence[TokenizedExample] = ray.get(config["examples"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    distributed = world_size > 1
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(settings.cpus_per_worker)
    torch.manual_seed(settings.seed)
    bf16 = use_bf16(settings.precision, device)

    model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32)
    model = ray.train.torch.prepare_model(model)  # moves to device; DDP when world_size > 1
    unwrapped: PreTrainedModel = model.module if distributed else model

    if distributed:
        sampler = DistributedSampler(examples, num_replicas=world_size, rank=rank,
                                     shuffle=True, seed=settings.seed)
    else:
        sampler = RandomSampler(examples, generator=torch.Generator().manual_seed(settings.seed))
    loader = DataLoader(examples, batch_size=settings.micro_batch_size, sampler=sampler,
                        collate_fn=partial(collate, pad_id=config["pad_id"]))

    accum = settings.grad_accum_steps(world_size)
    steps_per_epoch = math.ceil(len(loader) / accum)
    total_steps = settings.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(unwrapped.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    warmup = warmup_steps(total_steps, settings.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total_steps=total_steps, warmup=warmup,
                           kind=settings.lr_scheduler))
    if rank == 0:
        logger.info("SFT: %d examples, %d worker(s), micro batch %d x accum %d = %d per step, "
                    "%d epochs x %d steps = %d steps (%d warmup, %s), bf16 autocast %s, device %s",
                    len(examples), world_size, settings.micro_batch_size, accum,
                    settings.micro_batch_size * accum * world_size, settings.epochs,
                    steps_per_epoch, total_steps, warmup, settings.lr_scheduler, bf16, device)

    model.train()
    history: list[dict[str, float]] = []
    step, final_loss = 0, float("nan")
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        if distributed:
            sampler.set_epoch(epoch)
        epoch_loss, epoch_tokens = 0.0, 0.0
        for window in _windows(loader, accum):
            loss_sum, tokens = _accumulate(model, window, device, bf16, world_size)
            grad_norm = (torch.nn.utils.clip_grad_norm_(unwrapped.parameters(), settings.grad_clip)
                         if settings.grad_clip > 0 else None)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            epoch_loss += loss_sum
            epoch_tokens += tokens
            record = {"step": step, "epoch": epoch + 1, "loss": loss_sum / tokens, "lr": lr,
                      "tokens": tokens}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            history.append(record)
            if rank == 0:
                logger.debug("SFT step %s", record)
                if step % settings.log_every_steps == 0 or step in (1, total_steps):
                    logger.info("SFT step %d/%d epoch %d loss %.4f lr %.3g (%.2f s/step)",
                                step, total_steps, epoch + 1, record["loss"], lr,
                                (time.perf_counter() - start) / step)
        final_loss = epoch_loss / max(epoch_tokens, 1.0)
        if rank == 0:
            logger.info("SFT epoch %d/%d: mean loss %.4f", epoch + 1, settings.epochs, final_loss)

    seconds = time.perf_counter() - start
    metrics = {"steps": step, "final_loss": final_loss, "train_seconds": seconds,
               "world_size": world_size, "bf16": bf16}
    with tempfile.TemporaryDirectory(prefix="imm-sft-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            _save_checkpoint(unwrapped, config["model_path"], tmp, config["save_dtype"],
                             {**metrics, "settings": settings.model_dump(), "history": history})
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)

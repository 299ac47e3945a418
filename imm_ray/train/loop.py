"""The Ray Train worker loop: full fine-tune of a causal LM on pre-tokenized SFT examples.

Config keys (built by `imm_ray.train.trainer.run_sft`): ``model_path`` (str), ``examples``
(list of TokenizedExample), ``pad_id`` (int), ``save_dtype`` ("float32", "bfloat16", ...),
``settings`` (SFTSettings as a dict).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, get_scheduler

from imm_ray.train.settings import SFTSettings
from imm_ray.train.sft_data import IGNORE_INDEX, TokenizedExample, collate

logger = logging.getLogger(__name__)

STATE_FILE = "sft_state.json"

_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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


def _global_sum(value: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Sum a float64 scalar across workers (identity on a single worker)."""
    value = value.detach().to(torch.float64)
    if distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


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
    examples: Sequence[TokenizedExample] = config["examples"]
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
    scheduler = get_scheduler(_SCHEDULERS[settings.lr_scheduler], optimizer,
                              num_warmup_steps=math.ceil(settings.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if rank == 0:
        logger.info("SFT: %d examples, %d worker(s), micro batch %d x accum %d = %d per step, "
                    "%d epochs x %d steps = %d steps, bf16 autocast %s, device %s",
                    len(examples), world_size, settings.micro_batch_size, accum,
                    settings.micro_batch_size * accum * world_size, settings.epochs,
                    steps_per_epoch, total_steps, bf16, device)

    model.train()
    history: list[dict[str, float]] = []
    step, final_loss = 0, float("nan")
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        if distributed:
            sampler.set_epoch(epoch)
        epoch_loss, epoch_tokens = 0.0, 0.0
        for window in _windows(loader, accum):
            window = [{k: v.to(device) for k, v in b.items()} for b in window]
            local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
            tokens = max(_global_sum(torch.tensor(local_tokens), distributed).item(), 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                sync = contextlib.nullcontext() if last or not distributed else model.no_sync()
                with sync:
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                        enabled=bf16):
                        logits = model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"],
                                       use_cache=False).logits
                    micro_loss = token_loss_sum(logits, batch["labels"])
                    # DDP averages gradients over workers: scale so the result is the mean over
                    # all completion tokens of the step on all workers.
                    (micro_loss * (world_size / tokens)).backward()
                loss_sum += micro_loss.detach().to(torch.float64)
            grad_norm = (torch.nn.utils.clip_grad_norm_(unwrapped.parameters(), settings.grad_clip)
                         if settings.grad_clip > 0 else None)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            step_loss_sum = _global_sum(loss_sum, distributed).item()
            epoch_loss += step_loss_sum
            epoch_tokens += tokens
            record = {"step": step, "epoch": epoch + 1, "loss": step_loss_sum / tokens, "lr": lr,
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

"""`run_sft`: tokenize the SFT data, fine-tune with a Ray Train TorchTrainer, publish the result."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from transformers import AutoConfig, AutoTokenizer

from imm_ray.train.loop import train_loop_per_worker
from imm_ray.train.settings import SFTError, SFTSettings
from imm_ray.train.sft_data import pad_token_id, read_rows, tokenize_rows

logger = logging.getLogger(__name__)


@dataclass
class SFTResult:
    """Outcome of one SFT run. `final_loss` is the token-weighted mean loss of the last epoch."""

    checkpoint_dir: Path
    steps: int
    examples: int
    dropped: int
    final_loss: float
    seconds: float


def _save_dtype(model_path: Path, choice: str) -> str:
    """Torch dtype name to save in; "auto": the input config's dtype (float32 if unset)."""
    if choice != "auto":
        return choice
    dtype = AutoConfig.from_pretrained(model_path).dtype
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.")


def _root_cause(error: BaseException) -> str:
    """A one-line-per-worker summary of what made a Ray Train run fail."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}"
                         for rank, exc in sorted(failures.items()))
    cause = getattr(error, "controller_failure", None) or error.__cause__ or error
    return f"{type(cause).__name__}: {cause}"


def _publish(checkpoint: ray.train.Checkpoint, out_dir: Path) -> None:
    """Copy the checkpoint to a temporary sibling of `out_dir`, then rename it into place."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        checkpoint.to_directory(str(tmp))
        if out_dir.exists():
            raise SFTError(f"output folder appeared while training: {out_dir}")
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_sft(model_path: str | Path, data_path: str | Path, out_dir: str | Path,
            settings: SFTSettings, storage_dir: str | Path) -> SFTResult:
    """Fully fine-tune the HF model at `model_path` on the JSONL prompt/completion pairs.

    Trains with a TorchTrainer (Ray Train run stored under `storage_dir`) and publishes the final
    Hugging Face checkpoint atomically as `out_dir`, which must not exist yet. Works inside an
    existing Ray session (otherwise Ray auto-starts a local one). Raises SFTError for bad
    inputs and, with the workers' root cause, for failed training.
    """
    start = time.perf_counter()
    model_path, data_path = Path(model_path).resolve(), Path(data_path).resolve()
    out_dir, storage_dir = Path(out_dir).resolve(), Path(storage_dir).resolve()
    if out_dir.exists():
        raise SFTError(f"SFT output folder already exists: {out_dir}")
    if not (model_path / "config.json").is_file():
        raise SFTError(f"not a Hugging Face model folder (no config.json): {model_path}")

    rows = read_rows(data_path)
    if not rows:
        raise SFTError(f"SFT data file has no examples: {data_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, dropped = tokenize_rows(tokenizer, rows, settings.max_length)
    if dropped:
        logger.warning("SFT: dropped %d of %d examples whose prompt alone reaches max_length %d",
                       dropped, len(rows), settings.max_length)
    if not examples:
        raise SFTError(f"all {len(rows)} SFT examples were dropped: every prompt reaches "
                       f"max_length {settings.max_length}")

    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model_path": str(model_path),
            # An object ref, not the list: Ray Train stringifies the config for its state API.
            "examples": ray.put(examples),
            "pad_id": pad_token_id(tokenizer),
            "save_dtype": _save_dtype(model_path, settings.save_dtype),
            "settings": settings.model_dump(),
        },
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"sft-{out_dir.name}-{uuid.uuid4().hex[:8]}",
                             storage_path=str(storage_dir),
                             failure_config=FailureConfig(max_failures=0)),
    )
    logger.info("SFT: %s on %d examples (%d dropped) -> %s", model_path, len(examples), dropped,
                out_dir)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise SFTError(f"SFT training failed: {_root_cause(exc)}") from exc
    if result.checkpoint is None:
        raise SFTError(f"SFT run finished without a checkpoint (run folder {result.path})")
    _publish(result.checkpoint, out_dir)

    seconds = time.perf_counter() - start
    logger.info("SFT done in %.1f s: %d steps, final loss %.4f -> %s", seconds,
                result.metrics["steps"], result.metrics["final_loss"], out_dir)
    return SFTResult(checkpoint_dir=out_dir, steps=int(result.metrics["steps"]),
                     examples=len(examples), dropped=dropped,
                     final_loss=float(result.metrics["final_loss"]), seconds=seconds)

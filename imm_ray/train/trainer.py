"""`run_sft`: tokenize the SFT data, fine-tune with a Ray Train TorchTrainer, publish the result."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from imm_ray.train.loop import CRASH_ENV, STATE_FILE, train_loop_per_worker
from imm_ray.train.settings import SFTError, SFTSettings
from imm_ray.train.sft_data import pad_token_id, read_rows, tokenize_rows

logger = logging.getLogger(__name__)


@dataclass
class SFTResult:
    """Outcome of one SFT run. `final_loss` is the token-weighted mean loss of the last epoch;
    `tokens` counts the non-padding input tokens trained on (all epochs and workers), `seconds`
    the whole stage; `timings` says where those seconds went; `restarts` counts recoveries from
    worker failures that resumed from a checkpoint."""

    checkpoint_dir: Path
    steps: int
    examples: int
    dropped: int
    final_loss: float
    seconds: float
    tokens: int = 0
    train_seconds: float = 0.0
    restarts: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Tokens trained per second of the whole stage."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# Ray Train's controller polls its workers every 2 s by default, which adds up to 2 s at the
# start and at the end of every run. Defaults for the run (values set in the environment win).
_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


@contextmanager
def _ray_train_env() -> Iterator[None]:
    """Set `_RAY_TRAIN_ENV` defaults while a trainer runs (Ray Train copies them to its actors)."""
    added = [key for key in _RAY_TRAIN_ENV if key not in os.environ]
    os.environ.update({key: _RAY_TRAIN_ENV[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


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


def _clear_stale_temps(out_dir: Path) -> None:
    """Remove temp siblings of `out_dir` that a killed earlier attempt left behind."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        logger.warning("SFT: removing %s, left by an interrupted earlier attempt", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _publish(result: ray.train.Result, staging: Path, out_dir: Path,
             tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Add the tokenizer to the staging folder, rename it into place and return the run's
    STATE_FILE. When the worker could not write the folder in place (it ran on another node),
    copy its final checkpoint into the staging folder first."""
    if not (staging / STATE_FILE).is_file():
        if result.checkpoint is None or Path(result.checkpoint.path).name != "final":
            raise SFTError(f"SFT run finished without its final model (run folder {result.path})")
        result.checkpoint.to_directory(str(staging))
    tokenizer.save_pretrained(staging)
    state = json.loads((staging / STATE_FILE).read_text(encoding="utf-8"))
    if out_dir.exists():
        raise SFTError(f"output folder appeared while training: {out_dir}")
    os.rename(staging, out_dir)
    return state


def _delete_run_folder(result: ray.train.Result) -> None:
    """Drop Ray Train's run folder (resume checkpoints) once the output is published."""
    try:
        result.filesystem.delete_dir(result.path)
    except OSError as exc:
        logger.warning("SFT: could not remove Ray Train's run folder %s: %s", result.path, exc)


def _crash_hook() -> str | None:
    """The worker crash test hook from the environment (see `loop.CRASH_ENV`), checked here."""
    spec = os.environ.get(CRASH_ENV)
    if spec and not re.fullmatch(r"\d+:.+", spec):
        raise SFTError(f"{CRASH_ENV} must look like STEP:MARKER_FILE, got {spec!r}")
    return spec or None


def run_sft(model_path: str | Path, data_path: str | Path, out_dir: str | Path,
            settings: SFTSettings, storage_dir: str | Path | None = None, *,
            storage_path: str | None = None,
            storage_filesystem: pyarrow.fs.FileSystem | None = None) -> SFTResult:
    """Fully fine-tune the HF model at `model_path` on the JSONL prompt/completion pairs.

    Trains with a TorchTrainer whose run (resume checkpoints) is stored under `storage_path`
    on `storage_filesystem` (e.g. S3) when given, else under the local `storage_dir`; the run
    folder is deleted after success. Rank 0 writes the final Hugging Face folder once, into a
    temporary sibling of `out_dir` (which must not exist yet), renamed into place when done.
    Works inside an existing Ray session (otherwise Ray auto-starts a local one). Raises
    SFTError for bad inputs and, with the workers' root cause, for failed training.
    """
    start = time.perf_counter()
    if storage_path is None and storage_dir is None:
        raise SFTError("run_sft needs storage_dir or storage_path for Ray Train's run folder")
    model_path, data_path = Path(model_path).resolve(), Path(data_path).resolve()
    out_dir = Path(out_dir).resolve()
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
    crash = _crash_hook()

    _clear_stale_temps(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    resources = settings.worker_resources()
    prepared = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model_path": str(model_path),
            # An object ref, not the list: Ray Train stringifies the config for its state API.
            "examples": ray.put(examples),
            "pad_id": pad_token_id(tokenizer),
            "save_dtype": _save_dtype(model_path, settings.save_dtype),
            "settings": settings.model_dump(),
            "staging_dir": str(staging),
            "driver_node": ray.get_runtime_context().get_node_id(),
            "fit_started": time.time(),
            "crash_after_step": crash,
        },
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"sft-{out_dir.name}-{uuid.uuid4().hex[:8]}",
                             storage_path=storage_path or str(Path(storage_dir).resolve()),
                             storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    logger.info("SFT: %s on %d examples (%d dropped) -> %s", model_path, len(examples), dropped,
                out_dir)
    try:
        try:
            with _ray_train_env():
                result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise SFTError(f"SFT training failed: {_root_cause(exc)}") from exc
        fitted = time.perf_counter()
        metrics = _publish(result, staging, out_dir, tokenizer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _delete_run_folder(result)

    seconds = time.perf_counter() - start
    worker = {key: float(metrics[f"{key}_seconds"]) for key in ("startup", "load", "train", "save")}
    timings = {"prepare": prepared - start, **worker,
               "finish": max(fitted - prepared - sum(worker.values()), 0.0),
               "publish": time.perf_counter() - fitted}
    restarts = int(metrics["resumes"])
    if restarts:
        logger.warning("SFT: recovered from %d worker failure(s), resuming from checkpoints",
                       restarts)
    tokens = int(metrics["input_tokens"])
    logger.info("SFT done in %.1f s (%s): %d steps, %d tokens (%.0f tokens/s), final loss %.4f "
                "-> %s", seconds, ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
                metrics["steps"], tokens, tokens / seconds, metrics["final_loss"], out_dir)
    return SFTResult(checkpoint_dir=out_dir, steps=int(metrics["steps"]), examples=len(examples),
                     dropped=dropped, final_loss=float(metrics["final_loss"]), seconds=seconds,
                     tokens=tokens, train_seconds=worker["train"], restarts=restarts,
                     timings={k: round(v, 3) for k, v in timings.items()})

"""`run_sft`: tokenize the SFT data, fine-tune with a Ray Train TorchTrainer, publish the result."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from imm_ray.ray_env import actor_runtime_env
from imm_ray.storage import (
    CheckpointError,
    Location,
    clear_output,
    delete,
    exists,
    is_published,
    materialize,
    read_json,
    resolve,
    temp_prefix,
)
from imm_ray.train.loop import CRASH_ENV, STATE_FILE, train_loop_per_worker
from imm_ray.train.settings import SFTError, SFTSettings
from imm_ray.train.sft_data import TokenizedExample, pad_token_id, read_rows, tokenize_rows

logger = logging.getLogger(__name__)


@dataclass
class SFTResult:
    """Outcome of one SFT run. `final_loss` is the token-weighted mean loss of the last epoch;
    `tokens` counts the non-padding input tokens trained on (all epochs and workers), `seconds`
    the whole stage; `timings` says where those seconds went; `restarts` counts recoveries from
    worker failures that resumed from a checkpoint."""

    checkpoint: str  # the published checkpoint: a local path or a URI
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
# How long Ray Train waits for room for its workers before it tears the worker group down and
# starts again (Ray's default: 60 s, shorter than an autoscaler's GPU node takes to boot).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Host allocations of 64 KiB and more straight from mmap, so freed ones go back to the OS: FSDP
# allocates and frees every layer's gathered weights and gradients each step, from gloo's threads
# too, and glibc's default heap kept that memory (peak RSS of an FSDP rank on SmolLM2-135M, 2 CPU
# workers: 3.6 GB with glibc's default, 2.2 GB with this).
_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@contextmanager
def _ray_train_env(start_timeout_s: float | None = None) -> Iterator[None]:
    """Set `_RAY_TRAIN_ENV` defaults (and the worker start timeout) while a trainer runs; Ray Train
    copies them from the driver to its controller and workers."""
    defaults = {**_RAY_TRAIN_ENV, **({START_TIMEOUT_ENV: str(start_timeout_s)} if start_timeout_s else {})}
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _worker_runtime_env() -> dict:
    """The workers' runtime_env: the forwarded variables (storage credentials and endpoint, wherever
    the workers run) and `_WORKER_ENV` (values set in the driver's environment win)."""
    env = actor_runtime_env()
    defaults = {key: value for key, value in _WORKER_ENV.items() if key not in os.environ}
    return {**env, "env_vars": {**defaults, **env.get("env_vars", {})}}


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


def _delete_run_folder(run_root: Location) -> None:
    """Drop Ray Train's run folder (resume checkpoints); the output no longer needs it."""
    try:
        delete(run_root)
    except OSError as exc:
        logger.warning("SFT: could not remove Ray Train's run folder %s: %s", run_root, exc)


def _crash_hook() -> str | None:
    """The worker crash test hook from the environment (see `loop.CRASH_ENV`), checked here."""
    spec = os.environ.get(CRASH_ENV)
    if spec and not re.fullmatch(r"\d+:.+", spec):
        raise SFTError(f"{CRASH_ENV} must look like STEP:MARKER_FILE, got {spec!r}")
    return spec or None


def run_sft(model: str | Path | Location, data: str | Path | Location, out: str | Path | Location,
            settings: SFTSettings, storage_dir: str | Path | None = None,
            start_timeout_s: float | None = None) -> SFTResult:
    """Fully fine-tune the HF model at ``model`` on the JSONL prompt/completion pairs at ``data``
    and publish the result as the checkpoint ``out`` (which must not exist yet).

    Each location is a local path or a URI (``s3://...``): the workers may run on other nodes,
    so rank 0 materializes ``model`` on its own node and publishes ``out`` itself. Ray Train's
    run folder (resume checkpoints) lives beside ``out`` on the same storage (``storage_dir``
    overrides that for a local run) and is deleted after success. Works inside an existing Ray
    session (otherwise Ray auto-starts a local one). Raises SFTError for bad inputs and, with
    the workers' root cause, for failed training. ``start_timeout_s``: how long Ray Train waits for
    room for its workers (e.g. for an autoscaler's node) before it gives up, instead of its 60 s.
    """
    start = time.perf_counter()
    model_loc, out_loc = resolve(model), resolve(out)
    if exists(out_loc):
        raise SFTError(f"SFT output already exists: {out_loc}")
    model_dir = _start_model(model_loc)
    tokenizer, examples, dropped = _examples(model_dir, data, settings.max_length)
    crash = _crash_hook()

    clear_output(out_loc)  # temp siblings (work folders, Ray Train's run folder) of a killed attempt
    run_root = (resolve(storage_dir) if storage_dir is not None
                else out_loc.parent / f"{temp_prefix(out_loc.name)}ray-train")
    run_name = f"sft-{out_loc.name}-{uuid.uuid4().hex[:8]}"
    prepared = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": model_loc,
            "out": out_loc,
            # An object ref, not the list: Ray Train stringifies the config for its state API.
            "examples": ray.put(examples),
            "pad_id": pad_token_id(tokenizer),
            "save_dtype": _save_dtype(model_dir, settings.save_dtype),
            "settings": settings.model_dump(),
            "fit_started": time.time(),
            "crash_after_step": crash,
        },
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=settings.worker_resources()),
        run_config=RunConfig(name=run_name,
                             storage_path=run_root.path,
                             storage_filesystem=None if run_root.is_local else run_root.fs,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             worker_runtime_env=_worker_runtime_env()),
    )
    logger.info("SFT: %s on %d examples (%d dropped) -> %s", model_loc, len(examples), dropped,
                out_loc)
    try:
        with _ray_train_env(start_timeout_s):
            trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise SFTError(f"SFT training failed: {_root_cause(exc)}") from exc
    finally:
        _delete_run_folder(run_root if storage_dir is None else run_root / run_name)
    fitted = time.perf_counter()
    if not is_published(out_loc):
        raise SFTError(f"SFT run finished without publishing its model to {out_loc}")
    return _result(out_loc, len(examples), dropped, (start, prepared, fitted))


def _start_model(model_loc: Location) -> Path:
    """The start model's folder on this node, without its weights (the driver only tokenizes);
    SFTError if it is not a Hugging Face model."""
    try:
        model_dir = materialize(model_loc, weights=False)
    except CheckpointError as exc:
        raise SFTError(f"cannot load the SFT start model: {exc}") from exc
    if not (model_dir / "config.json").is_file():
        raise SFTError(f"not a Hugging Face model folder (no config.json): {model_loc}")
    return model_dir


def _examples(model_dir: Path, data: str | Path | Location,
              max_length: int) -> tuple[PreTrainedTokenizerBase, list[TokenizedExample], int]:
    """The model's tokenizer, the examples of the JSONL at ``data`` tokenized with it and how many
    were dropped (their prompt alone reaches ``max_length``); SFTError when none is left."""
    rows = read_rows(data)
    if not rows:
        raise SFTError(f"SFT data file has no examples: {data}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, dropped = tokenize_rows(tokenizer, rows, max_length)
    if dropped:
        logger.warning("SFT: dropped %d of %d examples whose prompt alone reaches max_length %d",
                       dropped, len(rows), max_length)
    if not examples:
        raise SFTError(f"all {len(rows)} SFT examples were dropped: every prompt reaches "
                       f"max_length {max_length}")
    return tokenizer, examples, dropped


def _result(out_loc: Location, examples: int, dropped: int, marks: tuple[float, float, float]) -> SFTResult:
    """The SFT result from the workers' metrics published with the model, and the driver's time
    ``marks`` (start, inputs prepared, fit returned)."""
    start, prepared, fitted = marks
    metrics = read_json(out_loc / STATE_FILE)
    seconds = time.perf_counter() - start
    worker = {key: float(metrics[f"{key}_seconds"]) for key in ("startup", "load", "train", "save")}
    timings = {"prepare": prepared - start, **worker,
               "finish": max(fitted - prepared - sum(worker.values()), 0.0)}
    restarts = int(metrics["resumes"])
    if restarts:
        logger.warning("SFT: recovered from %d worker failure(s), resuming from checkpoints",
                       restarts)
    tokens = int(metrics["input_tokens"])
    logger.info("SFT done in %.1f s (%s): %d steps, %d tokens (%.0f tokens/s), final loss %.4f "
                "-> %s", seconds, ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
                metrics["steps"], tokens, tokens / seconds, metrics["final_loss"], out_loc)
    return SFTResult(checkpoint=out_loc.uri, steps=int(metrics["steps"]), examples=examples,
                     dropped=dropped, final_loss=float(metrics["final_loss"]), seconds=seconds,
                     tokens=tokens, train_seconds=worker["train"], restarts=restarts,
                     timings={k: round(v, 3) for k, v in timings.items()})

"""The merge engine: validate inputs, stream tensor blocks through a merge method on a thread pool,
publish the output folder atomically with a provenance file.

Work is split into tasks: elementwise methods get flat blocks of ``BLOCK_ELEMENTS`` elements (read
with ``pread`` into per-thread buffers, computed in fp32, cast, written in place with ``pwrite``);
other methods (TIES trim, breadcrumbs, SLERP, L1 rescale) get whole tensors. Every block's result is
a pure function of its inputs, the parameters, the seed and the tensor name (see :mod:`.rng`), so the
output bytes do not depend on the number of threads or on scheduling. Peak memory: a few blocks per
thread (elementwise) or a few fp32 copies of the largest tensor (whole-tensor methods); output
shards are never held in memory.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
from tqdm.auto import tqdm

from .dtypes import FLOAT32, DType, parse_dtype
from .errors import MergeError
from .methods import MergeMethod, get_merge_method
from .options import MergeOptions
from .rng import RNG_ALGORITHM, TensorRNG
from .safetensors_io import (
    CheckpointReader,
    StreamingSafetensorsWriter,
    TensorInfo,
    is_weight_file,
    parse_size,
    sha256_files,
)
from .selection import TensorSelector, count_layers, depth, params_at
from .tensor_names import VOCAB_MATRIX, VOCAB_MATRIX_HINT

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "merge_provenance.json"
PROVENANCE_FORMAT = "imm_ray.merge/2"
BLOCK_ELEMENTS = 1 << 20


def merge_checkpoints(
    anchor: str | Path,
    models: Sequence[str | Path],
    out_dir: str | Path,
    options: MergeOptions | None = None,
    *,
    progress: bool = True,
    known_sha256: Mapping[Path, str] | None = None,
) -> Path:
    """Merge HF safetensors checkpoints as ``options`` say and write an HF folder to ``out_dir``.

    ``anchor`` is the base (for IMM: the original model); it supplies config, tokenizer, generation
    config and chat template files, the tensors left out by ``options.include``/``exclude`` (copied
    unmerged) and, by default, the output dtype of every tensor (``options.dtype`` overrides it for
    floating tensors). ``models`` are the fine-tuned folders. Layerwise parameters may be gradients
    over depth (lists). Computation is fp32 on ``options.threads`` threads (default: all usable
    cores); equal inputs, parameters and seed give byte-identical output.

    All checks on names, shapes and vocabularies happen before anything is written; NaN/Inf in the
    result is an error. The output is built in a temporary sibling folder and renamed to ``out_dir``
    only on success (``options.fsync`` also makes it durable first). ``options.checksums`` records
    sha256 of every input and output weight file in ``merge_provenance.json`` (:func:`output_sha256`
    reads the output's back); ``known_sha256`` are digests of input files (by path) that the caller
    has just verified, recorded without hashing those files again. Raises MergeError.
    """
    job = _Job.check(anchor, models, out_dir, options or MergeOptions())
    with ExitStack() as stack:
        anchor_reader = stack.enter_context(CheckpointReader(job.anchor))
        readers = [stack.enter_context(CheckpointReader(p)) for p in job.models]
        check_compatible(anchor_reader, readers)
        out_infos = _output_infos(anchor_reader, job.out_dtype)
        tasks, merged = _plan(job.impl, job.params, out_infos, anchor_reader, job.selector)
        if not merged:
            logger.warning("include/exclude left no tensor to merge: the output is a copy of the anchor")
        inputs = _describe_inputs([anchor_reader, *readers], job.options.checksums, job.threads, known_sha256 or {})
        logger.info(
            "merging %s with %s (params=%s, seed=%d, %d/%d tensors merged, %d threads) onto anchor %s -> %s",
            [str(p) for p in job.models], job.options.method, job.params, job.options.seed, len(merged),
            len(out_infos), job.threads, job.anchor, job.out_dir,
        )
        _build_and_publish(job, [anchor_reader, *readers], out_infos, tasks, progress,
                           {"selection": {**job.selector.describe(), "merged": len(merged),
                                          "copied_from_anchor": len(out_infos) - len(merged)},
                            "anchor": inputs[0], "models": inputs[1:]})
    logger.info("merge written to %s", job.out_dir)
    return job.out_dir


@dataclass(frozen=True)
class _Job:
    """A merge's inputs, checked before any file is read: the method, resolved parameters, output
    dtype, shard size, tensor selection and thread count."""

    options: MergeOptions
    impl: MergeMethod
    params: dict[str, Any]
    anchor: Path
    models: list[Path]
    out_dir: Path
    out_dtype: DType | None
    shard_bytes: int | None
    selector: TensorSelector
    threads: int

    @classmethod
    def check(cls, anchor: str | Path, models: Sequence[str | Path], out_dir: str | Path,
              options: MergeOptions) -> _Job:
        """The job of merging ``models`` onto ``anchor`` into ``out_dir``; MergeError on bad input."""
        impl = get_merge_method(options.method)
        if isinstance(models, (str, Path)):
            raise MergeError("models must be a list of checkpoint folders, got a single path")
        model_paths = [Path(m).absolute() for m in models]
        params = impl.validate(options.params, len(model_paths))
        out = Path(out_dir).absolute()
        job = cls(options, impl, params, Path(anchor).absolute(), model_paths, out,
                  parse_dtype(options.dtype) if options.dtype is not None else None,
                  parse_size(options.max_shard_size), TensorSelector(options.include, options.exclude),
                  _thread_count(options.threads))
        if out.exists() or out.is_symlink():
            raise MergeError(f"output folder already exists (refusing to overwrite): {out}")
        return job


def _output_infos(anchor: CheckpointReader, out_dtype: DType | None) -> list[TensorInfo]:
    """The output's tensors: the anchor's, floating ones in ``out_dtype`` when it is set."""
    return [
        TensorInfo(info.name, out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype,
                   info.shape)
        for info in (anchor.tensors[n] for n in anchor.names())
    ]


def _build_and_publish(job: _Job, readers: Sequence[CheckpointReader], out_infos: Sequence[TensorInfo],
                       tasks: Sequence[_Task], progress: bool, described: dict[str, Any]) -> None:
    """Run ``tasks`` on the anchor's and the models' ``readers`` into a temporary sibling of
    ``job.out_dir``, add the support files and the provenance (with the ``described`` selection and
    inputs), and rename it into place; on any failure nothing is left behind."""
    job.out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.out_dir.parent / f".{job.out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # umask permissions (mkdtemp's are 0700: unreadable by a server under another user)
    writer: StreamingSafetensorsWriter | None = None
    try:
        copied = copy_support_files(job.anchor, tmp, job.out_dtype)
        writer = StreamingSafetensorsWriter(tmp, out_infos, job.shard_bytes)
        worker = _Worker(job.impl, readers[0], readers[1:], writer, job.options.seed)
        bar = tqdm(total=len(out_infos), desc=f"merge[{job.options.method}]", unit="tensor",
                   disable=not progress)
        with bar:
            _execute(tasks, worker, job.threads, bar)
        files = writer.close(fsync=job.options.fsync)
        hashes = sha256_files([tmp / f for f in files], job.threads) if job.options.checksums else [None] * len(files)
        output = {"weight_files": dict(zip(files, hashes)), "num_tensors": len(out_infos),
                  "total_bytes": sum(i.nbytes for i in out_infos), "copied_files": copied}
        provenance = _provenance(job, out_infos, described, output)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _publish(tmp, job.out_dir, job.options.fsync)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _provenance(job: _Job, out_infos: Sequence[TensorInfo], described: dict[str, Any],
                output: dict[str, Any]) -> dict[str, Any]:
    """The content of ``merge_provenance.json``: how the output was made, from what, and its files."""
    return {
        "format": PROVENANCE_FORMAT,
        "method": job.options.method,
        "params": job.params,
        "seed": job.options.seed,
        "rng": RNG_ALGORITHM if job.impl.uses_random else None,
        "dtype": job.out_dtype.name if job.out_dtype is not None else None,
        "output_dtypes": sorted({i.dtype.name for i in out_infos}),
        "selection": described["selection"],
        "max_shard_size": job.shard_bytes,
        "checksum": "sha256" if job.options.checksums else None,
        "anchor": described["anchor"],
        "models": described["models"],
        "output": output,
        "versions": _versions(),
    }


def check_compatible(anchor: CheckpointReader, models: Sequence[CheckpointReader]) -> None:
    """Raise MergeError unless every model has the anchor's tensor names and shapes.

    Vocabulary mismatches (embedding rows differ) are reported first, naming both vocab sizes.
    A tied anchor (no ``lm_head.weight``) against an untied model is reported as such.
    """
    vocab = _read_config(anchor.folder).get("vocab_size")
    for model in models:
        other = _read_config(model.folder).get("vocab_size")
        if isinstance(vocab, int) and isinstance(other, int) and other != vocab:
            raise MergeError(
                f"vocabulary mismatch: anchor {anchor.folder} has vocab size {vocab} but model "
                f"{model.folder} has vocab size {other} (config.json vocab_size); models with different "
                "vocabularies cannot be merged"
            )
    embeddings = [
        info for info in (anchor.tensors[n] for n in anchor.names())
        if len(info.shape) == 2
        and (
            VOCAB_MATRIX.search(info.name)
            or (info.shape[0] == vocab and VOCAB_MATRIX_HINT.search(info.name))
        )
    ]
    for model in models:
        for info in embeddings:
            other = model.tensors.get(info.name)
            if other is not None and len(other.shape) == 2 and other.shape[0] != info.shape[0]:
                raise MergeError(
                    f"vocabulary mismatch: anchor {anchor.folder} has vocab size {info.shape[0]} but "
                    f"model {model.folder} has vocab size {other.shape[0]} (tensor {info.name!r}: "
                    f"{list(info.shape)} vs {list(other.shape)}); models with different vocabularies "
                    "cannot be merged"
                )
    for model in models:
        for name in sorted(set(anchor.tensors) | set(model.tensors)):
            a, m = anchor.tensors.get(name), model.tensors.get(name)
            if a is None or m is None:
                where = f"model {model.folder}" if a is None else f"anchor {anchor.folder}"
                lacking = f"anchor {anchor.folder}" if a is None else f"model {model.folder}"
                shape = list((a or m).shape)
                hint = ""
                if name.endswith("lm_head.weight"):
                    hint = (
                        " (tied vs untied embeddings: one checkpoint has tie_word_embeddings and stores "
                        "no lm_head.weight)"
                    )
                raise MergeError(
                    f"tensor names differ: {name!r} (shape {shape}) is in {where} but not in {lacking}{hint}"
                )
            if a.shape != m.shape:
                raise MergeError(
                    f"shape mismatch for tensor {name!r}: anchor {anchor.folder} has {list(a.shape)}, "
                    f"model {model.folder} has {list(m.shape)}"
                )


# The manifest a published checkpoint carries (imm_ray.storage.MANIFEST_NAME; the merge package
# imports no other imm_ray package): it describes the source's files, never the output's.
_SOURCE_MANIFEST = "manifest.json"


def copy_support_files(src: Path, dst: Path, out_dtype: DType | None = None) -> list[str]:
    """Copy every top-level non-weight file (config, generation config, tokenizer, chat template...)
    from ``src`` to ``dst``; subfolders, hidden files, old provenance and the source's checkpoint
    manifest are skipped. If ``out_dtype`` is set, the dtype recorded in config.json is updated.
    Returns the copied names."""
    copied = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name.startswith(".") or is_weight_file(name) or name in (PROVENANCE_FILE, _SOURCE_MANIFEST):
            continue
        if entry.is_dir():
            logger.debug("not copying subfolder %s", entry)
            continue
        shutil.copyfile(entry, dst / name)
        copied.append(name)
    config = dst / "config.json"
    if out_dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
        for key in keys:
            data[key] = out_dtype.name
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return copied


@dataclass(frozen=True)
class _Task:
    """One unit of work: ``count`` flat elements of tensor ``info`` from ``start`` (``whole``: all,
    shaped), merged with ``params`` or, if ``params`` is None, copied from the anchor."""

    info: TensorInfo
    start: int
    count: int
    whole: bool
    params: dict[str, Any] | None
    last: bool  # the tensor's last task (progress)


def _plan(
    impl: MergeMethod,
    params: dict[str, Any],
    out_infos: Sequence[TensorInfo],
    anchor: CheckpointReader,
    selector: TensorSelector,
) -> tuple[list[_Task], list[str]]:
    """Split the output tensors into tasks; returns the tasks and the names of merged tensors."""
    layerwise = [k for k in impl.layerwise_params if isinstance(params.get(k), list)]
    num_layers = count_layers(anchor.tensors) if layerwise else 0
    tasks: list[_Task] = []
    merged: list[str] = []
    for info in out_infos:
        is_float = anchor.tensors[info.name].dtype.is_floating_point
        tensor_params = None
        if is_float and selector(info.name):
            tensor_params = params_at(params, layerwise, depth(info.name, num_layers)) if layerwise else params
            merged.append(info.name)
        blockable = is_float and (tensor_params is None or impl.is_elementwise(tensor_params))
        if not blockable or info.numel <= BLOCK_ELEMENTS:
            tasks.append(_Task(info, 0, info.numel, not blockable, tensor_params, True))
            continue
        for start in range(0, info.numel, BLOCK_ELEMENTS):
            count = min(BLOCK_ELEMENTS, info.numel - start)
            tasks.append(_Task(info, start, count, False, tensor_params, start + count == info.numel))
    return tasks, merged


class _Worker:
    """Runs tasks (from any thread); block-sized buffers are reused per thread."""

    def __init__(
        self,
        impl: MergeMethod,
        anchor: CheckpointReader,
        models: Sequence[CheckpointReader],
        writer: StreamingSafetensorsWriter,
        seed: int,
    ) -> None:
        self.impl = impl
        self.anchor = anchor
        self.models = list(models)
        self.writer = writer
        self.seed = seed
        self._local = threading.local()

    def _buffer(self, key: str, count: int, dtype: np.dtype | type) -> np.ndarray:
        buffers = self._local.__dict__.setdefault("buffers", {})
        dtype = np.dtype(dtype)
        buf = buffers.get((key, dtype))
        if buf is None or buf.size < count:
            buf = buffers[(key, dtype)] = np.empty(max(count, BLOCK_ELEMENTS), dtype=dtype)
        return buf[:count]

    def _load(self, reader: CheckpointReader, task: _Task, key: str) -> np.ndarray:
        """float32 copy of the task's range of a tensor (shaped for whole-tensor tasks)."""
        name = task.info.name
        stored = reader.tensors[name].dtype
        if task.whole:
            return reader.get_float32(name)
        if stored == FLOAT32:
            return reader.read_into(name, task.start, self._buffer(key, task.count, np.float32))
        raw = reader.read_into(name, task.start, self._buffer(key + "/raw", task.count, stored.storage))
        return stored.to_float32(raw, self._buffer(key, task.count, np.float32))

    def run(self, task: _Task) -> None:
        name = task.info.name
        if task.params is None:
            out = self._copy(task)
        else:
            anchor = self._load(self.anchor, task, "anchor") if self.impl.uses_anchor_weights else None
            models = [self._load(r, task, f"model{i}") for i, r in enumerate(self.models)]
            rng = TensorRNG(self.seed, name).at(task.start)
            result = self.impl.merge_tensor(anchor, models, task.params, rng)
            if result.size != task.count or (task.whole and tuple(result.shape) != task.info.shape):
                raise MergeError(f"method {self.impl.name!r} returned shape {list(result.shape)} for {name!r}")
            if not task.info.dtype.fits(result):
                raise MergeError(self._non_finite_message(task, result))
            out = self._cast(result, task)
        self.writer.write_block(name, task.start, out.reshape(-1))

    def _cast(self, values: np.ndarray, task: _Task) -> np.ndarray:
        """float32 ``values`` in the output dtype's storage (checked by ``DType.fits`` before)."""
        dtype = task.info.dtype
        if dtype == FLOAT32:
            return values
        if task.whole:
            return dtype.from_float32(values)
        return dtype.from_float32(values.reshape(-1), self._buffer("out", task.count, dtype.storage),
                                  self._buffer("scratch", task.count, np.uint32))

    def _copy(self, task: _Task) -> np.ndarray:
        """The anchor's values (cast to the output dtype); non-float tensors are compared first."""
        name = task.info.name
        stored = self.anchor.tensors[name].dtype
        if task.whole:
            value = self.anchor.get(name)
        else:
            value = self.anchor.read_into(name, task.start, self._buffer("anchor/raw", task.count, stored.storage))
        if not stored.is_floating_point:
            if any(not np.array_equal(value, m.get(name)) for m in self.models):
                logger.warning("non-float tensor %r differs between inputs; keeping the anchor's", name)
            return value
        same = stored == task.info.dtype  # else: through float32, checked before the cast
        if not same:
            value = stored.to_float32(value, None if task.whole else self._buffer("anchor", task.count, np.float32))
        if not (stored.all_finite(value) if same else task.info.dtype.fits(value)):
            raise MergeError(f"anchor tensor {name!r} (copied unmerged) contains NaN/Inf, or overflows "
                             f"{task.info.dtype}; nothing was published")
        return value if same else self._cast(value, task)

    def _non_finite_message(self, task: _Task, result: np.ndarray) -> str:
        name = task.info.name
        for reader in (self.anchor, *self.models):
            if not reader.tensors[name].dtype.all_finite(reader.get(name)):
                return f"input tensor {name!r} of {reader.folder} contains NaN/Inf; nothing was published"
        overflow = bool(np.isfinite(result).all())
        cause = f" (overflow when casting to {task.info.dtype})" if overflow else ""
        return f"merged tensor {name!r} contains NaN/Inf{cause}; nothing was published"


def _execute(tasks: Sequence[_Task], worker: _Worker, threads: int, bar: Any) -> None:
    """Run all tasks on ``threads`` threads; the first error cancels the rest and is raised."""
    if threads <= 1:
        for task in tasks:
            worker.run(task)
            bar.update(int(task.last))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="merge") as pool:
        futures = {pool.submit(worker.run, task): task for task in tasks}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
                bar.update(int(futures[future].last))


def _thread_count(threads: int | None) -> int:
    """``threads``, or all usable cores when it is None."""
    if threads is not None:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _describe_inputs(readers: Sequence[CheckpointReader], checksums: bool, threads: int,
                     known: Mapping[Path, str]) -> list[dict[str, Any]]:
    known = {Path(p).absolute(): digest for p, digest in known.items()}
    paths = [r.folder / f for r in readers for f in r.weight_files]
    todo = [p for p in paths if p.absolute() not in known] if checksums else []
    digests = {**known, **dict(zip(todo, sha256_files(todo, threads)))} if checksums else {}
    return [{"path": str(r.folder), "weight_files": {f: digests.get((r.folder / f).absolute()) for f in r.weight_files}}
            for r in readers]


def output_sha256(folder: str | Path) -> dict[str, str]:
    """The sha256 of the output weight files of a merge, by file name, from its provenance (empty
    when it was written without checksums)."""
    try:
        provenance = json.loads((Path(folder) / PROVENANCE_FILE).read_text())
        return {name: digest for name, digest in provenance["output"]["weight_files"].items() if digest}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"{folder}: no readable {PROVENANCE_FILE} ({exc})") from exc


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: cannot read config: {exc}") from exc
    if "vocab_size" not in data and isinstance(data.get("text_config"), dict):
        return data["text_config"]
    return data


def _versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    try:
        from importlib.metadata import version

        versions["imm_ray"] = version("imm-ray")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        pass
    return versions


def _publish(tmp: Path, out_dir: Path, fsync: bool) -> None:
    """Rename the finished temporary folder to ``out_dir`` (fails if ``out_dir`` appeared meanwhile)."""
    if fsync:
        for path in (*sorted(p for p in tmp.iterdir() if p.is_file()), tmp):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if out_dir.exists() or out_dir.is_symlink():
        raise MergeError(f"output folder appeared during the merge (refusing to overwrite): {out_dir}")
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:
        raise MergeError(f"cannot publish merge to {out_dir}: {exc}") from exc
    if fsync:
        fd = os.open(out_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

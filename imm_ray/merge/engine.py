"""The merge engine: validate inputs, stream tensors through a merge method, publish atomically."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import safetensors
import torch
from tqdm.auto import tqdm

from .errors import MergeError
from .methods import MergeMethod, get_merge_method
from .safetensors_io import (
    CheckpointReader,
    StreamingSafetensorsWriter,
    TensorInfo,
    dtype_name,
    is_weight_file,
    parse_dtype,
    parse_size,
    sha256_file,
)

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "merge_provenance.json"
PROVENANCE_FORMAT = "imm_ray.merge/1"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_EMBEDDING_NAME = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings)\.weight$"
)


def merge_checkpoints(
    method: str,
    anchor: str | Path,
    models: Sequence[str | Path],
    out_dir: str | Path,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    progress: bool = True,
    *,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
    hash_inputs: bool = True,
) -> Path:
    """Merge HF safetensors checkpoints with a registered method and write an HF folder to ``out_dir``.

    ``anchor`` is the base (for IMM: the original model); it supplies config, tokenizer and chat
    template files and, by default, the output dtype of every tensor. ``models`` are the fine-tuned
    folders. Tensors are processed one at a time in sorted-name order with a single
    ``torch.Generator`` seeded with ``seed``, computed in fp32 and cast to ``dtype`` (default: each
    anchor tensor's stored dtype), so equal inputs and seed give byte-identical output.

    All checks on names, shapes and vocabularies happen before anything is written. The output is
    written into a temporary sibling folder and renamed to ``out_dir`` only on success; on any error
    the temporary folder is removed and ``out_dir`` is not created. Raises MergeError.
    """
    impl = get_merge_method(method)
    if isinstance(models, (str, Path)):
        raise MergeError("models must be a list of checkpoint folders, got a single path")
    model_paths = [Path(m).absolute() for m in models]
    anchor_path = Path(anchor).absolute()
    resolved = impl.validate(params, len(model_paths))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeError(f"seed must be an integer, got {seed!r}")
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    shard_bytes = parse_size(max_shard_size)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        raise MergeError(f"output folder already exists (refusing to overwrite): {out_dir}")

    with ExitStack() as stack:
        anchor_reader = stack.enter_context(CheckpointReader(anchor_path))
        readers = [stack.enter_context(CheckpointReader(p)) for p in model_paths]
        check_compatible(anchor_reader, readers)
        out_infos = [
            TensorInfo(
                info.name,
                out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype,
                info.shape,
            )
            for info in (anchor_reader.tensors[n] for n in anchor_reader.names())
        ]
        inputs = [_describe_input(r, hash_inputs) for r in (anchor_reader, *readers)]
        logger.info(
            "merging %s with %s (params=%s, seed=%d) onto anchor %s: %d tensors -> %s",
            [str(p) for p in model_paths], method, resolved, seed, anchor_path, len(out_infos), out_dir,
        )
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        writer: StreamingSafetensorsWriter | None = None
        try:
            copied = copy_support_files(anchor_path, tmp, out_dtype)
            writer = StreamingSafetensorsWriter(tmp, out_infos, shard_bytes)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            for info in tqdm(out_infos, desc=f"merge[{method}]", unit="tensor", disable=not progress):
                tensor = _merge_one(impl, resolved, info, anchor_reader, readers, generator)
                writer.write(info.name, tensor)
            out_hashes = writer.close()
            provenance = {
                "format": PROVENANCE_FORMAT,
                "method": method,
                "params": resolved,
                "seed": seed,
                "dtype": dtype_name(out_dtype) if out_dtype is not None else None,
                "output_dtypes": sorted({dtype_name(i.dtype) for i in out_infos}),
                "max_shard_size": shard_bytes,
                "anchor": inputs[0],
                "models": inputs[1:],
                "output": {
                    "weight_files": out_hashes,
                    "num_tensors": len(out_infos),
                    "total_bytes": sum(i.nbytes for i in out_infos),
                    "copied_files": copied,
                },
                "versions": _versions(),
            }
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            _publish(tmp, out_dir)
        except BaseException:
            if writer is not None:
                writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("merge written to %s", out_dir)
    return out_dir


def check_compatible(anchor: CheckpointReader, models: Sequence[CheckpointReader]) -> None:
    """Raise MergeError unless every model has the anchor's tensor names and shapes.

    Vocabulary mismatches (embedding rows differ) are reported first, naming both vocab sizes.
    A tied anchor (no ``lm_head.weight``) against an untied model is reported as such.
    """
    vocab = _read_config(anchor.folder).get("vocab_size")
    embeddings = [
        info for info in (anchor.tensors[n] for n in anchor.names())
        if len(info.shape) == 2
        and (
            _EMBEDDING_NAME.search(info.name)
            or (info.shape[0] == vocab and re.search(r"embed|head", info.name))
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


def copy_support_files(src: Path, dst: Path, out_dtype: torch.dtype | None = None) -> list[str]:
    """Copy every top-level non-weight file (config, generation config, tokenizer, chat template...)
    from ``src`` to ``dst``; subfolders, hidden files and old provenance are skipped. If ``out_dtype``
    is set, the dtype recorded in config.json is updated. Returns the copied names."""
    copied = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name.startswith(".") or is_weight_file(name) or name == PROVENANCE_FILE:
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
            data[key] = dtype_name(out_dtype)
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return copied


def _merge_one(
    impl: MergeMethod,
    params: dict[str, Any],
    info: TensorInfo,
    anchor: CheckpointReader,
    models: Sequence[CheckpointReader],
    generator: torch.Generator,
) -> torch.Tensor:
    name = info.name
    if not anchor.tensors[name].dtype.is_floating_point:
        value = anchor.get(name)
        if any(not torch.equal(value, m.get(name)) for m in models):
            logger.warning("non-float tensor %r differs between inputs; keeping the anchor's", name)
        return value
    anchor32 = _load_fp32(anchor, name) if impl.uses_anchor_weights else None
    models32 = [_load_fp32(m, name) for m in models]
    result = impl.merge_tensor(anchor32, models32, params, generator)
    out = result.to(info.dtype)
    if not bool(torch.isfinite(out).all()):
        overflow = bool(torch.isfinite(result).all())
        cause = f" (overflow when casting to {dtype_name(info.dtype)})" if overflow else ""
        raise MergeError(f"merged tensor {name!r} contains NaN/Inf{cause}; nothing was written")
    return out


def _load_fp32(reader: CheckpointReader, name: str) -> torch.Tensor:
    tensor = reader.get(name).to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"input tensor {name!r} of {reader.folder} contains NaN/Inf; nothing was written")
    return tensor


def _describe_input(reader: CheckpointReader, hash_inputs: bool) -> dict[str, Any]:
    return {
        "path": str(reader.folder),
        "weight_files": {
            f: (sha256_file(reader.folder / f) if hash_inputs else None) for f in reader.weight_files
        },
    }


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
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }
    try:
        from importlib.metadata import version

        versions["imm_ray"] = version("imm-ray")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        pass
    return versions


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary folder to ``out_dir`` (fails if ``out_dir`` appeared meanwhile)."""
    fd = os.open(tmp, os.O_RDONLY)
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

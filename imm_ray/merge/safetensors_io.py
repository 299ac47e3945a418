"""Streaming safetensors IO: read checkpoints tensor by tensor, write (sharded) output tensor by tensor.

Reading uses ``safetensors.safe_open`` (memory-mapped; one tensor at a time). Headers are parsed
directly so names, shapes and dtypes are known without touching tensor data. Writing streams: the
header of each output file is computed up front from the planned shapes/dtypes, then tensor bytes are
appended in order, so at most one tensor is held in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import MergeError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _st, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                   ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_st] = getattr(torch, _attr)
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_TO_TORCH.items()}

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"torch.bfloat16"``/torch.dtype -> floating torch.dtype."""
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise MergeError(f"output dtype must be floating point, got {name}")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise MergeError(f"unknown dtype {name!r} (use one of {sorted(_DTYPE_ALIASES)})")
    return _DTYPE_ALIASES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str | None) -> int | None:
    """``"5GB"`` -> 5e9 bytes, ``"2GiB"`` -> 2**31, ints pass through; None means no sharding."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise MergeError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match:
        raise MergeError(f"cannot parse size {size!r} (e.g. '5GB', '500MB', '2GiB')")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    value = int(number * scale)
    if value <= 0:
        raise MergeError(f"max_shard_size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype, shape (and file) of one stored tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> dict[str, Any]:
    """Parse the JSON header of a safetensors file (no tensor data is read)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise MergeError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER_BYTES:
                raise MergeError(f"{path}: safetensors header too large ({length} bytes)")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MergeError(f"{path}: cannot read safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise MergeError(f"{path}: malformed safetensors header")
    return header


class CheckpointReader:
    """Tensor-by-tensor access to an HF checkpoint folder (single or sharded safetensors).

    Use as a context manager; files are opened lazily with ``safe_open(..., framework="pt")``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MergeError(f"checkpoint folder does not exist: {self.folder}")
        self.weight_files = self._find_weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for fname in self.weight_files:
            header = read_header(self.folder / fname)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise MergeError(f"{self.folder}: tensor {name!r} is stored twice")
                st_dtype = meta.get("dtype")
                if st_dtype not in _ST_TO_TORCH:
                    raise MergeError(f"{self.folder}/{fname}: unsupported dtype {st_dtype!r} for {name!r}")
                self.tensors[name] = TensorInfo(name, _ST_TO_TORCH[st_dtype], tuple(meta["shape"]), fname)
        if not self.tensors:
            raise MergeError(f"{self.folder}: no tensors found in {self.weight_files}")
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}

    def _find_weight_files(self) -> list[str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise MergeError(f"{index}: malformed index: {exc}") from exc
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise MergeError(f"{self.folder}: shards listed in {INDEX_FILE} are missing: {missing}")
            return files
        if (self.folder / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        others = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if len(others) == 1:
            return others
        raise MergeError(
            f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE} found"
            + (f" (found {others})" if others else " (only safetensors checkpoints are supported)")
        )

    def names(self) -> list[str]:
        """Tensor names in sorted order."""
        return sorted(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (as stored)."""
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._stack.enter_context(
                safe_open(str(self.folder / info.file), framework="pt", device="cpu")
            )
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_weight_file(name: str) -> bool:
    """True for files that hold (or index) model weights, which a merge must not copy."""
    lower = name.lower()
    return (
        lower.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"))
        or lower in (INDEX_FILE, "pytorch_model.bin.index.json", "tf_model.h5.index.json",
                     "flax_model.msgpack.index.json")
    )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def plan_shards(infos: Sequence[TensorInfo], max_shard_bytes: int | None) -> list[list[TensorInfo]]:
    """Split tensors (in the given order) into consecutive shards of at most ``max_shard_bytes``
    (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if max_shard_bytes is not None and shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class StreamingSafetensorsWriter:
    """Write tensors, in a fixed planned order, into one or more safetensors files in ``folder``.

    Layout follows HF: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. Call ``write`` once per planned tensor, then ``close``.
    """

    def __init__(
        self,
        folder: Path,
        infos: Sequence[TensorInfo],
        max_shard_bytes: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":
            raise MergeError("the safetensors writer needs a little-endian machine")
        for info in infos:
            if info.dtype not in _TORCH_TO_ST:
                raise MergeError(f"cannot write dtype {info.dtype} (tensor {info.name!r})")
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(list(infos), max_shard_bytes)
        n = len(self.shards)
        self.files = (
            [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(s, j) for s, shard in enumerate(self.shards) for j in range(len(shard))]
        self._pos = 0
        self._fh: Any = None
        self._digest: Any = None
        self.sha256: dict[str, str] = {}

    def _header_bytes(self, shard: list[TensorInfo]) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for info in shard:
            header[info.name] = {
                "dtype": _TORCH_TO_ST[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._digest.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (must match the planned name, dtype and shape)."""
        if self._pos >= len(self._queue):
            raise MergeError(f"unexpected extra tensor {name!r}")
        s, j = self._queue[self._pos]
        info = self.shards[s][j]
        if name != info.name or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise MergeError(
                f"writer expected {info.name!r} {info.dtype} {list(info.shape)}, "
                f"got {name!r} {tensor.dtype} {list(tensor.shape)}"
            )
        if j == 0:
            self._fh = open(self.folder / self.files[s], "wb")
            self._digest = hashlib.sha256()
            self._emit(self._header_bytes(self.shards[s]))
        if info.nbytes:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._emit(memoryview(flat.numpy()))
        self._pos += 1
        if j == len(self.shards[s]) - 1:
            self._finish_file(s)

    def _finish_file(self, s: int) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self.sha256[self.files[s]] = self._digest.hexdigest()

    def close(self) -> dict[str, str]:
        """Check every planned tensor was written, write the index if sharded; return file sha256s."""
        if self._pos != len(self._queue):
            raise MergeError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for shard in self.shards for i in shard)},
                "weight_map": {
                    info.name: self.files[s] for s, shard in enumerate(self.shards) for info in shard
                },
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return dict(self.sha256)

    def abort(self) -> None:
        """Close an open file after a failure (the caller removes the folder)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


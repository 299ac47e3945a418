"""Streaming safetensors IO: read checkpoints tensor by tensor, write (sharded) output tensor by tensor.

Headers are parsed directly, so names, shapes, dtypes and byte offsets are known without touching
tensor data; reading is ``pread`` of any element range of a tensor into a caller's buffer (from the
page cache; thread-safe, releases the GIL; no file is held in memory). Writing: the header of every
output file is computed up front from the planned names/dtypes/shapes, the files are created at
full size, and any element range of any tensor is written in place with ``pwrite`` (from any thread,
in any order). Neither side ever holds a shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dtypes import DType, dtype_from_safetensors
from .errors import MergeError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_RESAVE = "the file is damaged or not a safetensors checkpoint: re-save it"


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
    dtype: DType
    shape: tuple[int, ...]
    file: str = ""
    offset: int = 0  # absolute byte offset of the data in ``file``

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(path: Path) -> dict[str, Any]:
    """Parse the JSON header of a safetensors file (no tensor data is read)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise MergeError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER_BYTES:
                raise MergeError(f"{path}: safetensors header too large ({length} bytes); {_RESAVE}")
            header = json.loads(fh.read(length))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MergeError(f"{path}: cannot parse the safetensors header ({exc}); {_RESAVE}") from exc
    except OSError as exc:
        raise MergeError(f"{path}: cannot read the safetensors header: {exc.strerror or exc}") from exc
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise MergeError(f"{path}: the safetensors header must be a JSON object, got {kind}; {_RESAVE}")
    return header


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def parse_header_entry(
    path: Path, name: str, meta: Any, data_start: int, file_size: int
) -> tuple[DType, tuple[int, ...], int, int]:
    """Check one tensor's header entry; return its dtype, shape and absolute data ``begin, end``.

    Rejects (MergeError naming the file and tensor) what a crafted header can put there: an entry
    that is not a mapping, an unknown dtype, a shape that is not a list of non-negative integers,
    data offsets that are not ``[begin, end]`` with ``0 <= begin <= end`` inside the file, and a
    byte length that does not match the shape.
    """
    where = f"{path}: tensor {name!r}"
    if not isinstance(meta, dict):
        raise MergeError(f"{where}: its header entry must be an object with dtype, shape and data_offsets, "
                         f"got {type(meta).__name__}; {_RESAVE}")
    st = meta.get("dtype")
    dtype = dtype_from_safetensors(st) if isinstance(st, str) else None
    if dtype is None:
        raise MergeError(f"{where}: unsupported dtype {st!r}")
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not _is_int_list(shape) or any(d < 0 for d in shape):
        raise MergeError(f"{where}: shape must be a list of non-negative integers, got {shape!r}; {_RESAVE}")
    if not (_is_int_list(offsets) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
        raise MergeError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}; "
                         f"{_RESAVE}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise MergeError(f"{where}: data_offsets {offsets} hold {end - begin} bytes but {st} {shape} needs {nbytes}; "
                         f"{_RESAVE}")
    if end > file_size:
        raise MergeError(f"{where}: data ends at byte {end} but the file has {file_size} (truncated); {_RESAVE}")
    return dtype, tuple(shape), begin, end


class CheckpointReader:
    """Tensor access to an HF checkpoint folder (single or sharded safetensors, via the index file).

    Use as a context manager. ``read_into`` reads any element range of a tensor; ``get`` a whole one.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MergeError(f"checkpoint folder does not exist: {self.folder}")
        self.weight_files = self._find_weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for fname in self.weight_files:
            self._add_file(fname)
        if not self.tensors:
            raise MergeError(f"{self.folder}: no tensors found in {self.weight_files}")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _add_file(self, fname: str) -> None:
        path = self.folder / fname
        header = read_header(path)
        data_start = 8 + _header_length(path)
        size = path.stat().st_size
        spans: list[tuple[int, int, str]] = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if name in self.tensors:
                raise MergeError(f"{self.folder}: tensor {name!r} is stored twice")
            dtype, shape, begin, end = parse_header_entry(path, name, meta, data_start, size)
            self.tensors[name] = TensorInfo(name, dtype, shape, fname, begin)
            spans.append((begin, end, name))
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise MergeError(f"{path}: the data of tensors {first!r} and {second!r} overlap; {_RESAVE}")

    def _find_weight_files(self) -> list[str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise MergeError(f"{index}: malformed index ({exc}); re-save the checkpoint") from exc
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise MergeError(f"{index}: weight_map must map tensor names to file names; re-save the checkpoint")
            files = sorted(set(weight_map.values()))
            outside = [f for f in files if Path(f).name != f or f in (".", "..")]
            if outside:
                raise MergeError(f"{index}: shard names must be files in {self.folder}, got {outside}")
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

    def _fd(self, fname: str) -> int:
        fd = self._fds.get(fname)
        if fd is None:
            with self._lock:
                fd = self._fds.get(fname)
                if fd is None:
                    fd = os.open(self.folder / fname, os.O_RDONLY)
                    self._fds[fname] = fd
        return fd

    def read_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        """Read elements ``start .. start + out.size`` (flat) of ``name`` into contiguous ``out``
        (of the stored dtype's numpy storage); returns ``out``."""
        info = self.tensors[name]
        if out.dtype != info.dtype.storage or not out.flags.c_contiguous or start + out.size > info.numel:
            raise MergeError(f"bad read of {name!r}: {out.dtype} x {out.size} at element {start}")
        if out.size:
            pread_full(self._fd(info.file), _bytes_view(out), info.offset + start * out.itemsize,
                       self.folder / info.file)
        return out

    def get(self, name: str) -> np.ndarray:
        """Load one whole tensor as stored (a new array of the dtype's numpy storage, shaped)."""
        info = self.tensors[name]
        return self.read_into(name, 0, np.empty(info.shape, dtype=info.dtype.storage))

    def get_float32(self, name: str) -> np.ndarray:
        """Load one whole floating tensor as float32 (shaped)."""
        info = self.tensors[name]
        if not info.dtype.is_floating_point:
            raise MergeError(f"tensor {name!r} is {info.dtype}, not a floating tensor")
        return info.dtype.to_float32(self.get(name))

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _header_length(path: Path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


def _bytes_view(array: np.ndarray) -> memoryview:
    """Byte view of a contiguous array's memory."""
    return memoryview(array.reshape(-1).view(np.uint8))


def pread_full(fd: int, buf: memoryview, offset: int, path: Path | str = "") -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (loops over short reads)."""
    done, total = 0, len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise MergeError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


def pwrite_full(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` to ``fd`` at ``offset``."""
    done, total = 0, len(buf)
    while done < total:
        done += os.pwritev(fd, [buf[done:]], offset + done)


def is_weight_file(name: str) -> bool:
    """True for files that hold (or index) model weights, which a merge must not copy."""
    lower = name.lower()
    return (
        lower.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"))
        or lower in (INDEX_FILE, "pytorch_model.bin.index.json", "tf_model.h5.index.json",
                     "flax_model.msgpack.index.json")
    )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (hashlib releases the GIL: files hash in parallel)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def sha256_files(paths: Sequence[Path], threads: int = 1) -> list[str]:
    """sha256 of several files, ``threads`` at a time."""
    if threads <= 1 or len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


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
    """Write planned tensors into one or more safetensors files in ``folder``, block by block.

    Layout follows HF: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. All files are created (header written, full size) up front;
    ``write_block`` (thread-safe) puts any element range of a tensor in place, ``write`` a whole one.
    ``close`` checks that every byte was written.
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
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(list(infos), max_shard_bytes)
        n = len(self.shards)
        self.files = (
            [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._plan: dict[str, tuple[TensorInfo, int, int]] = {}  # name -> (info, fd, data offset)
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fds: list[int] = []
        try:
            for fname, shard in zip(self.files, self.shards):
                self._create(fname, shard)
        except BaseException:
            self.abort()
            raise

    def _create(self, fname: str, shard: list[TensorInfo]) -> None:
        header = self._header_bytes(shard)
        fd = os.open(self.folder / fname, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._fds.append(fd)
        pwrite_full(fd, memoryview(header), 0)
        offset = len(header)
        for info in shard:
            if info.name in self._plan:
                raise MergeError(f"tensor {info.name!r} is planned twice")
            self._plan[info.name] = (info, fd, offset)
            self._written[info.name] = 0
            offset += info.nbytes
        os.ftruncate(fd, offset)

    def _header_bytes(self, shard: list[TensorInfo]) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for info in shard:
            header[info.name] = {
                "dtype": info.dtype.st,
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def write_block(self, name: str, start: int, block: np.ndarray) -> None:
        """Write ``block`` (the planned dtype's numpy storage) as flat elements ``start ..`` of ``name``."""
        planned = self._plan.get(name)
        if planned is None:
            raise MergeError(f"writer got unplanned tensor {name!r}")
        info, fd, offset = planned
        if block.dtype != info.dtype.storage or start < 0 or start + block.size > info.numel:
            raise MergeError(
                f"writer expected {info.name!r} {info.dtype} {list(info.shape)}, got a block of "
                f"{block.size} x {block.dtype} at element {start}"
            )
        if block.size:
            block = np.ascontiguousarray(block)
            pwrite_full(fd, _bytes_view(block), offset + start * block.itemsize)
        with self._lock:
            self._written[name] += block.size

    def write(self, name: str, array: np.ndarray) -> None:
        """Write a whole planned tensor (storage dtype and shape must match the plan)."""
        info = self._plan[name][0] if name in self._plan else None
        if info is None or array.dtype != info.dtype.storage or tuple(array.shape) != info.shape:
            want = f"{info.name!r} {info.dtype} {list(info.shape)}" if info else "a planned tensor"
            raise MergeError(f"writer expected {want}, got {name!r} {array.dtype} {list(array.shape)}")
        self.write_block(name, 0, array)

    def close(self, fsync: bool = False) -> list[str]:
        """Check that every planned element was written, close the files (``fsync`` first if asked)
        and write the index if sharded; returns the weight file names."""
        missing = [n for n, (info, _, _) in self._plan.items() if self._written[n] != info.numel]
        if missing:
            raise MergeError(f"writer closed with {len(missing)} incomplete tensors, e.g. {missing[0]!r}")
        for fd in self._fds:
            if fsync:
                os.fsync(fd)
        self.abort()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for shard in self.shards for i in shard)},
                "weight_map": {
                    info.name: self.files[s] for s, shard in enumerate(self.shards) for info in shard
                },
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return list(self.files)

    def abort(self) -> None:
        """Close the files (after a failure the caller removes the folder)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

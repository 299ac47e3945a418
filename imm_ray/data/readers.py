"""Row readers for files (JSONL, JSON, Parquet; local or on object storage) and `datasets` hub sets.

Readers yield RawRow objects: bad rows are reported (error set), not raised, so the loader
can count them or fail in strict mode with the exact location.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from imm_ray.data.problems import DataError
from imm_ray.storage import fs as storage

__all__ = ["RawRow", "FILE_SUFFIXES", "iter_file_rows", "iter_hub_rows", "load_hub_rows"]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class RawRow:
    """One record of a source: its 0-based position, a human-readable location, data or error."""

    index: int
    location: str
    data: dict[str, Any] | None
    error: str | None = None


def _iter_jsonl(lines: list[str]) -> Iterator[RawRow]:
    index = 0
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        location = f"line {line_no}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRow(index, location, None, f"invalid JSON ({exc.msg})")
        else:
            if isinstance(data, dict):
                yield RawRow(index, location, data)
            else:
                yield RawRow(index, location, None, f"expected a JSON object, got {type(data).__name__}")
        index += 1


def _iter_records(records: list[Any]) -> Iterator[RawRow]:
    for index, data in enumerate(records):
        location = f"row {index}"
        if isinstance(data, dict):
            yield RawRow(index, location, data)
        else:
            yield RawRow(index, location, None, f"expected an object, got {type(data).__name__}")


def _iter_json(text: str, path: str) -> Iterator[RawRow]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a .json file that is really JSON Lines
            return _iter_jsonl(text.splitlines())
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}")
    return _iter_records(payload)


def _iter_parquet(data: bytes, path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as exc:  # pyarrow raises several error types for unreadable files
        raise DataError(f"{path}: cannot read Parquet file ({exc})") from exc
    return _iter_records(records)


def _read(loc: storage.Location) -> bytes:
    try:
        return storage.read_bytes(loc)
    except OSError as exc:  # pyarrow reports missing objects, credentials and network alike
        raise DataError(f"{loc}: cannot read ({type(exc).__name__}: {exc})") from exc


def iter_file_rows(path: str | Path | storage.Location) -> Iterator[RawRow]:
    """Rows of a .jsonl, .json or .parquet file, in file order: a local path or a storage URI
    (``s3://``, ``gs://``, read through :mod:`imm_ray.storage.fs`)."""
    loc = storage.resolve(path)
    suffix = PurePosixPath(loc.path).suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".parquet"):
        raise DataError(f"{loc}: unsupported file type {suffix!r} (use one of {FILE_SUFFIXES})")
    data = _read(loc)
    if suffix == ".parquet":
        return _iter_parquet(data, str(loc))
    text = data.decode("utf-8")
    if suffix == ".json":
        return _iter_json(text, str(loc))
    return _iter_jsonl(text.splitlines())


def load_hub_rows(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a `datasets` hub set (honours HF_HUB_OFFLINE and the local datasets cache)."""
    import datasets

    return datasets.load_dataset(hub_id, config, split=split).to_list()


def iter_hub_rows(hub_id: str, config: str | None, split: str) -> Iterator[RawRow]:
    """Hub rows as RawRow objects; raises whatever the hub loader raises."""
    return _iter_records(load_hub_rows(hub_id, config, split))

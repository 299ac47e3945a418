"""load_problems: resolve a DatasetSpec to a source (local file or hub) and build Problems."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from imm_ray.data.bundled import BundledSplit, bundled_split
from imm_ray.data.presets import DatasetPreset, get_dataset_preset
from imm_ray.data.problems import DataError, LoadResult, Problem
from imm_ray.data.readers import FILE_SUFFIXES, RawRow, iter_file_rows, iter_hub_rows
from imm_ray.data.spec import AnswerFormat, DatasetSpec
from imm_ray.storage import fs as storage
from imm_ray.verify.answers import normalize_number

__all__ = ["DATA_DIR_ENV", "load_problems", "find_data_file", "gold_answer"]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "IMM_DATA_DIR"
_FIX_HINT = (
    f"set the {DATA_DIR_ENV} environment variable or the config's data.dir to a folder (or an s3:// "
    "or gs:// URI) holding <dataset>/<split>.jsonl, give the dataset an explicit path, or make its "
    "hub_id reachable"
)


@dataclass(frozen=True)
class _FieldMap:
    question: str
    answer: str
    id: str | None
    answer_format: AnswerFormat


def _field_map(spec: DatasetSpec, preset: DatasetPreset | None, hub: bool) -> _FieldMap:
    """Explicitly set spec fields win; otherwise the preset's (its hub variant for hub sources)."""
    explicit = spec.model_fields_set

    def pick(field: str, preset_value: Any, hub_value: Any) -> Any:
        if preset is None or field in explicit:
            return getattr(spec, field)
        return hub_value if hub and hub_value is not None else preset_value

    if preset is None:
        return _FieldMap(spec.question_field, spec.answer_field, spec.id_field, spec.answer_format)
    return _FieldMap(
        question=pick("question_field", preset.question_field, preset.hub_question_field),
        answer=pick("answer_field", preset.answer_field, preset.hub_answer_field),
        id=spec.id_field,
        answer_format=pick("answer_format", preset.answer_format, preset.hub_answer_format),
    )


def _kind(loc: storage.Location) -> str | None:
    """'file', 'dir' or None (missing); DataError when the storage cannot be asked."""
    try:
        kind = loc.fs.get_file_info(loc.path).type
    except OSError as exc:  # credentials, network, bucket permissions
        raise DataError(f"{loc}: cannot look it up ({type(exc).__name__}: {exc})") from exc
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind)


def _split_file(folder: storage.Location, split: str) -> storage.Location | None:
    for suffix in FILE_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if _kind(candidate) == "file":
            return candidate
    return None


def _describe_split_file(folder: storage.Location, split: str) -> str:
    return f"{folder}/{split}{{{','.join(FILE_SUFFIXES)}}}"


def _is_absolute(path: str) -> bool:
    return "://" in path or Path(path).expanduser().is_absolute()


def find_data_file(
    spec: DatasetSpec, data_dir: str | Path | None = None
) -> tuple[storage.Location | None, list[str]]:
    """Find the file for spec in the data folders; returns (location or None, the candidates
    tried, in order). Paths and folders may be local or storage URIs (s3://, gs://).

    Order: explicit spec.path (as given, then relative to data_dir and $IMM_DATA_DIR; a folder
    means <folder>/<split>.jsonl|json|parquet), then <data_dir>/<folder>/<split>.*, then
    <$IMM_DATA_DIR>/<folder>/<split>.*, where folder is the preset's folder or the spec name.
    """
    roots = [storage.resolve(r) for r in (data_dir, os.environ.get(DATA_DIR_ENV)) if r]
    tried: list[str] = []
    if spec.path:
        candidates = [storage.resolve(spec.path)]
        if not _is_absolute(spec.path):
            candidates += [root / spec.path for root in roots]
        for candidate in candidates:
            kind = _kind(candidate)
            if kind == "file":
                return candidate, tried + [str(candidate)]
            if kind == "dir":
                found = _split_file(candidate, spec.split)
                tried.append(_describe_split_file(candidate, spec.split))
                if found:
                    return found, tried
            else:
                tried.append(str(candidate))
        return None, tried
    folder = get_dataset_preset(spec.preset).folder if spec.preset else spec.name
    for root in roots:
        found = _split_file(root / folder, spec.split)
        tried.append(_describe_split_file(root / folder, spec.split))
        if found:
            return found, tried
    return None, tried


def gold_answer(value: Any, answer_format: AnswerFormat) -> str | None:
    """Normalised gold answer from a raw field value; None when it is unusable for the format."""
    if value is None or isinstance(value, bool):
        return None
    if answer_format == "gsm8k":
        if not isinstance(value, str) or "####" not in value:
            return None
        return normalize_number(value.rsplit("####", 1)[1].strip())
    number = normalize_number(value if isinstance(value, (int, float)) else str(value))
    if number is not None or answer_format == "numeric":
        return number
    text = str(value).strip()
    return text or None


def _to_problem(row: RawRow, fields: _FieldMap, name: str, require_answer: bool) -> Problem | str:
    """A Problem, or a message saying why the row is malformed (a row without an answer is, when
    ``require_answer``; else its answer is None)."""
    if row.error is not None or row.data is None:
        return row.error or "empty row"
    data = row.data
    question = data.get(fields.question)
    if not isinstance(question, str) or not question.strip():
        return f"missing or empty question field {fields.question!r}"
    answer = None
    if data.get(fields.answer) is None:
        if require_answer:
            return f"missing answer field {fields.answer!r}"
    elif (answer := gold_answer(data[fields.answer], fields.answer_format)) is None:
        raw = repr(data[fields.answer])
        raw = raw if len(raw) <= 80 else raw[:77] + "..."
        return f"unparseable gold answer {raw} for answer_format {fields.answer_format!r}"
    if fields.id is not None:
        raw_id = data.get(fields.id)
        if raw_id is None or str(raw_id).strip() == "":
            return f"missing id field {fields.id!r}"
        problem_id = str(raw_id)
    else:
        problem_id = f"{name}-{row.index}"
    return Problem(id=problem_id, question=question.strip(), answer=answer, dataset=name)


def _build(
    rows: Iterable[RawRow], spec: DatasetSpec, fields: _FieldMap, source: str, require_answer: bool = True
) -> LoadResult:
    stop = None if spec.limit is None else spec.offset + spec.limit
    problems: list[Problem] = []
    seen_ids: set[str] = set()
    malformed: list[str] = []
    for row in rows:
        if row.index < spec.offset:
            continue
        if stop is not None and row.index >= stop:
            break
        result = _to_problem(row, fields, spec.name, require_answer)
        if isinstance(result, Problem) and result.id in seen_ids:
            result = f"duplicate id {result.id!r}"
        if isinstance(result, str):
            message = f"{source}: {row.location}: {result}"
            if spec.strict:
                raise DataError(f"dataset {spec.name!r}: malformed row: {message}")
            malformed.append(message)
            continue
        seen_ids.add(result.id)
        problems.append(result)
    if malformed:
        logger.warning(
            "dataset %r: skipped %d malformed row(s); first: %s",
            spec.name,
            len(malformed),
            malformed[0],
        )
    return LoadResult(
        problems=problems,
        malformed=len(malformed),
        source=source,
        malformed_examples=malformed[:5],
    )


def _bundled(spec: DatasetSpec, preset: DatasetPreset | None) -> BundledSplit | None:
    """The bundled copy of the set spec names, unless spec points elsewhere (a path or another
    hub set)."""
    if preset is None or spec.path:
        return None
    if spec.hub_id not in (None, preset.hub_id) or spec.hub_config not in (None, preset.hub_config):
        return None
    return bundled_split(preset.folder, spec.split)


def _window(spec: DatasetSpec) -> str:
    return f"rows {spec.offset}-{'end' if spec.limit is None else spec.offset + spec.limit - 1}"


def _missing_hint(spec: DatasetSpec, preset: DatasetPreset | None, bundled: BundledSplit | None) -> str:
    """What the user can do when no source holds the set (the bundled copy's size, the preset's note)."""
    hint = ""
    if bundled is not None:
        hint = (f" The package's bundled copy holds only the first {bundled.rows:,} of its "
                f"{bundled.full_rows:,} rows and {_window(spec)} were asked for.")
    if preset is not None and preset.note:
        hint += f" {preset.note}"
    return f"{hint} Fix: {_FIX_HINT}."


def load_problems(spec: DatasetSpec, data_dir: str | Path | None = None, require_answer: bool = True) -> LoadResult:
    """Load the problems a DatasetSpec names.

    Source resolution: explicit path > data_dir argument > $IMM_DATA_DIR (paths and folders may be
    storage URIs) > the package's bundled copy when the requested rows (offset, limit) lie inside
    it > a generated preset > hub (spec.hub_id, else the preset's). An explicit path that does not
    exist is an error unless spec.hub_id is also given. offset/limit select rows by their position
    in the source (ids f"{name}-{index}" keep that position); malformed rows in the window are
    skipped and counted, or raise DataError when spec.strict. Without ``require_answer`` (a verifier
    that needs no gold) a row without an answer loads with answer None.
    """
    try:
        preset = get_dataset_preset(spec.preset) if spec.preset else None
    except KeyError as exc:
        raise DataError(f"dataset {spec.name!r}: {exc.args[0]}") from None
    path, tried = find_data_file(spec, data_dir)
    if path is not None:
        logger.info("dataset %r: loading %s", spec.name, path)
        return _build(iter_file_rows(path), spec, _field_map(spec, preset, hub=False), str(path), require_answer)
    bundled = _bundled(spec, preset)
    if bundled is not None and bundled.holds(spec.offset, spec.limit):
        logger.info("dataset %r: loading %s of the bundled copy %s (no data folder holds it)",
                    spec.name, _window(spec), bundled.path)
        return _build(iter_file_rows(bundled.path), spec, _field_map(spec, preset, hub=False), str(bundled.path),
                      require_answer)
    if preset is not None and preset.builder is not None and not spec.path:
        logger.info("dataset %r: generating preset %s split %s", spec.name, preset.name, spec.split)
        return preset.builder(spec)
    hub_id = spec.hub_id or (preset.hub_id if preset and not spec.path else None)
    tried_text = ", ".join(tried) or f"nothing (no path, data_dir or {DATA_DIR_ENV})"
    if hub_id is None:
        raise DataError(
            f"dataset {spec.name!r} (split {spec.split!r}): no local file found and no hub_id; "
            f"tried: {tried_text}.{_missing_hint(spec, preset, bundled)}"
        )
    hub_config = spec.hub_config
    if hub_config is None and preset is not None and hub_id == preset.hub_id:
        hub_config = preset.hub_config
    try:
        rows = list(iter_hub_rows(hub_id, hub_config, spec.split))
    except Exception as exc:  # hub/network/cache failures come in many types
        raise DataError(
            f"dataset {spec.name!r} (split {spec.split!r}): no local file found "
            f"(tried: {tried_text}) and loading hub dataset {hub_id!r}"
            f"{f' config {hub_config!r}' if hub_config else ''} failed: "
            f"{type(exc).__name__}: {exc}.{_missing_hint(spec, preset, bundled)}"
        ) from exc
    logger.info("dataset %r: loaded %d rows from hub %s", spec.name, len(rows), hub_id)
    return _build(rows, spec, _field_map(spec, preset, hub=True), hub_id, require_answer)

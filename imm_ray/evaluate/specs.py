"""Dataset arguments of ``imm eval``: a preset name or PATH[:QUESTION_FIELD:ANSWER_FIELD[:FORMAT]]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import get_args

from imm_ray.data import DATASET_PRESETS, AnswerFormat, DatasetSpec
from imm_ray.errors import UsageError

__all__ = ["parse_dataset_arg", "parse_dataset_args"]

_FORMATS = get_args(AnswerFormat)


def parse_dataset_arg(arg: str, limit: int | None = None) -> DatasetSpec:
    """DatasetSpec for one ``--dataset`` value.

    - a preset name (gsm8k, svamp, asdiv, ...): its test split, found under --data-dir or
      $IMM_DATA_DIR, else on the hub;
    - ``PATH`` (JSONL/JSON/Parquet file, or a folder holding test.*; local or an s3:// or gs://
      URI) with fields question/answer;
    - ``PATH:QUESTION_FIELD:ANSWER_FIELD`` (e.g. ``mawps.jsonl:input:target``), optionally
      ``:FORMAT`` (plain, numeric or gsm8k; default plain: numbers normalised, other answers
      kept as text, e.g. MATH-500's LaTeX).

    A relative PATH is also looked up under the data dirs. The dataset is named after the file
    stem (the folder name for a folder). UsageError (a ValueError) on a malformed value.
    """
    scheme, sep, rest = arg.partition("://")  # a storage URI keeps its scheme's colon
    parts = (rest if sep else arg).split(":")
    if sep:
        parts[0] = f"{scheme}{sep}{parts[0]}"
    if len(parts) == 1 and arg in DATASET_PRESETS and not Path(arg).exists():
        return DatasetSpec(name=arg, preset=arg, split="test", limit=limit)
    if len(parts) not in (1, 3, 4) or not all(parts):
        raise UsageError(
            f"--dataset {arg!r}: expected a preset ({', '.join(sorted(DATASET_PRESETS))}) or "
            "PATH[:QUESTION_FIELD:ANSWER_FIELD[:FORMAT]]"
        )
    path = PurePosixPath(parts[0].rstrip("/"))
    fields = {}
    if len(parts) >= 3:
        fields = {"question_field": parts[1], "answer_field": parts[2]}
    if len(parts) == 4:
        if parts[3] not in _FORMATS:
            raise UsageError(f"--dataset {arg!r}: unknown answer format {parts[3]!r}; use one of {_FORMATS}")
        fields["answer_format"] = parts[3]
    name = path.name if path.suffix == "" else path.stem
    return DatasetSpec(name=name, path=parts[0], split="test", limit=limit, **fields)


def parse_dataset_args(args: Sequence[str], limit: int | None = None) -> list[DatasetSpec]:
    """Specs for several ``--dataset`` values; UsageError when two would get the same name."""
    specs = [parse_dataset_arg(a, limit) for a in args]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"--dataset: several datasets would be named {duplicates}; rename the files")
    return specs

"""DatasetSpec: the config block that names one dataset and how to read it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AnswerFormat", "DatasetSpec", "PRESET_FIELDS"]

# How the gold answer is read (see DatasetSpec.answer_format).
AnswerFormat = Literal["plain", "numeric", "gsm8k"]

# The fields a preset supplies when a spec with a preset leaves them unset (imm_ray.data.loaders).
PRESET_FIELDS = ("question_field", "answer_field", "answer_format")


class DatasetSpec(BaseModel):
    """Where a dataset lives and how its rows map onto Problem fields.

    With `preset`, fields that are not set explicitly are taken from the preset
    (see imm_ray.data.presets); explicitly set fields always win.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1)
    """Name of the data set in metrics and reports (required; unique among data.eval)."""
    preset: str | None = None
    """Known data set whose unset fields fill this one: gsm8k, svamp, asdiv, ... (imm_ray.data.presets)."""
    path: str | None = None
    """Local file or folder (JSONL, JSON or Parquet; a folder holds <split>.jsonl), relative to data.dir too."""
    hub_id: str | None = None
    """Hugging Face hub data set to load when no local file is found."""
    hub_config: str | None = None
    """Configuration (subset) of the hub data set."""
    split: str = "test"
    """Split to read: train or test."""
    question_field: str = "question"
    """Field of a row that holds the question."""
    answer_field: str = "answer"
    """Field of a row that holds the gold answer."""
    id_field: str | None = None
    """Field of a row that holds its id (default: the row's position)."""
    answer_format: AnswerFormat = "plain"
    """plain: gold as written (normalised if numeric); numeric: gold must be a number; gsm8k: the number after
    the last '####'."""
    offset: int = Field(default=0, ge=0)
    """Skip the first rows of the source."""
    limit: int | None = Field(default=None, ge=0)
    """Read at most this many rows after offset (unset: all)."""
    strict: bool = False
    """Fail on a malformed row instead of skipping it with a warning."""

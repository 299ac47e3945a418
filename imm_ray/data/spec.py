"""DatasetSpec: the config block that names one dataset and how to read it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AnswerFormat", "DatasetSpec", "PRESET_FIELDS"]

# plain: gold taken as written (normalised if numeric, kept as text otherwise);
# numeric: gold must be a number; gsm8k: gold is the number after the last '####'.
AnswerFormat = Literal["plain", "numeric", "gsm8k"]

# The fields a preset supplies when a spec with a preset leaves them unset (imm_ray.data.loaders).
PRESET_FIELDS = ("question_field", "answer_field", "answer_format")


class DatasetSpec(BaseModel):
    """Where a dataset lives and how its rows map onto Problem fields.

    With `preset`, fields that are not set explicitly are taken from the preset
    (see imm_ray.data.presets); explicitly set fields always win.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    preset: str | None = None
    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "test"
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    answer_format: AnswerFormat = "plain"
    offset: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, ge=0)
    strict: bool = False

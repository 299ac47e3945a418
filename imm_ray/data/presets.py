"""Registry of known benchmark datasets: file layout, field names, answer format, hub source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imm_ray.data.problems import LoadResult
from imm_ray.data.spec import AnswerFormat, DatasetSpec
from imm_ray.data.synthetic import load_synthetic
from imm_ray.registry import Registry

__all__ = ["DatasetPreset", "DATASET_PRESETS", "register_dataset_preset", "get_dataset_preset"]


@dataclass(frozen=True)
class DatasetPreset:
    """How to find and read one benchmark.

    Local files live at <data dir>/<folder>/<split>.jsonl (or .json/.parquet). The hub copy may
    name its columns differently (hub_question_field / hub_answer_field / hub_answer_format).
    """

    name: str
    folder: str
    question_field: str
    answer_field: str
    answer_format: AnswerFormat
    splits: tuple[str, ...] = ("test",)
    hub_id: str | None = None
    hub_config: str | None = None
    hub_question_field: str | None = None
    hub_answer_field: str | None = None
    # Generated sets: build the problems in memory when no local file exists.
    builder: Callable[[DatasetSpec], LoadResult] | None = None
    hub_answer_format: AnswerFormat | None = None
    # Where to get the set when no source has it (said in the loader's error).
    note: str | None = None


DATASET_PRESETS: Registry[DatasetPreset] = Registry("dataset preset")


def register_dataset_preset(preset: DatasetPreset, overwrite: bool = False) -> DatasetPreset:
    """Add a preset to DATASET_PRESETS (ValueError if the name exists and overwrite is False)."""
    return DATASET_PRESETS.add(preset.name, preset, overwrite)


def get_dataset_preset(name: str) -> DatasetPreset:
    """The preset called name; KeyError listing the known presets otherwise."""
    return DATASET_PRESETS.lookup(name)


register_dataset_preset(
    DatasetPreset(
        name="gsm8k",
        folder="gsm8k",
        question_field="question",
        answer_field="answer",
        answer_format="gsm8k",
        splits=("train", "test"),
        hub_id="openai/gsm8k",
        hub_config="main",
    )
)
# The hub copy (ChilleD/SVAMP) is a 700/300 train/test split with other column names; the
# local file is the 1,000-question set packaged by the PAL project.
register_dataset_preset(
    DatasetPreset(
        name="svamp",
        folder="svamp",
        question_field="input",
        answer_field="target",
        answer_format="numeric",
        hub_id="ChilleD/SVAMP",
        hub_question_field="question_concat",
        hub_answer_field="Answer",
    )
)
# ASDiv is licensed CC BY-NC 4.0 (non-commercial): it is not bundled and has no hub source here.
register_dataset_preset(
    DatasetPreset(
        name="asdiv",
        folder="asdiv",
        question_field="input",
        answer_field="target",
        answer_format="numeric",
        note=(
            "ASDiv is not shipped with imm-ray (its licence, CC BY-NC 4.0, is non-commercial): put its "
            "test set at <data dir>/asdiv/test.jsonl (fields input/target, e.g. the PAL project's "
            "datasets/asdiv.jsonl) and point data.dir or IMM_DATA_DIR at <data dir>."
        ),
    )
)
# Synthetic arithmetic word problems (imm_ray.data.synthetic): ID train/test and three OOD
# families, generated in memory (or read from <data dir>/synthetic/<split>.jsonl when written there
# with `python -m imm_ray.data.synthetic DATA_DIR`).
register_dataset_preset(
    DatasetPreset(
        name="synthetic",
        folder="synthetic",
        question_field="question",
        answer_field="answer",
        answer_format="numeric",
        splits=("train", "test", "ood-mul-div", "ood-two-step", "ood-reworded"),
        builder=load_synthetic,
    )
)

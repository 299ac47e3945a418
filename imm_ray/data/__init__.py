"""Benchmark data: problems, dataset specs and presets, loaders and prompt templates (no Ray)."""

from imm_ray.data.loaders import DATA_DIR_ENV, find_data_file, gold_answer, load_problems
from imm_ray.data.presets import (
    DATASET_PRESETS,
    DatasetPreset,
    get_dataset_preset,
    register_dataset_preset,
)
from imm_ray.data.problems import DataError, LoadResult, Problem
from imm_ray.data.prompts import (
    DEFAULT_INSTRUCTION_SUFFIX,
    PROMPT_TEMPLATES,
    PromptTemplate,
    default_stop_strings,
    encode_prompt,
    register_prompt_template,
    render_prompt,
)
from imm_ray.data.spec import AnswerFormat, DatasetSpec

__all__ = [
    "DATASET_PRESETS",
    "DATA_DIR_ENV",
    "DEFAULT_INSTRUCTION_SUFFIX",
    "PROMPT_TEMPLATES",
    "AnswerFormat",
    "DataError",
    "DatasetPreset",
    "DatasetSpec",
    "LoadResult",
    "Problem",
    "PromptTemplate",
    "default_stop_strings",
    "encode_prompt",
    "find_data_file",
    "get_dataset_preset",
    "gold_answer",
    "load_problems",
    "register_dataset_preset",
    "register_prompt_template",
    "render_prompt",
]

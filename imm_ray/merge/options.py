"""One typed model of a merge's options, used by the merge engine, ``imm merge`` and the run config.

:class:`MergeRecipe` is what is merged and how (method, parameters, seed): the run config's ``merge``
section extends it. :class:`MergeOptions` adds how the output is written; :func:`merge_checkpoints`
takes it, and ``imm merge`` generates its flags from it (:func:`add_options_arguments`) and reads its
YAML keys into it. Pure pydantic: no torch, no Ray.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imm_ray.cli_flags import flag_type
from imm_ray.errors import known_name

from .errors import MergeError
from .methods import MERGE_METHODS

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "MergeOptions", "MergeRecipe", "add_options_arguments", "merge_options",
           "options_from_namespace"]

DEFAULT_MAX_SHARD_SIZE = "5GB"


class MergeRecipe(BaseModel):
    """What is merged and how: the method, its parameters and the seed of its random choices."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    method: str = "imm"
    """Merge method (imm = DARE drop-and-rescale of the task vector, then interpolation with the anchor)."""
    params: dict[str, Any] = {}
    """The method's parameters (imm: lam, drop_rate); unset ones take the method's defaults."""
    seed: int = 0
    """Seed of the merge's random drop mask."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return known_name("merge method", v, MERGE_METHODS)


class MergeOptions(MergeRecipe):
    """A merge's recipe and how its output is written."""

    dtype: str | None = None
    """Output dtype of floating tensors (unset: the anchor's stored dtype)."""
    include: list[str] = []
    """Merge only the tensors whose names match one of these regexes (none: all)."""
    exclude: list[str] = []
    """Copy the tensors whose names match one of these regexes from the anchor unmerged (e.g. embed|norm)."""
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE
    """Output shard size, e.g. 5GB, 500MB (unset: one file)."""
    threads: int | None = Field(None, ge=1)
    """Worker threads (unset: all usable cores)."""
    checksums: bool = True
    """Record the sha256 of every input and output weight file in the provenance."""
    fsync: bool = False
    """Make the output durable before publishing it."""

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _one_pattern(cls, v: Any) -> Any:
        """A single regex is a list of one."""
        return [v] if isinstance(v, str) else v


def merge_options(values: Mapping[str, Any]) -> MergeOptions:
    """:class:`MergeOptions` from ``values``; MergeError naming the first bad key."""
    try:
        return MergeOptions(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "merge options"
        raise MergeError(f"{where}: {error['msg'].removeprefix('Value error, ')}") from None


# Fields that a command line spells otherwise: the parameters as --param, --lambda, --drop-rate...
_NO_FLAG = {"params"}


def add_options_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per field of :class:`MergeOptions` but the parameters (booleans get
    ``--no-...``, lists repeat). A flag left out leaves no attribute, so that a YAML file's value shows through."""
    defaults = MergeOptions()
    for name, field in MergeOptions.model_fields.items():
        if name in _NO_FLAG:
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        help_text = (field.description or "").rstrip(".")
        help_text += f" (default {default})" if default not in (None, []) else ""
        if name == "method":
            help_text += f"; one of {', '.join(sorted(MERGE_METHODS))}"
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(field.annotation) is list:
            parser.add_argument(flag, action="append", metavar="RE", **common)
        else:
            parser.add_argument(flag, type=flag_type(field.annotation), metavar=name.split("_")[-1].upper(), **common)


def options_from_namespace(args: argparse.Namespace, base: Mapping[str, Any] | None = None,
                           params: Mapping[str, Any] | None = None) -> MergeOptions:
    """The :class:`MergeOptions` of ``base`` (e.g. a YAML file's) with the flags given on top, and ``params``."""
    given = {name: getattr(args, name) for name in MergeOptions.model_fields if hasattr(args, name)}
    values = {**{k: v for k, v in (base or {}).items() if k in MergeOptions.model_fields}, **given}
    return merge_options({**values, **({"params": dict(params)} if params is not None else {})})

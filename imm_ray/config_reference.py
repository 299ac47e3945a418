"""Every key of the config tree with its type, value and meaning, read from the pydantic models.

The models are the single source: each field's one-line description is its attribute docstring.
:func:`config_keys` walks them (sections included; a list of models such as ``data.eval`` is shown
once, its items as ``data.eval.N.<key>``). ``imm config show`` prints the keys and ``docs/config.md``
is :func:`config_markdown` (``make docs``).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

__all__ = ["ConfigKey", "config_keys", "config_markdown", "config_text"]

# Placeholders of a list of models (``data.eval.N.limit``; an override names the index: data.eval.0.limit=10)
# and of a mapping of names to models (``ray.node_types.NAME.max_workers``).
LIST_INDEX = "N"
MAPPING_KEY = "NAME"
REGENERATE = "make docs (or: python -m imm_ray.cli config show --markdown > docs/config.md)"


@dataclass(frozen=True)
class ConfigKey:
    """One dotted key of the config tree; ``value`` is None for a section (a nested model)."""

    key: str
    type: str
    value: str | None
    description: str


def _non_none(annotation: Any) -> Any:
    """``X`` from ``X | None``; anything else as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    candidate = _non_none(annotation)
    return candidate if isinstance(candidate, type) and issubclass(candidate, BaseModel) else None


def _item_model(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model of a ``list[X]`` or ``dict[str, X]`` field's items, and the placeholder its keys use."""
    candidate = _non_none(annotation)
    origin, args = typing.get_origin(candidate), typing.get_args(candidate)
    if origin is list and args:
        return _model(args[0]), LIST_INDEX
    if origin is dict and len(args) == 2:
        return _model(args[1]), MAPPING_KEY
    return None, ""


def type_name(annotation: Any) -> str:
    """A short readable type: ``int | None``, ``list[str]``, ``cosine|linear|constant``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _value_text(value: Any) -> str:
    """JSON (valid YAML, as an override takes it); the models of a list without their default fields."""
    if value is PydanticUndefined:
        return "(required)"
    if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
        value = [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        value = {k: v.model_dump(mode="json", exclude_defaults=True) for k, v in value.items()}
    return json.dumps(to_jsonable_python(value))


def config_keys(model: type[BaseModel] | None = None, values: BaseModel | None = None,
                prefix: str = "") -> list[ConfigKey]:
    """Every key under ``model`` (default the whole tree), valued from ``values`` (else the defaults)."""
    if model is None:
        from imm_ray.config import ImmConfig

        model = ImmConfig
    keys: list[ConfigKey] = []
    for name, field in model.model_fields.items():
        key, description = f"{prefix}{name}", _one_line(field.description)
        value = getattr(values, name) if values is not None else field.get_default(call_default_factory=True)
        section, (items, placeholder) = _model(field.annotation), _item_model(field.annotation)
        if section is not None and (value is None or isinstance(value, BaseModel)):
            keys.append(ConfigKey(key, type_name(field.annotation), None, description))
            keys.extend(config_keys(section, value, f"{key}."))
            continue
        keys.append(ConfigKey(key, type_name(field.annotation), _value_text(value), description))
        if items is not None:
            keys.extend(config_keys(items, None, f"{key}.{placeholder}."))
    return keys


def config_text(keys: list[ConfigKey]) -> str:
    """One line per key: ``key  type = value  # meaning`` (a section: ``key  Type  # meaning``)."""
    width = max(len(k.key) for k in keys)
    lines = []
    for k in keys:
        typed = k.type if k.value is None else f"{k.type} = {k.value}"
        lines.append(f"{k.key:<{width}}  {typed}  # {k.description}")
    return "\n".join(lines) + "\n"


def _cell(text: str, code: bool = False) -> str:
    """Table-cell text: pipes escaped; outside code spans also <...>, which Markdown takes for HTML."""
    text = text.replace("|", "\\|")
    return f"`{text}`" if code else text.replace("<", "&lt;").replace(">", "&gt;")


def config_markdown(keys: list[ConfigKey] | None = None) -> str:
    """``docs/config.md``: one table per top-level section, from the models' defaults."""
    keys = keys if keys is not None else config_keys()
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the pydantic models by {REGENERATE}; do not edit by hand. -->",
        "",
        "Every key of the run configuration (`imm run --config FILE [key.sub=value ...]`), with its type,",
        "default and meaning. A run's config is built from these defaults, then a preset (`preset:` or",
        "`--preset`), then the YAML file, then `key.sub=value` overrides (values are YAML; a list item is",
        f"addressed by its index: `data.eval.0.limit=10`, shown here as `data.eval.{LIST_INDEX}.limit`).",
        "`imm config show --config FILE` prints the same keys with a config's resolved values.",
    ]
    header = ["", "| key | type | default | meaning |", "|---|---|---|---|"]
    top = [k for k in keys if "." not in k.key and k.value is not None]
    if top:
        out += ["", "## Top level", *header]
        out += [f"| `{k.key}` | {_cell(k.type)} | {_cell(k.value or '', code=True)} | {_cell(k.description)} |"
                for k in top]
    for section in (k for k in keys if "." not in k.key and k.value is None):
        out += ["", f"## `{section.key}`", "", section.description, *header]
        for k in keys:
            if k.key.startswith(section.key + "."):
                value = "" if k.value is None else _cell(k.value, code=True)
                out.append(f"| `{k.key}` | {_cell(k.type)} | {value} | {_cell(k.description)} |")
    return "\n".join(out) + "\n"

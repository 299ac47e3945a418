"""A name -> item registry for the parts users extend (arms, data-set presets, prompt templates,
engines, verifiers, importance measures, merge methods): one lookup, one error type (:class:`UnknownNameError`)."""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from imm_ray.errors import UnknownNameError, unknown_name

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of named items whose errors say what kind of item is missing and which exist."""

    def __init__(self, kind: str, error: type[UnknownNameError] = UnknownNameError) -> None:
        super().__init__()
        self.kind = kind
        self.error = error

    def add(self, name: str, item: T, overwrite: bool = False) -> T:
        """Register ``item`` under ``name`` (ValueError if taken and ``overwrite`` is False)."""
        if name in self and not overwrite:
            raise ValueError(f"{self.kind} {name!r} already exists (pass overwrite=True)")
        self[name] = item
        return item

    def lookup(self, name: str) -> T:
        """The item called ``name``; else ``error`` (an UnknownNameError) naming the nearest and the known ones."""
        try:
            return self[name]
        except KeyError:
            raise self.error(unknown_name(self.kind, name, self)) from None


def import_entry(ref: str) -> Any:
    """The object a lazy ``"module:attr"`` entry names, importing its module now."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)

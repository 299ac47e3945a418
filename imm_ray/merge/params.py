"""Typed, validated merge-method parameters."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import MergeError

_MISSING = object()
_FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method.

    kind: ``float``, ``int``, ``bool``, ``str`` or ``"per_model"`` (one float per input model;
    a single number is broadcast). ``default`` may be a callable taking the number of models.
    ``layerwise`` float parameters also accept a list of numbers: a gradient over depth, linearly
    interpolated over the decoder layers (see :func:`imm_ray.merge.selection.value_at`).
    """

    name: str
    kind: Any
    default: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    choices: tuple[Any, ...] | None = None
    finite: bool = True
    layerwise: bool = False

    def default_for(self, n_models: int) -> Any:
        """The default value for a merge of ``n_models`` models."""
        value = self.default(n_models) if callable(self.default) else self.default
        return list(value) if isinstance(value, (list, tuple)) else value

    def range_text(self) -> str:
        """Human-readable allowed range, e.g. ``[0, 1)``."""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'[' if self.low_inclusive and self.low is not None else '('}{lo}, {hi}" + (
            "]" if self.high_inclusive and self.high is not None else ")"
        )

    def _check_number(self, method: str, value: float, what: str) -> None:
        if self.finite and not (math.isfinite(value) and abs(value) <= _FP32_MAX):
            raise MergeError(f"{method}: parameter {what!s} must be finite in float32, got {value!r}")
        bad_low = self.low is not None and (
            value < self.low or (not self.low_inclusive and value == self.low)
        )
        bad_high = self.high is not None and (
            value > self.high or (not self.high_inclusive and value == self.high)
        )
        if bad_low or bad_high:
            raise MergeError(
                f"{method}: parameter {what!s} = {value!r} is out of range {self.range_text()}"
            )

    def validate(self, method: str, value: Any, n_models: int) -> Any:
        """Coerce and check ``value``; raise MergeError naming the parameter if it is invalid."""
        name = self.name
        if self.layerwise and isinstance(value, (list, tuple)):
            if not value:
                raise MergeError(f"{method}: parameter {name!r} needs at least one value, got []")
            items = [self.validate(method, item, n_models) for item in value]
            return items[0] if len(items) == 1 else items
        if self.kind == "per_model":
            if _is_number(value):
                value = [value] * n_models
            if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
                raise MergeError(
                    f"{method}: parameter {name!r} must be a list of numbers, got {value!r}"
                )
            if len(value) != n_models:
                raise MergeError(
                    f"{method}: parameter {name!r} needs one value per model "
                    f"({n_models} models), got {len(value)}"
                )
            out = []
            for i, item in enumerate(value):
                if not _is_number(item):
                    raise MergeError(f"{method}: parameter {name}[{i}] must be a number, got {item!r}")
                self._check_number(method, float(item), f"{name}[{i}]")
                out.append(float(item))
            return out
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"{method}: parameter {name!r} must be true/false, got {value!r}")
        elif self.kind is float:
            if not _is_number(value):
                raise MergeError(f"{method}: parameter {name!r} must be a number, got {value!r}")
            value = float(value)
            self._check_number(method, value, repr(name))
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MergeError(f"{method}: parameter {name!r} must be an integer, got {value!r}")
            self._check_number(method, float(value), repr(name))
        elif self.kind is str:
            if not isinstance(value, str):
                raise MergeError(f"{method}: parameter {name!r} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise MergeError(
                f"{method}: parameter {name!r} = {value!r} is not one of {list(self.choices)}"
            )
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_params(
    method: str,
    specs: Sequence[ParamSpec],
    params: Mapping[str, Any] | None,
    n_models: int,
    extra_check: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Return the full, validated parameter dict (defaults filled in, in spec order).

    Unknown parameter names raise MergeError naming the parameter and listing the accepted ones.
    """
    params = dict(params or {})
    known = {spec.name: spec for spec in specs}
    for key in params:
        if key not in known:
            accepted = ", ".join(known) or "none"
            raise MergeError(f"{method}: unknown parameter {key!r} (accepted: {accepted})")
    out: dict[str, Any] = {}
    for spec in specs:
        raw = params.get(spec.name, _MISSING)
        value = spec.default_for(n_models) if raw is _MISSING else raw
        out[spec.name] = spec.validate(method, value, n_models)
    if extra_check is not None:
        extra_check(out)
    return out

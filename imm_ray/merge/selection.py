"""Which tensors are merged (include/exclude regexes) and per-layer parameter gradients."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import MergeError
from .tensor_names import BEFORE_LAYERS, layer_index


def _compile(patterns: str | Iterable[str] | None, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as exc:
            raise MergeError(f"invalid {what} regex {pattern!r}: {exc}") from exc
    return compiled


class TensorSelector:
    """A tensor is merged iff it matches an ``include`` regex (all do if none is given) and no
    ``exclude`` regex (``re.search``). Tensors not merged are copied from the anchor."""

    def __init__(self, include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None):
        self.include = _compile(include, "include")
        self.exclude = _compile(exclude, "exclude")

    def __call__(self, name: str) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)

    def describe(self) -> dict[str, list[str]]:
        return {"include": [p.pattern for p in self.include], "exclude": [p.pattern for p in self.exclude]}


def count_layers(names: Iterable[str]) -> int:
    """Number of decoder layers (largest layer index + 1; 0 if none)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def depth(name: str, num_layers: int) -> float:
    """Position of a tensor in the network in [0, 1]: layer i of n -> i / (n - 1); embeddings -> 0;
    anything else outside the layers (final norm, lm_head) -> 1."""
    index = layer_index(name)
    if index is None:
        return 0.0 if BEFORE_LAYERS.search(name) else 1.0
    return index / (num_layers - 1) if num_layers > 1 else 0.0


def value_at(value: Any, t: float) -> Any:
    """A gradient ``[v0, ..., vk]`` evaluated at depth ``t`` (piecewise linear); scalars pass through."""
    if not isinstance(value, list):
        return value
    x = t * (len(value) - 1)
    lo = min(int(x), len(value) - 2)
    frac = x - lo
    return value[lo] * (1.0 - frac) + value[lo + 1] * frac if frac else value[lo]


def params_at(params: Mapping[str, Any], layerwise: Sequence[str], t: float) -> dict[str, Any]:
    """``params`` with every layerwise gradient replaced by its value at depth ``t``."""
    return {k: (value_at(v, t) if k in layerwise else v) for k, v in params.items()}

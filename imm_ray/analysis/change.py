"""Relative parameter change ||W_t - W_0||_F / ||W_0||_F, streamed tensor by tensor.

Squared norms are accumulated per tensor, then summed per decoder layer, module type, and
(layer, module type): the relative change of a group is sqrt(sum ||dW||^2) / sqrt(sum ||W0||^2),
i.e. the Frobenius norm of the group's concatenated update over that of its original weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imm_ray.analysis.names import TensorKey, parse_tensor_name
from imm_ray.merge.errors import MergeError
from imm_ray.merge.safetensors_io import CheckpointReader

__all__ = ["ChangeSummary", "SquaredNorms", "parameter_change", "relative_change",
           "squared_norms", "summarize_changes"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 22


@dataclass
class SquaredNorms:
    """Running sums of ||W_t - W_0||^2 and ||W_0||^2."""

    diff: float = 0.0
    base: float = 0.0

    def add(self, other: SquaredNorms) -> None:
        self.diff += other.diff
        self.base += other.base

    @property
    def relative(self) -> float | None:
        """sqrt(diff / base); 0.0 when nothing changed, None when the base norm is 0."""
        if self.base > 0:
            return math.sqrt(self.diff / self.base)
        return 0.0 if self.diff == 0 else None


def squared_norms(original: np.ndarray, updated: np.ndarray) -> SquaredNorms:
    """Squared Frobenius norms of (updated - original) and of original, in float64 chunks."""
    if original.shape != updated.shape:
        raise ValueError(f"shape mismatch: {tuple(original.shape)} vs {tuple(updated.shape)}")
    a, b = original.reshape(-1), updated.reshape(-1)
    out = SquaredNorms()
    for start in range(0, a.size, _CHUNK_ELEMENTS):
        w0 = a[start:start + _CHUNK_ELEMENTS].astype(np.float64)
        diff = b[start:start + _CHUNK_ELEMENTS].astype(np.float64) - w0
        out.diff += float(np.dot(diff, diff))
        out.base += float(np.dot(w0, w0))
    return out


def relative_change(original: np.ndarray, updated: np.ndarray) -> float | None:
    """||updated - original||_F / ||original||_F for one tensor (see SquaredNorms.relative)."""
    return squared_norms(original, updated).relative


@dataclass
class ChangeSummary:
    """Relative change per tensor, per layer, per module type and per (layer, module type)."""

    num_layers: int
    tensors: dict[str, float | None]
    per_layer: list[float | None]
    per_module: dict[str, float | None]
    per_layer_module: dict[str, list[float | None]]
    per_group: dict[str, float | None]
    non_layer: dict[str, float | None]
    total: float | None
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers, "total": self.total, "per_layer": self.per_layer,
            "per_module": self.per_module, "per_group": self.per_group,
            "per_layer_module": self.per_layer_module, "non_layer": self.non_layer,
            "tensors": self.tensors, "missing": self.missing,
        }


def summarize_changes(entries: Iterable[tuple[str, SquaredNorms]],
                      num_layers: int | None = None) -> ChangeSummary:
    """Aggregate per-tensor squared norms by layer and module type (names parsed from HF names).

    num_layers defaults to 1 + the largest layer index seen; layers with no tensor get None.
    """
    keyed: list[tuple[str, TensorKey, SquaredNorms]] = [
        (name, parse_tensor_name(name), norms) for name, norms in entries]
    seen = [k.layer for _, k, _ in keyed if k.layer is not None]
    n = num_layers if num_layers is not None else (max(seen) + 1 if seen else 0)
    layers = [SquaredNorms() for _ in range(n)]
    layer_has = [False] * n
    modules: dict[str, SquaredNorms] = {}
    groups: dict[str, SquaredNorms] = {}
    cells: dict[str, list[SquaredNorms | None]] = {}
    outside: dict[str, SquaredNorms] = {}
    total = SquaredNorms()
    for _, key, norms in keyed:
        total.add(norms)
        modules.setdefault(key.module, SquaredNorms()).add(norms)
        groups.setdefault(key.group, SquaredNorms()).add(norms)
        if key.layer is None or key.layer >= n:
            outside.setdefault(key.module, SquaredNorms()).add(norms)
            continue
        layers[key.layer].add(norms)
        layer_has[key.layer] = True
        row = cells.setdefault(key.module, [None] * n)
        if row[key.layer] is None:
            row[key.layer] = SquaredNorms()
        row[key.layer].add(norms)
    return ChangeSummary(
        num_layers=n,
        tensors={name: norms.relative for name, _, norms in keyed},
        per_layer=[acc.relative if has else None for acc, has in zip(layers, layer_has)],
        per_module={m: acc.relative for m, acc in sorted(modules.items())},
        per_layer_module={m: [c.relative if c is not None else None for c in row]
                          for m, row in sorted(cells.items())},
        per_group={g: acc.relative for g, acc in sorted(groups.items())},
        non_layer={m: acc.relative for m, acc in sorted(outside.items())},
        total=total.relative,
    )


def _num_layers(folder: Path) -> int | None:
    import json

    config = folder / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config", data)
    value = data.get("num_hidden_layers", data.get("n_layer"))
    return int(value) if value is not None else None


def parameter_change(original: str | Path, model: str | Path) -> ChangeSummary:
    """Relative change of every tensor of ``model`` against ``original``, one tensor at a time.

    Tensors present in only one checkpoint are listed in ``missing`` (and logged); a shape
    mismatch raises ValueError.
    """
    from imm_ray.storage import materialize

    original, model = materialize(original), materialize(model)  # a URI: this node's cached copy
    try:
        with CheckpointReader(original) as base, CheckpointReader(model) as tuned:
            common = [name for name in base.names() if name in tuned.tensors]
            missing = sorted(set(base.tensors) ^ set(tuned.tensors))

            def stream() -> Iterable[tuple[str, SquaredNorms]]:
                for name in common:
                    try:
                        yield name, squared_norms(base.get_float32(name), tuned.get_float32(name))
                    except ValueError as exc:
                        raise ValueError(f"{model}: tensor {name!r}: {exc}") from None

            summary = summarize_changes(stream(), _num_layers(original))
    except MergeError as exc:
        raise ValueError(str(exc)) from exc
    if missing:
        logger.warning("%s vs %s: %d tensor(s) in only one checkpoint (first: %s)",
                       model, original, len(missing), missing[0])
    summary.missing = missing
    return summary

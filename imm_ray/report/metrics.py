"""Reading a run's metrics rows and naming what is in them (ID/OOD sets, stages, diversity)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imm_ray.config import ImmConfig, config_from_run_yaml
from imm_ray.run import layout
from imm_ray.run.files import read_analysis, read_config_text, read_metrics
from imm_ray.storage import Location, resolve

__all__ = ["STAGE_ORDER", "RunMetrics", "load_run_metrics"]

STAGE_ORDER = layout.STAGES
_DIVERSITY_FIRST = ("distinct_1", "distinct_2", "distinct_3", "distinct_4", "self_bleu",
                    "distinct_answers", "mean_token_entropy")
_DIVERSITY_SKIP = {"questions", "samples"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class RunMetrics:
    """The metrics rows of a run plus its config (for names) and its analysis, if any."""

    run_dir: Location
    rows: list[dict[str, Any]]
    config: ImmConfig | None
    analysis: dict[str, Any] | None = None

    # --- names ------------------------------------------------------------------------------
    @property
    def datasets(self) -> list[str]:
        """Evaluation sets in config order (the first is in-domain), else in row order."""
        seen = [spec.name for spec in self.config.data.eval] if self.config is not None else []
        for row in self.rows:
            for name in row.get("accuracy", {}):
                if name not in seen:
                    seen.append(name)
        return seen

    @property
    def id_dataset(self) -> str | None:
        return self.datasets[0] if self.datasets else None

    @property
    def ood_datasets(self) -> list[str]:
        return self.datasets[1:]

    @property
    def arms(self) -> list[str]:
        """Arms in first-seen order, "base" excluded."""
        out: list[str] = []
        for row in self.rows:
            if row.get("arm") != "base" and row.get("arm") not in out:
                out.append(row["arm"])
        return out

    @property
    def stages(self) -> list[str]:
        found = {s for row in self.rows for s in (row.get("seconds") or {})}
        return [s for s in STAGE_ORDER if s in found] + sorted(found - set(STAGE_ORDER))

    @property
    def diversity_keys(self) -> list[str]:
        """Numeric diversity metrics present in any row (a fixed order first)."""
        found = {k for row in self.rows for k, v in (row.get("diversity") or {}).items()
                 if k not in _DIVERSITY_SKIP and _number(v) is not None}
        return [k for k in _DIVERSITY_FIRST if k in found] + sorted(found - set(_DIVERSITY_FIRST))

    # --- values -----------------------------------------------------------------------------
    def base_row(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r.get("arm") == "base"), None)

    def arm_rows(self, arm: str, with_base: bool = True) -> list[dict[str, Any]]:
        """Rows of one arm by round, led by the shared base row (round 0) when present."""
        rows = sorted((r for r in self.rows if r.get("arm") == arm), key=lambda r: r["round"])
        base = self.base_row()
        return ([base] if with_base and base is not None else []) + rows

    @staticmethod
    def accuracy(row: dict[str, Any], dataset: str) -> float | None:
        return _number((row.get("accuracy") or {}).get(dataset))

    @staticmethod
    def ci95(row: dict[str, Any], dataset: str) -> tuple[float, float] | None:
        ci = ((row.get("eval") or {}).get(dataset) or {}).get("accuracy_ci95")
        if isinstance(ci, Sequence) and len(ci) == 2 and all(_number(v) is not None for v in ci):
            return float(ci[0]), float(ci[1])
        return None

    def ood_mean(self, row: dict[str, Any]) -> float | None:
        values = [self.accuracy(row, d) for d in self.ood_datasets]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    @staticmethod
    def diversity(row: dict[str, Any], key: str) -> float | None:
        return _number((row.get("diversity") or {}).get(key))


def load_run_metrics(run_dir: str | Path | Location) -> RunMetrics:
    """Rows of RUN_DIR/metrics.jsonl (empty if absent), its config and analysis.json if present.

    RUN_DIR is a local path or an object-storage URI."""
    root = resolve(run_dir)
    text = read_config_text(root)
    config = None if text is None else config_from_run_yaml(text, str(root / layout.CONFIG))
    return RunMetrics(root, read_metrics(root), config, read_analysis(root))

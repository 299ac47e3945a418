"""Optional metric sinks: push per-round metrics to TensorBoard or MLflow.

A sink receives flat scalars per (arm, round). The base row (round 0) is logged under every
arm so that each arm's curves start at the original model. Sinks are rebuilt from
metrics.jsonl each time (TensorBoard's folder is cleared first, so nothing is doubled).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from imm_ray.errors import UsageError
from imm_ray.run import layout

__all__ = [
    "SINKS",
    "MLflowSink",
    "MetricsSink",
    "TensorBoardSink",
    "flatten_row",
    "make_sink",
    "publish_rows",
]

logger = logging.getLogger(__name__)


class MetricsSink(Protocol):
    """Where per-round scalars go."""

    def log(self, arm: str, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def flatten_row(row: dict[str, Any]) -> dict[str, float]:
    """Scalars of a metrics row: accuracy/<set>, accuracy_ci95_low|high/<set>, diversity/<key>,
    seconds/<stage>, generated, accepted, and merge/<param> of the merge a sweep chose."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)

    for key in ("generated", "accepted", "questions_solved"):
        put(key, row.get(key))
    for name, value in (row.get("accuracy") or {}).items():
        put(f"accuracy/{name}", value)
    for name, entry in (row.get("eval") or {}).items():
        ci = (entry or {}).get("accuracy_ci95")
        if isinstance(ci, Sequence) and len(ci) == 2:
            put(f"accuracy_ci95_low/{name}", ci[0])
            put(f"accuracy_ci95_high/{name}", ci[1])
    for key, value in (row.get("diversity") or {}).items():
        put(f"diversity/{key}", value)
    for stage, value in (row.get("seconds") or {}).items():
        put(f"seconds/{stage}", value)
    for key, value in ((row.get("sweep") or {}).get("chosen") or {}).get("params", {}).items():
        put(f"merge/{key}", value)  # the merge a sweep chose
    return out


class TensorBoardSink:
    """Scalars as TensorBoard events under <folder>/<arm> (tensorboardX)."""

    def __init__(self, folder: str | Path) -> None:
        from tensorboardX import SummaryWriter

        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)  # derived data: rebuilt in full
        self._writer_cls = SummaryWriter
        self._writers: dict[str, Any] = {}

    def log(self, arm: str, step: int, scalars: dict[str, float]) -> None:
        writer = self._writers.get(arm)
        if writer is None:
            writer = self._writers[arm] = self._writer_cls(logdir=str(self.folder / arm))
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class MLflowSink:
    """Scalars as MLflow metrics, one MLflow run per arm (needs `mlflow` installed)."""

    def __init__(self, experiment: str, run_name: str, tracking_uri: str | None = None) -> None:
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self._client = mlflow.MlflowClient()
        found = self._client.get_experiment_by_name(experiment)
        self._experiment_id = (found.experiment_id if found is not None
                               else self._client.create_experiment(experiment))
        self.run_name = run_name
        self._runs: dict[str, str] = {}

    def log(self, arm: str, step: int, scalars: dict[str, float]) -> None:
        run_id = self._runs.get(arm)
        if run_id is None:
            run = self._client.create_run(self._experiment_id, run_name=f"{self.run_name}/{arm}")
            run_id = self._runs[arm] = run.info.run_id
        for key, value in scalars.items():
            self._client.log_metric(run_id, key, value, step=step)

    def close(self) -> None:
        for run_id in self._runs.values():
            self._client.set_terminated(run_id)
        self._runs.clear()


SINKS = ("tensorboard", "mlflow")


def make_sink(kind: str, run_dir: str | Path, **options: Any) -> MetricsSink:
    """A sink by name: "tensorboard" (RUN_DIR/tensorboard) or "mlflow" (if installed)."""
    run_dir = Path(run_dir)
    if kind == "tensorboard":
        return TensorBoardSink(options.get("folder") or run_dir / layout.TENSORBOARD)
    if kind == "mlflow":
        if importlib.util.find_spec("mlflow") is None:
            raise UsageError("the mlflow sink needs the mlflow package (pip install mlflow)")
        return MLflowSink(options.get("experiment") or "imm-ray", run_dir.name,
                          options.get("tracking_uri"))
    raise UsageError(f"unknown metrics sink {kind!r}; known: {list(SINKS)}")


def publish_rows(rows: Iterable[dict[str, Any]], sinks: Sequence[MetricsSink]) -> int:
    """Log every row to every sink (the base row under each arm); returns rows logged."""
    rows = list(rows)
    arms = [r["arm"] for r in rows if r.get("arm") != "base"]
    arms = list(dict.fromkeys(arms)) or ["base"]
    count = 0
    for row in rows:
        scalars = flatten_row(row)
        targets = arms if row.get("arm") == "base" else [row["arm"]]
        for sink in sinks:
            for arm in targets:
                sink.log(arm, int(row.get("round", 0)), scalars)
        count += 1
    for sink in sinks:
        sink.close()
    return count

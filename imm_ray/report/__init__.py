"""Run reports: report.md with the per-round table, PNG plots, optional metric sinks."""

from imm_ray.report.metrics import RunMetrics, load_run_metrics
from imm_ray.report.sinks import (
    MetricsSink,
    TensorBoardSink,
    flatten_row,
    make_sink,
    publish_rows,
)
from imm_ray.report.writer import render_report, write_report

__all__ = [
    "MetricsSink",
    "RunMetrics",
    "TensorBoardSink",
    "flatten_row",
    "load_run_metrics",
    "make_sink",
    "publish_rows",
    "render_report",
    "write_report",
]

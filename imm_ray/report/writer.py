"""write_report: RUN_DIR/report.md and RUN_DIR/plots/*.png from the run's metrics."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imm_ray.config import ImmConfig
from imm_ray.report.frontier import frontier_section
from imm_ray.report.ledger import Ledgers, comparison_section, ledger_section, load_ledgers, pass_at_k_section
from imm_ray.report.metrics import RunMetrics, load_run_metrics
from imm_ray.report.plots import write_plots
from imm_ray.report.sinks import make_sink, publish_rows
from imm_ray.report.tables import analysis_table, rounds_table, summary_lines
from imm_ray.run import layout
from imm_ray.storage import Location, delete, remove_temp_siblings, write_text
from imm_ray.storage.fs import upload_file

__all__ = ["render_report", "write_report"]

logger = logging.getLogger(__name__)

_PLOT_TITLES = {
    "accuracy.png": "Accuracy by round (ID solid, OOD dashed)",
    "accuracy_by_dataset.png": "Accuracy per evaluation set",
    "diversity.png": "Output diversity of each round's model on the training questions",
    "frontier.png": "Merge candidates per round: ID against OOD accuracy on the probe split",
    "layer_change.png": "Relative parameter change per layer beside layer importance",
    "module_change.png": "Relative change per module type and layer (last round per arm)",
}


def _config_lines(config: ImmConfig | None) -> list[str]:
    if config is None:
        return []
    run, data, gen, merge = config.run, config.data, config.generate, config.merge
    return [f"- model: `{config.model.ref}`",
            f"- arms: {', '.join(run.arms)}; rounds: {run.rounds}",
            f"- train pool: {data.train.name}; evaluation: {', '.join(d.name for d in data.eval)} (first = ID)",
            f"- sampling: {gen.samples_per_question} per question, temperature {gen.temperature}, "
            f"max {gen.max_tokens} tokens",
            f"- merge: {merge.method} {merge.params}"
            + (f"; sweep {merge.sweep}, select {merge.select}, probe {merge.probe_fraction:g} of each eval set "
               "(accuracies on the held-back rest)" if merge.sweep else "")]


def _analysis_section(run: RunMetrics, plots: Sequence[str]) -> list[str]:
    analysis = run.analysis
    if not analysis:
        return []
    lines = ["## Layer analysis", ""]
    imp = analysis.get("importance")
    if imp:
        probe, base = imp.get("probe") or {}, imp.get("baseline") or {}
        acc = base.get("accuracy")
        lines += [
            f"Layer importance of `{imp.get('model')}`: each decoder layer skipped in turn on "
            f"{probe.get('problems')} probe problems of {probe.get('dataset')} (accuracy "
            f"{'-' if acc is None else f'{100 * acc:.1f}%'} unmodified) and "
            f"{probe.get('references')} reference solutions ({probe.get('references_source')}).",
            "rho is Spearman's rank correlation between a layer's importance and its relative "
            "change: near zero or negative means updates land in layers that matter little.",
            "",
        ]
    lines += [analysis_table(analysis), ""]
    lines += [f"![{_PLOT_TITLES[p]}]({layout.PLOTS}/{p})\n" for p in plots
              if p in ("layer_change.png", "module_change.png")]
    return lines


def render_report(run: RunMetrics, plots: Sequence[str], ledgers: Ledgers | None = None) -> str:
    """The markdown text of the report (plots: names of the PNGs written under plots/; ledgers:
    the per-question records of each evaluation, see load_ledgers)."""
    name = run.config.run.name if run.config is not None else run.run_dir.name
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# IMM run report: {name}", "", f"Run directory `{run.run_dir}`, written {now}.", ""]
    lines += _config_lines(run.config) + [""]
    lines += ["## Results by round", "", rounds_table(run), ""]
    if run.rows and any(run.ci95(r, d) for r in run.rows for d in run.datasets):
        lines += ["Accuracy cells show the 95% confidence interval in brackets.", ""]
    if run.diversity_keys:
        lines += ["Diversity columns describe the training samples a round generated, which the previous "
                  "round's model wrote; the diversity plot draws them at that model's round (0 = original).", ""]
    summary = summary_lines(run)
    if summary:
        lines += summary + [""]
    for section in (ledger_section, pass_at_k_section, comparison_section):
        lines += section(run, ledgers or {})
    lines += frontier_section(run)
    if "frontier.png" in plots:
        lines += [f"![{_PLOT_TITLES['frontier.png']}]({layout.PLOTS}/frontier.png)", ""]
    curve_plots = [p for p in plots if p in ("accuracy.png", "accuracy_by_dataset.png", "diversity.png")]
    if curve_plots:
        lines += ["## Plots", ""]
        lines += [f"![{_PLOT_TITLES[p]}]({layout.PLOTS}/{p})\n" for p in curve_plots]
    lines += _analysis_section(run, plots)
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | Path | Location, sinks: Sequence[str] = (), **sink_options: Any) -> Location:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png; return the report's location.

    RUN_DIR is a local path or an object-storage URI (plots and TensorBoard events are written
    locally, then uploaded). sinks: also publish the metrics rows to these sinks ("tensorboard":
    RUN_DIR/tensorboard, "mlflow").
    """
    run = load_run_metrics(run_dir)
    root = run.run_dir
    with tempfile.TemporaryDirectory(prefix="imm-report-") as tmp:
        # An object-store run is drawn in a local stand-in folder of the same name, then uploaded.
        local = root.local_path() if root.is_local else Path(tmp) / root.name
        plots = write_plots(run, local / layout.PLOTS)
        path = root / layout.REPORT
        write_text(path, render_report(run, [p.name for p in plots], load_ledgers(run)))
        # What a killed earlier report left (this writer owns these files; object storage has none).
        remove_temp_siblings(root, [layout.REPORT])
        if root.is_local:
            remove_temp_siblings(root / layout.PLOTS, [p.name for p in plots])
        if sinks:
            publish_rows(run.rows, [make_sink(kind, local, **sink_options) for kind in sinks])
        if not root.is_local:
            delete(root / layout.TENSORBOARD)  # derived data: rebuilt in full, as on a local disk
            for folder in (layout.PLOTS, layout.TENSORBOARD):
                for file in sorted(p for p in (local / folder).rglob("*") if p.is_file()):
                    upload_file(file, root / file.relative_to(local).as_posix())
    logger.info("report written to %s (%d rows, %d plots)", path, len(run.rows), len(plots))
    return path

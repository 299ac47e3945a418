"""PNG plots of a run (matplotlib, Agg backend): accuracy and diversity by round, and the
layer heat map of relative parameter change beside layer importance."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imm_ray.merge.sweep import ProbeScore, pareto_front
from imm_ray.report.frontier import candidate_label, sweep_rows, varying_params
from imm_ray.report.metrics import RunMetrics
from imm_ray.storage.fs import write_bytes

__all__ = ["arm_colours", "plot_accuracy", "plot_accuracy_by_dataset", "plot_diversity", "plot_frontier",
           "plot_layer_analysis", "plot_module_changes", "write_plots"]

logger = logging.getLogger(__name__)

_COLOURS = plt.get_cmap("tab10").colors
_KNOWN_ARMS = {"imm": 0, "si": 3, "rest": 2, "base": 7}


def arm_colours(arms: list[str]) -> dict[str, Any]:
    """A fixed colour per arm (imm blue, si red, rest green, others in tab10 order)."""
    out, free = {}, [c for i, c in enumerate(_COLOURS) if i not in _KNOWN_ARMS.values()]
    for arm in arms:
        out[arm] = _COLOURS[_KNOWN_ARMS[arm]] if arm in _KNOWN_ARMS else free.pop(0) if free else "k"
    return out


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path


def _series(rows: list[dict[str, Any]], get: Callable[[dict[str, Any]], float | None]
            ) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = get(row)
        if value is not None:
            xs.append(row["round"])
            ys.append(value)
    return xs, ys


def _round_axis(ax: Any, run: RunMetrics) -> None:
    rounds = sorted({r["round"] for r in run.rows})
    ax.set_xticks(rounds)
    ax.set_xlabel("round (0 = original model)")
    ax.grid(alpha=0.3)


def _ci_errors(run: RunMetrics, rows: list[dict[str, Any]], dataset: str) -> list[list[float]] | None:
    """Matplotlib yerr (percent below, above) of the rows' 95% CIs on a set; None unless all have one."""
    pairs = [(run.accuracy(r, dataset), run.ci95(r, dataset)) for r in rows]
    if not pairs or any(acc is None or ci is None for acc, ci in pairs):
        return None
    return [[100 * (acc - ci[0]) for acc, ci in pairs], [100 * (ci[1] - acc) for acc, ci in pairs]]


def _accuracy_axis(ax: Any) -> None:
    """Accuracy axes start at 0% and end at the next multiple of 10% above the highest value or
    interval end drawn (at most 100%): a gap of a few points is never stretched to fill the panel."""
    top = ax.get_ylim()[1]
    ax.set_ylim(0, min(100, 10 * max(1, math.ceil(top / 10))))
    ax.set_ylabel("accuracy (%)")


def plot_accuracy(run: RunMetrics, path: Path) -> Path | None:
    """Accuracy by round: one colour per arm, ID solid (95% CI shaded), OOD dashed (the mean of
    several OOD sets; one set's 95% CI as error bars)."""
    if not run.arms or run.id_dataset is None:
        return None
    colours = arm_colours(run.arms)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in run.arms:
        rows = run.arm_rows(arm)
        xs, ys = _series(rows, lambda r: run.accuracy(r, run.id_dataset))
        ax.plot(xs, [100 * y for y in ys], "-o", color=colours[arm], label=f"{arm} ID ({run.id_dataset})")
        cis = [(r["round"], run.ci95(r, run.id_dataset)) for r in rows]
        cis = [(x, ci) for x, ci in cis if ci is not None]
        if cis:
            ax.fill_between([x for x, _ in cis], [100 * c[0] for _, c in cis],
                            [100 * c[1] for _, c in cis], color=colours[arm], alpha=0.12)
        if run.ood_datasets:  # one OOD set: its 95% CI as error bars; a mean of several has none
            ood = [r for r in rows if run.ood_mean(r) is not None]
            label = "OOD" if len(run.ood_datasets) == 1 else "OOD mean"
            ax.errorbar([r["round"] for r in ood], [100 * run.ood_mean(r) for r in ood], fmt="--s",
                        yerr=_ci_errors(run, ood, run.ood_datasets[0]) if label == "OOD" else None,
                        color=colours[arm], capsize=3, label=f"{arm} {label} ({', '.join(run.ood_datasets)})")
    _round_axis(ax, run)
    _accuracy_axis(ax)
    ax.set_title("Accuracy by round")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _grid(n: int, width: float = 4.0, height: float = 3.2) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_accuracy_by_dataset(run: RunMetrics, path: Path) -> Path | None:
    """One panel per evaluation set: accuracy by round per arm, 95% CI as error bars."""
    if not run.arms or not run.datasets:
        return None
    colours = arm_colours(run.arms)
    fig, axes = _grid(len(run.datasets))
    for i, (ax, dataset) in enumerate(zip(axes, run.datasets)):
        for arm in run.arms:
            rows = [r for r in run.arm_rows(arm) if run.accuracy(r, dataset) is not None]
            ax.errorbar([r["round"] for r in rows], [100 * run.accuracy(r, dataset) for r in rows],
                        yerr=_ci_errors(run, rows, dataset), fmt="-o" if i == 0 else "--s",
                        color=colours[arm], capsize=3, label=arm)
        _round_axis(ax, run)
        _accuracy_axis(ax)
        ax.set_title(f"{'ID' if i == 0 else 'OOD'}: {dataset}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_diversity(run: RunMetrics, path: Path) -> Path | None:
    """One panel per diversity metric, per arm, by the round of the model that wrote the samples.

    A round's diversity is measured on the training samples its generate stage draws from the
    previous round's model, so round t's value is drawn at t - 1: every curve starts at round 0,
    the original model (None when no row has diversity)."""
    keys = run.diversity_keys
    if not keys or not run.arms:
        return None
    colours = arm_colours(run.arms)
    fig, axes = _grid(len(keys), 3.6, 2.9)
    for ax, key in zip(axes, keys):
        for arm in run.arms:
            xs, ys = _series(run.arm_rows(arm, with_base=False), lambda r, k=key: run.diversity(r, k))
            ax.plot([x - 1 for x in xs], ys, "-o", color=colours[arm], label=arm)
        _round_axis(ax, run)
        ax.set_xlabel("model's round (0 = original)")
        ax.set_title(key)
    axes[0].legend(fontsize=8)
    teacher = run.config is not None and run.config.model.teacher is not None
    fig.suptitle("Diversity of the training samples a round's model wrote"
                 + (" (here the teacher wrote them)" if teacher else ""))
    return _save(fig, path)


def plot_frontier(run: RunMetrics, path: Path) -> Path | None:
    """One panel per arm and round with a merge sweep: each candidate's probe accuracy, ID against OOD
    mean, labelled by the parameters it varies; the frontier joined, the chosen one starred, the
    round's start model as a cross (None when no round swept)."""
    rows = sweep_rows(run)
    if not rows:
        return None
    colours = arm_colours(run.arms)
    fig, axes = _grid(len(rows), 4.2, 3.6)
    for ax, row in zip(axes, rows):
        sweep, colour = row["sweep"], colours[row["arm"]]
        cands, keys = sweep["candidates"], varying_params(sweep)
        xs, ys = [100 * c["id"] for c in cands], [100 * c["ood"] for c in cands]
        ax.scatter(xs, ys, color=colour, zorder=3)
        front = sorted((x, y) for (x, y), on in zip(zip(xs, ys), pareto_front([ProbeScore(c["id"], c["ood"])
                                                                                for c in cands])) if on)
        ax.plot([x for x, _ in front], [y for _, y in front], "-", color=colour, alpha=0.5, label="frontier")
        for x, y, cand in zip(xs, ys, cands):
            ax.annotate(candidate_label(cand["params"], keys), (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        best = cands[sweep["chosen"]["index"]]
        ax.scatter([100 * best["id"]], [100 * best["ood"]], marker="*", s=220, color=colour,
                   edgecolors="k", zorder=4, label="chosen")
        start = sweep["start"]
        ax.scatter([100 * start["id"]], [100 * start["ood"]], marker="x", color="0.4", zorder=4, label="start model")
        top = max([*xs, *ys, 100 * start["id"], 100 * start["ood"]]) + 2  # room for the markers and labels
        for axis in (ax.set_xlim, ax.set_ylim):  # both from 0: a few points' gap is not magnified
            axis(0, min(102, 10 * max(1, math.ceil(top / 10))))
        ax.set_xlabel(f"ID probe accuracy (%), {run.id_dataset}")
        ax.set_ylabel("OOD probe accuracy (%, mean)")
        ax.set_title(f"{row['arm']} round {row['round']}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Merge candidates on the probe split")
    return _save(fig, path)


def _model_label(m: dict[str, Any]) -> str:
    return f"{m['arm']} r{m['round']} {m['kind']}"


def plot_layer_analysis(analysis: dict[str, Any], path: Path) -> Path | None:
    """Heat map of per-layer relative change (layers x models) beside layer importance bars."""
    import numpy as np

    models = [m for m in analysis.get("models", []) if m.get("change", {}).get("per_layer")]
    importance = analysis.get("importance")
    if not models and not importance:
        return None
    n_layers = max([len(m["change"]["per_layer"]) for m in models]
                   + [len((importance or {}).get("layers", []))])
    fig, (ax_heat, ax_imp) = plt.subplots(
        1, 2, figsize=(3 + 0.9 * max(len(models), 2) + 4, 1.2 + 0.28 * max(n_layers, 4)),
        gridspec_kw={"width_ratios": [max(len(models), 1), 2.5]}, sharey=True, squeeze=True)
    if models:
        grid = np.full((n_layers, len(models)), np.nan)
        for j, m in enumerate(models):
            for i, v in enumerate(m["change"]["per_layer"]):
                grid[i, j] = np.nan if v is None else v
        image = ax_heat.imshow(grid, aspect="auto", cmap="viridis", origin="lower",
                               extent=(-0.5, len(models) - 0.5, -0.5, n_layers - 0.5))
        fig.colorbar(image, ax=ax_heat, label="||W_t - W_0|| / ||W_0||", pad=0.02)
        ax_heat.set_xticks(range(len(models)))
        ax_heat.set_xticklabels([_model_label(m) for m in models], rotation=60, ha="right", fontsize=8)
    ax_heat.set_ylabel("decoder layer")
    ax_heat.set_title("relative parameter change")
    if importance:
        layers = importance.get("layers", [])
        ys = [row["layer"] for row in layers]
        # accuracy drop (fraction) on the bottom axis, loss rise (nats) on a twin top axis
        axes = {"accuracy_drop": ax_imp, "loss_rise": ax_imp.twiny()}
        for column, colour, label, offset in (("accuracy_drop", "tab:red", "accuracy drop", -0.2),
                                              ("loss_rise", "tab:purple", "loss rise (nats)", 0.2)):
            ax = axes[column]
            values = [row.get(column) for row in layers]
            if any(v is not None for v in values):
                ax.barh([y + offset for y in ys], [v if v is not None else 0 for v in values],
                        height=0.4, color=colour, label=label)
            ax.set_xlabel(label, color=colour)
            ax.tick_params(axis="x", colors=colour)
        ax_imp.axvline(0, color="k", lw=0.6)
    ax_imp.set_title("importance when skipped", pad=28)
    ax_imp.set_ylim(-0.5, n_layers - 0.5)
    ax_heat.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def plot_module_changes(analysis: dict[str, Any], path: Path) -> Path | None:
    """Per arm, its last model's relative change per (module type, layer)."""
    import numpy as np

    last: dict[str, dict[str, Any]] = {}
    for m in analysis.get("models", []):
        if m.get("change", {}).get("per_layer_module"):
            last[m["arm"]] = m  # models are sorted by arm, round, kind
    if not last:
        return None
    fig, axes = plt.subplots(1, len(last), figsize=(5.5 * len(last), 4), squeeze=False)
    for ax, m in zip(axes[0], last.values()):
        cells = m["change"]["per_layer_module"]
        modules = sorted(cells)
        grid = np.array([[np.nan if v is None else v for v in cells[k]] for k in modules])
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels(modules, fontsize=8)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(_model_label(m))
        fig.colorbar(image, ax=ax)
    fig.suptitle("relative change per module type and layer")
    return _save(fig, path)


def write_plots(run: RunMetrics, folder: Path) -> list[Path]:
    """Write every plot the run's data supports into folder; return the files written."""
    makers: list[tuple[str, Callable[[], Path | None]]] = [
        ("accuracy.png", lambda: plot_accuracy(run, folder / "accuracy.png")),
        ("accuracy_by_dataset.png", lambda: plot_accuracy_by_dataset(run, folder / "accuracy_by_dataset.png")),
        ("diversity.png", lambda: plot_diversity(run, folder / "diversity.png")),
        ("frontier.png", lambda: plot_frontier(run, folder / "frontier.png")),
    ]
    if run.analysis:
        makers += [
            ("layer_change.png", lambda: plot_layer_analysis(run.analysis, folder / "layer_change.png")),
            ("module_change.png", lambda: plot_module_changes(run.analysis, folder / "module_change.png")),
        ]
    written = []
    for name, make in makers:
        try:
            out = make()
        except Exception:  # a broken plot must not cost the report (the log says which)
            logger.exception("report: plot %s failed", name)
            continue
        if out is not None:
            written.append(out)
    return written

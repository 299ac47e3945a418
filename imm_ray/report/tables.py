"""Markdown tables for the report: per-round results and the layer-analysis summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imm_ray.report.metrics import RunMetrics

__all__ = ["analysis_table", "markdown_table", "rounds_table", "summary_lines"]


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]],
                   align_right_from: int = 0) -> str:
    """A GitHub-flavoured markdown table (columns from align_right_from on are right-aligned)."""
    rule = ["---:" if i >= align_right_from else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _acc_cell(run: RunMetrics, row: dict[str, Any], dataset: str) -> str:
    cell = _pct(run.accuracy(row, dataset))
    ci = run.ci95(row, dataset)
    if ci is not None and cell != "-":
        cell += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return cell


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rounds_table(run: RunMetrics) -> str:
    """One line per arm and round: samples, the verifier that kept them (with its pseudo-label precision
    against gold when it needs none), ID/OOD accuracy (with 95% CI when present),
    diversity (when present), stage seconds and tokens per second (generated or trained)."""
    if not run.rows:
        return "_No finished rounds yet._"
    datasets, diversity, stages = run.datasets, run.diversity_keys, run.stages
    head = ["arm", "round", "generated", "accepted"]
    named = any(row.get("verifier") for row in run.rows)  # runs made before rounds recorded their verifier lack it
    checked = any("gold_check" in row for row in run.rows)  # a verifier without gold ran
    head += (["verifier"] if named else []) + (["label precision"] if checked else [])
    head += [f"{'ID' if i == 0 else 'OOD'}: {d}" for i, d in enumerate(datasets)]
    with_mean = len(run.ood_datasets) > 1
    head += ["OOD mean"] if with_mean else []
    head += diversity + [f"{s} s" for s in stages]
    rated = [s for s in stages if any(s in (row.get("tokens_per_s") or {}) for row in run.rows)]
    head += [f"{s} tok/s" for s in rated]
    body = []
    for arm in ["base"] + run.arms:
        for row in run.arm_rows(arm, with_base=False):
            cells = [str(row.get("arm")), str(row.get("round")), str(row.get("generated", "-")),
                     str(row.get("accepted", "-"))]
            cells += [str(row.get("verifier") or "-")] if named else []
            cells += [_pct((row.get("gold_check") or {}).get("label_precision"))] if checked else []
            cells += [_acc_cell(run, row, d) for d in datasets]
            cells += [_pct(run.ood_mean(row))] if with_mean else []
            cells += [_num(run.diversity(row, k)) for k in diversity]
            seconds = row.get("seconds") or {}
            cells += [f"{seconds[s]:.0f}" if isinstance(seconds.get(s), (int, float)) else "-"
                      for s in stages]
            rates = row.get("tokens_per_s") or {}
            cells += [f"{rates[s]:.0f}" if isinstance(rates.get(s), (int, float)) else "-" for s in rated]
            body.append(cells)
    return markdown_table(head, body, align_right_from=1)


def summary_lines(run: RunMetrics) -> list[str]:
    """Per arm: ID and OOD accuracy of the last round against the base model."""
    base = run.base_row()
    lines = []
    for arm in run.arms:
        rows = run.arm_rows(arm, with_base=False)
        if not rows:
            continue
        last = rows[-1]
        parts = []
        for label, get in (("ID", lambda r: run.accuracy(r, run.id_dataset or "")),
                           ("OOD", run.ood_mean)):
            now = get(last)
            if now is None:
                continue
            text = f"{label} {_pct(now)}"
            before = get(base) if base is not None else None
            if before is not None:
                text += f" ({100 * (now - before):+.1f} pt vs base)"
            parts.append(text)
        if parts:
            lines.append(f"- **{arm}** after round {last['round']}: " + ", ".join(parts))
    return lines


def analysis_table(analysis: dict[str, Any]) -> str:
    """Per compared model: total relative change, most-changed layer, Spearman rho."""
    body = []
    for m in analysis.get("models", []):
        change = m.get("change", {})
        per_layer = change.get("per_layer") or []
        valued = [(v, i) for i, v in enumerate(per_layer) if v is not None]
        top = f"{max(valued)[1]}" if valued else "-"
        rho = m.get("spearman") or {}
        body.append([str(m.get("arm")), str(m.get("round")), str(m.get("kind")),
                     _num(change.get("total"), 4), top, _num(rho.get("accuracy_drop"), 2),
                     _num(rho.get("loss_rise"), 2)])
    head = ["arm", "round", "model", "relative change", "most-changed layer",
            "rho (accuracy drop)", "rho (loss rise)"]
    return markdown_table(head, body, align_right_from=1) if body else "_No models compared._"

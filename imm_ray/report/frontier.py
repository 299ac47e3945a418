"""The merge sweep in the report: each round's candidates with their in-domain (ID) and out-of-domain
(OOD) probe accuracies, which of them lie on the ID/OOD frontier, and the one the round chose."""

from __future__ import annotations

from typing import Any

from imm_ray.merge.sweep import ProbeScore, pareto_front
from imm_ray.report.metrics import RunMetrics
from imm_ray.report.tables import markdown_table

__all__ = ["candidate_label", "frontier_section", "sweep_rows", "varying_params"]


def sweep_rows(run: RunMetrics) -> list[dict[str, Any]]:
    """The metrics rows of rounds that ran a merge sweep, by arm and round."""
    return [row for arm in run.arms for row in run.arm_rows(arm, with_base=False) if row.get("sweep")]


def varying_params(sweep: dict[str, Any]) -> list[str]:
    """The parameters that differ between a sweep's candidates (all of them when none does)."""
    params = [c["params"] for c in sweep["candidates"]]
    keys = list(params[0]) if params else []
    return [k for k in keys if len({repr(p.get(k)) for p in params}) > 1] or keys


def candidate_label(params: dict[str, Any], keys: list[str]) -> str:
    """``lam=0.5, drop_rate=0.2`` for the parameters ``keys``."""
    return ", ".join(f"{k}={params[k]:g}" if isinstance(params.get(k), float) else f"{k}={params.get(k)}"
                     for k in keys)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def frontier_section(run: RunMetrics) -> list[str]:
    """Per arm and round with a sweep: the start model and every candidate (probe ID, probe OOD mean,
    on the frontier, chosen); empty when no round swept."""
    rows = sweep_rows(run)
    if not rows:
        return []
    body = []
    for row in rows:
        sweep = row["sweep"]
        keys, cands = varying_params(sweep), sweep["candidates"]
        start = sweep["start"]
        body.append([row["arm"], str(row["round"]), "start model", _pct(start["id"]), _pct(start["ood"]), "", ""])
        front = pareto_front([ProbeScore(c["id"], c["ood"]) for c in cands])
        for i, (cand, on_front) in enumerate(zip(cands, front)):
            body.append([row["arm"], str(row["round"]), candidate_label(cand["params"], keys), _pct(cand["id"]),
                         _pct(cand["ood"]), "yes" if on_front else "",
                         "chosen" if i == sweep["chosen"]["index"] else ""])
    first = rows[0]["sweep"]
    probe = ", ".join(f"{n} of {name}" for name, n in first.get("probe_n", {}).items())
    ood = ", ".join(run.ood_datasets)
    lines = ["## Merge sweep: the ID / OOD frontier per round", "",
             f"Each round's candidate merges scored greedily on the probe split ({probe} questions); every accuracy "
             "reported above is on the held-back rest, so the choice cannot flatter it. ID is "
             f"{run.id_dataset}, OOD the mean over {ood}; a candidate is on the frontier when no other is as good "
             f"on both and better on one. merge.select {first['rule']}.", "",
             markdown_table(["arm", "round", "merge", "ID probe", "OOD probe", "frontier", "chosen"], body,
                            align_right_from=3), ""]
    return lines

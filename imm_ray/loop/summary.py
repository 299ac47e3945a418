"""Per-round metrics rows and the summary table printed in the log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imm_ray.run.layout import BASELINE_ARM, BASELINE_ROUND, STAGES, stage_key
from imm_ray.run.state import RunState, StageRecord

# Stages whose tokens per second the table shows (tokens generated or trained).
_RATED = ("generate", "sft", "evaluate")


def metrics_rows(state: RunState, arms: list[str], rounds: int) -> list[dict[str, Any]]:
    """Build one metrics row per finished round and arm (plus the baseline) from the run's state."""
    rows: list[dict[str, Any]] = []
    base = state.record(stage_key(BASELINE_ARM, BASELINE_ROUND, "evaluate"))
    if base and base.done:
        rows.append(_row(BASELINE_ROUND, BASELINE_ARM, {"evaluate": base}))
    for arm in arms:
        for t in range(1, rounds + 1):
            recs = {s: state.record(stage_key(arm, t, s)) for s in STAGES}
            ev = recs["evaluate"]
            if not ev or not ev.done:
                break
            rows.append(_row(t, arm, {k: v for k, v in recs.items() if v and v.done}))
    return rows


def _info(recs: dict[str, StageRecord], stage: str) -> Mapping[str, Any]:
    rec = recs.get(stage)
    return (rec.info or {}) if rec else {}


def _row(round_idx: int, arm: str, recs: dict[str, StageRecord]) -> dict[str, Any]:
    gen, ver, sft, ev = (_info(recs, s) for s in ("generate", "verify", "sft", "evaluate"))
    return {
        "round": round_idx,
        "arm": arm,
        "generated": gen.get("generated", 0),
        "accepted": ver.get("accepted", 0),
        "correct": ver.get("correct", 0),
        "questions_solved": ver.get("questions_solved", 0),
        "verifier": ver.get("verifier"),
        # Verifiers without gold: pseudo-label precision against the gold answers the data has.
        **({"gold_check": ver["gold_check"]} if "gold_check" in ver else {}),
        "accuracy": {name: d["accuracy"] for name, d in ev["datasets"].items()},
        "eval": ev["datasets"],
        "diversity": ver.get("diversity"),
        "sft": dict(sft),
        "model": ev.get("model"),
        "seconds": {name: rec.seconds for name, rec in recs.items()},
        # Tokens generated (generate, evaluate) or trained (sft), and their rate over the stage.
        "tokens": {name: _info(recs, name)["tokens"] for name in recs if "tokens" in _info(recs, name)},
        "tokens_per_s": {name: _info(recs, name)["tokens_per_s"] for name in recs
                         if "tokens_per_s" in _info(recs, name)},
        # With merge.sweep: every candidate's probe ID/OOD accuracy, the rule and the chosen merge.
        **({"sweep": dict(_info(recs, "sweep"))} if "sweep" in recs else {}),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: arm, round, samples, accuracy per data set, seconds per stage, tokens/s."""
    if not rows:
        return "(no finished rounds yet)"
    datasets = list(rows[0]["accuracy"])
    head = ["arm", "round", "generated", "accepted"] + datasets + [f"{s} s" for s in STAGES]
    head += [f"{s} tok/s" for s in _RATED]
    body = []
    for r in rows:
        cells = [r["arm"], str(r["round"]), str(r["generated"]), str(r["accepted"])]
        cells += [f"{100 * r['accuracy'].get(d, float('nan')):.1f}%" for d in datasets]
        cells += [f"{r['seconds'][s]:.0f}" if s in r["seconds"] else "-" for s in STAGES]
        rates = r.get("tokens_per_s") or {}
        cells += [f"{rates[s]:.0f}" if s in rates else "-" for s in _RATED]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)

"""Report sections from the per-question ledgers (each evaluation's eval_samples.jsonl): questions
gained and lost per set and round, pass@k, and the paired comparison of every two arms."""

from __future__ import annotations

import logging
from itertools import combinations

from imm_ray.evaluate.ledger import Ledger, question_changes, read_ledger
from imm_ray.evaluate.paired import paired_difference
from imm_ray.report.metrics import RunMetrics
from imm_ray.report.tables import markdown_table
from imm_ray.run import layout
from imm_ray.run.files import eval_samples_location, read_eval_samples

__all__ = ["Ledgers", "comparison_section", "ledger_section", "load_ledgers", "pass_at_k_section"]

logger = logging.getLogger(__name__)

Ledgers = dict[tuple[str, int], Ledger | None]  # (arm, round) -> ledger; None: not recorded


def load_ledgers(run: RunMetrics) -> Ledgers:
    """The ledger of every evaluation with a metrics row (the baseline as ("base", 0)); None for
    one whose eval_samples.jsonl is missing or has no per-question correctness (older runs)."""
    out: Ledgers = {}
    for row in run.rows:
        arm, t = str(row.get("arm")), int(row.get("round", 0))
        rows = read_eval_samples(run.run_dir, arm, t)
        if rows is None:
            logger.info("no ledger for %s round %d: %s is missing", arm, t, eval_samples_location(run.run_dir, arm, t))
        out[(arm, t)] = None if rows is None else read_ledger(rows)
    return out


def _changes_cell(before: Ledger | None, after: Ledger | None, dataset: str) -> str:
    if before is None or after is None or dataset not in before.greedy or dataset not in after.greedy:
        return "n/a"
    ch = question_changes(before.greedy[dataset], after.greedy[dataset])
    return f"+{len(ch.gained)} / -{len(ch.lost)} (net {ch.net:+d})"


def ledger_section(run: RunMetrics, ledgers: Ledgers) -> list[str]:
    """Questions gained / lost per arm, round and set, against the baseline and the previous round."""
    if not any(ledgers.values()):
        return []
    base = ledgers.get((layout.BASELINE_ARM, layout.BASELINE_ROUND))
    head = ["arm", "round"] + [f"{d} vs {ref}" for d in run.datasets for ref in ("base", "prev")]
    body = []
    for arm in run.arms:
        rounds = [r["round"] for r in run.arm_rows(arm, with_base=False)]
        for prev, t in zip([layout.BASELINE_ROUND, *rounds], rounds):
            now, before = ledgers.get((arm, t)), (ledgers.get((arm, prev)) if prev else base)
            body.append([arm, str(t)] + [_changes_cell(ref, now, d) for d in run.datasets for ref in (base, before)])
    lines = ["## Per-question ledger", "",
             "Questions answered correctly (greedy) that were wrong before (+gained) and wrong that were "
             "right before (-lost), against the original model (base) and the arm's previous round (prev); "
             "n/a where a ledger is unavailable.", "", markdown_table(head, body, align_right_from=1), ""]
    missing = sorted(f"{arm} round {t}" for (arm, t), ledger in ledgers.items() if ledger is None)
    if missing:
        lines += [f"Ledger unavailable (no per-question records in {layout.EVAL_SAMPLES}) for: "
                  + ", ".join(missing) + ".", ""]
    return lines


def pass_at_k_section(run: RunMetrics, ledgers: Ledgers) -> list[str]:
    """pass@1 and pass@k (unbiased estimator) per arm, round and set, when some evaluation sampled k > 1."""
    if not any(ledger.k(d) > 1 for ledger in ledgers.values() if ledger for d in ledger.samples):
        return []
    body = []
    for arm in ["base", *run.arms]:
        for row in run.arm_rows(arm, with_base=False):
            ledger = ledgers.get((arm, row["round"]))
            cells = [arm, str(row["round"])]
            for d in run.datasets:
                k = ledger.k(d) if ledger else 0
                p1, pk = (ledger.pass_at(d, 1), ledger.pass_at(d, k)) if ledger and k > 1 else (None, None)
                cells.append("n/a" if pk is None else f"{100 * p1:.1f}% / {100 * pk:.1f}% (k={k})")
            body.append(cells)
    return ["## pass@k", "",
            "pass@1 / pass@k of k samples per question at evaluate.temperature, with the unbiased estimator "
            "1 - C(n-c, k) / C(n, k) averaged over questions (n samples, c correct).", "",
            markdown_table(["arm", "round", *run.datasets], body, align_right_from=1), ""]


def comparison_section(run: RunMetrics, ledgers: Ledgers) -> list[str]:
    """For every two arms, round and set: the paired accuracy difference, its 95% interval and
    McNemar's exact p-value on the questions both were evaluated on."""
    body = []
    for a, b in combinations(run.arms, 2):
        rounds = sorted({r["round"] for r in run.arm_rows(a, False)} & {r["round"] for r in run.arm_rows(b, False)})
        for t in rounds:
            la, lb = ledgers.get((a, t)), ledgers.get((b, t))
            for d in run.datasets:
                pd = (paired_difference(la.greedy[d], lb.greedy[d])
                      if la and lb and d in la.greedy and d in lb.greedy else None)
                if pd is None:
                    continue
                lo, hi = pd.ci95
                diff = f"{100 * pd.difference:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                body.append([str(t), f"{a} - {b}", d, str(pd.n), f"{100 * pd.accuracy_a:.1f}%",
                             f"{100 * pd.accuracy_b:.1f}%", diff, f"{pd.only_a} / {pd.only_b}", f"{pd.p_value:.3g}"])
    if not body:
        return []
    head = ["round", "arms (A - B)", "set", "n", "A", "B", "A - B (pt) [95% CI]", "only A / only B right",
            "McNemar p"]
    return ["## Paired comparison of arms", "",
            "Both arms on the same questions: the accuracy difference in points with its Wald 95% interval on "
            "the paired per-question differences, the discordant questions, and McNemar's exact two-sided "
            "p-value (binomial test on the discordant questions).", "",
            markdown_table(head, body, align_right_from=3), ""]

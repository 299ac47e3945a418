"""The JSON behind the run's web page: overview, training samples, evaluation answers and votes.

Everything is read through the run directory's own readers (``state.json`` through `read_state`,
``metrics.jsonl`` through `load_run_metrics`, the per-question ledgers through `read_ledger`), so
the page shows exactly what the run published. No Ray, no FastAPI: the routes live in
:mod:`imm_ray.serve.page`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imm_ray.errors import UserError
from imm_ray.evaluate.ledger import question_changes, read_ledger
from imm_ray.report.metrics import RunMetrics, load_run_metrics
from imm_ray.run import RunState, StageRecord, layout
from imm_ray.run.arms import get_arm, round_stages
from imm_ray.run.files import read_eval_samples
from imm_ray.run.state import read_state
from imm_ray.storage import Location, read_jsonl, resolve
from imm_ray.storage.append import append_line

__all__ = ["PageData", "PageInputError", "SAMPLE_FILTERS", "EVAL_FILTERS"]

SAMPLE_FILTERS = ("all", "accepted", "rejected", "disagree")
EVAL_FILTERS = ("all", "right", "wrong", "gained", "lost")
PAGE_SIZE = 20
MAX_VOTE_TEXT = 20_000  # characters of one prompt or answer kept in a vote


class PageInputError(UserError):
    """A page request names something the run does not have; the message says what to pick."""


def _stage_table(state: RunState | None) -> dict[tuple[str, int], dict[str, StageRecord]]:
    """(arm, round) -> stage -> its record (none before the run's first stage)."""
    table: dict[tuple[str, int], dict[str, StageRecord]] = {}
    for rec in state or ():
        try:
            arm, n, stage = layout.parse_stage_key(rec.key)
        except ValueError:
            continue
        table.setdefault((arm, n), {})[stage] = rec
    return table


def _accuracy(run: RunMetrics, row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for d in run.datasets:
        value = run.accuracy(row, d)
        if value is not None:
            out[d] = {"value": value, "ci95": run.ci95(row, d)}
    return out


def _round_entry(run: RunMetrics, n: int, stages: dict[str, StageRecord], row: dict[str, Any] | None,
                 stage_names: Iterable[str]) -> dict[str, Any]:
    """One round of one arm: stage status and seconds, then its metrics once its row exists."""
    status = {s: stages[s].status if s in stages else "pending" for s in stage_names}
    seconds = {s: rec.seconds for s, rec in stages.items() if isinstance(rec.seconds, (int, float))}
    merge = stages["merge"].info or {} if "merge" in stages else {}
    entry: dict[str, Any] = {"round": n, "status": status, "seconds": seconds,
                             "merge": {"method": merge.get("method"), "params": merge.get("params")} if merge else None}
    if row is not None:
        entry.update(accuracy=_accuracy(run, row), generated=row.get("generated"), accepted=row.get("accepted"),
                     diversity={k: run.diversity(row, k) for k in run.diversity_keys})
    return entry


class PageData:
    """Reads one run directory for the page; ``arm`` is the arm whose rounds the app serves."""

    def __init__(self, run_dir: str | Path | Location, arm: str, run_name: str) -> None:
        self.root = resolve(run_dir)
        self.arm, self.run_name = arm, run_name

    # --- overview ---------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        """Arms and rounds with stage status, metrics, merge settings; the baseline as round 0; votes."""
        run = load_run_metrics(self.root)
        table = _stage_table(read_state(self.root))  # reads only: the page never creates the run folder
        planned = (run.config.run.arms, run.config.run.rounds) if run.config is not None else ([], 0)
        arms = list(dict.fromkeys([*planned[0], *run.arms, *(a for a, _ in table if a != layout.BASELINE_ARM)]))
        rows = {(r.get("arm"), r.get("round")): r for r in run.rows}
        base_key = (layout.BASELINE_ARM, layout.BASELINE_ROUND)
        base = _round_entry(run, 0, table.get(base_key, {}), rows.get(base_key), ("evaluate",))
        sweeps = run.config is not None and bool(run.config.merge.sweep)
        out_arms, shown = [], set()
        for arm in arms:
            numbers = sorted({n for a, n in table if a == arm} | set(range(1, planned[1] + 1)))
            entries = []
            for n in numbers:
                stages = table.get((arm, n), {})
                # The stages this round runs, as the driver plans them (no merge for arms that do not merge
                # or rounds whose SFT was skipped, no sweep without merge.sweep).
                sft = stages["sft"].info if "sft" in stages else None
                names = [st.name for st in round_stages(get_arm(arm), bool(sft and sft.get("skipped")), sweeps)]
                shown.update(names)
                entries.append(_round_entry(run, n, stages, rows.get((arm, n)), names))
            out_arms.append({"name": arm, "served": arm == self.arm, "rounds": entries})
        return {"run": self.run_name, "served_arm": self.arm, "datasets": run.datasets,
                "diversity_keys": run.diversity_keys, "stages": [s for s in layout.STAGES if s in shown],
                "baseline": base, "arms": out_arms, "votes": self.vote_counts()}

    # --- training samples -------------------------------------------------------------------
    def _round_file(self, arm: str, n: int, name: str) -> list[dict[str, Any]] | None:
        try:
            return read_jsonl(self.root / layout.round_folder(arm, n) / name)
        except FileNotFoundError:
            return None

    def _judged(self, arm: str, n: int) -> dict[str, list[dict[str, Any]]]:
        """Question id -> its samples (generation order), each with the verifier's verdict: correct,
        the extracted answer, and accepted (correct and not a duplicate). Rounds verified before
        verdicts.jsonl existed have verdicts for the accepted samples only."""
        samples = self._round_file(arm, n, layout.SAMPLES)
        if samples is None:
            raise PageInputError(f"{arm} round {n} has no {layout.SAMPLES} (not generated yet)")
        accepted = {(r["problem_id"], r.get("sample")) for r in self._round_file(arm, n, layout.ACCEPTED) or []}
        verdicts = {(v["problem_id"], v.get("sample")): v for v in self._round_file(arm, n, layout.VERDICTS)
                    or self._round_file(arm, n, layout.ACCEPTED) or []}
        by_q: dict[str, list[dict[str, Any]]] = {}
        for r in samples:
            key = (r["problem_id"], r.get("sample"))
            verdict = verdicts.get(key, {})
            by_q.setdefault(str(r["problem_id"]), []).append({
                "sample": r.get("sample"), "completion": r.get("completion", ""), "question": r.get("question"),
                "gold": r.get("gold"), "finish_reason": r.get("finish_reason"), "accepted": key in accepted,
                "correct": verdict.get("correct", True if key in accepted else None),
                "extracted": verdict.get("extracted")})
        return by_q

    def samples(self, arm: str, n: int, which: str = "all", other: int | None = None,
                offset: int = 0) -> dict[str, Any]:
        """One page of a round's training questions with their k samples, filtered by ``which``:
        samples accepted / rejected, or questions solved in one of rounds ``n`` and ``other`` only."""
        if which not in SAMPLE_FILTERS:
            raise PageInputError(f"filter {which!r} is not one of {', '.join(SAMPLE_FILTERS)}")
        by_q = self._judged(arm, n)
        questions = []
        solved_other = None
        if which == "disagree":
            if other is None:
                raise PageInputError("the 'disagree' filter needs a second round to compare with (other=N)")
            solved_other = {q for q, ss in self._judged(arm, other).items() if any(s["accepted"] for s in ss)}
        for qid, ss in by_q.items():
            if which in ("accepted", "rejected"):
                ss = [s for s in ss if s["accepted"] == (which == "accepted")]
            elif solved_other is not None and any(s["accepted"] for s in ss) == (qid in solved_other):
                ss = []
            if ss:
                questions.append({"problem_id": qid, "question": ss[0]["question"], "gold": ss[0]["gold"],
                                  "solved_other": None if solved_other is None else qid in solved_other,
                                  "samples": ss})
        total = sum(len(ss) for ss in by_q.values())
        kept = sum(s["accepted"] for ss in by_q.values() for s in ss)
        return {"arm": arm, "round": n, "filter": which, "other": other, "questions_total": len(questions),
                "offset": offset, "page_size": PAGE_SIZE, "questions": questions[offset:offset + PAGE_SIZE],
                "samples_total": total, "accepted_total": kept}

    # --- evaluation answers -----------------------------------------------------------------
    def _eval_rows(self, arm: str, n: int) -> list[dict[str, Any]] | None:
        return read_eval_samples(self.root, arm, n)

    def evaluation(self, arm: str, n: int, which: str = "all", offset: int = 0) -> dict[str, Any]:
        """One page of a round's greedy evaluation answers, right or wrong, and the questions it
        gained and lost against the baseline per evaluation set."""
        if which not in EVAL_FILTERS:
            raise PageInputError(f"filter {which!r} is not one of {', '.join(EVAL_FILTERS)}")
        rows = self._eval_rows(arm, n)
        if rows is None:
            raise PageInputError(f"{arm} round {n} has no {layout.EVAL_SAMPLES} (not evaluated yet)")
        greedy = [r for r in rows if r.get("kind", "greedy") == "greedy"]
        mine = read_ledger(rows)
        base_rows = self._eval_rows(layout.BASELINE_ARM, layout.BASELINE_ROUND)
        base = read_ledger(base_rows) if base_rows else None
        changes = {}
        if mine is not None and base is not None and n != layout.BASELINE_ROUND:
            for d, answers in mine.greedy.items():
                if d in base.greedy:
                    ch = question_changes(base.greedy[d], answers)
                    changes[d] = {"gained": ch.gained, "lost": ch.lost, "n": ch.n}
        gained = {(d, q) for d, ch in changes.items() for q in ch["gained"]}
        lost = {(d, q) for d, ch in changes.items() for q in ch["lost"]}
        keep = {"all": lambda r: True, "right": lambda r: bool(r.get("correct")),
                "wrong": lambda r: not r.get("correct"),
                "gained": lambda r: (r.get("dataset"), str(r.get("problem_id"))) in gained,
                "lost": lambda r: (r.get("dataset"), str(r.get("problem_id"))) in lost}[which]
        answers = [{"dataset": r.get("dataset"), "problem_id": str(r.get("problem_id")), "gold": r.get("gold"),
                    "extracted": r.get("extracted"), "correct": bool(r.get("correct")),
                    "completion": r.get("completion", ""),
                    "change": "gained" if (r.get("dataset"), str(r.get("problem_id"))) in gained
                    else "lost" if (r.get("dataset"), str(r.get("problem_id"))) in lost else None}
                   for r in greedy if keep(r)]
        return {"arm": arm, "round": n, "filter": which, "changes": changes, "answers_total": len(answers),
                "offset": offset, "page_size": PAGE_SIZE, "answers": answers[offset:offset + PAGE_SIZE]}

    # --- votes ------------------------------------------------------------------------------
    @property
    def votes_path(self) -> Location:
        return self.root / layout.VOTES

    def add_vote(self, models: list[str], prompt: str, answers: list[str], winner: str | None,
                 blind: bool) -> dict[str, Any]:
        """Append one preference (``winner`` None: a tie) to the run's votes file; return it."""
        if len(models) < 2 or len(models) != len(answers):
            raise PageInputError("a vote needs two or more models and one answer per model")
        if winner is not None and winner not in models:
            raise PageInputError(f"the winner {winner!r} is not one of the compared models")
        vote = {"time": time.time(), "models": models, "prompt": prompt[:MAX_VOTE_TEXT],
                "answers": [a[:MAX_VOTE_TEXT] for a in answers], "winner": winner, "blind": blind}
        append_line(self.votes_path, vote)
        return vote

    def votes(self) -> list[dict[str, Any]]:
        try:
            return read_jsonl(self.votes_path)
        except FileNotFoundError:
            return []

    def vote_counts(self) -> dict[str, Any]:
        """Votes cast, ties, and wins per model."""
        wins: dict[str, int] = {}
        rows = self.votes()
        for v in rows:
            if v.get("winner"):
                wins[v["winner"]] = wins.get(v["winner"], 0) + 1
        return {"total": len(rows), "ties": sum(1 for v in rows if not v.get("winner")), "wins": wins}

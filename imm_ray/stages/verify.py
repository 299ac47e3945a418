"""The verify stage: a verdict per sample, the accepted samples (``AcceptedRow``) and the round's
verification record (accuracy, pass@k and collapse metrics on the training questions)."""

from __future__ import annotations

from typing import Any

from imm_ray.evaluate import diversity_metrics, group_by_question, mean_pass_at_k
from imm_ray.run.infos import VerifyInfo
from imm_ray.run.records import AcceptedRow
from imm_ray.stages.ports import Verifiers
from imm_ray.storage import Location, read_jsonl, write_jsonl
from imm_ray.verify import Verdict, label_precision, needs_gold, select_accepted


def verify(verifiers: Verifiers, samples: Location, accepted: Location, verdicts_out: Location, verifier: str,
           samples_per_question: int, batch_size: int, dedup: bool = True) -> VerifyInfo:
    """Judge the rows of ``samples`` with ``verifiers`` (running ``verifier``); write the accepted rows
    to ``accepted`` and every verdict to ``verdicts_out``."""
    rows = read_jsonl(samples)
    verdicts = verifiers.verify(rows, batch_size)
    kept = [AcceptedRow.from_json(r) for r in select_accepted(rows, verdicts, dedup=dedup)]
    write_jsonl(accepted, [r.to_json() for r in kept])
    write_jsonl(verdicts_out, [_verdict_row(r, vd) for r, vd in zip(rows, verdicts)])
    verified = [{**r, "extracted": vd.extracted, "correct": vd.correct} for r, vd in zip(rows, verdicts)]
    k = samples_per_question
    return VerifyInfo(
        verifier=verifier,
        generated=len(rows),
        correct=sum(vd.correct for vd in verdicts),
        unparseable=sum(vd.extracted is None for vd in verdicts),
        timeouts=sum(vd.timed_out for vd in verdicts),
        accepted=len(kept),
        questions_solved=len({r.problem_id for r in kept}),
        actor_retries=verifiers.last_retries,  # verifier actors replaced mid-stage
        # Without gold in the loop: how often the accepted answers were right, where gold exists.
        gold_check=None if needs_gold(verifier) else label_precision(rows, verdicts),
        diversity=_diversity(verified),  # collapse metrics on the k samples per training question
        extra={f"train_pass@{k}": mean_pass_at_k(list(group_by_question(verified, field="correct").values()), k)},
    )


def _verdict_row(row: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    """One line of the verdicts file: the sample's key, its extracted answer and verdict."""
    return {"problem_id": row["problem_id"], "sample": row["sample"], "extracted": verdict.extracted,
            "correct": verdict.correct, **({"timed_out": True} if verdict.timed_out else {}),
            **({"note": verdict.note} if verdict.note is not None else {})}


def _diversity(verified: list[dict[str, Any]]) -> dict[str, Any]:
    """Diversity of the samples per question; entropy only on the questions it was measured on
    (generate's entropy stride)."""
    with_entropy = [r for r in verified if "token_entropies" in r]
    return diversity_metrics(
        group_by_question(verified), group_by_question(verified, field="extracted"),
        group_by_question(with_entropy, field="token_entropies") if with_entropy else None)

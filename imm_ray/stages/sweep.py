"""The merge sweep stage: score the round's start model and each merge candidate on the probe split
and pick the round's merge by ``merge.select``.

Each candidate is merged, scored, then deleted; each score is recorded as it is made
(``folder/NN.json``, the start model's in ``folder/start.json``), so that a resumed sweep keeps
the records made with the same inputs and redoes only the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imm_ray.merge.sweep import SELECT_RULES, ProbeScore, choose_candidate, sweep_candidates
from imm_ray.run.infos import SweepInfo
from imm_ray.stages.ports import Merge
from imm_ray.storage import Location, clear_output, read_json, write_json

logger = logging.getLogger(__name__)

ProbeScorer = Callable[[str, str], Mapping[str, Mapping[str, Any]]]
"""(model, progress label) -> per eval set its probe-split ``accuracy`` and ``n`` (the in-domain set first)."""

_SCORES = ("id", "ood", "accuracy")


@dataclass(frozen=True)
class SweepSpec:
    """The sweep's settings (``merge.*``) and what else its probe scores depend on."""

    method: str
    params: Mapping[str, Any]  # merge.params: the fixed choice
    grid: Mapping[str, Sequence[Any]]  # merge.sweep
    select: str
    seed: int
    probe_fraction: float
    probe_seed: int
    max_tokens: int  # evaluate.max_tokens


def sweep(spec: SweepSpec, start: str, sft: str, anchor: str, folder: Location, run_merge: Merge,
          score: ProbeScorer, probe_n: Mapping[str, int]) -> SweepInfo:
    """Score ``start`` and each candidate merge of ``sft`` into ``anchor`` with ``score``; choose one."""
    candidates = sweep_candidates(spec.params, spec.grid, keep=spec.select == "fixed")
    inputs = {"sft": sft, "anchor": anchor, "seed": spec.seed, "method": spec.method,
              "probe_fraction": spec.probe_fraction, "probe_seed": spec.probe_seed, "max_tokens": spec.max_tokens}
    start_inputs = {**inputs, "model": start}
    start_rec = (_kept_record(folder / "start.json", start_inputs)
                 or _probe_record(folder / "start.json", start_inputs, start, score))
    records = []
    for i, params in enumerate(candidates):
        record, checkpoint = folder / f"{i:02d}.json", folder / f"{i:02d}"
        cand_inputs = {**inputs, "params": params}
        rec = _kept_record(record, cand_inputs)
        if rec is None:
            clear_output(checkpoint)
            rec = _probe_record(record, cand_inputs, run_merge(anchor, sft, checkpoint, params), score)
        clear_output(checkpoint)  # scored: only its record is kept
        records.append(rec)
    chosen = choose_candidate(spec.select, spec.params, candidates, ProbeScore(start_rec["id"], start_rec["ood"]),
                              [ProbeScore(r["id"], r["ood"]) for r in records])
    logger.info("merge sweep: candidate %d of %d chosen (%s): %s", chosen + 1, len(candidates), spec.select,
                candidates[chosen])
    return SweepInfo(select=spec.select, rule=SELECT_RULES[spec.select], probe_n=dict(probe_n),
                     start={"model": start, **{k: start_rec[k] for k in _SCORES}},
                     candidates=[{"params": p, **{k: r[k] for k in _SCORES}} for p, r in zip(candidates, records)],
                     chosen={"index": chosen, "params": candidates[chosen]})


def _kept_record(record: Location, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The probe scores in ``record`` if they were made from the same ``inputs``, else None."""
    try:
        kept = read_json(record)
    except FileNotFoundError:
        return None
    if kept.get("inputs") != json.loads(json.dumps(inputs)):
        return None
    logger.info("merge sweep: kept the probe scores of %s", record)
    return kept


def _probe_record(record: Location, inputs: dict[str, Any], model: str, score: ProbeScorer) -> dict[str, Any]:
    """Score ``model`` on the probe split and record it in ``record`` with its ``inputs``: accuracy per
    set, on the in-domain set (``id``) and the mean over the others (``ood``)."""
    clear_output(record)
    results = score(model, f"probe {record.name}")
    accuracy = {name: r["accuracy"] for name, r in results.items()}
    id_set, *ood_sets = list(accuracy)
    out = {"inputs": inputs, "accuracy": accuracy, "n": {name: r["n"] for name, r in results.items()},
           "id": accuracy[id_set], "ood": sum(accuracy[s] for s in ood_sets) / len(ood_sets)}
    write_json(record, out)
    return out

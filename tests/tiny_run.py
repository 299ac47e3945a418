"""The run config of the integration tests' tiny IMM runs, built in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imm_ray.config import deep_merge


def tiny_run_config(model_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """One imm round on the tiny memorising model with the ``hf`` engine (deterministic with the run's
    seed on the CPU), evaluated on ``tiny-test``; each keyword is merged over its config section
    (``run={"rounds": 2}``)."""
    tree = {
        "run": {"name": "tiny", "rounds": 1, "arms": ["imm"], "progress": False},
        "model": {"ref": str(model_dir)},
        "data": {
            "dir": str(data_dir),
            "train": {"name": "tiny-train", "preset": "gsm8k", "split": "train"},
            "eval": [{"name": "tiny-test", "preset": "gsm8k", "split": "test"}],
            "instruction_suffix": "",
        },
        "generate": {
            "engine": {"name": "hf", "dtype": "float32", "batch_size": 16},
            "samples_per_question": 2, "temperature": 0.7, "max_tokens": 40,
        },
        "train": {"epochs": 2, "lr": 1e-4, "micro_batch_size": 4, "effective_batch_size": 4, "max_length": 128},
        "merge": {"params": {"lam": 0.5, "drop_rate": 0.2}},
        "evaluate": {"max_tokens": 40},
    }
    return deep_merge(tree, sections)



def driver_config(model_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny imm round as ``imm run`` gets it in the driver fault tests: no baseline, no report, the
    driver's own 4-CPU Ray head; each keyword is merged over its section as in :func:`tiny_run_config`."""
    tree = tiny_run_config(model_dir, data_dir, run={"report": False}, evaluate={"baseline": False},
                           ray={"num_cpus": 4})
    return deep_merge(tree, sections)

def write_finished_round(run_dir: Path, arm: str, n: int, model: Path, wrong_eval: int = 0) -> None:
    """Publish round ``n`` of ``arm`` (round 0: the baseline) into ``run_dir`` as the driver does:
    its stage files (samples verified by the numeric verifier, the per-question evaluation ledger),
    its stage records in state.json (evaluate last: that publishes the round) and metrics.jsonl.
    ``model`` is the round's checkpoint; the first ``wrong_eval`` test questions are answered wrong; the
    training questions i with (i + n) % 4 == 0 get no right sample."""
    from imm_ray.evaluate.metrics import bootstrap_ci
    from imm_ray.loop.summary import metrics_rows
    from imm_ray.run import RunDir, layout
    from imm_ray.storage import write_jsonl
    from imm_ray.verify.verifiers import select_accepted, verify_batch
    from tiny_model import TINY_PROBLEMS

    rd = RunDir(run_dir)
    folder = rd.round_dir(arm, n).local_path()
    folder.mkdir(parents=True, exist_ok=True)
    tests = TINY_PROBLEMS[:4]
    ledger = [{"dataset": "tiny-test", "problem_id": f"test-{i}", "gold": gold, "kind": "greedy", "sample": 0,
               "completion": solution if i >= wrong_eval else "The answer is 1.", "finish_reason": "stop",
               "num_tokens": 9, "extracted": gold if i >= wrong_eval else "1", "correct": i >= wrong_eval,
               "timed_out": False} for i, (_, solution, gold) in enumerate(tests)]
    write_jsonl(folder / layout.EVAL_SAMPLES, ledger)
    right = len(tests) - wrong_eval
    datasets = {"tiny-test": {"accuracy": right / len(tests), "n": len(tests), "correct": right,
                              "accuracy_ci95": list(bootstrap_ci([float(r["correct"]) for r in ledger]))}}
    if n > 0:
        samples = [{"problem_id": f"train-{i}", "dataset": "tiny-train", "question": q, "gold": gold,
                    "sample": j, "completion": f"I think it is {int(gold) + 1}."
                    if (i + n) % 4 == 0 or (i + j + n) % 3 == 0 else solution,
                    "finish_reason": "stop", "num_tokens": 12}
                   for i, (q, solution, gold) in enumerate(TINY_PROBLEMS) for j in range(2)]
        verdicts = verify_batch([(s["completion"], s["gold"]) for s in samples])
        accepted = select_accepted(samples, verdicts)
        write_jsonl(folder / layout.SAMPLES, samples)
        write_jsonl(folder / layout.ACCEPTED, accepted)
        write_jsonl(folder / layout.VERDICTS, [{"problem_id": s["problem_id"], "sample": s["sample"],
                                                "extracted": v.extracted, "correct": v.correct,
                                                "timed_out": v.timed_out} for s, v in zip(samples, verdicts)])
        infos = {"generate": {"generated": len(samples), "questions": len(TINY_PROBLEMS), "tokens": 192},
                 "verify": {"generated": len(samples), "accepted": len(accepted),
                            "correct": sum(v.correct for v in verdicts),
                            "questions_solved": len({r["problem_id"] for r in accepted}),
                            "diversity": {"distinct_1": 0.5 + 0.1 * n, "self_bleu": 0.4 - 0.1 * n,
                                          "distinct_answers": 1.0 + n / 4}},
                 "sft": {"skipped": False, "examples": len(accepted), "steps": 4},
                 "merge": {"method": "dare", "params": {"lam": 0.5, "drop_rate": 0.2}}}
        for stage, info in infos.items():
            rd.mark_done(layout.stage_key(arm, n, stage), 1.5 * (1 + len(stage) % 3), info)
    rd.mark_done(layout.stage_key(arm, n, "evaluate"), 2.0, {"model": str(model), "datasets": datasets})
    rd.write_metrics(metrics_rows(rd.view(), [arm], n))

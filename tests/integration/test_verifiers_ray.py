"""Verifier actors on a real local Ray cluster: the verdicts of an in-process verifier, a killed actor
replaced with the same accepted set, an hf-engine judge, and a majority round on data without answers."""

from __future__ import annotations

import json
import pickle

import pytest
import ray
from tiny_run import tiny_run_config

import imm_ray.loop.verifier_pool as pool_mod
from imm_ray.config import config_from_dict
from imm_ray.generate.actors import ActorPlacement
from imm_ray.generate.settings import EngineSettings
from imm_ray.loop.driver import RoundDriver
from imm_ray.loop.verifier_pool import VerifierPool
from imm_ray.storage import read_jsonl
from imm_ray.verify import parse_verdict, select_accepted, verify_batch
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow


def sample_rows() -> list[dict]:
    """Two samples per tiny problem: its worked solution, and one that ends one off (or in LaTeX)."""
    rows = []
    for i, (question, solution, gold) in enumerate(TINY_PROBLEMS):
        wrong = f"The answer is {int(gold) + 1}." if i % 2 else f"So it is $\\frac{{{2 * int(gold)}}}{{2}}$."
        rows += [{"problem_id": f"p{i}", "question": question, "gold": gold, "sample": j, "completion": c}
                 for j, c in enumerate([solution, wrong])]
    return rows


def cpu_pool(verifier: str, actors: int = 2, **options) -> VerifierPool:
    return VerifierPool(ActorPlacement(num_actors=actors, num_cpus=1, config_key="verify.resources"), verifier,
                        options, progress=True)


def test_pool_gives_the_in_process_verdicts_and_keeps_its_actors(ray_local):
    rows = sample_rows()
    pool = cpu_pool("math")
    try:
        first = pool.verify(rows, batch_size=4)
        actors = list(pool.actors)
        again = pool.verify(rows, batch_size=3)
        assert pool.actors == actors and pool.last_retries == 0  # created once, reused warm
    finally:
        pool.shutdown()
    expected = verify_batch([(r["completion"], r["gold"]) for r in rows], "math")
    assert pickle.dumps(first) == pickle.dumps(expected) == pickle.dumps(again)  # byte for byte
    assert sum(v.correct for v in expected) == len(TINY_PROBLEMS) + len(TINY_PROBLEMS) // 2


class KillingBar:
    """Stands in for tqdm: kills verifier actor 0 after the first chunk came back."""

    pool: VerifierPool | None = None

    def __init__(self, *args, **kwargs) -> None:
        self.updates = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        self.updates += 1
        if self.updates == 1 and KillingBar.pool is not None:
            ray.kill(KillingBar.pool.actors[0], no_restart=True)


def test_a_killed_actor_is_replaced_and_the_accepted_set_is_the_same(ray_local, monkeypatch):
    rows = sample_rows()
    reference = select_accepted(rows, verify_batch([(r["completion"], r["gold"]) for r in rows], "numeric"))
    pool = cpu_pool("numeric")
    monkeypatch.setattr(pool_mod, "tqdm", KillingBar)
    KillingBar.pool = pool
    try:
        verdicts = pool.verify(rows, batch_size=2)  # 8 chunks: actor 0 dies with chunks still queued
        assert pool.last_retries == 1
    finally:
        KillingBar.pool = None
        pool.shutdown(graceful=False)
    assert select_accepted(rows, verdicts) == reference


def test_judge_runs_in_the_actors_on_the_hf_engine(ray_local, tiny_model_dir):
    rows = sample_rows()[:4]
    engine = EngineSettings(name="hf", dtype="float32", batch_size=4)
    pool = cpu_pool("judge", actors=1, model_path=str(tiny_model_dir), engine=engine, max_tokens=12, threshold=0.5)
    try:
        verdicts = pool.verify(rows, batch_size=8)
    finally:
        pool.shutdown()
    # The tiny model cannot judge: this checks the plumbing (its text kept, the answer extracted, no gold read).
    assert all(v.note is not None and v.note.strip() for v in verdicts)
    assert [v.extracted for v in verdicts] == ["5", "5", "3", "4"]
    assert [v.correct for v in verdicts] == [parse_verdict(v.note) is True for v in verdicts]  # one judgement each


def test_majority_round_on_a_training_set_without_answers(ray_local, tiny_model_dir, tiny_data_dir, tmp_path):
    train = tmp_path / "own.jsonl"
    lines = (tiny_data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows[len(rows) // 2:]:
        del row["answer"]  # half the questions have no gold answer
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tree = tiny_run_config(tiny_model_dir, tiny_data_dir, run={"arms": ["si"]},
                           data={"train": {"name": "own", "path": str(train), "answer_format": "gsm8k"}},
                           generate={"samples_per_question": 3}, verify={"verifier": "majority"},
                           evaluate={"baseline": False})
    run_dir = tmp_path / "run"
    (row,) = RoundDriver(config_from_dict(tree), run_dir).run()
    check = row["gold_check"]  # the memorising tiny model's samples agree on its (right) answers
    assert (row["verifier"], row["accepted"], row["questions_solved"]) == ("majority", len(rows), len(rows))
    assert check == {"labelled": len(rows), "label_precision": 1.0, "accepted_precision": 1.0}
    verdicts = read_jsonl(run_dir / "si" / "round-001" / "verdicts.jsonl")
    assert len(verdicts) == 3 * len(rows)
    report = (run_dir / "report.md").read_text()
    assert "| verifier | label precision |" in report and "| majority |" in report

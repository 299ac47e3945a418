"""The round stages' bodies (imm_ray/stages) without Ray: in-memory generators, verifiers, SFT and
merge fakes, checked on the records each stage writes and the Info it returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imm_ray.data import Problem
from imm_ray.generate.engine import Completion, SamplingSpec
from imm_ray.run import layout
from imm_ray.run.records import AcceptedRow, EvalSampleRow, SampleRow
from imm_ray.stages.evaluate import EvalSpec, evaluate
from imm_ray.stages.generate import Prompt, generate
from imm_ray.stages.merge import merge
from imm_ray.stages.sft import sft
from imm_ray.stages.sweep import SweepSpec, sweep
from imm_ray.stages.verify import verify
from imm_ray.storage import Location, read_json, read_jsonl, resolve, write_jsonl
from imm_ray.verify import Verdict

PROBLEMS = [Problem("q1", "1+1?", "2", "tiny"), Problem("q2", "2+2?", "4", "tiny")]
PROMPTS = [Prompt("student: 1+1?", [1, 2]), Prompt("student: 2+2?", [3, 4])]


@dataclass
class Stats:
    tokens: int
    seconds: float
    retries: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class FakeGenerator:
    """Answers prompt ids by a table (first id -> completion texts, cycled over n); records each call."""

    answers: dict[int, list[str]]
    retries: int = 0
    calls: list[tuple[list[list[int]], SamplingSpec, str]] = field(default_factory=list)
    last_stats: Stats | None = None

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, desc: str = "") -> list[list[Completion]]:
        self.calls.append((prompts, sampling, desc))
        outs = []
        for ids in prompts:
            texts = self.answers[ids[0]]
            outs.append([Completion(texts[j % len(texts)], "length" if "..." in texts[j % len(texts)] else "stop",
                                    num_tokens=3 + j) for j in range(sampling.n)])
        tokens = sum(c.num_tokens for comps in outs for c in comps)
        self.last_stats = Stats(tokens, seconds=2.0, retries=self.retries)
        return outs


@pytest.fixture
def folder(tmp_path: Path) -> Location:
    return resolve(tmp_path)


def test_generate_writes_sample_rows_and_counts_them(folder: Location) -> None:
    gen = FakeGenerator({1: ["The answer is 2.", "hmm..."], 3: ["4"]}, retries=1)
    sampling = SamplingSpec(n=2, temperature=0.7, top_p=0.9, max_tokens=8, seed=5)
    info = generate(gen, PROBLEMS, PROMPTS, sampling, folder / layout.SAMPLES, "model-dir", desc="generate round 1")

    rows = [SampleRow.from_json(r) for r in read_jsonl(folder / layout.SAMPLES)]
    assert [(r.problem_id, r.sample, r.completion) for r in rows] == [
        ("q1", 0, "The answer is 2."), ("q1", 1, "hmm..."), ("q2", 0, "4"), ("q2", 1, "4")]
    assert rows[0].prompt == "student: 1+1?" and rows[0].gold == "2" and rows[0].token_entropies is None
    assert gen.calls[0][0] == [[1, 2], [3, 4]] and gen.calls[0][2] == "generate round 1"
    assert info.to_json() == {
        "generated": 4, "questions": 2, "model": "model-dir", "generator": "student",
        "sampling": {"n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 8, "greedy": False},
        "truncated": 1, "tokens": 14, "tokens_per_s": 7.0, "actor_retries": 1}


def test_a_teacher_generates_from_its_own_prompts_and_rows_keep_the_students(folder: Location) -> None:
    gen = FakeGenerator({7: ["2"], 8: ["4"]})
    info = generate(gen, PROBLEMS, PROMPTS, SamplingSpec(n=1), folder / layout.SAMPLES, "teacher-dir",
                    role="teacher", gen_ids=[[7], [8]])
    assert gen.calls[0][0] == [[7], [8]]
    assert [r["prompt"] for r in read_jsonl(folder / layout.SAMPLES)] == ["student: 1+1?", "student: 2+2?"]
    assert info.generator == "teacher" and info.model == "teacher-dir"


@dataclass
class FakeVerifiers:
    """Verdicts from the number at the end of each completion, against the row's gold."""

    last_retries: int = 2
    batches: list[int] = field(default_factory=list)

    def verify(self, rows: list[dict[str, Any]], batch_size: int) -> list[Verdict]:
        self.batches.append(batch_size)
        out = []
        for r in rows:
            last = r["completion"].split()[-1].rstrip(".") if r["completion"].split() else ""
            extracted = last if last.isdigit() else None
            out.append(Verdict(correct=extracted == r["gold"], extracted=extracted))
        return out


def _samples(folder: Location) -> Location:
    texts = [("q1", "so 2"), ("q1", "so  2"), ("q2", "so 3"), ("q2", "no idea")]  # the first two: one text
    write_jsonl(folder / layout.SAMPLES, [
        SampleRow(problem_id=p, dataset="tiny", question="?", gold={"q1": "2", "q2": "4"}[p], prompt="p", sample=j,
                  completion=c, finish_reason="stop", num_tokens=2).to_json()
        for j, (p, c) in enumerate(texts)])
    return folder / layout.SAMPLES


def test_verify_writes_accepted_rows_and_verdicts(folder: Location) -> None:
    pool = FakeVerifiers()
    info = verify(pool, _samples(folder), folder / layout.ACCEPTED, folder / layout.VERDICTS, "numeric",
                  samples_per_question=2, batch_size=16)
    accepted = read_jsonl(folder / layout.ACCEPTED)
    assert [AcceptedRow.from_json(r).to_json() for r in accepted] == accepted  # AcceptedRow's one JSON form
    assert [(r["problem_id"], r["completion"], r["extracted"]) for r in accepted] == [("q1", "so 2", "2")]  # dedup
    assert read_jsonl(folder / layout.VERDICTS) == [
        {"problem_id": "q1", "sample": 0, "extracted": "2", "correct": True},
        {"problem_id": "q1", "sample": 1, "extracted": "2", "correct": True},
        {"problem_id": "q2", "sample": 2, "extracted": "3", "correct": False},
        {"problem_id": "q2", "sample": 3, "extracted": None, "correct": False}]
    assert pool.batches == [16]
    out = info.to_json()
    assert {k: out[k] for k in ("verifier", "generated", "correct", "unparseable", "timeouts", "accepted",
                                "questions_solved", "actor_retries")} == {
        "verifier": "numeric", "generated": 4, "correct": 2, "unparseable": 1, "timeouts": 0, "accepted": 1,
        "questions_solved": 1, "actor_retries": 2}
    assert "gold_check" not in out and out["train_pass@2"] == pytest.approx(0.5) and "diversity" in out


def test_a_verifier_without_gold_records_its_labels_gold_check(folder: Location) -> None:
    info = verify(FakeVerifiers(), _samples(folder), folder / layout.ACCEPTED, folder / layout.VERDICTS, "majority",
                  samples_per_question=2, batch_size=4, dedup=False)
    assert info.accepted == 2 and info.gold_check is not None


@dataclass
class SFTRun:
    examples: int = 3
    dropped: int = 1
    steps: int = 4
    final_loss: float = 0.25
    tokens: int = 90
    restarts: int = 0
    timings: dict[str, float] = field(default_factory=lambda: {"train": 1.234})
    tokens_per_second: float = 45.04


def test_sft_trains_on_the_accepted_rows_after_making_room(folder: Location) -> None:
    write_jsonl(folder / layout.ACCEPTED, [{"problem_id": "q1"}])
    events: list[Any] = []

    def train(model: str, accepted: Location, out: Location) -> SFTRun:
        events.append(("train", model, accepted.name, out.name))
        return SFTRun()

    info = sft(train, "start-model", folder / layout.ACCEPTED, folder / layout.SFT, lambda: events.append("room"))
    assert events == ["room", ("train", "start-model", layout.ACCEPTED, layout.SFT)]
    assert info.to_json() == {
        "skipped": False, "init_model": "start-model", "examples": 3, "dropped": 1, "steps": 4, "final_loss": 0.25,
        "checkpoint": (folder / layout.SFT).uri, "tokens": 90, "tokens_per_s": 45.0, "restarts": 0,
        "timings": {"train": 1.23}}


def test_sft_is_skipped_when_nothing_was_accepted(folder: Location) -> None:
    write_jsonl(folder / layout.ACCEPTED, [])

    def train(*args: Any) -> SFTRun:
        raise AssertionError("no SFT without accepted samples")

    info = sft(train, "m", folder / layout.ACCEPTED, folder / layout.SFT, lambda: train())
    assert info.to_json() == {"skipped": True, "reason": "no accepted samples", "examples": 0}


def test_merge_records_what_it_merged(folder: Location) -> None:
    calls = []

    def run_merge(anchor: str, sft_model: str, out: Location, params: Any) -> str:
        calls.append((anchor, sft_model, out.name, dict(params)))
        return out.uri

    info = merge(run_merge, "ties", "orig", "sft-dir", folder / layout.MERGED, {"alpha": 0.5}, seed=3)
    assert calls == [("orig", "sft-dir", layout.MERGED, {"alpha": 0.5})]
    assert info.to_json() == {"method": "ties", "params": {"alpha": 0.5}, "seed": 3, "anchor": "orig",
                              "checkpoint": (folder / layout.MERGED).uri}


SETS = [("tiny-a", PROBLEMS[:1]), ("tiny-b", PROBLEMS[1:])]


def test_evaluate_scores_every_set_and_writes_the_ledger(folder: Location) -> None:
    gen = FakeGenerator({1: ["The answer is 2."], 3: ["The answer is 5."]}, retries=1)
    spec = EvalSpec(max_tokens=16, stop=("\n\n",))
    info = evaluate(gen, SETS, [[1], [3]], spec, "merged-dir", folder, desc="evaluate imm/round_1")

    assert len(gen.calls) == 1 and gen.calls[0][1].greedy and gen.calls[0][1].stop == ("\n\n",)
    written = read_json(folder / layout.EVAL)
    assert written["model"] == "merged-dir" and written["questions"] == "all"
    assert {name: (d["accuracy"], d["n"], d["correct"]) for name, d in written["datasets"].items()} == {
        "tiny-a": (1.0, 1, 1), "tiny-b": (0.0, 1, 0)}
    assert set(written["datasets"]["tiny-a"]) == {"accuracy", "accuracy_ci95", "n", "correct", "unparseable",
                                                  "timeouts"}
    rows = read_jsonl(folder / layout.EVAL_SAMPLES)
    assert [EvalSampleRow.from_json(r).to_json() for r in rows] == rows
    assert [(r["dataset"], r["kind"], r["extracted"], r["correct"]) for r in rows] == [
        ("tiny-a", "greedy", "2", True), ("tiny-b", "greedy", "5", False)]
    assert info.to_json() == {"model": "merged-dir", "questions": "all", "datasets": written["datasets"],
                              "tokens": 6, "tokens_per_s": 3.0, "actor_retries": 1}


def test_evaluate_with_samples_adds_pass_at_k(folder: Location) -> None:
    gen = FakeGenerator({1: ["The answer is 2.", "The answer is 3."], 3: ["The answer is 4."]})
    spec = EvalSpec(max_tokens=16, stop=(), samples=2, temperature=0.8, seed=9)
    info = evaluate(gen, SETS, [[1], [3]], spec, "m", folder, questions="held_back")
    sampled = gen.calls[1][1]
    assert (sampled.n, sampled.temperature, sampled.seed) == (2, 0.8, 9) and gen.calls[1][2] == "evaluate k=2"
    a = info.datasets["tiny-a"]
    assert (a["k"], a["pass@k"], a["pass@1"]) == (2, 1.0, 0.5) and info.questions == "held_back"
    assert [r["kind"] for r in read_jsonl(folder / layout.EVAL_SAMPLES)] == ["greedy", "sample", "sample"] * 2
    assert info.tokens == 3 + 3 + (3 + 4) * 2


def test_evaluate_refuses_prompts_that_do_not_match_the_sets(folder: Location) -> None:
    with pytest.raises(ValueError, match="1 prompts for 2 problems"):
        evaluate(FakeGenerator({1: ["2"]}), SETS, [[1]], EvalSpec(max_tokens=4, stop=()), "m", folder)


SPEC = SweepSpec(method="task_arithmetic", params={"alpha": 0.5}, grid={"alpha": [0.25, 1.0]}, select="frontier",
                 seed=0, probe_fraction=0.5, probe_seed=1, max_tokens=32)
# in-domain and out-of-domain probe accuracy of each model
PROBE = {"start": (0.2, 0.6), "alpha=0.25": (0.5, 0.55), "alpha=1.0": (0.6, 0.3)}


def _merge_named(anchor: str, sft_model: str, out: Location, params: Any) -> str:
    return f"alpha={params['alpha']}"


def test_sweep_scores_each_candidate_and_picks_by_the_frontier_rule(folder: Location) -> None:
    scored = []

    def score(model: str, desc: str) -> dict[str, dict[str, Any]]:
        scored.append((model, desc))
        id_acc, ood_acc = PROBE[model]
        return {"id-set": {"accuracy": id_acc, "n": 4}, "ood-set": {"accuracy": ood_acc, "n": 4}}

    info = sweep(SPEC, "start", "sft-dir", "orig", folder / layout.SWEEP, _merge_named, score, {"id-set": 4})
    assert scored == [("start", "probe start.json"), ("alpha=0.25", "probe 00.json"), ("alpha=1.0", "probe 01.json")]
    # gains 0.3 and 0.4: both within half the best, the better OOD one is chosen
    assert info.chosen == {"index": 0, "params": {"alpha": 0.25}}
    assert info.start == {"model": "start", "id": 0.2, "ood": 0.6, "accuracy": {"id-set": 0.2, "ood-set": 0.6}}
    assert [c["params"] for c in info.candidates or []] == [{"alpha": 0.25}, {"alpha": 1.0}]
    record = read_json(folder / layout.SWEEP / "01.json")
    assert record["inputs"]["params"] == {"alpha": 1.0} and record["id"] == 0.6

    def no_score(model: str, desc: str) -> dict[str, dict[str, Any]]:
        raise AssertionError("a resumed sweep keeps the records made with the same inputs")

    again = sweep(SPEC, "start", "sft-dir", "orig", folder / layout.SWEEP, _merge_named, no_score, {"id-set": 4})
    assert again.to_json() == info.to_json()
    assert json.loads(json.dumps(info.to_json()))["rule"]

"""The run page's data and routes without Ray or a browser: overview, samples and evaluation filters,
votes appended to the run directory, and which routes need the API key."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from test_serve import FakeLoader, write_checkpoint
from tiny_run import tiny_run_config, write_finished_round

from imm_ray.config import config_from_dict, config_to_yaml
from imm_ray.run import RunDir, layout
from imm_ray.serve.auth import KeyChecker
from imm_ray.serve.http_app import create_app
from imm_ray.serve.page_data import PageData, PageInputError
from imm_ray.serve.server import OpenAIServer
from imm_ray.serve.settings import ServeSettings
from imm_ray.storage import read_jsonl, resolve
from imm_ray.storage.append import append_line
from tiny_model import TINY_PROBLEMS

# A run without merge.sweep: its rounds have every stage but the sweep.
NO_SWEEP = tuple(s for s in layout.STAGES if s != "sweep")


@pytest.fixture
def run(tmp_path):
    """Baseline (2 of 4 right), imm round 1 (3 of 4) and round 2 generating."""
    run = tmp_path / "webrun"
    model = write_checkpoint(tmp_path / "ckpt")
    write_finished_round(run, "base", 0, model, wrong_eval=2)
    write_finished_round(run, "imm", 1, model, wrong_eval=1)
    RunDir(run).mark_started(layout.stage_key("imm", 2, "generate"))
    return run


def test_overview_has_stages_metrics_and_the_baseline(run):
    data = PageData(run, "imm", "webrun").overview()
    assert data["datasets"] == ["tiny-test"] and data["baseline"]["accuracy"]["tiny-test"]["value"] == 0.5
    [arm] = data["arms"]
    one, two = arm["rounds"]
    assert one["status"] == dict.fromkeys(NO_SWEEP, "done") and one["merge"]["params"]["lam"] == 0.5
    lo, hi = one["accuracy"]["tiny-test"]["ci95"]
    assert lo <= one["accuracy"]["tiny-test"]["value"] == 0.75 <= hi
    assert one["accepted"] > 0 and one["diversity"]["distinct_1"] == pytest.approx(0.6)
    assert two["status"]["generate"] == "started" and two["status"]["evaluate"] == "pending"
    assert "accuracy" not in two


def test_planned_arms_and_rounds_show_before_they_start(run, tmp_path):
    cfg = config_from_dict(tiny_run_config(tmp_path, tmp_path, run={"rounds": 3, "arms": ["imm", "si"]}))
    RunDir(run).write_config(config_to_yaml(cfg))
    arms = {a["name"]: a["rounds"] for a in PageData(run, "imm", "webrun").overview()["arms"]}
    assert [r["round"] for r in arms["imm"]] == [1, 2, 3] and [r["round"] for r in arms["si"]] == [1, 2, 3]
    # si does not merge: its rounds have no merge stage to wait for
    assert arms["si"][0]["status"] == dict.fromkeys((s for s in NO_SWEEP if s != "merge"), "pending")


def test_samples_filters_and_evaluation_changes(run):
    data = PageData(run, "imm", "webrun")
    every = data.samples("imm", 1)
    assert every["questions_total"] == len(TINY_PROBLEMS) and every["samples_total"] == 2 * len(TINY_PROBLEMS)
    kept = [s for q in data.samples("imm", 1, "accepted")["questions"] for s in q["samples"]]
    assert len(kept) == every["accepted_total"] and all(s["accepted"] and s["extracted"] == s["gold"] for s in kept)
    rejected = [s for q in data.samples("imm", 1, "rejected")["questions"] for s in q["samples"]]
    assert rejected and not any(s["accepted"] for s in rejected)
    assert {s["correct"] for s in rejected} == {True, False}  # duplicates of a right answer, and wrong ones
    assert all(s["extracted"] != s["gold"] for s in rejected if not s["correct"])
    write_finished_round(run, "imm", 2, run.parent / "ckpt")  # unsolved: train-2, train-6 (round 1: 3, 7)
    differ = data.samples("imm", 2, "disagree", other=1)["questions"]
    assert {(q["problem_id"], q["solved_other"]) for q in differ} == {
        ("train-2", True), ("train-6", True), ("train-3", False), ("train-7", False)}
    ev = data.evaluation("imm", 1)
    assert ev["changes"] == {"tiny-test": {"gained": ["test-1"], "lost": [], "n": 4}}
    assert [a["problem_id"] for a in data.evaluation("imm", 1, "wrong")["answers"]] == ["test-0"]
    with pytest.raises(PageInputError, match="second round"):
        data.samples("imm", 1, "disagree")
    with pytest.raises(PageInputError, match="not one of"):
        data.evaluation("imm", 1, "odd")
    with pytest.raises(PageInputError, match="not generated yet"):
        data.samples("imm", 3)


def test_votes_are_appended_and_counted(run):
    data = PageData(run, "imm", "webrun")
    data.add_vote(["a", "b"], "q", ["x", "y"], "b", blind=True)
    data.add_vote(["a", "b"], "q", ["x", "y"], None, blind=True)
    assert data.vote_counts() == {"total": 2, "ties": 1, "wins": {"b": 1}}
    with pytest.raises(PageInputError, match="not one of the compared"):
        data.add_vote(["a", "b"], "q", ["x", "y"], "c", blind=True)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_appends_keep_every_line(where, tmp_path, request):
    """Locally O_APPEND; on S3 a conditional write retried when another writer got there first."""
    target = resolve(request.getfixturevalue("s3_bucket")) / "lines.jsonl" if where == "s3" else tmp_path / "x.jsonl"
    text = "x" * 3000  # longer than one small write: lines must still not interleave
    per_writer = 40 if where == "local" else 5  # S3: 15 rival lines < the 20 attempts, so none gives up

    def writer(i: int) -> None:
        for j in range(per_writer):
            append_line(target, {"w": i, "j": j, "t": text})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = read_jsonl(target)
    assert sorted((r["w"], r["j"]) for r in rows) == [(i, j) for i in range(4) for j in range(per_writer)]


def test_page_shell_is_open_and_its_data_needs_the_key(run):
    async def main():
        server = OpenAIServer(ServeSettings(poll_interval_s=0.05, spare_engines=0), run, loader=FakeLoader())
        await server.start()
        app = create_app(server, KeyChecker(("s3cret",)))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        auth = {"Authorization": "Bearer s3cret"}
        page = await http.get("/")
        assert page.status_code == 200 and 'data-testid="signin"' in page.text and '<base href="/">' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert (await http.get("/ui/static/app.js")).headers["content-type"].startswith("text/javascript")
        assert (await http.get("/ui/static/nothing.js")).status_code == 404
        assert (await http.get("/ui/api/overview")).status_code == 401
        assert (await http.get("/ui/api/overview", headers=auth)).json()["run"] == "webrun"
        bad = await http.get("/ui/api/samples", params={"arm": "imm", "round": 1, "filter": "odd"}, headers=auth)
        assert bad.status_code == 400 and "not one of" in bad.json()["error"]["message"]
        vote = {"models": ["webrun/round-0", "webrun/round-1"], "prompt": "q", "answers": ["a", "b"],
                "winner": "webrun/round-1"}
        assert (await http.post("/ui/api/votes", json=vote)).status_code == 401
        assert (await http.post("/ui/api/votes", json=vote, headers=auth)).status_code == 200
        assert (await http.post("/ui/api/votes", json={"models": ["x"]}, headers=auth)).status_code == 400
        prefixed = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/imm"), base_url="http://t")
        assert '<base href="/imm/">' in (await prefixed.get("/imm/")).text  # under a Serve route prefix
        [row] = [json.loads(line) for line in (run / layout.VOTES).read_text().splitlines()]
        assert row["winner"] == "webrun/round-1" and row["blind"] is True
        await server.stop()

    asyncio.run(main())

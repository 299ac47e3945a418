"""``imm serve --run-dir s3://...`` (the CLI, real Ray Serve over HTTP, hf engine) follows a run whose
directory is on S3 (moto on loopback): it answers on ``latest``, and moves to a round published to
the bucket after it started, while the older round stays queryable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from test_serve_app import free_port, wait_healthy

from imm_ray.storage import publish_dir, write_json
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
Q, _, GOLD = TINY_PROBLEMS[0]
MSG = [{"role": "user", "content": Q}]


def _finish_rounds(run: str, rounds: list[int]) -> None:
    """state.json as the driver leaves it once each of ``rounds`` is evaluated (models by URI)."""
    write_json(f"{run}/state.json", {"stages": {
        f"imm/round-{n:03d}/evaluate": {"status": "done", "info": {"model": f"{run}/imm/round-{n:03d}/merged"}}
        for n in rounds}})


def test_imm_serve_follows_a_run_on_s3(s3_bucket, tiny_model_dir, scrambled_model, tmp_path):
    run = f"{s3_bucket}/runs/s3serve"
    publish_dir(tiny_model_dir, f"{run}/imm/round-001/merged")
    _finish_rounds(run, [1])
    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "IMM_NODE_CACHE_DIR": str(tmp_path / "cache"), "RAY_worker_niceness": "0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imm_ray.cli", "serve", "--run-dir", run, "--engine", "hf", "--port", str(port),
             "dtype=float32", "max_model_len=256", "poll_interval_s=0.5", "resident_models=2", "spare_engines=0"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def alive() -> None:
            assert proc.poll() is None, f"imm serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"

        wait_healthy(url, lambda: log.read_text()[-4000:], still_up=alive)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list()] == ["s3serve/round-1", "s3serve/latest"]
        chat = c.chat.completions.create(model="s3serve/latest", messages=MSG, max_tokens=40, temperature=0)
        assert chat.model == "s3serve/round-1" and GOLD in chat.choices[0].message.content

        publish_dir(scrambled_model, f"{run}/imm/round-002/merged")  # a round finished after serving began
        _finish_rounds(run, [1, 2])
        deadline = time.monotonic() + 120
        while chat.model != "s3serve/round-2" and time.monotonic() < deadline:
            time.sleep(1)
            chat = c.chat.completions.create(model="s3serve/latest", messages=MSG, max_tokens=8, temperature=0)
        assert chat.model == "s3serve/round-2"
        assert [m.id for m in c.models.list()] == ["s3serve/round-1", "s3serve/round-2", "s3serve/latest"]
        old = c.chat.completions.create(model="s3serve/round-1", messages=MSG, max_tokens=40, temperature=0)
        assert GOLD in old.choices[0].message.content
        assert (tmp_path / "cache").is_dir()  # the rounds were loaded through this node's cache
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # imm serve shuts Serve and Ray down on SIGTERM
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()[-4000:]

"""The driver as a Ray job: `make cluster-up`'s script, `ray job submit`, `make cluster-down`'s script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PORT = "8275"


def test_job_submit_against_a_local_head(tiny_model_dir, tiny_data_dir, tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    env = {
        **os.environ,
        "RAY_DASHBOARD_PORT": PORT,
        "RAY_NUM_CPUS": "4",
        "IMM_DATA_DIR": str(tiny_data_dir),
        "IMM_RUNS_DIR": str(tmp_path / "runs"),
        "VENV": str(Path(sys.executable).parents[1]),
    }
    config = {
        "run": {"name": "job", "rounds": 1, "progress": False},
        "model": {"ref": str(tiny_model_dir)},
        "data": {
            "train": {"name": "tiny-train", "preset": "gsm8k", "split": "train"},
            "eval": [{"name": "tiny-test", "preset": "gsm8k", "split": "test"}],
            "instruction_suffix": "",
        },
        "generate": {"engine": {"name": "hf", "dtype": "float32"}, "samples_per_question": 2, "max_tokens": 40},
        "train": {"epochs": 1, "micro_batch_size": 4, "effective_batch_size": 4, "max_length": 128},
        "evaluate": {"max_tokens": 40, "baseline": False},
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    subprocess.run(["bash", "cluster/local-up.sh"], cwd=REPO, env=env, check=True, timeout=180)
    try:
        job = subprocess.run(
            [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{PORT}", "--working-dir", ".",
             "--", "python", "-m", "jobs.imm_run", "--config", str(cfg_path)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
    finally:
        subprocess.run(["bash", "cluster/local-down.sh"], cwd=REPO, env=env, timeout=120)
    rows = [json.loads(x) for x in (tmp_path / "runs/job/metrics.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["round"]) for r in rows] == [("imm", 1)]
    assert (tmp_path / "runs/job/imm/round-001/merged/config.json").exists()

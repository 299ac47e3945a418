"""Two ``imm run`` drivers started together on one run directory on S3 (moto on loopback): the
conditional create of the lease lets exactly one of them run; the other exits 2 with one line that
names the holder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import kill_driver_tree
from tiny_run import tiny_run_config

from imm_ray.storage import resolve
from imm_ray.storage.fs import read_bytes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_two_drivers_started_together_one_runs_one_exits_2_naming_it(s3_bucket, tiny_model_dir, tiny_data_dir,
                                                                       tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, tiny_data_dir, evaluate={"baseline": False},
                                                     ray={"num_cpus": 2})))
    uri = f"{s3_bucket}/run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "IMM_NODE_CACHE_DIR": str(tmp_path / "cache"), "IMM_SCRATCH_DIR": str(tmp_path / "scratch")}
    argv = [sys.executable, "-m", "imm_ray.cli", "run", "--config", str(config), "--run-dir", uri]
    logs = [tmp_path / f"driver-{i}.err" for i in range(2)]
    outs = [log.open("w") for log in logs]
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=out,
                              start_new_session=True) for out in outs]  # back to back: well within 100 ms
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.05)
        first = 0 if procs[0].poll() is not None else 1
        loser, winner = procs[first], procs[1 - first]
        assert winner.poll() is None, "both drivers ended"  # the winner runs on
        err = logs[first].read_text().strip().splitlines()
        assert loser.returncode == 2, err
        assert len(err) == 1 and err[0].startswith("imm run: error: ") and f"driver pid {winner.pid} on " in err[0], err
        lease = json.loads(read_bytes(resolve(uri) / ".lease.json"))
        assert lease["pid"] == winner.pid and lease["holder"] in err[0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_driver_tree(proc)
        for out in outs:
            out.close()

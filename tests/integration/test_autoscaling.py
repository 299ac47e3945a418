"""A run on a real autoscaler that starts with no worker node (``cluster/local/autoscale-up.sh``).

Ray's fake multi-node provider starts worker nodes as local processes on 127.0.0.1 when work waits
for them and removes them after the idle timeout. The head has 0 CPUs; the node types are ``cpu``
(2 CPUs) and ``gpu`` (1 CPU, a logical GPU and ``gpu_node``), none at first. A request no type can
hold fails before any stage; a tiny IMM round places its generator pool and SFT on ``gpu`` nodes and
its merge (2 CPUs) on a ``cpu`` node, and the nodes go once the run is over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from tiny_run import tiny_run_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port_pair() -> int:
    """A port whose successor is free too (the head's GCS and its Ray client server)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def _session_processes(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=", "-o", "sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


@pytest.fixture(scope="module")
def autoscaling():
    """The autoscaling cluster (nodes idle for 6 s go) and a client's environment; stopped by
    autoscale-down.sh, which must leave no process of the cluster's session."""
    state = Path(tempfile.mkdtemp(prefix="imm-as-", dir="/tmp"))  # short: Ray's socket paths
    port = _free_port_pair()
    env = {**os.environ, "VENV": str(BIN.parent), "RAY_PORT": str(port), "RAY_DASHBOARD_PORT": str(_free_port_pair()),
           "IMM_AUTOSCALE_DIR": str(state), "IMM_IDLE_TIMEOUT_MINUTES": "0.1", "IMM_INCLUDE_DASHBOARD": "0"}
    up = subprocess.run(["bash", "cluster/local/autoscale-up.sh"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    sid = int((state / "head.pid").read_text())
    client = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    client.update(RAY_ADDRESS=f"127.0.0.1:{port}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state / "auth_token"),
                  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    try:
        yield state, client
    finally:
        down = subprocess.run(["bash", "cluster/local/autoscale-down.sh"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        left = _session_processes(sid)
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert left == []


def _config(state: Path, model: Path, data: Path, tmp: Path, **sections) -> Path:
    tree = tiny_run_config(model, data, **{
        "run": {"report": False},
        "generate": {"resources": {"num_cpus": 1, "num_gpus": 1}},  # the hf engine finds no CUDA: CPU
        # Ray Train picks NCCL for a worker that asks for a GPU: gpu_node places SFT on a gpu node instead.
        "train": {"cpus_per_worker": 1, "resources": {"gpu_node": 1}},
        "merge": {"resources": {"num_cpus": 2}},  # only a cpu node has 2 CPUs
        "evaluate": {"baseline": False},
        "ray": {"cluster_yaml": str(state / "cluster.yaml"), "placement_log_s": 5, "placement_timeout_s": 300},
        **sections})
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _imm_run(config: Path, run_dir: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imm_ray.cli", "run", "--config", str(config), "--run-dir",
                           str(run_dir), *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _monitor_events(state: Path) -> tuple[set[str], set[str]]:
    """The node types the autoscaler added and removed (its monitor log's event summaries)."""
    log = (state / "ray/session_latest/logs/monitor.log").read_text()
    added = set(re.findall(r"Adding \d+ node\(s\) of type (\w+)", log))
    return added, set(re.findall(r"Removing \d+ nodes of type (\w+)", log))


# Polls the cluster until the head is its only alive node (the idle timeout is 6 s), for at most 180 s.
ONLY_THE_HEAD_LEFT = """
import time, ray
ray.init(log_to_driver=False)
deadline = time.monotonic() + 180
while sum(n["Alive"] for n in ray.nodes()) > 1 and time.monotonic() < deadline:
    time.sleep(2)
print(sum(n["Alive"] for n in ray.nodes()))
"""


def test_a_request_no_node_type_holds_fails_at_once_naming_the_types(autoscaling, tiny_model_dir, tiny_data_dir,
                                                                     tmp_path):
    state, env = autoscaling
    out = _imm_run(_config(state, tiny_model_dir, tiny_data_dir, tmp_path), tmp_path / "run", env,
                   "generate.resources.resources.tpu=1")
    assert out.returncode == 2, out.stderr[-3000:]
    error = out.stderr.strip().splitlines()[-1]
    assert "tpu: 1 (generate.resources.resources)" in error and "the most is 0" in error
    assert "cpu x2 (CPU: 2), gpu x2 (CPU: 1, GPU: 1, gpu_node: 1)" in error and "ray.cluster_yaml" in error
    assert _monitor_events(state) == (set(), set())  # nothing was started for it


def test_two_arms_on_a_cold_cluster_add_nodes_overlap_and_the_nodes_go_when_idle(autoscaling, tiny_model_dir,
                                                                                 tiny_data_dir, tmp_path):
    """One run of two concurrent arms (one round each) covers the cold start, the sizing from node types
    and the scale-down: a second run for one arm alone would cost CI another cold cluster's minutes."""
    state, env = autoscaling
    run = tmp_path / "run"
    config = _config(state, tiny_model_dir, tiny_data_dir, tmp_path, run={"report": False, "arms": ["imm", "si"],
                                                                          "concurrent_arms": 0})
    out = _imm_run(config, run, env)
    assert out.returncode == 0, out.stderr[-5000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["round"]) for r in rows) == [("imm", 1), ("si", 1)]
    assert all(r["sft"]["steps"] >= 1 for r in rows)

    log = (run / "driver.log").read_text()
    # A cold cluster: sized from the node types, not from the alive nodes (the head, 0 CPUs).
    assert "arms imm, si: 2 arms at once: the cluster (1 alive node(s); node types: cpu x2 (CPU: 2), gpu x2" in log
    assert "+1 node (CPU: 1, GPU: 1, gpu_node: 1)" in log  # the pools' and SFT's type
    assert "+1 node (CPU: 2)" in log  # the merges'
    assert "withdrew the resource requests to the autoscaler" in log
    stages = json.loads((run / "state.json").read_text())["stages"]
    started = {key: s["finished_at"] - s["seconds"] for key, s in stages.items()}
    assert started["si/round-001/generate"] < stages["imm/round-001/evaluate"]["finished_at"]
    assert started["imm/round-001/generate"] < stages["si/round-001/evaluate"]["finished_at"]
    assert _monitor_events(state)[0] == {"gpu", "cpu"}

    left = subprocess.run([sys.executable, "-c", ONLY_THE_HEAD_LEFT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert left.stdout.split()[-1:] == ["1"], left.stderr[-2000:]  # the head alone
    assert _monitor_events(state)[1] == {"gpu", "cpu"}  # removed as idle

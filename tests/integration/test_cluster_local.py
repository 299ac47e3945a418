"""The local multi-node cluster (``cluster/local/up.sh 2``) and what the kit runs on it.

Three Ray nodes on 127.0.0.1 with token authentication on; tasks pinned by custom resources land
on three distinct nodes, each with its own folders; no process of the cluster touches an address
off loopback; the Ray-connect helper joins it (and, without an address, starts its own head
instead) and forwards settings but never the driver's AWS keys (absent from ``ray list tasks
--detail``); the RayJob's entrypoint runs through ``ray job submit --working-dir . --runtime-env-json``
with the tiny model; ``imm serve`` inside the cluster deploys its app and returns; the RayService's
Serve config, deployed with ``serve deploy``, answers an OpenAI-SDK chat request;
``cluster/local/down.sh`` leaves none of its processes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import pytest
import yaml

from imm_ray.local_cluster import ClusterState, cluster_processes
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_data_dir):
    """Head + 2 worker nodes started by cluster/local/up.sh; stopped by down.sh (again) at the end."""
    state_dir = Path(tempfile.mkdtemp(prefix="imm-cl-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_DASHBOARD_PORT": str(free_port()), "IMM_CLUSTER_DIR": str(state_dir),
           "VENV": str(BIN.parent), "RAY_NUM_CPUS": "4", "RAY_WORKER_CPUS": "2",
           "IMM_DATA_DIR": str(tiny_data_dir), "IMM_RUNS_DIR": str(state_dir / "runs")}
    up = subprocess.run(["bash", "cluster/local/up.sh", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr + (state_dir / "supervisor.log").read_text()
    state = ClusterState.read(state_dir)
    yield state, env
    subprocess.run(["bash", "cluster/local/down.sh"], cwd=REPO, env=env, timeout=120)
    shutil.rmtree(state_dir, ignore_errors=True)


def client_env(state: ClusterState, env: dict[str, str], **extra: str) -> dict[str, str]:
    """A client's environment: the cluster's exports, and no token of this test process."""
    out = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    return {**out, **state.client_env(), "PATH": f"{BIN}:{env['PATH']}", **extra}


def run_python(code: str, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


PIN_TASKS = """
import json, os, subprocess, sys, time
from imm_ray.ray_env import actor_runtime_env, connect_ray
assert connect_ray()
import ray

@ray.remote(num_cpus=0)
def where():
    return [ray.get_runtime_context().get_node_id(), os.environ.get("IMM_NODE_CACHE_DIR"),
            os.environ.get("IMM_DATA_DIR"), os.environ.get("IMM_SCRATCH_DIR"),
            os.environ.get("AWS_REGION"), os.environ.get("AWS_SECRET_ACCESS_KEY")]

alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
placed = [ray.get(where.options(resources={f"node_{i}": 0.01}, runtime_env=actor_runtime_env()).remote())
          for i in range(3)]
ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
for _ in range(60):  # task events reach the dashboard within a few seconds
    listing = subprocess.run([ray_bin, "list", "tasks", "--detail", "--limit", "1000"],
                             capture_output=True, text=True).stdout
    if listing.count("/from-the-driver") >= 3:
        break
    time.sleep(1)
print(json.dumps({"alive": alive, "placed": placed, "listing": listing}))
"""
SECRET = "imm-test-secret-5b1f0c"


def test_three_nodes_pinned_tasks_and_forwarded_env(cluster):
    """Settings follow the driver to every node; its AWS keys do not, and no task listing shows them."""
    state, env = cluster
    driver_env = client_env(state, env, IMM_DATA_DIR="/from-the-driver", AWS_REGION="eu-north-1",
                            AWS_ACCESS_KEY_ID="AKIA" + SECRET, AWS_SECRET_ACCESS_KEY=SECRET)
    driver_env.pop("IMM_FORWARD_CREDENTIALS", None)
    out = run_python(PIN_TASKS, driver_env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(result["alive"]) == sorted(n.node_id for n in state.nodes)
    node_ids = [p[0] for p in result["placed"]]
    assert node_ids == [n.node_id for n in state.nodes] and len(set(node_ids)) == 3
    for (_, cache, data, scratch, region, secret), node in zip(result["placed"], state.nodes):
        assert (cache, scratch) == (node.cache_dir, node.scratch_dir)  # node-local folders stay the node's
        assert data == "/from-the-driver" and region == "eu-north-1"  # the driver's settings reach every node
        assert secret is None  # its keys do not: workers use their node's role
    # `ray list tasks --detail` shows each task's runtime_env (the settings), never the keys
    assert result["listing"].count("/from-the-driver") >= 3 and SECRET not in result["listing"]


def test_without_an_address_the_helper_starts_its_own_loopback_head(cluster):
    """Never joins the cluster this machine happens to run (Ray would, through ray_current_cluster)."""
    state, env = cluster
    code = ("from imm_ray.ray_env import connect_ray\nassert connect_ray(num_cpus=1)\nimport ray\n"
            "print(len(ray.nodes()), ray.util.get_node_ip_address())")
    local = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    out = run_python(code, local)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["1", "127.0.0.1"]


def test_token_authentication_is_on(cluster):
    state, env = cluster
    assert os.stat(state.token_path).st_mode & 0o077 == 0  # the token file is the user's alone
    ray_bin = str(BIN / "ray")
    submit = [ray_bin, "job", "submit", "--address", state.dashboard_url, "--", "echo", "hello"]
    with_token = subprocess.run(submit, env=client_env(state, env), capture_output=True, text=True, timeout=120)
    assert with_token.returncode == 0 and "hello" in with_token.stdout, with_token.stderr[-2000:]
    no_token = {k: v for k, v in client_env(state, env).items() if k != "RAY_AUTH_TOKEN_PATH"}
    no_token["HOME"] = tempfile.mkdtemp()  # no ~/.ray/auth_token either
    refused = subprocess.run(submit, env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "authentication token" in (refused.stdout + refused.stderr)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback  # ::ffff:127.0.0.1 too


def test_no_process_of_the_cluster_leaves_loopback(cluster):
    state, _ = cluster
    procs = cluster_processes(state)
    recorded = {pid for node in state.nodes for pid in node.pids} | {state.supervisor_pid}
    assert recorded <= {p.pid for p in procs}
    off = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except Exception:  # noqa: BLE001 - it ended meanwhile
            continue
        for c in conns:
            for addr in (c.laddr, c.raddr):
                if addr and not _loopback(addr.ip):
                    off.append((proc.pid, proc.name(), c.status, addr))
    assert not off, off


def _rayjob() -> dict:
    return yaml.safe_load((REPO / "cluster/k8s/rayjob.yaml").read_text())["spec"]


def test_rayjob_entrypoint_through_ray_job_submit(cluster, tiny_model_dir, tmp_path):
    """The RayJob's entrypoint module and runtime env, with the tiny model's config and a local run dir."""
    state, env = cluster
    spec = _rayjob()
    config = {
        "run": {"name": "kjob", "rounds": 1, "progress": False},
        "model": {"ref": str(tiny_model_dir)},
        "data": {"train": {"name": "tiny-train", "preset": "gsm8k", "split": "train"},
                 "eval": [{"name": "tiny-test", "preset": "gsm8k", "split": "test"}], "instruction_suffix": ""},
        "generate": {"engine": {"name": "hf", "dtype": "float32"}, "samples_per_question": 2, "max_tokens": 40},
        "train": {"epochs": 1, "micro_batch_size": 4, "effective_batch_size": 4, "max_length": 128},
        "evaluate": {"max_tokens": 40, "baseline": False},
    }
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    argv = shlex.split(spec["entrypoint"])
    argv[argv.index("--config") + 1] = str(cfg_path)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runs = tmp_path / "runs"
    runtime_env["env_vars"].update(IMM_RUNS_DIR=str(runs), HF_HUB_OFFLINE="1")  # the bucket, here a folder
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", state.dashboard_url, "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env), "--", *argv],
        cwd=REPO, env=client_env(state, env), capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    rows = [json.loads(x) for x in (runs / "kjob/metrics.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["round"]) for r in rows] == [("imm", 1)]


def _publish(run: Path, model: Path) -> None:
    """A run whose round 1 is published (the evaluate stage marked done in state.json)."""
    run.mkdir(parents=True)
    state = {"stages": {"imm/round-001/evaluate": {"status": "done", "info": {"model": str(model)}}}}
    (run / "state.json").write_text(json.dumps(state))


def test_imm_serve_deploys_on_the_cluster_and_returns(cluster, tiny_model_dir, tmp_path):
    """Inside a cluster (RAY_ADDRESS set, as in KubeRay pods) `imm serve` deploys the app and exits;
    the app keeps serving without it, until `serve shutdown`."""
    state, env = cluster
    run = tmp_path / "joinrun"
    _publish(run, tiny_model_dir)
    port = free_port()
    cenv = client_env(state, env, HF_HUB_OFFLINE="1")
    imm = subprocess.run([str(BIN / "imm"), "serve", "--run-dir", str(run), "--port", str(port), "--engine", "hf",
                          "dtype=float32", "num_cpus=1"], cwd=REPO, env=cenv, capture_output=True, text=True,
                         timeout=420)
    try:
        assert imm.returncode == 0, imm.stderr[-3000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert "joinrun/latest" in [m.id for m in client.models.list()]
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", state.dashboard_url], env=cenv,
                       capture_output=True, timeout=120)


def test_rayservice_serve_config_through_serve_deploy(cluster, tiny_model_dir, tmp_path):
    state, env = cluster
    doc = yaml.safe_load((REPO / "cluster/k8s/rayservice.yaml").read_text())
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    port = free_port()
    run = tmp_path / "tinyrun"
    _publish(run, tiny_model_dir)
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] = "1"
    # The same app and settings on CPU: the bucket is a folder, the engine hf, no GPU, one replica.
    app["args"].update(run_dir=str(run), engine="hf", dtype="float32", num_cpus=1, num_gpus=0,
                       autoscaling={"enabled": True, "min_replicas": 1, "max_replicas": 1})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    cenv = client_env(state, env)
    serve_bin = str(BIN / "serve")
    deploy = subprocess.run([serve_bin, "deploy", str(path), "--address", state.dashboard_url], cwd=REPO,
                            env=cenv, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    deadline, last = time.monotonic() + 420, None
    while time.monotonic() < deadline:
        try:
            if "tinyrun/latest" in [m.id for m in client.models.list()]:
                break
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(3)
    else:
        status = subprocess.run([serve_bin, "status", "--address", state.dashboard_url], env=cenv,
                                capture_output=True, text=True, timeout=60)
        pytest.fail(f"the app did not answer within 420 s ({last}); serve status:\n{status.stdout[-3000:]}")
    question, _, gold = TINY_PROBLEMS[0]
    chat = client.chat.completions.create(model="tinyrun/latest", messages=[{"role": "user", "content": question}],
                                          max_tokens=40, temperature=0)
    assert chat.model == "tinyrun/round-1" and gold in chat.choices[0].message.content


def test_down_leaves_none_of_its_processes(cluster):
    state, env = cluster
    before = cluster_processes(state)
    assert before
    down = subprocess.run(["bash", "cluster/local/down.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]
    deadline = time.monotonic() + 60  # processes signalled by down.sh may take a moment to exit
    while (left := cluster_processes(state)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
    assert not [p for p in before if p.is_running() and p.status() != "zombie"]
    assert not (Path(env["IMM_CLUSTER_DIR"]) / "cluster.json").exists()

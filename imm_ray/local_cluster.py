"""A Ray cluster of a head and N worker nodes on this machine, on 127.0.0.1 only.

``cluster/local/up.sh N`` runs ``python -m imm_ray.local_cluster up`` as a supervisor in its own
session: it starts the nodes with Ray's multi-node utility (``ray.cluster_utils.Cluster``; ``ray
start`` refuses a second node while Ray is bound to loopback), gives node ``i`` a custom resource
``node_i`` (the head is ``node_0``) and its own scratch and cache folders, writes the state file
(addresses, token file, pids) and waits for SIGTERM. ``cluster/local/down.sh`` (``... down``)
stops exactly the processes of that cluster: the supervisor's session and every process that
carries the cluster's id in its environment (job drivers run in sessions of their own), never
``ray stop``.

Token authentication stays on: the supervisor writes a random token to ``auth_token`` (mode 0600)
in the state folder, and every client points ``RAY_AUTH_TOKEN_PATH`` at it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imm_ray.ray_env import LOOPBACK_RAY_ENV

logger = logging.getLogger(__name__)

STATE_NAME = "cluster.json"
TOKEN_NAME = "auth_token"
CLUSTER_ID_ENV = "IMM_LOCAL_CLUSTER_ID"  # inherited by every process of the cluster
NODE_ENV = ("IMM_NODE_CACHE_DIR", "IMM_SCRATCH_DIR")  # node-local: each node's own folders


def default_state_dir(dashboard_port: int) -> Path:
    """``$IMM_CLUSTER_DIR``, else a short per-user, per-port folder under /tmp (Ray's socket paths are short)."""
    env = os.environ.get("IMM_CLUSTER_DIR")
    return Path(env) if env else Path(f"/tmp/imm-cluster-{os.getuid()}-{dashboard_port}")


@dataclass
class NodeInfo:
    name: str          # node_0 (head), node_1, ...
    node_id: str
    scratch_dir: str
    cache_dir: str
    pids: list[int]


@dataclass
class ClusterState:
    """What ``up`` started: written to ``<state dir>/cluster.json`` once every node is alive."""

    cluster_id: str
    supervisor_pid: int
    session_id: int
    gcs_address: str
    dashboard_url: str
    token_path: str
    nodes: list[NodeInfo] = field(default_factory=list)

    def client_env(self) -> dict[str, str]:
        """What a client (``ray job submit``, ``imm run``, ``serve deploy``) exports to use the cluster."""
        return {**LOOPBACK_RAY_ENV, "RAY_ADDRESS": self.gcs_address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
                "RAY_AUTH_TOKEN_PATH": self.token_path}

    def write(self, state_dir: Path) -> None:
        tmp = state_dir / (STATE_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(state_dir / STATE_NAME)

    @classmethod
    def read(cls, state_dir: Path) -> ClusterState:
        raw = json.loads((state_dir / STATE_NAME).read_text())
        raw["nodes"] = [NodeInfo(**n) for n in raw["nodes"]]
        return cls(**raw)


def node_env(state_dir: Path, index: int) -> dict[str, str]:
    """Node-local folders of node ``index`` (created)."""
    base = state_dir / f"node_{index}"
    env = {"IMM_NODE_CACHE_DIR": str(base / "cache"), "IMM_SCRATCH_DIR": str(base / "scratch")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return env


def write_token(state_dir: Path) -> Path:
    """A fresh random token, readable by this user only."""
    path = state_dir / TOKEN_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def _wait_for_job_agent(dashboard_url: str, timeout_s: float) -> None:
    """Submit no-op jobs until one is accepted: the job agent starts seconds after the head."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(dashboard_url).submit_job(entrypoint="true", entrypoint_num_cpus=0)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet" until the deadline
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job API at {dashboard_url} did not accept a job within {timeout_s:.0f} s: "
                                   f"{exc}") from exc
            time.sleep(2)


def _node_info(name: str, node: Any, env: dict[str, str]) -> NodeInfo:
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
    return NodeInfo(name=name, node_id=node.node_id, scratch_dir=env["IMM_SCRATCH_DIR"],
                    cache_dir=env["IMM_NODE_CACHE_DIR"], pids=pids)


def up(workers: int, state_dir: Path, head_cpus: int, worker_cpus: int, dashboard_port: int,
       object_store_mb: int, timeout_s: float = 180.0) -> None:
    """Start the cluster, write its state, and block until SIGTERM/SIGINT; then stop it."""
    if os.getsid(0) != os.getpid():
        os.setsid()  # a session of its own, so that down() finds every process it starts
    if (state_dir / STATE_NAME).exists():
        raise SystemExit(f"{state_dir / STATE_NAME} exists: a cluster is up there (cluster/local/down.sh stops it)")
    state_dir.mkdir(parents=True, exist_ok=True)
    for key, value in LOOPBACK_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0" or "ray" in sys.modules:
        raise SystemExit("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 must be set before Ray is imported: "
                         "without it the nodes talk over the machine's network interface")
    cluster_id = secrets.token_hex(8)
    token_path = write_token(state_dir)
    os.environ.update({CLUSTER_ID_ENV: cluster_id, "RAY_AUTH_MODE": "token",
                       "RAY_AUTH_TOKEN_PATH": str(token_path)})
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the token file
    os.environ.pop("RAY_ADDRESS", None)

    # Private: only ray._common.utils names the "current cluster" file Ray's Cluster utility writes;
    # ray.cluster_utils.Cluster is Ray's own multi-node test utility (`ray start` refuses a second
    # node while Ray is bound to loopback).
    import ray._common.utils as ray_utils
    from ray.cluster_utils import Cluster

    # The Cluster utility records its head as "the current cluster", which a plain ray.init() of
    # any other user of this machine would then join: put back what was there.
    address_file = Path(ray_utils.get_ray_address_file(None))
    previous = address_file.read_text() if address_file.exists() else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    env0 = node_env(state_dir, 0)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "resources": {"node_0": 1}, "env_vars": env0,
        "object_store_memory": object_store_mb << 20, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "temp_dir": str(state_dir / "ray"),
    })
    try:
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)
        nodes = [_node_info("node_0", cluster.head_node, env0)]
        for i in range(1, workers + 1):
            env = node_env(state_dir, i)
            node = cluster.add_node(num_cpus=worker_cpus, resources={f"node_{i}": 1}, env_vars=env,
                                    object_store_memory=object_store_mb << 20)
            nodes.append(_node_info(f"node_{i}", node, env))
        cluster.wait_for_nodes(timeout=timeout_s)
        dashboard_url = f"http://{cluster.webui_url}" if cluster.webui_url else f"http://127.0.0.1:{dashboard_port}"
        _wait_for_job_agent(dashboard_url, timeout_s)
        state = ClusterState(cluster_id=cluster_id, supervisor_pid=os.getpid(), session_id=os.getsid(0),
                             gcs_address=cluster.address, dashboard_url=dashboard_url,
                             token_path=str(token_path), nodes=nodes)
        state.write(state_dir)
        logger.info("local cluster up: %d node(s), GCS %s, dashboard %s", len(nodes), state.gcs_address,
                    dashboard_url)
        stop.wait()
    finally:
        logger.info("stopping the local cluster")
        cluster.shutdown()
        (state_dir / STATE_NAME).unlink(missing_ok=True)


def cluster_processes(state: ClusterState) -> list[Any]:
    """Live processes of the cluster: its supervisor's session, and any that carry its id."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and (
                    os.getsid(proc.pid) == state.session_id or proc.environ().get(CLUSTER_ID_ENV) == state.cluster_id):
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def down(state_dir: Path, timeout_s: float = 60.0) -> int:
    """Stop the cluster recorded in ``state_dir``; return how many processes had to be killed."""
    import psutil

    if not (state_dir / STATE_NAME).exists():
        logger.info("no local cluster recorded in %s", state_dir)
        return 0
    state = ClusterState.read(state_dir)
    if psutil.pid_exists(state.supervisor_pid) and os.getsid(state.supervisor_pid) == state.session_id:
        os.kill(state.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(state.supervisor_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = cluster_processes(state)
    for proc in left:
        try:
            logger.warning("killing leftover process %d (%s)", proc.pid, " ".join(proc.cmdline()[:3]))
            proc.kill()
        except psutil.Error:
            continue  # it ended meanwhile
    psutil.wait_procs(left, timeout=10)
    (state_dir / STATE_NAME).unlink(missing_ok=True)
    return len(left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imm_ray.local_cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a head and N worker nodes on 127.0.0.1 (blocks until SIGTERM)")
    p_up.add_argument("workers", type=int, nargs="?", default=0, help="worker nodes besides the head")
    p_up.add_argument("--head-cpus", type=int, default=4)
    p_up.add_argument("--worker-cpus", type=int, default=2)
    p_up.add_argument("--object-store-mb", type=int, default=300)
    p_down = sub.add_parser("down", help="stop the cluster recorded in the state folder")
    p_env = sub.add_parser("env", help="print the shell exports a client of the cluster needs")
    for p in (p_up, p_down, p_env):
        p.add_argument("--dashboard-port", type=int, default=int(os.environ.get("RAY_DASHBOARD_PORT", 8265)))
        p.add_argument("--state-dir", type=Path, help="state folder (default $IMM_CLUSTER_DIR or "
                                                      "/tmp/imm-cluster-<uid>-<port>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = (args.state_dir or default_state_dir(args.dashboard_port)).resolve()
    if args.command == "env":
        env = ClusterState.read(state_dir).client_env()
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    elif args.command == "up":
        up(args.workers, state_dir, args.head_cpus, args.worker_cpus, args.dashboard_port, args.object_store_mb)
    else:
        killed = down(state_dir)
        logger.info("local cluster in %s stopped (%d leftover processes killed)", state_dir, killed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Start a Ray cluster on this machine, on 127.0.0.1 only: a head and N worker nodes (default 0).
#   cluster/local/up.sh [N]   then, in the client's shell:   eval "$(.venv/bin/python -m imm_ray.local_cluster env)"
# Node i has the custom resource node_i (the head is node_0) and its own scratch and cache folders.
# Ray's token authentication stays on; clients read the token file named by RAY_AUTH_TOKEN_PATH.
# Settings: RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS (head, 4), RAY_WORKER_CPUS (2), IMM_CLUSTER_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-$here/.venv}
workers=${1:-0}
port=${RAY_DASHBOARD_PORT:-8265}
state=${IMM_CLUSTER_DIR:-/tmp/imm-cluster-$(id -u)-$port}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token
unset RAY_ADDRESS RAY_AUTH_TOKEN
# Jobs inherit the nodes' environment: where run directories live (and IMM_DATA_DIR, HF_HUB_OFFLINE
# when set here; without a data folder the presets use the bundled sets, then the hub).
export IMM_RUNS_DIR=${IMM_RUNS_DIR:-$here/runs}
# A job's `python` is the nodes': put the project's virtual environment first.
export PATH="$VENV/bin:$PATH"
mkdir -p "$state" "$IMM_RUNS_DIR"
if [ -e "$state/cluster.json" ]; then
  echo "a local cluster is already recorded in $state (stop it with cluster/local/down.sh)" >&2
  exit 1
fi
cd "$here"
# Its own session, so that down.sh finds every process it starts (and nothing else).
setsid "$VENV/bin/python" -m imm_ray.local_cluster up "$workers" --state-dir "$state" --dashboard-port "$port" \
  --head-cpus "${RAY_NUM_CPUS:-4}" --worker-cpus "${RAY_WORKER_CPUS:-2}" >"$state/supervisor.log" 2>&1 </dev/null &
supervisor=$!
for _ in $(seq 1 300); do
  [ -e "$state/cluster.json" ] && break
  if ! kill -0 "$supervisor" 2>/dev/null; then
    echo "the local cluster did not start; its log ($state/supervisor.log) ends with:" >&2
    tail -n 20 "$state/supervisor.log" >&2
    exit 1
  fi
  sleep 1
done
if [ ! -e "$state/cluster.json" ]; then
  echo "the local cluster was not up within 300 s; see $state/supervisor.log (cluster/local/down.sh stops it)" >&2
  exit 1
fi
echo "Local Ray cluster up: head + $workers worker node(s), state in $state"
echo "Use it from a shell with:"
echo "  $("$VENV/bin/python" -m imm_ray.local_cluster env --state-dir "$state")"
echo "  ray job submit --working-dir . -- python -m jobs.imm_run --config jobs/configs/demo.yaml"

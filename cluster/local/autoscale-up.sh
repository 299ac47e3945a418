#!/usr/bin/env bash
# Start an autoscaling Ray cluster on this machine, on 127.0.0.1 only: a head with 0 CPUs whose
# autoscaler (Ray's fake multi-node provider) starts worker nodes of the types in
# cluster/local/autoscale.yaml (`cpu`: 2 CPUs, `gpu`: 1 CPU and a logical GPU; none at first) when work
# waits for them, and removes them after the idle timeout.
#   cluster/local/autoscale-up.sh      then, in the client's shell:   source "$STATE/env"
#   imm run --config jobs/configs/demo.yaml ray.cluster_yaml="$STATE/cluster.yaml" ...
#   cluster/local/autoscale-down.sh    (stops exactly the processes this script started)
# Settings: RAY_PORT (6390; Ray client: the next port), RAY_DASHBOARD_PORT (8275), IMM_IDLE_TIMEOUT_MINUTES (1),
# IMM_AUTOSCALE_TEMPLATE (another cluster YAML with @GCS_ADDRESS@ / @IDLE_TIMEOUT_MINUTES@),
# IMM_AUTOSCALE_DIR (the state folder, default /tmp/imm-autoscale-<uid>-<port>).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-$here/.venv}
port=${RAY_PORT:-6390}
dashboard=${RAY_DASHBOARD_PORT:-8275}
state=${IMM_AUTOSCALE_DIR:-/tmp/imm-autoscale-$(id -u)-$port}
template=${IMM_AUTOSCALE_TEMPLATE:-$here/cluster/local/autoscale.yaml}
if [ -e "$state/head.pid" ]; then
  echo "an autoscaling cluster is already recorded in $state (stop it with cluster/local/autoscale-down.sh)" >&2
  exit 1
fi
mkdir -p "$state/ray"
sed -e "s/@GCS_ADDRESS@/127.0.0.1:$port/" -e "s/@IDLE_TIMEOUT_MINUTES@/${IMM_IDLE_TIMEOUT_MINUTES:-1}/" \
  "$template" >"$state/cluster.yaml"
# A fresh token, readable by this user only; every node and client reads it (Ray's token authentication).
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$state/auth_token")
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token"
unset RAY_ADDRESS RAY_AUTH_TOKEN
# The worker nodes are processes of the head's autoscaler: they inherit this environment, its
# temporary folder (RAY_TMPDIR) included, and the project's virtual environment.
export RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 RAY_TMPDIR="$state/ray" PATH="$VENV/bin:$PATH"
cat >"$state/env" <<ENV
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$state/auth_token
export RAY_ADDRESS=127.0.0.1:$port RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard STATE=$state
unset RAY_AUTH_TOKEN
ENV
cd "$here"
# Its own session: autoscale-down.sh stops the processes of this session (and only those).
setsid "$VENV/bin/ray" start --head --block --node-ip-address=127.0.0.1 --port="$port" --num-cpus=0 \
  --object-store-memory=209715200 --dashboard-host=127.0.0.1 --dashboard-port="$dashboard" \
  --ray-client-server-port=$((port + 1)) --dashboard-agent-listen-port=0 --min-worker-port=0 --max-worker-port=0 \
  --temp-dir="$state/ray" --autoscaling-config="$state/cluster.yaml" >"$state/head.log" 2>&1 </dev/null &
head_pid=$!
echo "$head_pid" >"$state/head.pid"
for _ in $(seq 1 120); do
  if "$VENV/bin/ray" status --address="127.0.0.1:$port" >/dev/null 2>&1; then
    echo "Autoscaling Ray cluster up at 127.0.0.1:$port (head: 0 CPUs; worker types from $state/cluster.yaml)"
    echo "Use it from a shell with:   source $state/env"
    exit 0
  fi
  if ! kill -0 "$head_pid" 2>/dev/null; then
    echo "the head did not start; its log ($state/head.log) ends with:" >&2
    tail -n 20 "$state/head.log" >&2
    rm -f "$state/head.pid"
    exit 1
  fi
  sleep 1
done
echo "the head did not answer within 120 s; see $state/head.log (cluster/local/autoscale-down.sh stops it)" >&2
exit 1

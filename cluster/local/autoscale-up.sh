#!/usr/bin/env bash
# Start an autoscaling Ray cluster on this machine, on 127.0.0.1 only: a head with 0 CPUs whose
# autoscaler (Ray's fake multi-node provider) starts worker nodes of the types in
# cluster/local/autoscale.yaml (`cpu`: 2 CPUs, `gpu`: 1 CPU and a logical GPU; none at first) when work
# waits for them, and removes them after the idle timeout.
#   cluster/local/autoscale-up.sh      then, in the client's shell:   source <its state folder>/env
#   imm run --config jobs/configs/demo.yaml ray.cluster_yaml="$STATE/cluster.yaml" ...
#   cluster/local/autoscale-down.sh    (stops exactly the processes this script started)
# Settings: RAY_PORT (6390; Ray client: the next port), RAY_DASHBOARD_PORT (8275; IMM_INCLUDE_DASHBOARD=0:
# none, for a lighter head), IMM_IDLE_TIMEOUT_MINUTES (1),
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
# A raylet waits this long for its node's agents (Python processes) to start: slow on a busy machine.
export RAY_agent_register_timeout_ms=${RAY_agent_register_timeout_ms:-120000}
cat >"$state/env" <<ENV
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$state/auth_token
export RAY_ADDRESS=127.0.0.1:$port RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard STATE=$state
unset RAY_AUTH_TOKEN
ENV
cd "$here"
dashboard_flags=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard")
[ "${IMM_INCLUDE_DASHBOARD:-1}" = 0 ] && dashboard_flags=(--include-dashboard=false)
start_head() {
  # Its own session: autoscale-down.sh stops the processes of this session (and only those).
  setsid "$VENV/bin/ray" start --head --block --node-ip-address=127.0.0.1 --port="$port" --num-cpus=0 \
    --object-store-memory=209715200 "${dashboard_flags[@]}" \
    --ray-client-server-port=$((port + 1)) --dashboard-agent-listen-port=0 --min-worker-port=0 --max-worker-port=0 \
    --temp-dir="$state/ray" --autoscaling-config="$state/cluster.yaml" >"$state/head.log" 2>&1 </dev/null &
  head_pid=$!
  echo "$head_pid" >"$state/head.pid"
  for _ in $(seq 1 180); do
    # `ray start` says so once the head's raylet has registered with the GCS.
    if grep -q "Ray runtime started" "$state/head.log" && kill -0 "$head_pid" 2>/dev/null; then
      return 0
    fi
    kill -0 "$head_pid" 2>/dev/null || break
    sleep 1
  done
  # Not up: stop what that attempt left (the processes of its session).
  kill -KILL $(ps -e -o pid= -o sid= | awk -v sid="$head_pid" '$2 == sid {print $1}') 2>/dev/null || true
  rm -f "$state/head.pid"
  return 1
}
# Ray gives a raylet 30 s to register with the GCS; on a busy machine a start may miss that: try again.
for attempt in 1 2 3; do
  if start_head; then
    echo "Autoscaling Ray cluster up at 127.0.0.1:$port (head: 0 CPUs; worker types from $state/cluster.yaml)"
    echo "Use it from a shell with:   source $state/env"
    exit 0
  fi
  echo "the head did not start (attempt $attempt of 3); its log ends with:" >&2
  tail -n 3 "$state/head.log" >&2
done
exit 1

#!/usr/bin/env bash
# Start a local Ray head bound to loopback (127.0.0.1), for `ray job submit` and tests.
# Ray 2.60 turns on token auth when it binds to loopback; head and clients share
# RAY_AUTH_MODE=disabled so that `ray job submit` works without a token.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$here/.venv}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# Jobs inherit the head's environment: where data sets and run directories live.
if [ -z "${IMM_DATA_DIR:-}" ] && [ -d "$here/../shared/data" ]; then
  export IMM_DATA_DIR=$(cd "$here/../shared/data" && pwd)
fi
export IMM_RUNS_DIR=${IMM_RUNS_DIR:-$here/runs}
# A job's `python` is the head's: put the project's virtual environment first.
export PATH="$VENV/bin:$PATH"
mkdir -p "$IMM_RUNS_DIR"
"$VENV/bin/ray" start --head --num-cpus "${RAY_NUM_CPUS:-4}" --dashboard-host 127.0.0.1 \
  --dashboard-port "${RAY_DASHBOARD_PORT:-8265}" --include-dashboard true --disable-usage-stats
# The job agent comes up some seconds after the head (longer on a busy machine): wait until a
# no-op job is accepted, so that the user's first `ray job submit` does not fail.
for _ in $(seq 1 90); do
  if "$VENV/bin/ray" job submit --address "http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}" --no-wait \
       --entrypoint-num-cpus 0 -- true >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 2
done
if [ -z "${ready:-}" ]; then
  echo "the Ray head started but its job agent did not answer within 180 s; see /tmp/ray/session_latest/logs" >&2
  exit 1
fi
echo "Ray head up. Submit jobs with:"
echo "  export RAY_ADDRESS=http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265} RAY_AUTH_MODE=disabled"
echo "  $VENV/bin/ray job submit --working-dir . -- python -m jobs.imm_run --config jobs/configs/demo.yaml"

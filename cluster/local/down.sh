#!/usr/bin/env bash
# Stop the local cluster started by cluster/local/up.sh: exactly its processes (never `ray stop`).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
port=${RAY_DASHBOARD_PORT:-8265}
cd "$here"
exec "${VENV:-$here/.venv}/bin/python" -m imm_ray.local_cluster down --dashboard-port "$port" \
  ${IMM_CLUSTER_DIR:+--state-dir "$IMM_CLUSTER_DIR"}

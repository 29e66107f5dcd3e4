#!/usr/bin/env bash
# Creates .venv and installs flip-ds with its pinned dependencies. Idempotent: a second run with
# unchanged requirements only checks a stamp. Used by run_demo.sh and run_tests.sh.
#
# torch: an existing torch in .venv is kept (install your CUDA/ROCm/CPU build there first to
# choose it); otherwise torch 2.14.1 + torchvision 0.29.1: PyPI's build (CUDA, also runs on CPUs)
# where nvidia-smi exists, PyTorch's CPU-only build where it does not (PyPI's if that index is
# unreachable).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.flip-ds-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into .venv (first time: a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  torch_index=()
  # Without an NVIDIA driver, PyTorch's CPU-only build (a few hundred MB instead of several GB of
  # CUDA libraries), when its index is reachable; otherwise PyPI's build, which runs on CPUs too.
  if ! command -v nvidia-smi >/dev/null && .venv/bin/python -c \
      "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=10)" \
      2>/dev/null; then
    torch_index=(--index-url https://download.pytorch.org/whl/cpu)
    echo "[setup] no NVIDIA driver: CPU-only torch from download.pytorch.org/whl/cpu"
  fi
  .venv/bin/python -m pip install -q "${torch_index[@]}" torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)')"

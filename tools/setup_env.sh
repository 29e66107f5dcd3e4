#!/usr/bin/env bash
# Creates .venv and installs flip-ds with its pinned dependencies. Idempotent: a second run with
# unchanged requirements only checks a stamp. Used by run_demo.sh and run_tests.sh.
#
# torch: an existing torch in .venv is kept (install your CUDA/ROCm/CPU build there first to
# choose it); otherwise torch 2.14.1 + torchvision 0.29.1 come from PyPI, whose Linux x86_64
# build carries CUDA and also runs on a CPU-only machine.
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
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)')"

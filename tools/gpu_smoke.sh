#!/usr/bin/env bash
# flip-ds on one GPU, end to end: one prepared command for a machine with one NVIDIA GPU and no internet.
# Every product path that differs on a GPU, as a user runs it (tools/gpu_smoke.py says which): training under
# torchrun (a real NCCL process group) with per-step logging, in-training eval and checkpoints; kill -9 and
# resume=auto reproducing the uninterrupted losses; eval zero-shot and retrieval; export and a load without
# DeepSpeed; ZeRO-1, 2 and 3; flip-ds bench on B/16 at masks 0 / 0.5 / 0.75 with MFU against the measured
# matmul peak. Prints PASS / FAIL / SKIP per stage, writes DIR/gpu_smoke.json, and exits non-zero naming the
# first failing stage. Sized for under 8 minutes on one H200.
#
#   tools/gpu_smoke.sh [--out DIR]      on the GPU machine (default DIR: runs/gpu_smoke)
#   tools/gpu_smoke.sh --cpu [--out D]  anywhere: the same stages on the CPU at tiny size (the test suite runs it)
#
# deepspeed and webdataset come from wheels/ when the GPU machine lacks them (tools/gpu_bench.sh --wheels
# makes them on a machine with PyPI); see tools/gpu_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
case "${1:-}" in -h|--help) sed -n '2,15p' "$0"; exit 0 ;; esac
gpu_env_activate wheels gpu_smoke.sh
exec "$PYTHON" tools/gpu_smoke.py "$@"

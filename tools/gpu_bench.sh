#!/usr/bin/env bash
# flip-ds's GPU benchmark, one prepared command for a single-GPU machine (sized for an H200, 141 GB):
# B/16, L/14 and H/14 in bf16 under ZeRO-1 and ZeRO-3 at image masks 0 / 0.5 / 0.75, each setup interleaved
# with the others and with a bf16 matmul peak; prints samples/s, TFLOP/s, MFU and peak memory per setup and
# writes one JSON per model. Sized to finish within 8 minutes on an H200 (estimated: not yet run on one; DeepSpeed
# JIT-builds its FusedAdam CUDA op on the first engine, about a minute).
#
#   tools/gpu_bench.sh [--out DIR]      on the GPU machine (default DIR: runs/gpu_bench)
#   tools/gpu_bench.sh --smoke          anywhere, CPU included: the tiny model, one round, seconds
#   tools/gpu_bench.sh --wheels [DIR]   on a machine with PyPI: fetch into DIR (default wheels/) what a GPU
#                                       machine without internet lacks: deepspeed, webdataset and their
#                                       missing dependencies, for its Python (WHEEL_PYTHON, default 3.12)
#
# The GPU machine needs torch, timm, sentencepiece and pyyaml; deepspeed and webdataset come from wheels/ when
# they are not installed. The repo is used in place (PYTHONPATH), nothing is pip-installed into it.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
mode=gpu out=runs/gpu_bench wheels=wheels
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) mode=smoke ;;
        --out) out=$2; shift ;;
        --wheels) mode=wheels; if [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; then wheels=$2; shift; fi ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$mode" = wheels ]; then
    gpu_env_make_wheels "$wheels"
    exit 0
fi
gpu_env_activate "$wheels" gpu_bench.sh
mkdir -p "$out"
bench() {  # NAME, then flip-ds bench arguments; a model that fails (e.g. out of memory) does not stop the others
    local name=$1; shift
    echo "== $name: flip-ds bench $*"
    "$PYTHON" -m flip_ds bench --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" || echo "== $name FAILED (see $out/$name.log)"
}

if [ "$mode" = smoke ]; then
    bench smoke --smoke --zero 1 3 --masks 0 0.5 0.75
    exit 0
fi
common=(--precision bf16 --zero 1 3 --masks 0 0.5 0.75 --rounds 3)
bench b16 --model B/16 --batch 256 --steps 5 "${common[@]}"
bench l14 --model L/14 --batch 128 --steps 4 "${common[@]}"
bench h14 --model H/14 --batch 64 --steps 3 "${common[@]}"

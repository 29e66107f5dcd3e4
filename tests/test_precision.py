"""precision: auto, and what an explicit choice does, for each kind of hardware (the hardware's
answers passed in), plus the real measurement with oneDNN held to AVX2, as on CPUs without bf16."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from flip_ds.precision import NATIVE_BF16_MAX_SLOWDOWN, cpu_bf16_flags, resolve_precision
from tests.distributed_helpers import REPO

NATIVE, EMULATED = 0.4, 90.0  # bf16 matmul time over fp32's, as measured with and without bf16 units


@pytest.mark.parametrize("requested, cuda_bf16, expected", [
    ("auto", True, "bf16"), ("auto", False, "fp32"), ("bf16", True, "bf16"), ("fp32", True, "fp32"),
])
def test_on_a_gpu_auto_is_bf16_where_supported(requested, cuda_bf16, expected):
    p = resolve_precision(requested, "cuda", cuda_bf16=cuda_bf16)
    assert (p.name, p.warning) == (expected, None)
    assert p.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
    assert ("auto" in p.reason) == (requested == "auto")


@pytest.mark.parametrize("requested, slowdown, expected", [
    ("auto", NATIVE, "bf16"), ("auto", EMULATED, "fp32"), ("auto", NATIVE_BF16_MAX_SLOWDOWN, "bf16"),
    ("fp32", NATIVE, "fp32"), ("bf16", NATIVE, "bf16"), ("bf16", EMULATED, "bf16"),
])
def test_on_a_cpu_auto_follows_the_measured_bf16_speed(requested, slowdown, expected):
    p = resolve_precision(requested, "cpu", cpu_slowdown=slowdown)
    assert p.name == expected
    assert f"{slowdown:.2g}x" in p.reason  # the measurement is stated with the choice


def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_with_one_warning_naming_the_slowdown():
    p = resolve_precision("bf16", "cpu", cpu_slowdown=EMULATED)
    assert p.name == "bf16" and "90x slower than fp32" in p.warning and "auto" in p.warning
    assert resolve_precision("bf16", "cpu", cpu_slowdown=NATIVE).warning is None
    assert resolve_precision("fp32", "cpu", cpu_slowdown=EMULATED).warning is None


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu", cpu_slowdown=NATIVE)


RESOLVE = ("import json; from flip_ds.precision import cpu_bf16_slowdown, resolve_precision; "
           "p = resolve_precision('auto', 'cpu'); print(json.dumps([p.name, cpu_bf16_slowdown()]))")


def _resolve_in_subprocess(env: dict[str, str]) -> tuple[str, float]:
    inherited = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    done = subprocess.run([sys.executable, "-c", RESOLVE], capture_output=True, text=True, cwd=REPO,
                          env={**inherited, "OMP_NUM_THREADS": "1", **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    name, slowdown = json.loads(done.stdout)
    return name, slowdown


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's AVX2 cap is an x86 setting")
def test_the_measurement_sees_emulated_bf16_and_native_bf16_where_the_cpu_has_it():
    # oneDNN held to AVX2 emulates bf16 as an AVX2-only CPU does (about 0.9 vs 88 GFLOP/s at 1024^2)
    name, slowdown = _resolve_in_subprocess({"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert (name, slowdown > 5 * NATIVE_BF16_MAX_SLOWDOWN) == ("fp32", True), slowdown
    name, slowdown = _resolve_in_subprocess({})
    has_units = bool({"avx512_bf16", "amx_bf16"} & set(cpu_bf16_flags()))
    assert name == ("bf16" if has_units else "fp32"), (slowdown, cpu_bf16_flags())

"""A CPU training process keeps what torch frees for the next step (flip_ds.host_memory): a large
tensor allocated again after one was freed takes no new page faults."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.distributed_helpers import REPO

FAULTS = """
import json, resource, torch
from flip_ds.distributed import detect_dist_env, init_distributed, shutdown

def faults_of_a_fresh_256mb_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20)  # 256 MB, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = [faults_of_a_fresh_256mb_tensor() for _ in range(2)]
init_distributed(detect_dist_env())  # what every CPU rank of train and bench starts with
kept = [faults_of_a_fresh_256mb_tensor() for _ in range(10)]  # the first few grow the heap
shutdown()
print(json.dumps({"plain": plain, "kept": kept}))
"""


def test_after_init_on_a_cpu_a_freed_large_tensor_is_reused_without_page_faults():
    done = subprocess.run([sys.executable, "-c", FAULTS], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "CUDA_VISIBLE_DEVICES": ""})  # a CPU rank on any machine
    assert done.returncode == 0, done.stderr
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    # glibc's default maps each one anew (65,536 faults of 4 KB pages; fewer with transparent huge pages)
    assert faults["plain"][-1] > 100, faults
    # once the heap has grown to hold one (a few rounds: other threads' small allocations move in
    # and out of the freed space meanwhile), each one reuses it
    assert max(faults["kept"][-3:]) * 10 < faults["plain"][-1], faults

#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this): sets up .venv, starts a real local
# SLURM cluster for the sbatch tests (Debian packages, installed on first use), runs pytest, and
# stops the cluster. Extra arguments go to pytest (e.g. ./run_tests.sh -k resume).
set -euo pipefail
cd "$(dirname "$0")"
tools/setup_env.sh
bash slurm/local_cluster.sh up
trap 'bash slurm/local_cluster.sh down' EXIT
eval "$(bash slurm/local_cluster.sh env)"  # SLURM_CONF: the sbatch tests run (they skip only without it)
set +e
.venv/bin/python -m pytest -q -ra --durations=15 "$@"  # the slowest tests listed, to keep the suite short
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$status"

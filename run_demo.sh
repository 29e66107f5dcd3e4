#!/usr/bin/env bash
# The main job on a built-in default: sets up .venv, then `flip-ds demo` builds the built-in dataset
# and tokenizer (once), trains the tiny FLIP recipe under DeepSpeed with masking on one single-threaded
# process per CPU core (or one per GPU), exports, evaluates on held-out data and prints a summary.
set -euo pipefail
cd "$(dirname "$0")"
tools/setup_env.sh
exec .venv/bin/flip-ds demo "$@"

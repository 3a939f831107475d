#!/usr/bin/env bash
# Set up (first time) and run the test suite on the CPU: `bash scripts/test.sh [pytest args]`.
source "$(dirname "$0")/setup.sh"
# one worker a CPU core (at most 8: each holds torch and the interpreter), ~6 min on 2 cores against ~18 serially;
# PACKINFER_TEST_WORKERS=0 runs in this process (for pdb or -s)
exec python -m pytest -q -n "${PACKINFER_TEST_WORKERS:-auto}" --maxprocesses 8 "$@"

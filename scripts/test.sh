#!/usr/bin/env bash
# Set up (first time) and run the test suite on the CPU: `bash scripts/test.sh [pytest args]`.
source "$(dirname "$0")/setup.sh"
exec python -m pytest -q "$@"

#!/usr/bin/env bash
# Set up (first time) and run the static checks: ruff over the repository and mypy over the kernel library
# (configuration: pyproject.toml's [tool.ruff] and [tool.mypy]). `bash scripts/lint.sh`; CI runs it before the
# tests. Both checks run; the script fails if either finds anything.
source "$(dirname "$0")/setup.sh"
status=0
python -m ruff check . || status=1
python -m mypy kernels/packinfer || status=1
exit "$status"

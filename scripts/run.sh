#!/usr/bin/env bash
# Set up (first time) and run an experiment: `bash scripts/run.sh [CONFIG] [--dry-run] [--resume] [--out DIR]`.
# With no CONFIG: experiments/smoke.yaml on a machine without a GPU, else the GPU's sweep (h100.yaml / a100.yaml).
source "$(dirname "$0")/setup.sh"
exec packinfer-bench run "$@"

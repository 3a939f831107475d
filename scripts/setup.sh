# Sourced by run.sh and test.sh: make .venv (once) and install the project into it.
# Without a GPU it installs a CPU build of torch (kernels then run under the Triton interpreter); with one,
# a torch that is already on the machine is used (the venv sees system packages), else PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.11"
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi

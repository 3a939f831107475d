# Sourced by run.sh and test.sh: make .venv (once), put torch in it, and install the kernel library (kernels/,
# distribution `packinfer`) and the harness (`packinfer-bench`, with its test and transformers extras), both
# editable. Without a GPU the torch is a CPU build and no CUDA library is ever downloaded: a wheel from pip's
# find-links when one is there (no index asked), else $PACKINFER_TORCH_SPEC from $PACKINFER_TORCH_INDEX
# (default: PyTorch's CPU index). With a GPU: a torch already on the machine (the venv sees system packages),
# else PyPI's CUDA build. Whatever torch is there stays: the project's installs are constrained to it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages .venv
fi
. .venv/bin/activate

torch_info() { python -c "import torch; print(torch.__version__, torch.version.cuda or 'none')" 2>/dev/null; }
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

info=$(torch_info || true)
if [ -z "$info" ]; then
  spec="${PACKINFER_TORCH_SPEC:-torch==2.13.0}"
  index="${PACKINFER_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  local_wheels=$(mktemp -d)
  if has_gpu; then
    echo "setup: installing torch>=2.11 (CUDA build) from the package index" >&2
    python -m pip install -q "torch>=2.11"
  elif python -m pip download -q --no-index --no-deps -d "$local_wheels" "$spec" >/dev/null 2>&1 &&
       ls "$local_wheels"/torch-*+cpu-*.whl >/dev/null 2>&1; then  # a CPU wheel in pip's find-links: no index asked
    wheel=$(ls "$local_wheels"/torch-*+cpu-*.whl | head -n 1)
    echo "setup: installing $(basename "$wheel") (CPU build) from pip's find-links" >&2
    python -m pip install -q "$wheel"
  else
    echo "setup: installing $spec, CPU build, from $index (PACKINFER_TORCH_INDEX to change)" >&2
    python -m pip install -q --index-url "$index" "$spec"
  fi
  rm -rf "$local_wheels"
  info=$(torch_info)
fi
read -r torch_version torch_cuda <<<"$info"
if [ "$torch_cuda" = none ]; then
  echo "setup: torch $torch_version (CPU build; kernels run under the Triton interpreter)" >&2
else
  echo "setup: torch $torch_version (CUDA $torch_cuda build)" >&2
fi

stamp=".venv/.installed-$(cat pyproject.toml kernels/pyproject.toml setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "torch==$torch_version" > .venv/torch-constraint.txt  # keeps pip from swapping the torch above
  python -m pip install -q -c .venv/torch-constraint.txt -e ./kernels -e ".[test,transformers]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

#!/usr/bin/env bash
# Make a wheelhouse for a machine without network access (typically a GPU machine for the FlashInfer baseline):
#   on a connected machine:  bash scripts/offline-wheels.sh [--out DIR] [--python-version 3.11]
#                              [--platform manylinux_2_28_x86_64] [--no-deps] [EXTRA | REQUIREMENT ...]
#   copy DIR (default .wheels/, ignored by git) to the offline machine's checkout, then there, in .venv:
#                            source .wheels/activate.sh
# EXTRA is an optional-dependency group of pyproject.toml (flashinfer, flash-attn, transformers); anything else is
# a pip requirement. Default: flashinfer. --python-version/--platform fetch wheels for another machine than this
# one (binary wheels only). --no-deps fetches the named packages alone, for a machine whose torch and other
# dependencies are installed (with dependencies, a torch CUDA build and its libraries come too: several GB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=.wheels
pip_args=()
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --python-version|--platform) pip_args+=("$1" "$2" --only-binary=:all:); shift 2 ;;
    --no-deps) pip_args+=(--no-deps); shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "offline-wheels.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) names+=("$1"); shift ;;
  esac
done
[ ${#names[@]} -gt 0 ] || names=(flashinfer)
python=$(command -v python3 || command -v python)
mkdir -p "$out"
# Extras become their requirements as pyproject.toml lists them; other names pass through unchanged.
"$python" - "${names[@]}" > "$out/requirements.txt" <<'PY'
import sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
for name in sys.argv[1:]:
    print("\n".join(extras[name]) if name in extras else name)
PY
echo "offline-wheels: fetching $(tr '\n' ' ' < "$out/requirements.txt")into $out/" >&2
"$python" -m pip download -q -d "$out" -r "$out/requirements.txt" ${pip_args[@]+"${pip_args[@]}"}
cat > "$out/activate.sh" <<'SH'
# Sourced on the offline machine, inside the project's venv: install this folder's wheels without any index, and
# let later pip commands of this shell look here first.
_wheels=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PIP_FIND_LINKS="$_wheels${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
if python -m pip install -q --no-index --find-links "$_wheels" -r "$_wheels/requirements.txt"; then
  echo "offline wheels installed: $(tr '\n' ' ' < "$_wheels/requirements.txt")"
  unset _wheels
else
  echo "offline wheels: install failed; a dependency missing from $_wheels means it was made with --no-deps" \
       "for a machine that has that dependency (make it again without --no-deps)" >&2
  unset _wheels
  return 1
fi
SH
echo "offline-wheels: $(ls "$out" | grep -c '\.whl$') wheel(s) in $out/; on the offline machine: source $out/activate.sh" >&2

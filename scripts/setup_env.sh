#!/usr/bin/env bash
# Create (or reuse) ./.venv with CoreDiffLib and what the given extras need.
# Usage: scripts/setup_env.sh [extras]   e.g. scripts/setup_env.sh test
# torch is pinned to the CPU build used in CI; on a GPU machine install the CUDA build you
# need first (README, Install, "Library / CLI, NVIDIA GPU"), then run this: the pin is skipped
# when torch is present.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup_env.sh: $("$PY" --version 2>&1) is too old: the pinned torch 2.13 needs Python >= 3.10" \
       "(set PYTHON=python3.11, say)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  if [ "$(uname -s)" = Darwin ]; then
    python -m pip install --quiet "torch==2.13.0"  # macOS wheels are the CPU / MPS build
  else
    # the CPU build: PyPI's Linux wheel of the same version pulls several GB of CUDA libraries.
    # A local wheel (a mirror, --find-links) first, else PyTorch's own CPU index.
    python -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null \
      || python -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.corediff-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet -e "$spec"
  touch "$stamp"
fi

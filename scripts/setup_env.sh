#!/usr/bin/env bash
# Create (or reuse) ./.venv with CoreDiffLib and what the given extras need.
# Usage: scripts/setup_env.sh [extras]   e.g. scripts/setup_env.sh test
# torch is pinned to the CPU build used in CI; on a GPU machine install the CUDA build you
# need first (see README, "GPU"), then run this: the pin is skipped when torch is present.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.corediff-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet -e "$spec"
  touch "$stamp"
fi

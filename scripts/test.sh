#!/usr/bin/env bash
# Set up ./.venv (CPU torch pin + test extras) and run the whole test suite.
# pytest's exit code 5 ("no tests ran") is treated as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test || exit 1
. .venv/bin/activate
export QT_QPA_PLATFORM=offscreen MPLBACKEND=Agg
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest ran no tests: failing" >&2
  exit 1
fi
exit "$rc"

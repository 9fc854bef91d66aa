#!/usr/bin/env bash
# CoreDiff CPU benchmark (issue #7): the runs behind Testing/benchmarks/results/cpu_*.md.
# 512x512 slices, exact sampler; --steps 2 times two network evaluations (one without, one
# with EMM) and the table scales s/slice linearly to T=10 (column s/slice@T). Ratios are
# measured within one run with interleaved repeats, so they hold on a loaded machine;
# absolute seconds do not (note the load average printed in each table's title).
#   bash Testing/benchmarks/cpu_benchmark.sh [OUT]   (OUT defaults to the committed results: they are replaced)
set -eu
cd "$(dirname "$0")/../.."
OUT="${1:-Testing/benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
bench() { name=$1; shift; "$PY" -m CoreDiffLib.cli bench --size 512 --device cpu --steps 2 --repeats 3 \
    --json "$OUT/$name.json" --markdown "$OUT/$name.md" "$@"; }
bench cpu_w64 --width 64 --batch-sizes 1 --channels-last --compile eager,onnx --slices 1
bench cpu_w32 --width 32 --batch-sizes 1 --channels-last --compile eager,onnx --slices 1
bench cpu_w16 --width 16 --batch-sizes 1,2 --channels-last --compile eager,onnx --slices 2
bench cpu_fast_candidates --width 8 --width 16 --batch-sizes 2 --compile onnx --slices 2
# a trained fast model (add its quality next to the paper-size one):
#   bench cpu_models --model fast.safetensors --model default --batch-sizes 2 --compile onnx --slices 2

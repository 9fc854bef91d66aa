#!/usr/bin/env bash
# The main job on the bundled default: denoise the shipped sample LDCT volume with the shipped
# model --model auto picks for it (the 25 % one), then compare against its normal-dose reference
# (metrics + before/after figure).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh  # the library alone: what the demo runs needs no extra
. .venv/bin/activate
mkdir -p out
sample=CoreDiffLib/data
corediff denoise "$sample/sample_abdomen_ldct25.nrrd" out/sample_denoised.nrrd --overwrite  # a rerun replaces it
corediff compare out/sample_denoised.nrrd --ldct "$sample/sample_abdomen_ldct25.nrrd" \
  --reference "$sample/sample_abdomen_ndct.nrrd" --csv out/sample_metrics.csv \
  --figure out/sample_before_after.png --overwrite  # a rerun replaces them
echo "Denoised volume: out/sample_denoised.nrrd   figure: out/sample_before_after.png"

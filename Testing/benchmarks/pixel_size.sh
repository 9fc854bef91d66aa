#!/usr/bin/env bash
# How the shipped 25 % model does at pixel sizes other than the 0.49-0.78 mm it learned from:
# the same phantom simulated at 25 % dose on 128^2 .. 512^2 grids over one field of view (so
# only the pixel size changes), denoised with --model corediff-25-w32 --steps 1 (the CPU
# default), scored with corediff compare against its NDCT. Writes DIR/pixel_size.md.
#   bash Testing/benchmarks/pixel_size.sh [DIR (default /tmp/corediff-pixel-size)]
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
dir=${1:-/tmp/corediff-pixel-size}
mkdir -p "$dir"
table="$dir/pixel_size.md"
{
  echo "| phantom | grid | pixel (mm) | LDCT PSNR / SSIM / RMSE | denoised PSNR / SSIM / RMSE | gain (dB) |"
  echo "|---|---|---|---|---|---|"
} > "$table"
seed=900
for kind in abdomen thorax head; do
  for size in 128 256 384 512; do
    sim="$dir/$kind-$size"
    corediff simulate --dose 0.25 --out "$sim" --count 1 --slices 5 --size "$size" --kinds "$kind" \
      --seed "$seed" --progress none --overwrite
    ldct=$(ls "$sim"/*_ldct25.nrrd); ndct=$(ls "$sim"/*_ndct.nrrd)
    corediff denoise "$ldct" "$sim/denoised.nrrd" --model corediff-25-w32 --steps 1 --progress none --overwrite
    mean=$(corediff compare "$sim/denoised.nrrd" --ldct "$ldct" --reference "$ndct" | tail -1)
    pixel=$(python -c "import SimpleITK as s; print(f'{s.ReadImage(\"$ldct\").GetSpacing()[0]:.2f}')")
    read -r _ dp ds dr lp ls lr <<< "$mean"
    gain=$(python -c "print(f'{$dp - $lp:+.2f}')")
    echo "| $kind | ${size}² | $pixel | $lp / $ls / $lr | $dp / $ds / $dr | $gain |" | tee -a "$table"
  done
  seed=$((seed + 1))
done
echo "wrote $table"

#!/usr/bin/env python
"""Where does an SSIM difference between two methods come from?

SSIM on the paper's [-1000, 1000] HU window is a mean over every pixel of the slice, and most
pixels of a 512² CT slice are air, where the window's floor clips the NDCT's noise. This splits
the SSIM map of each method (against the NDCT) by what the noise-free phantom shows there (air,
lung, soft tissue, bone) and reports each region's share of the slice-mean SSIM gap, the same
for the squared error on the window (what PSNR and RMSE average), SSIM's luminance and
contrast-structure factors by region (a level error or a texture error), plus the mean level each
method gives the air, against the noise-free image.

    python Testing/benchmarks/ssim_regions.py --dose 0.1 --split validation \\
        --model "CoreDiff w32=corediff-10-w32" \\
        --redcnn "RED-CNN=Testing/benchmarks/models/redcnn32-gpu-10.pt"

The first method given is the reference of the "share of the gap" column. Held-out phantoms
as in quality_benchmark.py (its cache, 6-slice volumes, the 4 inner slices).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_benchmark import default_cache, held_out  # noqa: E402
from CoreDiffLib.baselines import load_redcnn, redcnn_denoise  # noqa: E402
from CoreDiffLib.inference import denoise_volume  # noqa: E402
from CoreDiffLib.intensity import METRIC_WINDOW_HU  # noqa: E402
from CoreDiffLib.metrics import ssim_map, ssim_terms  # noqa: E402

#: regions by the noise-free image's HU (lower bound inclusive)
REGIONS = {"air (< -950 HU)": (-np.inf, -950), "lung (-950..-300)": (-950, -300),
           "soft tissue (-300..300)": (-300, 300), "bone (> 300)": (300, np.inf)}


def _spec(text: str) -> tuple[str, str]:
    label, sep, value = text.partition("=")
    return (label, value) if sep else (Path(text).stem, text)


def denoisers(models: list[str], redcnns: list[str]) -> dict:
    """label -> function(LDCT volume) -> output volume, from ``--model`` / ``--redcnn`` specs."""
    methods = {}
    for label, spec in map(_spec, models):
        name, _, steps = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
        methods[label] = lambda v, name=name, steps=steps: denoise_volume(
            v, name, device="cpu", steps=int(steps) if steps else None, progress=None)
    for label, path in map(_spec, redcnns):
        methods[label] = lambda v, net=load_redcnn(path): redcnn_denoise(net, v)
    return methods


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dose", type=float, default=0.25)
    p.add_argument("--split", choices=("test", "validation"), default="validation")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=MODEL[:STEPS]",
                   help="CoreDiff model (shipped name or file), optionally with the number of steps")
    p.add_argument("--redcnn", action="append", default=[], metavar="LABEL=FILE")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if not a.model and not a.redcnn:
        p.error("give at least one --model or --redcnn")
    torch.set_num_threads(a.threads)

    methods = denoisers(a.model, a.redcnn)

    # per method and region: summed SSIM, pixel count, summed (noise-free - output) in HU,
    # summed squared error against the NDCT on the metric window (HU²), summed luminance and
    # contrast-structure factors of the SSIM
    sums = {m: {r: [0.0, 0, 0.0, 0.0, 0.0, 0.0] for r in REGIONS} for m in methods}
    for _, ndct, ldct, truth in held_out(a.dose, default_cache(a.split, 6), slices=6, split=a.split):
        for label, fn in methods.items():
            out = fn(ldct)
            for k in range(1, ndct.shape[0] - 1):
                smap = ssim_map(out[k], ndct[k])
                lum, cs = ssim_terms(out[k], ndct[k])
                c = (ndct.shape[-1] - smap.shape[-1]) // 2  # the border ssim_map leaves out
                tr = truth[k][c:-c, c:-c]
                err = tr - out[k][c:-c, c:-c]
                sq = (np.clip(out[k][c:-c, c:-c], *METRIC_WINDOW_HU)
                      - np.clip(ndct[k][c:-c, c:-c], *METRIC_WINDOW_HU)).astype(np.float64) ** 2
                for region, (lo, hi) in REGIONS.items():
                    mask = (tr >= lo) & (tr < hi)
                    acc = sums[label][region]
                    acc[0] += float(smap[mask].sum()); acc[1] += int(mask.sum()); acc[2] += float(err[mask].sum())
                    acc[3] += float(sq[mask].sum())
                    acc[4] += float(lum[mask].sum()); acc[5] += float(cs[mask].sum())
    labels = list(methods)
    ref = labels[0]
    total_px = sum(acc[1] for acc in sums[ref].values())
    print(f"SSIM against the NDCT by region ({a.split} phantoms, {a.dose:g} dose, 12 inner slices); "
          f"Δ = method − {ref}; a region's share of the slice-mean gap is its Δ × its share of pixels.\n")
    print("| region | pixels | " + " | ".join(f"SSIM {m}" for m in labels)
          + " | " + " | ".join(f"share of Δ {m}" for m in labels[1:]) + " |")
    print("|---|---|" + "---|" * (2 * len(labels) - 1))
    for region in REGIONS:
        n = sums[ref][region][1]
        if n == 0:
            continue
        means = [sums[m][region][0] / n for m in labels]
        shares = [(mm - means[0]) * n / total_px for mm in means[1:]]
        print(f"| {region} | {n / total_px:.3f} | " + " | ".join(f"{v:.4f}" for v in means)
              + " | " + " | ".join(f"{v:+.5f}" for v in shares) + " |")
    overall = [sum(acc[0] for acc in sums[m].values()) / total_px for m in labels]
    print("| all | 1 | " + " | ".join(f"{v:.4f}" for v in overall) + " | "
          + " | ".join(f"{v - overall[0]:+.5f}" for v in overall[1:]) + " |")

    print(f"\nRMSE against the NDCT on the window {METRIC_WINDOW_HU} HU by region (HU), and each region's "
          "share of the slice's mean squared error (HU²), whose total gives PSNR and RMSE. The 'all' row "
          "pools every pixel of the slices (inside the SSIM map's border), so it differs a little from "
          "the quality tables' mean of per-slice RMSE.\n")

    def region_table(left: str, right: str, left_cell, right_cell) -> None:
        """One row per region: ``left_cell(acc, n)`` for every method, then ``right_cell``."""
        print("| region | " + " | ".join(f"{left} {m}" for m in labels) + " | "
              + " | ".join(f"{right} {m}" for m in labels) + " |")
        print("|---|" + "---|" * (2 * len(labels)))
        for region in REGIONS:
            n = sums[ref][region][1]
            if n:
                print(f"| {region} | " + " | ".join(left_cell(sums[m][region], n) for m in labels) + " | "
                      + " | ".join(right_cell(sums[m][region], n) for m in labels) + " |")

    region_table("RMSE", "MSE share", lambda acc, n: f"{np.sqrt(acc[3] / n):.2f}",
                 lambda acc, n: f"{acc[3] / total_px:.2f}")
    mse = [sum(acc[3] for acc in sums[m].values()) / total_px for m in labels]
    print("| all | " + " | ".join(f"{np.sqrt(v):.2f}" for v in mse) + " | "
          + " | ".join(f"{v:.2f}" for v in mse) + " |")
    print("\nSSIM's two factors by region (their product, pixel by pixel, is the SSIM map): "
          "luminance (local level) and contrast-structure (local texture).\n")
    region_table("luminance", "contrast-structure", lambda acc, n: f"{acc[4] / n:.5f}",
                 lambda acc, n: f"{acc[5] / n:.5f}")
    print("\nMean level in the air, noise-free − method (HU): "
          + ", ".join(f"{m} {sums[m]['air (< -950 HU)'][2] / max(sums[m]['air (< -950 HU)'][1], 1):+.2f}"
                      for m in labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Which slices' LDCT noise does each method pass into its output, and where?

A simulation knows every image's noise: the LDCT's is ``LDCT − noise-free`` on each slice. This
fits, per region (the open air around the body; soft tissue, −300…300 HU eroded), each method's
error against the noise-free image as a least-squares mix of the LDCT noise of the slice itself
and of its two neighbours, and reports the weights and the rms of what is left (blur, bias,
texture the method made). CLEAR-Net reads the neighbours as context: their *anatomy* is what it is
for, but their noise is independent of the slice's (and of its NDCT's), so any weight on it is
error against either reference. The NDCT row is the yardstick: it keeps a fraction ≈ dose of the
slice's own LDCT noise (noise insertion) and none of the neighbours'.

    python Testing/benchmarks/noise_passthrough.py --dose 0.25 --case 0 1 2 --what-if \\
        --model "CoreDiff=corediff-25-w32" --redcnn "RED-CNN=Testing/benchmarks/models/redcnn32-gpu-25.pt"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from air_texture import open_air  # noqa: E402
from quality_benchmark import default_cache, held_out, soft_tissue_mask  # noqa: E402
from ssim_regions import denoisers  # noqa: E402


def open_air_mask(truth: np.ndarray) -> np.ndarray:
    """:func:`air_texture.open_air` of each slice of a noise-free volume."""
    return np.stack([open_air(s) for s in truth])


#: region -> its mask over a noise-free volume (soft tissue as the quality tables' k / rest use it)
REGIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"open air": open_air_mask, "soft tissue": soft_tissue_mask}


class Passthrough(NamedTuple):
    """Least-squares weights of a slice's error on the LDCT noise of the slice and its neighbours."""
    centre: float
    previous: float
    following: float
    rest: float  # rms (HU) of the error the three do not explain


def passthrough(out: np.ndarray, ldct: np.ndarray, truth: np.ndarray, k: int, mask: np.ndarray) -> Passthrough:
    """Fit ``out[k] − truth[k]`` over ``mask`` by the LDCT noise of slices k, k − 1 and k + 1."""
    noise = [(ldct[j] - truth[j])[mask] for j in (k, k - 1, k + 1)]
    x = np.stack(noise, axis=1).astype(np.float64)
    y = (out[k] - truth[k])[mask].astype(np.float64)
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    return Passthrough(*map(float, w), float(np.sqrt(np.mean((y - x @ w) ** 2))))


def what_if(out: np.ndarray, ldct: np.ndarray, ndct: np.ndarray, truth: np.ndarray, k: int,
            air: np.ndarray, fit: Passthrough) -> dict[str, tuple]:
    """Slice k's metrics as it is and with one defect undone, to size what fixing each would be worth:
    the neighbours' noise (``fit``, fitted over the open air ``air``) taken out there or everywhere,
    or the open air's mean level set to the truth's. Diagnostics that use the noise-free image: not methods."""
    from CoreDiffLib.metrics import psnr, rmse_hu, ssim
    neighbours = fit.previous * (ldct[k - 1] - truth[k - 1]) + fit.following * (ldct[k + 1] - truth[k + 1])
    in_air, leveled = out[k].copy(), out[k].copy()
    in_air[air] -= neighbours[air]
    leveled[air] -= (out[k][air] - truth[k][air]).mean()
    variants = {"as it is": out[k], "neighbours' noise out of the open air": in_air,
                "neighbours' noise out everywhere (air fit)": out[k] - neighbours,
                "open air's level set to the truth's": leveled}
    return {name: (psnr(v, ndct[k]), ssim(v, ndct[k]), rmse_hu(v, ndct[k]), psnr(v, truth[k]), ssim(v, truth[k]),
                   rmse_hu(v, truth[k])) for name, v in variants.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dose", type=float, default=0.25)
    p.add_argument("--split", choices=("test", "validation"), default="validation")
    p.add_argument("--case", type=int, nargs="+", default=[0],
                   help="which held-out phantoms (0 abdomen, 1 thorax, 2 head)")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=MODEL[:STEPS]")
    p.add_argument("--redcnn", action="append", default=[], metavar="LABEL=FILE")
    p.add_argument("--what-if", action="store_true",
                   help="also each method's metrics over the cases with one defect undone (see what_if)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cases = held_out(a.dose, default_cache(a.split, 6), slices=6, split=a.split)
    methods = denoisers(a.model, a.redcnn)
    scores: dict[str, dict[str, list[tuple]]] = {}
    for case in a.case:
        name, ndct, ldct, truth = cases[case]
        images = {"NDCT": ndct}
        images.update({label: denoise(ldct) for label, denoise in methods.items()})
        inner = range(1, ndct.shape[0] - 1)  # slices with both neighbours
        masks = {region: mask_of(truth) for region, mask_of in REGIONS.items()}  # once per case, for every method
        print(f"LDCT noise passed through, {name} ({a.split}, {a.dose:g} dose, {len(inner)} inner slices): "
              "weights on the slice's own LDCT noise and on each neighbour's; rest = rms of the error "
              "against the noise-free image they do not explain (HU)\n")
        print("| image | " + " | ".join(f"{r}: own / previous / next | rest" for r in REGIONS) + " |")
        print("|---|" + "---|---|" * len(REGIONS))
        for label, image in images.items():
            fits = {region: [passthrough(image, ldct, truth, k, mask[k]) for k in inner]
                    for region, mask in masks.items()}
            cells = []
            for region_fits in fits.values():
                m = Passthrough(*np.mean(region_fits, axis=0))
                cells.append(f"{m.centre:.3f} / {m.previous:+.3f} / {m.following:+.3f} | {m.rest:.2f}")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
            if a.what_if and label != "NDCT":
                for k, air_fit in zip(inner, fits["open air"]):
                    for variant, metrics in what_if(image, ldct, ndct, truth, k, masks["open air"][k], air_fit).items():
                        scores.setdefault(label, {}).setdefault(variant, []).append(metrics)
        print()
    if scores:
        print(f"What each defect is worth ({a.split}, {a.dose:g} dose, cases {a.case}, inner slices; diagnostics "
              "that use the noise-free image, not methods): against the NDCT → against the noise-free image\n")
        print("| method | variant | PSNR / SSIM / RMSE (HU) vs NDCT | PSNR / SSIM / RMSE (HU) vs noise-free |")
        print("|---|---|---|---|")
        for label, variants in scores.items():
            for variant, rows in variants.items():
                m = np.mean(rows, axis=0)
                print(f"| {label} | {variant} | {m[0]:.2f} / {m[1]:.5f} / {m[2]:.2f} | {m[3]:.2f} / {m[4]:.5f} / "
                      f"{m[5]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Unpaired one-shot adaptation with a normal-dose slice of another grid than the low-dose scan's.

A user's unpaired reference is often another scanner's or protocol's: a wider or narrower field
of view, another matrix. :func:`CoreDiffLib.oneshot.adapt` puts it on the low-dose grid
(resampled to its pixel size, centred, air beyond its own field of view) before the texture
fit. This script measures what that gives on simulated abdomen phantoms:

* the reference: one LDCT slice (seed 8999) at ``--dose``, ``--size`` pixels over 380 mm;
* unpaired targets: normal-dose slices of other phantoms (or of the reference two slices on), at
  the same grid, a wider field of view, 1.5x and 0.75x the matrix over the same field, and a
  centre crop (a narrower field of view);
* scored: the blend's RMSE (HU, [-1000, 1000]) against the NDCT on the middle slices of two
  held-out phantoms (seeds 9000, 9001), beside no adaptation (the last step; the uniform blend)
  and a paired fit.

    python Testing/benchmarks/oneshot_grid.py --model corediff-25-w32 --dose 0.1 --out grid.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from CoreDiffLib.adaptations import combine_steps  # noqa: E402
from CoreDiffLib.atomic import write_text_atomic  # noqa: E402
from CoreDiffLib.intensity import unit_to_hu  # noqa: E402
from CoreDiffLib.models import load_model  # noqa: E402
from CoreDiffLib.oneshot import adapt, reference_step_outputs  # noqa: E402
from CoreDiffLib.simulation import make_phantom, simulate_ldct  # noqa: E402

FOV_MM = 380.0


def simulate(seed: int, size: int, pixel_mm: float, dose: float, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """(LDCT, NDCT) HU volumes of an abdomen phantom."""
    hu, _ = make_phantom("abdomen", slices, size, pixel_mm=pixel_mm, seed=seed)
    return simulate_ldct(hu, dose, pixel_mm=pixel_mm, seed=seed, return_ndct=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="corediff-25-w32")
    p.add_argument("--dose", type=float, default=0.1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    n, px = a.size, FOV_MM / a.size
    model = load_model(a.model, "cpu")
    ref_ldct, ref_ndct = simulate(8999, n, px, a.dose, 5)
    tests = [simulate(9000 + k, n, px, a.dose, 3) for k in range(2)]
    test_steps = [reference_step_outputs(model, ldct, 1) for ldct, _ in tests]

    def rmse(logits) -> float:
        errors = []
        for steps, (_, ndct) in zip(test_steps, tests):
            out = np.clip(unit_to_hu(combine_steps(steps, torch.tensor(logits))[0].numpy()), -1000, 1000)
            errors.append(float(np.sqrt(np.mean((out - np.clip(ndct[1], -1000, 1000)) ** 2))))
        return float(np.mean(errors))

    wide = min(int(n * 1.25), int(0.99 * 474 / px)) // 2 * 2  # the geometry sees 474 mm across
    fine, coarse = int(n * 1.5), int(n * 0.75)
    crop = int(n * 0.75) // 2 * 2
    o = (n - crop) // 2
    targets = {  # name: (NDCT slice, its pixel size in mm)
        "same grid, the reference two slices on": (ref_ndct[4], px),
        "same grid, another phantom": (simulate(8998, n, px, a.dose, 3)[1][1], px),
        f"wider field of view ({wide} px, same pixel size)": (simulate(8997, wide, px, a.dose, 3)[1][1], px),
        f"1.5x the matrix ({fine} px, same field)": (simulate(8996, fine, FOV_MM / fine, a.dose, 3)[1][1],
                                                     FOV_MM / fine),
        f"0.75x the matrix ({coarse} px, same field)": (simulate(8995, coarse, FOV_MM / coarse, a.dose, 3)[1][1],
                                                        FOV_MM / coarse),
        f"narrower field of view ({crop} px centre crop)": (ref_ndct[4][o:o + crop, o:o + crop], px),
    }
    T = model.config.steps
    rows = [("no adaptation (last step)", rmse([-20.0] * (T - 1) + [20.0])), ("uniform blend", rmse([0.0] * T)),
            ("paired (the reference's own NDCT)", rmse(adapt(model, ref_ldct, 2, ref_ndct, mode="paired").weights))]
    for name, (slice_hu, pixel) in targets.items():
        fit = adapt(model, ref_ldct, 2, slice_hu[None], mode="unpaired", ndct_slice=0,
                    ldct_spacing_xy=(px, px), ndct_spacing_xy=(pixel, pixel))
        rows.append((f"unpaired: {name}", rmse(fit.weights)))
        print(f"{rows[-1][0]}: {rows[-1][1]:.2f} HU", flush=True)
    lines = [f"**{a.model} at {a.dose:g} dose, {n}x{n} over {FOV_MM:.0f} mm; blend RMSE (HU) against the NDCT, "
             f"mean of 2 held-out phantoms ({time.time() - t0:.0f} s)**", "", "| method | RMSE (HU) |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(Path(a.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""How the shipped models do on thicker slice spacing than they were trained on (1 mm).

    python Testing/benchmarks/slice_spacing.py --dose 0.25 --spacings 1 3 5 > slice_spacing_25.md

Clinical series are often reconstructed at 3 or 5 mm. CLEAR-Net reads the two adjacent slices as
context, and every shipped model saw only 1 mm neighbours, so this asks what a wider neighbour
distance costs, and whether the model would do better without its neighbours there. The held-out
test phantoms (seeds 9000-9002: abdomen, thorax, head; never used in training; at 1 mm the
quality tables' own held-out set) are simulated with the same geometry and dose model, and the
same nested 25 / 10 / 5 % draw, at each spacing (the phantoms are continuous in z, so a
wider spacing samples the same anatomy further apart; the slice itself stays a thin slice, so
this isolates the neighbour distance, not a thicker slice's lower noise). Rows, scored on the
4 inner slices of 6-slice volumes against the NDCT, on the paper's window:

- the LDCT input;
- the same-budget RED-CNN, which sees one slice (so the spacing only changes its phantoms);
- the model with its real neighbours (what ``corediff denoise`` does), one step and ten;
- the model with each slice standing in for its own neighbours (no context information).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from CoreDiffLib.baselines import load_redcnn, redcnn_denoise  # noqa: E402
from CoreDiffLib.inference import Denoiser, denoise_volume  # noqa: E402
from CoreDiffLib.metrics import mean_metrics, paired_difference, volume_metrics  # noqa: E402
from CoreDiffLib.pairs import dose_tag  # noqa: E402
from quality_benchmark import default_cache, held_out  # noqa: E402

KINDS = ("abdomen", "thorax", "head")


def held_out_at(spacing_mm: float, dose: float, slices: int, split: str = "test"):
    """The quality benchmark's held-out set at one slice spacing: ``data/test-6slices`` (or
    ``val-6slices``) itself at 1 mm (the tables' own data), a set of its own (``...-3mm`` etc.)
    otherwise."""
    cache = default_cache(split, slices)
    if spacing_mm != 1.0:
        cache = cache.with_name(f"{cache.name}-{spacing_mm:g}mm")
    return held_out(dose, cache, KINDS, slices, split=split, slice_mm=spacing_mm)


def without_context(den: Denoiser, ldct: np.ndarray) -> np.ndarray:
    """Each slice denoised alone: its own context, as ``corediff denoise --context own``."""
    return denoise_volume(ldct, denoiser=den, neighbours=False)


def steps_label(n: int) -> str:
    return f"{n} step{'s' if n > 1 else ''}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dose", type=float, default=0.25)
    ap.add_argument("--model", default=None, help="default: the -w32 model of the dose")
    ap.add_argument("--spacings", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--split", choices=("test", "validation"), default="test",
                    help="the held-out phantoms: test (seeds 9000-9002) or validation (8000-8002, to choose models on)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 10], help="CoreDiff sampling steps to score")
    ap.add_argument("--redcnn", default="Testing/benchmarks/models/redcnn32-gpu2-{tag}.pt",
                    help="the same-budget RED-CNN per dose ({tag}: 25, 10, 5), a single-slice method; '' for none")
    a = ap.parse_args(argv)
    tag = dose_tag(a.dose)
    model = a.model or f"corediff-{tag}-w32"
    denoisers = {n: Denoiser.load(model, "cpu", steps=n) for n in a.steps}
    redcnn = load_redcnn(REPO / a.redcnn.format(tag=tag)) if a.redcnn else None
    inner = slice(1, a.slices - 1)
    t0 = time.perf_counter()
    seeds = "9000-9002" if a.split == "test" else "8000-8002"
    print(f"`{model}` at {a.dose:.0%} dose on the held-out {a.split} phantoms (seeds {seeds}: {', '.join(KINDS)}), "
          f"{a.slices}-slice 512² volumes at each slice spacing, scored on the {a.slices - 2} inner slices of each "
          "against the NDCT (PSNR dB / SSIM / RMSE HU on [-1000, 1000] HU). *Own slice as context*: each slice "
          "denoised alone, standing in for its own neighbours."
          + (f" RED-CNN: `{Path(a.redcnn.format(tag=tag)).name}`, the same-budget baseline, which sees one slice."
             if redcnn else "") + "\n")
    columns = ["LDCT"] + (["RED-CNN"] if redcnn else [])
    for n in a.steps:
        columns += [f"{steps_label(n)}, neighbours", f"{steps_label(n)}, own slice"]
    first = steps_label(a.steps[0])
    paired = [f"neighbours − own slice, {first}"] + ([f"neighbours − RED-CNN, {first}"] if redcnn else [])
    print("| spacing | " + " | ".join(columns + [f"{c} (PSNR, paired)" for c in paired]) + " |")
    print("|---" * (len(columns) + len(paired) + 1) + "|")
    for mm in a.spacings:
        rows: dict[str, list] = {k: [] for k in columns}
        for _name, nd, ld, _truth in held_out_at(mm, a.dose, a.slices, a.split):
            outs = {"LDCT": ld}
            if redcnn:
                outs["RED-CNN"] = redcnn_denoise(redcnn, ld)
            for n, den in denoisers.items():
                outs[f"{steps_label(n)}, neighbours"] = denoise_volume(ld, denoiser=den)
                outs[f"{steps_label(n)}, own slice"] = without_context(den, ld)
            for key, out in outs.items():
                rows[key] += volume_metrics(out[inner], nd[inner])
        cells = []
        for key in columns:
            m = mean_metrics(rows[key])
            cells.append(f"{m.psnr:.2f} / {m.ssim:.4f} / {m.rmse_hu:.2f}")
        ctx, own = f"{first}, neighbours", f"{first}, own slice"
        for other in [own] + (["RED-CNN"] if redcnn else []):
            d = paired_difference([m.psnr for m in rows[ctx]], [m.psnr for m in rows[other]])
            cells.append(f"{d.mean:+.2f} dB [{d.low:+.2f}, {d.high:+.2f}], {d.a_better}/{d.n} slices")
        print(f"| {mm:g} mm | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s on this machine (simulation included unless cached).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

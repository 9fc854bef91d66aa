#!/usr/bin/env python
"""Does an 8-fold test-time ensemble change the CoreDiff / RED-CNN ranking?

    python Testing/benchmarks/tta_benchmark.py --dose 0.25 --redcnn Testing/benchmarks/models/redcnn32-gpu-25.pt

Each inner slice of the held-out 6-slice volumes (as in quality_benchmark.py) is denoised in
its 8 rotations/flips, each result turned back and the 8 averaged. A denoiser's errors differ
between orientations while the anatomy does not, so the average cancels part of the error at
8x the cost. Both methods get the same ensemble: the question is whether it helps one more.
Prints PSNR vs NDCT per method, with and without the ensemble, and the paired gap.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from CoreDiffLib.baselines import load_redcnn  # noqa: E402
from CoreDiffLib.diffusion import sample  # noqa: E402
from CoreDiffLib.inference import context_stack  # noqa: E402
from CoreDiffLib.intensity import unit_to_hu  # noqa: E402
from CoreDiffLib.metrics import paired_difference, psnr  # noqa: E402
from CoreDiffLib.models import load_model  # noqa: E402
from quality_benchmark import default_cache, held_out  # noqa: E402

ORIENTATIONS = [(k, flip) for k in range(4) for flip in (False, True)]


def oriented_outputs(fn, stack: torch.Tensor, orientations) -> torch.Tensor:
    """fn on each orientation of a (1, C, H, W) stack, each output turned back: (N, 1, 1, H, W)."""
    outs = []
    for k, flip in orientations:
        x = torch.rot90(stack, k, (2, 3))
        x = torch.flip(x, (3,)) if flip else x
        y = fn(x)
        y = torch.flip(y, (3,)) if flip else y
        outs.append(torch.rot90(y, -k, (2, 3)))
    return torch.stack(outs)


def ensemble(outs: torch.Tensor) -> np.ndarray:
    """The ensemble of oriented_outputs' (N, 1, 1, H, W): their mean, in HU."""
    return unit_to_hu(outs.mean(0)[0, 0].numpy())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dose", type=float, default=0.25)
    p.add_argument("--model", default=None, help="CoreDiff model (default: the shipped one for the dose)")
    p.add_argument("--redcnn", required=True, help="RED-CNN weights (.pt state dict, 32 filters)")
    p.add_argument("--split", choices=("test", "validation"), default="test")
    a = p.parse_args()
    tag = f"{a.dose * 100:g}"
    cases = held_out(a.dose, default_cache(a.split, 6), slices=6, split=a.split)
    corediff = load_model(a.model or f"corediff-{tag}").eval()
    redcnn = load_redcnn(a.redcnn)
    methods = {
        "CoreDiff T=10": lambda x: sample(corediff, x).final,
        "CoreDiff T=1": lambda x: sample(corediff, x, 1).final,
        "RED-CNN": lambda x: redcnn(x[:, 1:2]).clamp(0, 1),
    }
    scores: dict[str, list[float]] = {}
    t0 = time.time()
    with torch.no_grad():
        for name, ndct, ldct, _ in cases:
            for i in range(1, ldct.shape[0] - 1):  # inner slices: both neighbours, as in the tables
                stack = torch.from_numpy(context_stack(ldct, i, i + 1))
                for label, fn in methods.items():
                    outs = oriented_outputs(fn, stack, ORIENTATIONS)  # the first is the plain output
                    scores.setdefault(label, []).append(psnr(unit_to_hu(outs[0, 0, 0].numpy()), ndct[i]))
                    scores.setdefault(f"{label} + 8-fold ensemble", []).append(psnr(ensemble(outs), ndct[i]))
            print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)  # progress: not in the table
    n = len(scores["RED-CNN"])
    print(f"\n{a.split} set, {tag} % dose, {n} inner slices, PSNR vs NDCT (dB); "
          "gap = method - RED-CNN without ensemble, paired per slice\n")
    print("| Method | PSNR | vs RED-CNN | 95 % interval |\n|---|---|---|---|")
    for label, v in scores.items():
        d = paired_difference(v, scores["RED-CNN"])
        print(f"| {label} | {np.mean(v):.2f} | {d.mean:+.2f} | [{d.low:+.2f}, {d.high:+.2f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

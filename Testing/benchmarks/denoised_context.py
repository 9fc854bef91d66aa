#!/usr/bin/env python
"""Would CLEAR-Net do better with denoised neighbours as its context? (inference only)

CLEAR-Net reads the two adjacent LDCT slices for their anatomy, and passes some of their noise
into its output (``noise_passthrough.py``). This swaps the neighbours it is given, leaving the
centre slice and the network as they are, and scores the inner slices of each held-out volume:

- the LDCT neighbours — what the network was trained on (the reference row);
- the neighbours denoised by a first pass of the same model (``--first-steps`` steps);
- the same, *echo-free*: each neighbour denoised without the centre slice in its own context
  (slice k − 1 from (k − 2, k − 1, k − 1), slice k + 1 from (k + 1, k + 1, k + 2)), so that the
  centre's noise, which a first pass passes into its neighbours, does not come back;
- oracles that use the references (not methods): the NDCT and the noise-free neighbours.

    python Testing/benchmarks/denoised_context.py --dose 0.1 --model corediff-10-w32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_benchmark import default_cache, held_out  # noqa: E402

from CoreDiffLib.inference import Denoiser, context_stack  # noqa: E402
from CoreDiffLib.intensity import hu_to_unit, unit_to_hu  # noqa: E402
from CoreDiffLib.metrics import psnr, rmse_hu, ssim  # noqa: E402


def denoise_stacks(denoiser: Denoiser, stacks: np.ndarray, steps: int | None, batch: int = 2) -> np.ndarray:
    """(N, 3, H, W) context stacks in [0, 1] -> (N, H, W) denoised, in HU, with ``steps`` steps."""
    denoiser.steps = steps
    return unit_to_hu(np.concatenate([denoiser.denoise_batch(stacks[i:i + batch])
                                      for i in range(0, len(stacks), batch)]))


def one_sided_stacks(ldct_unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's context without its next neighbour, and without its previous one.

    The missing side is the slice itself, as at a volume's ends: the first pass of a slice that
    will serve as slice k's *previous* neighbour must not see slice k.
    """
    n = len(ldct_unit)
    idx = np.arange(n)
    previous, following = ldct_unit[np.clip(idx - 1, 0, n - 1)], ldct_unit[np.clip(idx + 1, 0, n - 1)]
    return np.stack([previous, ldct_unit, ldct_unit], 1), np.stack([ldct_unit, ldct_unit, following], 1)


def with_neighbours(stacks: np.ndarray, previous_hu: np.ndarray, following_hu: np.ndarray) -> np.ndarray:
    """Inner slices' stacks (1 … n − 2 of ``stacks``) with their neighbours replaced by slices
    k − 1 of ``previous_hu`` and k + 1 of ``following_hu`` (whole volumes in HU)."""
    inner = stacks[1:-1].copy()
    inner[:, 0] = hu_to_unit(previous_hu[:-2].astype(np.float32))
    inner[:, 2] = hu_to_unit(following_hu[2:].astype(np.float32))
    return inner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dose", type=float, default=0.1)
    p.add_argument("--split", choices=("test", "validation"), default="validation")
    p.add_argument("--model", default="corediff-10-w32")
    p.add_argument("--first-steps", type=int, default=1, help="steps of the first pass that denoises the neighbours")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    denoiser = Denoiser.load(a.model, device="cpu", threads=a.threads)
    rows: dict[str, list[tuple]] = {}
    for name, ndct, ldct, truth in held_out(a.dose, default_cache(a.split, 6), slices=6, split=a.split):
        stacks = context_stack(ldct, 0, len(ldct))
        first = denoise_stacks(denoiser, stacks, a.first_steps)
        without_next, without_previous = (denoise_stacks(denoiser, s, a.first_steps)
                                          for s in one_sided_stacks(stacks[:, 1]))
        variants = {
            "LDCT neighbours (as trained)": stacks[1:-1],
            f"denoised neighbours (first pass T = {a.first_steps})": with_neighbours(stacks, first, first),
            f"echo-free denoised neighbours (first pass T = {a.first_steps})":
                with_neighbours(stacks, without_next, without_previous),
            "oracle: NDCT neighbours": with_neighbours(stacks, ndct, ndct),
            "oracle: noise-free neighbours": with_neighbours(stacks, truth, truth),
        }
        for label, inner in variants.items():
            out = denoise_stacks(denoiser, inner, None)
            for j, k in enumerate(range(1, len(ldct) - 1)):
                rows.setdefault(label, []).append((psnr(out[j], ndct[k]), ssim(out[j], ndct[k]), rmse_hu(out[j], ndct[k]),
                                                   psnr(out[j], truth[k]), ssim(out[j], truth[k]),
                                                   rmse_hu(out[j], truth[k])))
        print(f"{name} done", file=sys.stderr, flush=True)
    print(f"{a.model}, {a.split}, {a.dose:g} dose, inner slices of every case, T = {denoiser.model.config.steps} "
          "with the neighbours swapped\n")
    print("| neighbours given | PSNR / SSIM / RMSE (HU) vs NDCT | PSNR / SSIM / RMSE (HU) vs noise-free |")
    print("|---|---|---|")
    for label, r in rows.items():
        m = np.mean(r, axis=0)
        print(f"| {label} | {m[0]:.2f} / {m[1]:.5f} / {m[2]:.2f} | {m[3]:.2f} / {m[4]:.5f} / {m[5]:.2f} |")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())

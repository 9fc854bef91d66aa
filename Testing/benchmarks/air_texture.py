#!/usr/bin/env python
"""How much does each method's open air wander in local level?

SSIM's luminance factor compares Gaussian local means (σ = 1.5 px, SSIM's own window); in the
air, where the metric window's floor puts those means near 0, it is what RED-CNN's SSIM lead
over CoreDiff is made of (``ssim_regions.py``). This measures, in the open air of one held-out
phantom (pixels ~20 px or more from anything denser than −950 HU in the noise-free image), how
much each image's local mean varies, how far it is from the NDCT's (on average and in spread: the
luminance factor pays ~0.0025 x the mean square, HU²), and how correlated with it.

    python Testing/benchmarks/air_texture.py --dose 0.25 --model "CoreDiff=corediff-25-w32" \\
        --model "CoreDiff 1 step=corediff-25-w32:1" \\
        --redcnn "RED-CNN=Testing/benchmarks/models/redcnn32-gpu-25.pt"

A conditional-mean estimate of the NDCT wanders less than the NDCT itself; more than that is
texture the method made or kept, none of which the NDCT shares.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_benchmark import default_cache, held_out  # noqa: E402
from ssim_regions import denoisers  # noqa: E402
from CoreDiffLib.intensity import METRIC_WINDOW_HU  # noqa: E402
from CoreDiffLib.metrics import ssim_local_mean as local_mean  # noqa: E402


def open_air(truth: np.ndarray, margin: int = 8) -> np.ndarray:
    """Air at least ~20 px from anything denser than −950 HU, away from the image border."""
    near_body = gaussian_filter((truth > -950).astype(np.float64), 8) >= 1e-3
    mask = ~near_body
    mask[:margin] = mask[-margin:] = False
    mask[:, :margin] = mask[:, -margin:] = False
    return mask


class AirTexture(NamedTuple):
    """One image's open air against the NDCT's, HU."""
    level: float      # mean + 1000 (unclipped)
    spread: float     # std of the local mean
    offset: float     # mean of the clipped local-mean difference to the NDCT
    off_std: float    # std of that difference
    corr: float       # correlation of the local means with the NDCT's

    @property
    def off_rms(self) -> float:
        """What SSIM's luminance factor pays for in the air: ~0.0025 x rms² (``metrics.ssim_terms``)."""
        return float(np.hypot(self.offset, self.off_std))


def air_texture(out: np.ndarray, ndct: np.ndarray, mask: np.ndarray) -> AirTexture:
    """How one slice's open air (``mask``) compares with the NDCT's, in local level.

    The offset is there even for an unbiased image: the window's floor (−1000 HU) cuts the
    NDCT's pixel noise in half, so its clipped air sits ~σ/√(2π) above −1000, and an image
    smoother than the NDCT sits lower once clipped."""
    lm, lm_ref = local_mean(out), local_mean(ndct)
    diff = local_mean(np.clip(out, *METRIC_WINDOW_HU)) - local_mean(np.clip(ndct, *METRIC_WINDOW_HU))
    spread, spread_ref = float(lm[mask].std()), float(lm_ref[mask].std())
    # a perfectly flat image has no correlation to speak of
    corr = float(np.corrcoef(lm[mask], lm_ref[mask])[0, 1]) if spread > 0 and spread_ref > 0 else float("nan")
    return AirTexture(float(out[mask].mean()) + 1000.0, spread, float(diff[mask].mean()), float(diff[mask].std()),
                      corr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dose", type=float, default=0.25)
    p.add_argument("--split", choices=("test", "validation"), default="validation")
    p.add_argument("--case", type=int, default=0, help="which held-out phantom (0 abdomen, 1 thorax, 2 head)")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=MODEL[:STEPS]")
    p.add_argument("--redcnn", action="append", default=[], metavar="LABEL=FILE")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    name, ndct, ldct, truth = held_out(a.dose, default_cache(a.split, 6), slices=6, split=a.split)[a.case]
    images = {"NDCT": ndct, "LDCT": ldct}
    images.update({label: denoise(ldct) for label, denoise in denoisers(a.model, a.redcnn).items()})
    inner = range(1, ndct.shape[0] - 1)
    print(f"Open air of {name} ({a.split}, {a.dose:g} dose, {len(inner)} inner slices), HU\n")
    print("| image | mean + 1000 | local-mean std | clipped local-mean difference to the NDCT: mean "
          "| its std | its rms | correlation of the local means with the NDCT's |")
    print("|---|---|---|---|---|---|---|")
    for label, image in images.items():
        rows = [air_texture(image[k], ndct[k], open_air(truth[k])) for k in inner]
        m = AirTexture(*np.mean(rows, axis=0))
        rms = float(np.sqrt(np.mean([r.off_rms ** 2 for r in rows])))
        print(f"| {label} | {m.level:+.2f} | {m.spread:.2f} | {m.offset:+.2f} | {m.off_std:.2f} | {rms:.2f} "
              f"| {m.corr:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

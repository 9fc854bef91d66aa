#!/usr/bin/env python
"""Mean level of each sampler step's x0_hat in air and soft tissue, against the noise-free phantom.

Run from the repository root on the validation phantoms that quality_benchmark.py simulates:

    python docs/benchmarks/air_patches/step_levels.py corediff-10-w32 --dose-tag 10 [--local-emm]

``--local-emm`` is the probe of the README: the error-modulated module averages its features over
a sliding 7 x 7 window at 1/8 resolution (56 pixels, about a 64² training patch) instead of the
whole slice, to test whether pooling over a 512² slice, two thirds air, causes the bias.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from CoreDiffLib.diffusion import sample
from CoreDiffLib.intensity import hu_to_unit, unit_to_hu
from CoreDiffLib.io import read_volume
from CoreDiffLib.metrics import psnr, ssim
from CoreDiffLib.models import load_model
from CoreDiffLib.network import ClearNet, sinusoidal_embedding


def local_emm_forward(self: ClearNet, x, t, x0_prev=None, xT=None, window: int = 7):
    """ClearNet.forward with the EMM's global average replaced by a sliding-window one."""
    h, w = x.shape[-2:]
    sizes = [(h, w), (h // 2, w // 2), (h // 2, w // 2), (h, w)]
    temb = self.time_mlp(sinusoidal_embedding(t, self.config.time_dim))
    feats = [proj(temb)[:, :, None, None] for proj in self.time_proj]
    if self.emm is not None and x0_prev is not None:
        pair = torch.cat([self._normalise(x0_prev), self._normalise(xT)], dim=1)
        local = []
        for f, emm, size in zip(feats, self.emm, sizes):
            m = F.avg_pool2d(emm.features(pair), window, stride=1, padding=window // 2, count_include_pad=False)
            gamma, beta = m.chunk(2, dim=1)
            local.append(F.interpolate(gamma * f + beta, size=size, mode="bilinear", align_corners=False))
        feats = local
    f1, f2, f3, f4 = feats
    c = self.centre_channel
    scale = self.config.hu_scale / 4096.0 if self.config.hu_scale else 1.0
    x_in, x = x, self._normalise(x)
    h1 = self.enc1(x) + f1
    h2 = self.enc2(F.avg_pool2d(h1, 2)) + f2
    h3 = self.enc3(F.avg_pool2d(h2, 2))
    d2 = self.dec2(self.up2(h3) + h2) + f3
    d1 = self.dec1(self.up1(d2) + h1) + f4
    return self.out(d1) * scale + x_in[:, c:c + 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--dose-tag", default="10")
    p.add_argument("--cases", nargs="+", default=["val8000_abdomen", "val8002_head"])
    p.add_argument("--slice", type=int, default=2)
    p.add_argument("--local-emm", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.local_emm:
        ClearNet.forward = local_emm_forward
    model = load_model(a.model).eval()
    k = a.slice
    for case in a.cases:
        def vol(kind: str):
            return read_volume(f"data/val-6slices/{case}_{kind}.nrrd").array
        ndct, ldct, truth = vol("ndct"), vol(f"ldct{a.dose_tag}"), vol("noisefree")
        regions = {"air": truth[k] < -950, "soft tissue": (truth[k] > -300) & (truth[k] < 300)}
        res = sample(model, torch.from_numpy(hu_to_unit(ldct[k - 1:k + 2]))[None])
        for name, mask in regions.items():
            levels = [float(unit_to_hu(step[0, 0].numpy())[mask].mean() - truth[k][mask].mean()) for step in res.steps]
            print(f"{case} {name}: method − noise-free per step (HU): " + " ".join(f"{v:+.2f}" for v in levels))
        out = unit_to_hu(res.final[0, 0].numpy())
        print(f"{case}: PSNR {psnr(out, ndct[k]):.3f} dB, SSIM {ssim(out, ndct[k]):.4f} against the NDCT")


if __name__ == "__main__":
    main()

"""Baselines the quality benchmark compares CoreDiff against.

* **RED-CNN** (Chen et al., IEEE TMI 2017): a residual encoder-decoder CNN, the classic
  supervised LDCT denoiser — 5 valid 5x5 convolutions and 5 transposed convolutions with
  96 filters in the paper (32 in the benchmarks here: ``scripts/train_redcnn.py --filters``)
  and three residual shortcuts. Trained here on the same data and patches as
  CoreDiff, in no more CPU time, with a plain MSE loss and CLEAR-Net's normalisation.
* **BM3D** (the ``bm3d`` package): non-learned collaborative filtering; its noise sigma is
  tuned on training data by :func:`tune_bm3d_sigma`.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from . import CoreDiffError
from .atomic import StopRequests
from .intensity import hu_to_unit, unit_to_hu
from .training import (LR_SCHEDULES, MSE_ONLY, TRAIN_PRECISIONS, LossTerms, PairedSlices, check_choice, cosine_lr,
                       restoration_loss, run_progress)


class REDCNN(nn.Module):
    """RED-CNN, given the two training aids CLEAR-Net has (see :mod:`network`).

    Inputs are normalised inside (0 HU -> 0, ``hu_scale`` HU -> 1) and the last layer starts at
    zero, so a new RED-CNN is the identity and learns only the correction. Without them it
    learned so slowly on a CPU budget that it scored below its own input; with them the
    comparison measures the architectures, not the set-up. ``hu_scale=0`` is the original.
    """

    def __init__(self, filters: int = 96, hu_scale: float = 200.0):
        super().__init__()
        self.hu_scale = hu_scale
        self.enc = nn.ModuleList([nn.Conv2d(1 if i == 0 else filters, filters, 5) for i in range(5)])
        self.dec = nn.ModuleList([nn.ConvTranspose2d(filters, 1 if i == 4 else filters, 5) for i in range(5)])
        if hu_scale:
            nn.init.zeros_(self.dec[4].weight)
            nn.init.zeros_(self.dec[4].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = (4096.0 / self.hu_scale, 1024.0 / 4096.0) if self.hu_scale else (1.0, 0.0)
        x = (x - offset) * scale
        r1 = x
        h = F.relu(self.enc[0](x))
        h = F.relu(self.enc[1](h))
        r2 = h
        h = F.relu(self.enc[2](h))
        h = F.relu(self.enc[3](h))
        r3 = h
        h = F.relu(self.enc[4](h))
        h = self.dec[0](h) + r3
        h = self.dec[1](F.relu(h))
        h = F.relu(self.dec[2](F.relu(h)) + r2)
        h = self.dec[3](h)
        h = self.dec[4](F.relu(h)) + r1
        return F.relu(h / scale + offset)  # the original's output ReLU: nothing below -1024 HU


#: the smallest patch side RED-CNN takes: its five 5 x 5 convolutions are unpadded
REDCNN_MIN_SIZE = 21


def train_redcnn(pairs: Sequence[tuple[np.ndarray, np.ndarray]], iterations: int, batch_size: int = 8,
                 patch_size: int = 64, lr: float = 1e-4, seed: int = 0, filters: int = 96,
                 log: Callable[[str], None] = print, init_state: dict[str, torch.Tensor] | None = None,
                 time_limit_s: float = 0.0, lr_schedule: str = "constant", device: str = "cpu",
                 precision: str = "fp32", loss_terms: LossTerms = MSE_ONLY,
                 anywhere_share: float = 0.0) -> REDCNN:
    """Supervised MSE training on the same patch sampler CoreDiff uses.

    ``init_state``, ``time_limit_s`` and a cosine ``lr_schedule`` give RED-CNN the fine-tuning
    recipe CoreDiff's 10 % and 5 % models get (start from the 25 % weights, a fixed number of
    CPU minutes, lr decayed to 0 by the time limit), so both are compared on the same budget.
    ``device`` and ``precision`` ("bf16": autocast) match CoreDiff's GPU training, for the same
    reason, and ``loss_terms`` and ``anywhere_share`` its optional loss terms and air patches
    (see ``training.LossTerms`` and ``training.PairedSlices``). The model comes back on
    the CPU.
    """
    check_choice("--lr-schedule", lr_schedule, LR_SCHEDULES)
    check_choice("--precision", precision, TRAIN_PRECISIONS)
    loss_terms.check_patch_size(patch_size)
    if loss_terms.context_noise_weight:
        raise CoreDiffError("RED-CNN sees one slice, not its neighbours: the context-noise term does not apply")
    if iterations < 0:
        raise CoreDiffError(f"--iterations {iterations}: give 0 or more (0: the starting weights as they are)")
    smallest = min(min(np.shape(ldct)[1:]) for _, ldct in pairs) if len(pairs) else 0
    if min(patch_size or smallest, smallest) < REDCNN_MIN_SIZE:  # five 5 x 5 convolutions without padding
        raise CoreDiffError(f"RED-CNN needs patches of at least {REDCNN_MIN_SIZE} pixels: --patch-size {patch_size}"
                            f" and slices of {smallest} pixels give fewer")
    torch.manual_seed(seed)
    model = REDCNN(filters)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    autocast = torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                              dtype=torch.bfloat16, enabled=precision == "bf16")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = PairedSlices(pairs, patch_size, seed=seed, anywhere_share=anywhere_share, multiple=1)  # no pooling
    t0 = time.time()
    # Ctrl-C / SIGTERM (a lent machine's limit): the iteration in hand ends and the weights so far come
    # back, as CoreDiff's training keeps its own (an equal-budget round came back with one side only)
    with StopRequests() as stop:
        for it in range(1, iterations + 1):
            if lr_schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(lr, run_progress(it, iterations, time.time() - t0, time_limit_s))
            ctx, tgt = data.batch(batch_size)
            with autocast:
                loss = restoration_loss(model(ctx[:, 1:2].to(device)).float(), tgt.to(device), loss_terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % 100 == 0:
                log(f"RED-CNN iter {it}/{iterations} loss {float(loss.detach()):.3e} "
                    f"({it / (time.time() - t0):.2f} it/s)")
            if stop.requested:
                log(f"RED-CNN stopped at iteration {it}: interrupted ({signal.Signals(stop.signum).name}); "
                    "the weights so far are kept")
                break
            if time_limit_s and time.time() - t0 > time_limit_s:
                log(f"RED-CNN stopped at iteration {it}: time limit {time_limit_s / 60:.1f} min")
                break
    return model.cpu().eval()


def load_redcnn(path: str | Path) -> REDCNN:
    """A RED-CNN saved by ``scripts/train_redcnn.py`` (a state dict), on the CPU, in eval mode;
    its number of filters read from the weights."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = REDCNN(int(state["enc.0.weight"].shape[0]))
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def redcnn_denoise(model: REDCNN, volume_hu: np.ndarray) -> np.ndarray:
    """Slice by slice; each slice needs at least REDCNN_MIN_SIZE pixels a side (valid convolutions)."""
    if min(volume_hu.shape[-2:]) < REDCNN_MIN_SIZE:
        raise CoreDiffError(f"RED-CNN needs slices of at least {REDCNN_MIN_SIZE} x {REDCNN_MIN_SIZE} pixels: "
                            f"these are {volume_hu.shape[-2]} x {volume_hu.shape[-1]}")
    out = np.empty(volume_hu.shape, np.float32)
    for k, sl in enumerate(volume_hu):
        x = torch.from_numpy(hu_to_unit(sl))[None, None]
        out[k] = unit_to_hu(model(x)[0, 0].clamp(0, 1).numpy())
    return out


def bm3d_denoise(volume_hu: np.ndarray, sigma_hu: float) -> np.ndarray:
    """Slice-wise BM3D of a (slices, rows, cols) volume in the [0, 1] network range with a noise
    level given in HU."""
    if np.ndim(volume_hu) != 3:
        raise CoreDiffError(f"bm3d_denoise takes a (slices, rows, cols) volume, not shape {np.shape(volume_hu)} "
                            "(one slice: volume[None])")
    try:
        import bm3d
    except ImportError:
        raise CoreDiffError("the BM3D baseline needs the bm3d package: pip install 'bm3d>=4.0' (what the "
                            "checkout's pip install '.[baselines]' adds)") from None
    out = np.empty(volume_hu.shape, np.float32)
    for k, sl in enumerate(volume_hu):
        out[k] = unit_to_hu(bm3d.bm3d(hu_to_unit(sl), sigma_psd=sigma_hu / 4096.0))
    return out


def tune_bm3d_sigma(ldct_hu: np.ndarray, ndct_hu: np.ndarray, candidates: Sequence[float],
                    metric: Callable[[np.ndarray, np.ndarray], float]) -> tuple[float, dict[float, float]]:
    """Pick the sigma (HU) that maximises ``metric`` (e.g. PSNR) on training slices."""
    scores = {s: float(np.mean([metric(bm3d_denoise(l[None], s)[0], n)
                                for l, n in zip(ldct_hu, ndct_hu)])) for s in candidates}
    return max(scores, key=scores.get), scores

"""Training CLEAR-Net with CoreDiff's two-stage loss.

Stage I teaches the network to restore x0 from a state x_t = D(x0, xT, t). Stage II feeds
it its own Stage-I estimate (re-degraded to t-1) with EMM switched on, so the network learns
to correct the error it will meet at sampling time. Loss = 0.5 MSE_I + 0.5 MSE_II, gradients
through both. The network is fully convolutional, so it trains on patches (cheap on a CPU)
and runs on whole slices. Runs unchanged under ``torchrun`` (DistributedDataParallel).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import CoreDiffError
from .atomic import StopRequests, atomic_path
from .degradation import alpha_schedule, degrade
from .diffusion import network_input
from .intensity import HU_MAX, HU_MIN, HU_RANGE, METRIC_WINDOW_HU, hu_to_unit
from .network import ClearNet, NetworkConfig


LR_SCHEDULES = ("constant", "cosine")
T_SAMPLINGS = ("uniform", "late")
TRAIN_PRECISIONS = ("fp32", "bf16")  # autocast in training; runtime.PRECISIONS are for running a model


def check_share(flag: str, what: str, value: float) -> None:
    """Refuse a share outside [0, 1] (nan included), naming the option and what it shares out."""
    if not 0.0 <= value <= 1.0:
        raise CoreDiffError(f"{flag} {value}: {what} must be in [0, 1]")


def check_choice(flag: str, value: str, choices: Sequence[str]) -> None:
    """Refuse a value that is not one of ``choices``, naming the option and listing them."""
    if value not in choices:
        raise CoreDiffError(f"{flag} {value!r}: give one of {', '.join(choices)}")


def check_neighbour_gap(value: float) -> None:
    """Refuse a largest neighbour gap that is not a whole number of slices >= 1."""
    if not (value >= 1 and float(value).is_integer()):
        raise CoreDiffError(f"--max-neighbour-gap {value}: the largest neighbour gap must be a whole number of "
                            "slices >= 1 (1, the default, is the adjacent slices)")


@dataclass
class TrainConfig:
    """How a run trains. Every field is checked when the value is made (and again by ``train``,
    in case one was changed since), so a bad one is refused before any data are read or anything
    is written. The messages name the ``corediff train`` option of the same name
    (``own_slice_share`` is ``--own-slice-share``), or the field where there is none.
    """

    iterations: int = 150_000
    batch_size: int = 8
    patch_size: int = 64          # 0 = whole slices
    lr: float = 2e-4
    ema_decay: float = 0.995
    ema_every: int = 10
    ema_start: int = 2000         # before this iteration the EMA is a plain copy
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    threads: int = 0              # torch CPU threads, 0 = torch default
    keep_every: int = 0           # also keep a snapshot NAME.itN.ckpt every N iterations (0 = never)
    precision: str = "fp32"       # "bf16": autocast matmuls/convs (GPU training, ~2-3x faster there)
    time_limit_s: float = 0.0     # stop (and checkpoint) after this much training time, over resumed legs; 0 = none
    lr_schedule: str = "constant"  # one of LR_SCHEDULES; "cosine": decay to 0 over the iterations or the time limit
    t_sampling: str = "uniform"   # "late": p(t) ∝ t + 1, see time_index_probabilities
    ssim_weight: float = 0.0      # > 0: add ssim_weight x (1 - SSIM) to the MSE, see restoration_loss
    anywhere_share: float = 0.0   # share of patches drawn anywhere, air included, see PairedSlices
    max_neighbour_gap: int = 1    # > 1: neighbours 1..N slices away, for thicker spacing, see PairedSlices
    own_slice_share: float = 0.0  # share of patches whose context is the slice itself, see PairedSlices
    level_weight: float = 0.0     # > 0: add level_weight x the MSE of local levels, see restoration_loss
    level_window: str = "block8"  # which local levels: one of LEVEL_WINDOWS
    context_noise_weight: float = 0.0  # > 0: penalise the output's response to the neighbours' noise
    context_noise_region: str = "everywhere"  # where: one of CONTEXT_NOISE_REGIONS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise CoreDiffError, naming the option, for the first field out of its range."""
        for flag, value, least in (("--iterations", self.iterations, 1), ("--batch-size", self.batch_size, 1),
                                   ("--checkpoint-every", self.checkpoint_every, 1),
                                   ("log_every", self.log_every, 1), ("ema_every", self.ema_every, 1),
                                   ("--ema-start", self.ema_start, 0), ("--threads", self.threads, 0),
                                   ("--keep-every", self.keep_every, 0)):
            if not (value >= least and float(value).is_integer()):  # nan, inf too
                raise CoreDiffError(f"{flag} {value}: give a whole number >= {least}")
        if not (self.patch_size >= 0 and float(self.patch_size).is_integer()):
            raise CoreDiffError(f"--patch-size {self.patch_size}: give a size in pixels, or 0 for whole slices")
        if self.patch_size % PATCH_MULTIPLE or 0 < self.patch_size < 2 * PATCH_MULTIPLE:  # it crashed mid-run
            raise CoreDiffError(f"--patch-size {self.patch_size}: give a multiple of {PATCH_MULTIPLE} (CLEAR-Net "
                                f"halves a patch twice), at least {2 * PATCH_MULTIPLE}, or 0 for whole slices")
        if not self.lr > 0:  # also refuses nan
            raise CoreDiffError(f"--lr {self.lr}: give a learning rate > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CoreDiffError(f"ema_decay {self.ema_decay}: give a decay in [0, 1)")
        if not self.time_limit_s >= 0:
            raise CoreDiffError(f"--time-limit {self.time_limit_s / 60:g} min: give minutes >= 0 (0 = no limit)")
        check_choice("--lr-schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("--t-sampling", self.t_sampling, T_SAMPLINGS)
        check_choice("--precision", self.precision, TRAIN_PRECISIONS)
        check_share("--anywhere-share", "the share of patches drawn anywhere", self.anywhere_share)
        check_share("--own-slice-share", "the share of patches with their own slice as context",
                    self.own_slice_share)
        check_neighbour_gap(self.max_neighbour_gap)
        self.loss_terms.check_patch_size(self.patch_size)  # making the terms checks their weights

    @property
    def loss_terms(self) -> "LossTerms":
        """The loss fields as one value (kept flat here: manifests and checkpoints store them so)."""
        return LossTerms(self.ssim_weight, self.level_weight, self.level_window, self.context_noise_weight,
                         self.context_noise_region)


# ----------------------------------------------------------------------------- data
#: CLEAR-Net pools twice: a training patch's side must divide by this
PATCH_MULTIPLE = 4

#: below this (HU) a pixel counts as air: for the patch re-draw and the context-noise term's "air" region
AIR_HU = -900.0
AIR_UNIT = float(hu_to_unit(np.float32(AIR_HU)))  # the same in network units


def patch_size_used(pairs: Sequence[tuple[np.ndarray, np.ndarray]], patch_size: int,
                    multiple: int = PATCH_MULTIPLE) -> int:
    """One patch size for every pair (a batch stacks them): at most the smallest slice's side,
    and a multiple of ``multiple`` (CLEAR-Net's two poolings; 1 for a network without any)."""
    smallest = min(min(ldct.shape[1:]) for _, ldct in pairs)
    patch = min(patch_size or smallest, smallest)
    return patch - patch % multiple


def farthest_neighbour_mm(pairs: Sequence[tuple[np.ndarray, np.ndarray]], slice_mm: Sequence[float],
                          max_neighbour_gap: int) -> float:
    """How far apart (mm) the farthest neighbours :class:`PairedSlices` shows are: a gap of g
    slices needs a volume of more than 2g slices, so short volumes show only nearer ones."""
    return max(max(1, min(max_neighbour_gap, (ldct.shape[0] - 1) // 2)) * float(mm)
               for (_, ldct), mm in zip(pairs, slice_mm))


def _hu_to_unit_in_place(hu: np.ndarray) -> np.ndarray:
    """:func:`~CoreDiffLib.intensity.hu_to_unit` written over a float32 array (no second copy of
    a training set in memory); other arrays are converted into a new one."""
    if not (isinstance(hu, np.ndarray) and hu.dtype == np.float32 and hu.flags.writeable):
        return hu_to_unit(hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu -= HU_MIN
    hu /= HU_RANGE
    return hu


class PairedSlices:
    """Paired NDCT / LDCT volumes in [0, 1], sampled as random (context, target) patches.

    Neighbours come from the LDCT volume with edges replicated, exactly as at inference.
    Patches that are almost all air are re-drawn: they dominate CT FOVs and hold little to
    learn. Little is not nothing: a model that never sees open air may sample it a few HU off,
    and air is most of a slice's SSIM. ``anywhere_share`` of the patches skip the re-draw and
    so show the air in its true proportion.

    ``max_neighbour_gap`` N > 1 takes the two neighbours g slices away, g drawn from 1..N per
    patch: thin-slice training volumes then show the model what neighbours 3 or 5 mm away look
    like (most clinical series), where anatomy changes between them more than across 1 mm.

    ``own_slice_share`` of the patches have the slice itself as both neighbours, which is how
    inference runs thick-slice series (``inference.uses_neighbours``) and a volume's end slices:
    a model that only ever saw real neighbours leans on them to tell noise from anatomy, and with
    three copies of one noisy slice it may take noise for anatomy. Measured at 0.5 (55 min from
    ``corediff-25-w32``): +0.1 dB on thick slices, -0.15 dB on 1 mm ones, so no shipped model
    uses it (docs/benchmarks/real_anatomy).
    """

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], patch_size: int = 64,
                 seed: int = 0, anywhere_share: float = 0.0, max_neighbour_gap: int = 1,
                 own_slice_share: float = 0.0, multiple: int = PATCH_MULTIPLE, in_place: bool = False):
        if not pairs:
            raise CoreDiffError("no training pairs: give at least one NDCT/LDCT pair")
        check_share("--anywhere-share", "the share of patches drawn anywhere", anywhere_share)
        check_share("--own-slice-share", "the share of patches with their own slice as context", own_slice_share)
        check_neighbour_gap(max_neighbour_gap)
        self.pairs = []
        arrays = [a for pair in pairs for a in pair]
        if in_place and any(np.may_share_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:]):
            in_place = False  # one NDCT for several doses, or views of one volume: converted twice in place
        for ndct, ldct in pairs:
            if ndct.shape != ldct.shape:
                raise CoreDiffError(f"NDCT {ndct.shape} and LDCT {ldct.shape} volumes differ in shape")
            convert = _hu_to_unit_in_place if in_place else hu_to_unit
            self.pairs.append((convert(ndct), convert(ldct)))
        self.patch = patch_size_used(pairs, patch_size, multiple)
        self.rng = np.random.default_rng(seed)
        self.anywhere_share = anywhere_share
        self.max_gap = int(max_neighbour_gap)
        self.own_slice_share = own_slice_share

    def _one(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # drawn only when asked for, so that the default keeps the random stream of earlier runs
        anywhere = self.anywhere_share > 0 and self.rng.random() < self.anywhere_share
        own_slice = self.own_slice_share > 0 and self.rng.random() < self.own_slice_share
        for _ in range(10):
            ndct, ldct = self.pairs[self.rng.integers(len(self.pairs))]
            s, h, w = ldct.shape
            # drawn only when asked for, as above
            gap = int(self.rng.integers(1, self.max_gap + 1)) if self.max_gap > 1 else 1
            if gap > 1 and s > 2 * gap:  # a slice with both neighbours that far away
                i = int(self.rng.integers(gap, s - gap))
            else:  # too few slices for that gap on both sides: the adjacent ones, edges replicated, as
                gap = 1  # at inference (not one neighbour 1 slice away and the other 3)
                i = int(self.rng.integers(s))
            idx = [i, i, i] if own_slice else [max(i - gap, 0), i, min(i + gap, s - 1)]
            p = self.patch
            y = int(self.rng.integers(h - p + 1))
            x = int(self.rng.integers(w - p + 1))
            ctx = ldct[idx, y:y + p, x:x + p]
            clean = ndct[idx, y:y + p, x:x + p]
            if anywhere or (clean[1] > AIR_UNIT).mean() > 0.3:
                break
        k = int(self.rng.integers(4))
        flip = bool(self.rng.integers(2))
        ctx, clean = np.rot90(ctx, k, axes=(1, 2)), np.rot90(clean, k, axes=(1, 2))
        if flip:
            ctx, clean = ctx[:, :, ::-1], clean[:, :, ::-1]
        return np.ascontiguousarray(ctx), np.ascontiguousarray(clean[1:2]), np.ascontiguousarray(clean)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n (LDCT context stack, NDCT target) patch pairs: (n, 3, p, p) and (n, 1, p, p)."""
        ctx, tgt, _ = self.batch_with_clean_context(n)
        return ctx, tgt

    def batch_with_clean_context(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`batch`, plus the NDCT stack of the same three slices (n, 3, p, p).

        The same random draws as :meth:`batch`, so asking for it does not change a run's data.
        """
        items = [self._one() for _ in range(n)]
        return tuple(torch.from_numpy(np.stack([item[j] for item in items])) for j in range(3))


# ----------------------------------------------------------------------------- loss
_SSIM_RADIUS, _SSIM_SIGMA = 5, 1.5  # scikit-image's Gaussian SSIM window (truncate 3.5): 11 x 11


def ssim_local_mean(a: torch.Tensor) -> torch.Tensor:
    """SSIM's local mean of an (N, 1, H, W) batch: its Gaussian window, separable, "valid" (no padding)."""
    r = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=a.dtype, device=a.device)
    g = torch.exp(-r ** 2 / (2 * _SSIM_SIGMA ** 2))
    g = g / g.sum()
    return F.conv2d(F.conv2d(a, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))


def window_ssim(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of two (N, 1, H, W) batches in network units, on the metric window.

    Differentiable, and the same number :func:`CoreDiffLib.metrics.ssim` reports (both are
    clipped to [-1000, 1000] HU, Gaussian window 11 x 11, sigma 1.5, over the pixels whose window
    lies inside the image), so that training can aim at it: an MSE-trained model can lead in
    PSNR yet trail in SSIM, which weighs the air's exact level heavily because the window's
    floor (-1000 HU) cuts through its noise (docs/benchmarks/ssim_loss/).
    """
    lo, hi = (float(hu_to_unit(v)) for v in METRIC_WINDOW_HU)
    x = (image.clamp(lo, hi) - lo) / (hi - lo)
    y = (reference.clamp(lo, hi) - lo) / (hi - lo)
    blur = ssim_local_mean
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim_map.mean()


#: side of the blocks whose means ``level_weight`` compares (pixels), with level window "block8"
LEVEL_BLOCK = 8
#: what ``level_weight`` compares: 8x8 block means, or SSIM's own Gaussian local means (sigma 1.5 px)
LEVEL_WINDOWS = ("block8", "ssim")
#: where the context-noise term counts: the whole patch, or only pixels whose NDCT is air (< AIR_HU),
#: where the neighbours carry no anatomy to lose
CONTEXT_NOISE_REGIONS = ("everywhere", "air")


def local_level(a: torch.Tensor, window: str = "block8") -> torch.Tensor:
    """The local level of an (N, 1, H, W) batch that the level term compares, see LEVEL_WINDOWS."""
    if window == "ssim":
        return ssim_local_mean(a)
    if window == "block8":
        return F.avg_pool2d(a, LEVEL_BLOCK, ceil_mode=True)
    raise ValueError(f"level window {window!r}: expected one of {LEVEL_WINDOWS}")


@dataclass(frozen=True)
class LossTerms:
    """The optional terms either trainer may add to the paper's MSE (all off by default).

    One value that CoreDiff's trainer, RED-CNN's, their command lines and the loss share, so a
    term is defined, checked and passed in one place. Invalid weights or windows are refused when
    the value is made, before any data are read or anything is written.
    """

    ssim_weight: float = 0.0      # > 0: add ssim_weight x (1 - SSIM on the metric window)
    level_weight: float = 0.0     # > 0: add level_weight x the MSE of local levels
    level_window: str = "block8"  # which local levels: one of LEVEL_WINDOWS
    context_noise_weight: float = 0.0  # > 0: add W x the output's response to the neighbours' noise
    context_noise_region: str = "everywhere"  # where that term counts: one of CONTEXT_NOISE_REGIONS

    def __post_init__(self) -> None:
        for flag, weight in (("--ssim-weight", self.ssim_weight), ("--level-weight", self.level_weight),
                             ("--context-noise-weight", self.context_noise_weight)):
            if not weight >= 0:  # also refuses nan
                raise CoreDiffError(f"{flag} {weight} is negative: give 0 (MSE only) or a weight > 0")
        if self.level_window not in LEVEL_WINDOWS:
            raise CoreDiffError(f"level window must be one of {LEVEL_WINDOWS}, not {self.level_window!r}")
        if self.context_noise_region not in CONTEXT_NOISE_REGIONS:
            raise CoreDiffError(f"context-noise region must be one of {CONTEXT_NOISE_REGIONS}, "
                                f"not {self.context_noise_region!r}")

    @property
    def mse_only(self) -> bool:
        """True when the loss is the paper's plain MSE (its value then reads as an RMS error)."""
        return not (self.ssim_weight or self.level_weight or self.context_noise_weight)

    def check_patch_size(self, patch_size: int) -> None:
        """Refuse patches the level term could not compute on (0 = whole slices, always fine)."""
        if self.level_weight and self.level_window == "ssim" and 0 < patch_size < 2 * _SSIM_RADIUS + 1:
            raise CoreDiffError(f"{patch_size}-px patches are smaller than SSIM's 11 x 11 window: "
                                "give --patch-size 11 or more for --level-window ssim")

    def check_network(self, config: NetworkConfig) -> None:
        """Refuse the context-noise term for a network that sees no neighbours (it would be 0)."""
        if self.context_noise_weight and not config.use_context:
            raise CoreDiffError("--context-noise-weight needs a network that sees the adjacent slices: "
                                "drop --no-context, or drop the term")


#: the paper's loss: MSE alone
MSE_ONLY = LossTerms()


def restoration_loss(x0_hat: torch.Tensor, ndct: torch.Tensor, terms: LossTerms = MSE_ONLY) -> torch.Tensor:
    """MSE against the NDCT (the paper's loss), plus the optional ``terms``.

    ``ssim_weight`` adds W x (1 - SSIM on the metric window). ``level_weight`` adds W x the MSE
    of the two images' local levels (``level_window``: 8x8 block means, or SSIM's Gaussian
    window): the same minimiser as the MSE (the conditional mean of the NDCT), but more weight on
    errors of local level. A level error of a fraction of a HU is lost in the pixel MSE's noise
    (~5 HU rms per pixel), yet it is what SSIM's luminance factor punishes in the air (see
    ``metrics.ssim_terms``). Neither image is clipped to the metric window here: that would move
    the optimum (see docs/benchmarks/level/).
    """
    loss = F.mse_loss(x0_hat, ndct)
    if terms.ssim_weight:
        loss = loss + terms.ssim_weight * (1.0 - window_ssim(x0_hat.float(), ndct.float()))
    if terms.level_weight:
        loss = loss + terms.level_weight * F.mse_loss(local_level(x0_hat, terms.level_window),
                                                      local_level(ndct, terms.level_window))
    return loss


def mirror_neighbour_noise(ldct_stack: torch.Tensor, ndct_stack: torch.Tensor) -> torch.Tensor:
    """The LDCT context stack with each neighbour's low-dose noise negated: 2 x NDCT - LDCT.

    Our LDCT counts are a binomial thinning of the NDCT's, so LDCT - NDCT is the extra noise of
    the lower dose, uncorrelated with the NDCT and close to symmetric: the mirrored neighbour is
    as likely an LDCT slice as the real one, with the same anatomy. The centre slice is kept, and
    so is a neighbour that is the centre slice repeated (the volume's first and last slices).
    """
    c = ldct_stack.shape[1] // 2
    out = ldct_stack.clone()
    for j in range(ldct_stack.shape[1]):
        if j == c:
            continue
        repeated = (ldct_stack[:, j] == ldct_stack[:, c]).flatten(1).all(1)
        mirrored = 2 * ndct_stack[:, j] - ldct_stack[:, j]
        out[:, j] = torch.where(repeated[:, None, None], ldct_stack[:, j], mirrored)
    return out


def corediff_loss(model: torch.nn.Module, config: NetworkConfig, ldct_stack: torch.Tensor,
                  ndct: torch.Tensor, t: int, terms: LossTerms = MSE_ONLY,
                  mirrored_stack: torch.Tensor | None = None) -> torch.Tensor:
    """The two-stage CoreDiff loss for one batch at time index t (shared by the batch).

    With ``terms.context_noise_weight`` > 0, ``mirrored_stack`` (see :func:`mirror_neighbour_noise`)
    is run through the first stage too, and W x the mean square of half the two outputs'
    difference is added: the part of the output that follows the neighbours' noise, which an
    MSE-trained CLEAR-Net lets through at 1-12 % (docs/benchmarks/context_noise/). Its anatomy
    is the same in both inputs, so only the response to noise is penalised. Measured at 10 %
    everywhere: it cuts that share but costs more anatomy than it saves noise (not used for the
    shipped models). ``terms.context_noise_region`` "air" counts only pixels whose NDCT is air,
    where the neighbours carry no anatomy (the mean is still over all pixels).
    """
    alphas = alpha_schedule(config.steps).to(ndct.device)
    c = ldct_stack.shape[1] // 2
    xT = ldct_stack[:, c:c + 1]  # the centre LDCT slice, whether or not the model sees context
    ctx = ldct_stack if config.use_context else None
    tb = torch.full((ndct.shape[0],), t, device=ndct.device, dtype=torch.long)

    x_t = degrade(ndct, xT, alphas[t])
    x0_hat = model(network_input(x_t, ctx, config.use_context), tb)
    loss_1 = restoration_loss(x0_hat, ndct, terms)
    if terms.context_noise_weight:
        terms.check_network(config)
        if mirrored_stack is None:
            raise CoreDiffError("the context-noise term needs the mirrored stack (see mirror_neighbour_noise)")
        x0_mirrored = model(network_input(x_t, mirrored_stack, True), tb)
        response = (0.5 * (x0_hat - x0_mirrored)).pow(2)
        if terms.context_noise_region == "air":
            response = response * (ndct < AIR_UNIT).to(response.dtype)
        loss_1 = loss_1 + terms.context_noise_weight * response.mean()
    if t == 0:
        return loss_1
    x_prev = degrade(x0_hat, xT, alphas[t - 1])
    emm_prev = x0_hat if config.use_emm else None
    x0_hat_2 = model(network_input(x_prev, ctx, config.use_context), tb - 1, emm_prev, xT)
    return 0.5 * loss_1 + 0.5 * restoration_loss(x0_hat_2, ndct, terms)


# ----------------------------------------------------------------------------- distributed
def _dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


class _LossModule(torch.nn.Module):
    """The whole two-stage loss as one forward pass, so DistributedDataParallel sees exactly
    one forward per backward (the loss calls the network twice, the second time through its
    own first output)."""

    def __init__(self, model: ClearNet, config: NetworkConfig, terms: LossTerms = MSE_ONLY):
        super().__init__()
        self.model, self.config, self.terms = model, config, terms

    def forward(self, ldct_stack: torch.Tensor, ndct: torch.Tensor, t: int,
                mirrored_stack: torch.Tensor | None = None) -> torch.Tensor:
        return corediff_loss(self.model, self.config, ldct_stack, ndct, t, self.terms, mirrored_stack)


def _state_sha256(module: torch.nn.Module) -> str:
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- loop
@dataclass
class TrainState:
    iteration: int = 0
    losses: list[float] = field(default_factory=list)
    #: what the run started from (the starting weights' name and sha256), kept across resumes: a
    #: resumed run's weights descend from its first leg's start, whatever a later command gives
    origin: dict | None = None
    #: one entry per leg (command run) of a resumed run: the iterations it trained and the settings
    #: a resumed run may change (RESUMABLE_CHANGES), so the weights say how they were trained
    legs: list[dict] = field(default_factory=list)
    #: what the weights record of their data (``corediff train``: the files, dose tag, patch size,
    #: farthest neighbours), kept in the checkpoint: weights exported from it (scripts/ship_model.py)
    #: carried none of it, and a model that learned 5 mm neighbours lost them on 5 mm scans
    record: dict | None = None

    def begin_leg(self, cfg: "TrainConfig", device: str) -> None:
        settings = {k: getattr(cfg, k) for k in LEG_SETTINGS}
        self.legs.append({"from_iteration": self.iteration, "to_iteration": self.iteration, "device": device,
                          "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **settings})

    def end_leg_here(self) -> None:
        """The last leg ends at the current iteration; one that trained nothing is not a leg."""
        if self.legs:
            self.legs[-1]["to_iteration"] = self.iteration
            if self.iteration == self.legs[-1]["from_iteration"]:
                self.legs.pop()


def _duration(seconds: float) -> str:
    """'45 s', '12.5 min' or '3.2 h': a time limit and the time used, readable at every scale."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def run_progress(iteration: int, iterations: int, elapsed_s: float = 0.0, time_limit_s: float = 0.0) -> float:
    """Fraction of a run done: by iterations, or by wall time when a time limit ends it first.

    A budgeted run (say "4 minutes on the GPU we have") cannot know its iteration count in
    advance; decaying by elapsed time still ends it at lr 0, where the weights settle.
    """
    done = iteration / max(iterations, 1)
    if time_limit_s:
        done = max(done, elapsed_s / time_limit_s)
    return min(done, 1.0)


def time_index_probabilities(steps: int, sampling: str) -> np.ndarray | None:
    """How often each time index t is trained; None = uniform (the paper's choice).

    "late" weights t by t + 1: the states near the LDCT end (large t) are the hard restorations,
    and the one sampling starts from (t = T-1, the only step a 1-step sampler runs) gets 18 % of
    the updates at T = 10 instead of 10 %, while t near 0 (input ≈ the target) gets less.
    """
    if sampling == "uniform":
        return None
    if sampling == "late":
        w = np.arange(1, steps + 1, dtype=np.float64)
        return w / w.sum()
    raise CoreDiffError(f"time-index sampling must be uniform or late, not {sampling!r}")


def cosine_lr(base_lr: float, progress: float) -> float:
    """Cosine decay from base_lr at progress 0 to 0 at progress 1: the weights settle at the end."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class TrainingDiverged(CoreDiffError):
    """A loss or weight became NaN or infinite: nothing more is saved, so the last checkpoint and
    any earlier weights stay as they were."""


def _check_finite(window: list[torch.Tensor], models: Sequence[torch.nn.Module], iteration: int,
                  checkpoint: Path | None) -> None:
    """Stop a diverged run before it saves: checked at each log line and checkpoint (reading
    the losses every iteration would stall a GPU)."""
    finite = bool(torch.isfinite(torch.stack(window)).all()) if window else True
    finite = finite and all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters())
    if not finite:
        snapshots = sorted(checkpoint.parent.glob(f"{checkpoint.stem}.it*{checkpoint.suffix}"),
                           key=lambda p: p.stat().st_mtime) if checkpoint else []
        if checkpoint and checkpoint.exists():
            kept = f"{checkpoint} keeps the run as of its last save"
        elif snapshots:
            kept = f"its last snapshot is {snapshots[-1]} (resume from it with --checkpoint {snapshots[-1]})"
        else:
            kept = "nothing was saved"
        raise TrainingDiverged(f"training diverged by iteration {iteration} (a loss or weight is NaN or infinite): "
                               f"stopped without saving; {kept}. Go on with a lower --lr (or fp32 precision)")


def _update_ema(ema: ClearNet, model: ClearNet, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)


#: TrainConfig fields a resumed run may change: how long and how it runs, and the learning rate
#: (e.g. a lower one for a last leg); any other difference would silently train another recipe
RESUMABLE_CHANGES = ("iterations", "time_limit_s", "threads", "checkpoint_every", "log_every", "keep_every",
                     "lr", "lr_schedule")
#: of those, what each leg of a resumed run records (how often it logged or saved does not shape the weights)
LEG_SETTINGS = tuple(k for k in RESUMABLE_CHANGES if k not in ("log_every", "checkpoint_every"))


def data_fingerprint(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> str:
    """A short hash of the training pairs (their shapes and a sparse sample of their voxels): a
    checkpoint records it, so that a run is not resumed on other data without a word."""
    digest = hashlib.sha256()
    for ndct, ldct in pairs:
        for volume in (ndct, ldct):
            volume = np.asarray(volume)
            digest.update(str(volume.shape).encode())
            digest.update(np.ascontiguousarray(volume[:, ::16, ::16], dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def weights_at_stop(checkpoint: str | Path, net_cfg: NetworkConfig) -> tuple[ClearNet, TrainState]:
    """The EMA weights and state a run saved in ``checkpoint`` when it was stopped
    (:class:`TrainingInterrupted`): what a time-boxed GPU session keeps when its machine is
    taken back."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = _trained_config(saved)
    averaging = _ema_averaging(saved["iteration"], cfg["ema_start"], cfg["ema_every"])
    ema = ClearNet(net_cfg)  # stopped before the EMA averaged: the EMA is a stale copy, the live weights are the run
    ema.load_state_dict(saved["ema"] if averaging else saved["model"])
    return ema, TrainState(saved["iteration"], list(saved["losses"]))


def _trained_config(saved: dict) -> dict:
    """The settings a checkpoint's run trained with: an option newer than the checkpoint had its
    default then."""
    return {**asdict(TrainConfig()), **saved.get("train_config", {})}


def _ema_averaging(iteration: int, ema_start: int, ema_every: int) -> bool:
    """Whether the EMA averages by ``iteration``: from its first step at or after ema_start on."""
    return iteration // ema_every * ema_every >= max(ema_start, ema_every)


@contextlib.contextmanager
def _save_failure_as_error(path: Path):
    """torch.save's failures on a full disk (RuntimeError 'unexpected pos ...') as one line; the
    checkpoint on disk is the last complete one."""
    try:
        yield
    except RuntimeError as exc:
        from .io import full_disk_hint
        kept = ("; the checkpoint there is the last one written" if Path(path).exists()
                else "; no checkpoint was saved")
        raise CoreDiffError(f"could not write the checkpoint {path} ({str(exc).strip()[:120]})"
                            f"{full_disk_hint(Path(path).parent)}{kept}") from None


def save_checkpoint(path: Path, model: ClearNet, ema: ClearNet, optimizer: torch.optim.Optimizer,
                    state: TrainState, net_cfg: NetworkConfig, train_cfg: TrainConfig,
                    rng: np.random.Generator, sampler_rng: np.random.Generator | None = None,
                    data: str | None = None, elapsed_s: float = 0.0) -> None:
    """Everything needed to resume bit-for-bit (the patch sampler's random state included, the
    data's fingerprint, the training time so far for a time-limited schedule); written
    atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, _save_failure_as_error(path):
        torch.save({
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "iteration": state.iteration, "losses": state.losses,
            "network_config": net_cfg.to_dict(), "train_config": asdict(train_cfg),
            "numpy_rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
            **({"sampler_rng": json.dumps(sampler_rng.bit_generator.state)} if sampler_rng is not None else {}),
            **({"data": data} if data else {}), "elapsed_s": float(elapsed_s),
            **({"origin": json.dumps(state.origin)} if state.origin is not None else {}),
            "legs": json.dumps(state.legs),
            **({"record": json.dumps(state.record)} if state.record else {}),
        }, tmp)


def load_checkpoint(path: Path, net_cfg: NetworkConfig, cfg: TrainConfig,
                    data: str | None = None, inherit: Sequence[str] = ()) -> dict:
    """A checkpoint to resume, refused with a clear message when it is damaged, not ours, was
    made by another recipe than this run's (see RESUMABLE_CHANGES) or on other data (``data``,
    a :func:`data_fingerprint`). ``inherit``: settings the user left at their defaults, taken
    from the checkpoint (the default ``ema_start`` follows ``iterations``, which a resumed run
    may raise). Read onto the CPU: load_state_dict copies weights and optimizer state to the
    training device, and torch.set_rng_state takes only a CPU tensor (a state read onto a GPU
    stopped every resumed GPU run before its first iteration)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved_net, saved_cfg = saved["network_config"], saved["train_config"]
        keys = ("model", "ema", "optimizer", "iteration", "losses", "numpy_rng", "torch_rng")
        if not isinstance(saved_cfg, dict) or not all(k in saved for k in keys):
            raise KeyError("keys")
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise CoreDiffError(f"checkpoint {path} is damaged or not a CoreDiff training checkpoint "
                            f"({type(exc).__name__}); give another --checkpoint path, or delete it to start "
                            "afresh") from None
    if NetworkConfig.from_dict(saved_net) != net_cfg:
        then, now = NetworkConfig.from_dict(saved_net).to_dict(), net_cfg.to_dict()
        flags = {"width": "--width", "steps": "--steps", "use_context": "--no-context", "use_emm": "--no-emm"}
        differ = [f"{key} {then[key]!r} there, {now[key]!r} here ({flags.get(key, '--init-weights')})"
                  for key in sorted(now) if then[key] != now[key]]
        raise CoreDiffError(f"checkpoint {path} is for another architecture than this run's ({'; '.join(differ)}): "
                            "to go on with it, repeat the options (or --init-weights) of the run that made it; to "
                            "start another run, give a new --checkpoint path")
    if data and saved.get("data") and saved["data"] != data:
        raise CoreDiffError(f"checkpoint {path} was made on other training data: give a new --checkpoint path (and "
                            "--init-weights with that run's weights to go on from them on these data)")
    for key in inherit:
        if key in saved_cfg:
            setattr(cfg, key, saved_cfg[key])
    now, then = asdict(cfg), _trained_config(saved)
    changed = [f"{k} {then[k]!r}{'' if k in saved_cfg else ' (its default, older than the option)'} -> {now[k]!r}"
               for k in now if then[k] != now[k] and k not in RESUMABLE_CHANGES]
    if changed:
        raise CoreDiffError(f"checkpoint {path} was made with other settings ({'; '.join(changed)}): resume with "
                            "the same ones, or give a new --checkpoint path to start another run")
    return saved


def _unrecorded_legs(saved: dict) -> list[dict]:
    """What a checkpoint made before legs were recorded says of its run: its last settings."""
    cfg = saved["train_config"]
    return [{"from_iteration": 0, "to_iteration": int(saved["iteration"]),
             "note": "legs not recorded separately (a checkpoint from before 2026-12-05): the last leg's settings",
             **{k: cfg[k] for k in LEG_SETTINGS if k in cfg}}]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during :func:`train`, after the checkpoint was saved (the message says where);
    ``signum`` is the signal that asked (the CLI exits with the shell's code for it)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def train(pairs: Sequence[tuple[np.ndarray, np.ndarray]], net_cfg: NetworkConfig, cfg: TrainConfig,
          checkpoint: str | Path | None = None, resume: bool = True, device: str = "cpu",
          log: Callable[[str], None] = print,
          init_state: dict[str, torch.Tensor] | None = None,
          inherit: Sequence[str] = (), origin: dict | None = None,
          consume_pairs: bool = False,
          progress: Callable[[int, int], None] | None = None,
          record: dict | None = None) -> tuple[ClearNet, TrainState]:
    """Train (or resume) a model on HU volume pairs: see :func:`_train`. ``cfg.threads`` applies
    to this run only: torch's thread count is restored after it, for the rest of the process.
    ``origin``: what ``init_state`` is (recorded in the checkpoint; a resumed run keeps its own).
    ``record``: what the weights record of their data (:attr:`TrainState.record`), kept in the
    checkpoint (this command's: the data are the checkpoint's, checked by their fingerprint).
    ``consume_pairs``: float32 pairs are turned into the network's range in place (half the
    memory; the caller must not use them as HU afterwards). ``progress(iteration, iterations)``
    hears where the run is, about once a second."""
    before = torch.get_num_threads()
    try:
        return _train(pairs, net_cfg, cfg, checkpoint, resume, device, log, init_state, inherit, origin,
                      consume_pairs, progress, record)
    finally:
        torch.set_num_threads(before)


def _train(pairs: Sequence[tuple[np.ndarray, np.ndarray]], net_cfg: NetworkConfig, cfg: TrainConfig,
           checkpoint: str | Path | None, resume: bool, device: str, log: Callable[[str], None],
           init_state: dict[str, torch.Tensor] | None, inherit: Sequence[str],
           origin: dict | None = None, consume_pairs: bool = False,
           progress: Callable[[int, int], None] | None = None,
           record: dict | None = None) -> tuple[ClearNet, TrainState]:
    """Train (or resume) a model on HU volume pairs. Returns the EMA model and the state.

    ``init_state`` starts from given weights (fine-tuning a shipped model on new data, or
    continuing a run of which only the weights survive); a checkpoint, if resumed, wins
    (``inherit``: see :func:`load_checkpoint`). Ctrl-C or SIGTERM (a scheduler's notice) ends
    the iteration under way, saves the checkpoint and raises :class:`TrainingInterrupted`.

    Under torchrun each process trains on its own data stream (rank-seeded) and gradients are
    averaged by DDP, so all replicas hold identical weights.
    """
    rank, world, local_rank = _dist_info()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.validate()
    t_probabilities = time_index_probabilities(net_cfg.steps, cfg.t_sampling)
    terms = cfg.loss_terms
    terms.check_network(net_cfg)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed patch shape: let cuDNN pick its fastest kernels
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = ClearNet(net_cfg).to(device)
    if on_cuda:  # NHWC is what tensor-core convolutions want; the state dict is unaffected
        model = model.to(memory_format=torch.channels_last)
    if init_state is not None:
        model.load_state_dict(init_state)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt = Path(checkpoint) if checkpoint else None
    fingerprint = data_fingerprint(pairs) if ckpt else None  # of the HU, before a conversion in place
    data = PairedSlices(pairs, cfg.patch_size, seed=cfg.seed + 1000 * rank, anywhere_share=cfg.anywhere_share,
                        max_neighbour_gap=cfg.max_neighbour_gap, own_slice_share=cfg.own_slice_share,
                        in_place=consume_pairs)
    state = TrainState(origin=origin, record=record)
    step_rng = np.random.default_rng(cfg.seed + 7)  # same t on every rank each iteration

    elapsed_before = 0.0  # training time of the earlier legs of a resumed run
    if ckpt and resume and ckpt.exists():
        saved = load_checkpoint(ckpt, net_cfg, cfg, fingerprint, inherit)
        elapsed_before = float(saved.get("elapsed_s", 0.0))
        if fingerprint and not saved.get("data") and rank == 0:  # made before checkpoints recorded their data
            log(f"note: {ckpt} records no fingerprint of its training data, so whether these are the same data "
                "is not checked")
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # this run's --lr, not where a cosine run left it (~0)
            group["lr"] = cfg.lr
        state = TrainState(saved["iteration"], list(saved["losses"]),
                           json.loads(saved["origin"]) if "origin" in saved else None,
                           json.loads(saved["legs"]) if "legs" in saved else _unrecorded_legs(saved),
                           record or (json.loads(saved["record"]) if "record" in saved else None))
        step_rng.bit_generator.state = json.loads(saved["numpy_rng"])
        if rank > 0:  # the checkpoint holds rank 0's sampler (rank 0 writes it): loaded here, every rank
            # would draw rank 0's patches; each draws its own stream, fixed by seed, rank and iteration
            data.rng = np.random.default_rng([cfg.seed + 1000 * rank, state.iteration])
        elif "sampler_rng" in saved:  # (checkpoints before 2026-12-05 replay the first patches)
            data.rng.bit_generator.state = json.loads(saved["sampler_rng"])
        torch.set_rng_state(saved["torch_rng"])
        if rank == 0:
            used = (f", {_duration(elapsed_before)} of the {_duration(cfg.time_limit_s)} time limit used"
                    if cfg.time_limit_s else "")
            log(f"resumed from {ckpt} at iteration {state.iteration}{used}"
                + (f": nothing left to train for --iterations {cfg.iterations}" if state.iteration >= cfg.iterations
                   else "")
                + "".join(f"; {k} {saved['train_config'][k]!r} -> {getattr(cfg, k)!r}" for k in ("lr", "lr_schedule")
                          if saved["train_config"].get(k, getattr(cfg, k)) != getattr(cfg, k)))
    elif ckpt and rank == 0:  # where a stopped run goes on from: said at its start, not only when stopped
        log(f"checkpoint {ckpt} every {cfg.checkpoint_every} iterations and at the end: the same command "
            "resumes from it")

    loss_fn = _LossModule(model, net_cfg, terms)
    if world > 1:
        # find_unused_parameters: EMM takes no part when t == 0 (stage I only); t is the same
        # on every rank, so all replicas agree on which parameters were used
        loss_fn = torch.nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[local_rank] if device.startswith("cuda") else None,
            find_unused_parameters=net_cfg.use_emm)
    debug_dir = os.environ.get("COREDIFF_DDP_DEBUG_DIR")  # tests: per-rank weights hash + losses
    debug = {"losses": [], "ts": []}

    autocast = torch.autocast(device_type="cuda" if on_cuda else "cpu", dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16")
    memory_format = torch.channels_last if on_cuda else torch.contiguous_format
    t0 = time.time()
    started = t0 - elapsed_before  # the time limit and a time-limited cosine count the earlier legs too
    window: list[torch.Tensor] = []
    ema_averaging = _ema_averaging(state.iteration, cfg.ema_start, cfg.ema_every)  # resumed: is that step past
    stop_at = cfg.iterations if not (cfg.time_limit_s and elapsed_before >= cfg.time_limit_s) else state.iteration
    if rank == 0 and stop_at < cfg.iterations and state.iteration > 0:
        log(f"the --time-limit of {_duration(cfg.time_limit_s)} (all legs together) is used up: nothing left to "
            f"train at iteration {state.iteration} of {cfg.iterations}; its weights are written as they are "
            "(a larger --time-limit goes on)")
    shown_at = 0.0  # when progress was last told
    if progress and rank == 0:
        progress(state.iteration, cfg.iterations)
    since_log = state.iteration  # the iteration the rate is counted from

    state.begin_leg(cfg, device)

    def save(path: Path) -> None:
        state.end_leg_here()
        save_checkpoint(path, model, ema, optimizer, state, net_cfg, cfg, step_rng, data.rng, fingerprint,
                        time.time() - started)

    with StopRequests() as stop:  # Ctrl-C / SIGTERM: finish the iteration, save, then stop
        while state.iteration < stop_at:
            ctx, tgt, clean_ctx = data.batch_with_clean_context(cfg.batch_size)
            mirrored = (mirror_neighbour_noise(ctx, clean_ctx).to(device, non_blocking=True)
                        .contiguous(memory_format=memory_format) if terms.context_noise_weight else None)
            ctx = ctx.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            tgt = tgt.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            t = int(step_rng.integers(net_cfg.steps) if t_probabilities is None
                    else step_rng.choice(net_cfg.steps, p=t_probabilities))
            if cfg.lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    # under DDP only iterations count, so every replica applies the same rate
                    done = run_progress(state.iteration, cfg.iterations, time.time() - started,
                                        cfg.time_limit_s if world == 1 else 0.0)
                    group["lr"] = cosine_lr(cfg.lr, done)
            with autocast:
                loss = loss_fn(ctx, tgt, t, mirrored).float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.iteration += 1
            window.append(loss.detach())  # a tensor: reading it every iteration would stall a GPU
            if debug_dir:
                debug["losses"].append(float(window[-1]))
                debug["ts"].append(t)
            if state.iteration % cfg.ema_every == 0:
                if not ema_averaging:  # before ema_start, and at its first step: a copy of the live weights
                    ema.load_state_dict(model.state_dict())
                    ema_averaging = state.iteration >= cfg.ema_start
                else:
                    _update_ema(ema, model, cfg.ema_decay)
            if state.iteration % cfg.log_every == 0:  # every rank: they stop together
                _check_finite(window, (model, ema), state.iteration, ckpt)
                mean = float(torch.stack(window).double().mean())
                state.losses.append(mean)
                window = []
                if rank == 0:
                    rate = (state.iteration - since_log) / max(time.time() - t0, 1e-9)  # a resumed run's first
                    since_log = state.iteration  # window is shorter
                    scale = (f"~{math.sqrt(mean) * 4096.0:.1f} HU rms" if terms.mse_only
                             else "MSE + extra terms")  # the pure MSE reads as an RMS error in HU
                    log(f"iter {state.iteration}/{cfg.iterations}  loss {mean:.3e} ({scale})  "
                        f"{rate:.2f} it/s")
                t0 = time.time()
            if cfg.time_limit_s and (world == 1 or state.iteration % cfg.log_every == 0):
                over = time.time() - started > cfg.time_limit_s
                if world > 1:  # every rank must stop at the same iteration, or DDP deadlocks
                    flag = torch.tensor([float(over)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    over = bool(flag.item())
                if over:
                    stop_at = state.iteration
                    if rank == 0 and stop_at < cfg.iterations:
                        log(f"time limit of {cfg.time_limit_s / 60:g} min reached at iteration {stop_at} of "
                            f"{cfg.iterations}: the same command with a larger --time-limit (it counts every leg) "
                            "goes on from the checkpoint")
            if progress and rank == 0 and (time.time() - shown_at >= 1.0 or state.iteration == stop_at):
                progress(state.iteration, cfg.iterations)
                shown_at = time.time()
            if not ema_averaging and state.iteration == stop_at:  # too short to average: the weights as trained
                ema.load_state_dict(model.state_dict())
            at_checkpoint = state.iteration % cfg.checkpoint_every == 0 or state.iteration == stop_at \
                or stop.requested
            keep = bool(ckpt and cfg.keep_every and state.iteration % cfg.keep_every == 0)
            if at_checkpoint or keep:
                _check_finite(window, (model, ema), state.iteration, ckpt)  # nothing diverged is saved
                if ckpt and rank == 0 and at_checkpoint:
                    save(ckpt)
                if keep and rank == 0:
                    save(ckpt.with_name(f"{ckpt.stem}.it{state.iteration}{ckpt.suffix}"))
            if stop.requested:
                where = (f"; {ckpt} holds the run so far: run the same command to go on, or with --iterations "
                         f"{state.iteration} to write its weights as they are" if ckpt and rank == 0 else "")
                raise TrainingInterrupted(f"interrupted at iteration {state.iteration}{where}",
                                          stop.signum or signal.SIGINT)
    if not ema_averaging:  # a run too short to average: the EMA would be a stale copy (or the initial weights)
        ema.load_state_dict(model.state_dict())
    state.end_leg_here()
    if world > 1:
        dist.barrier()
    if debug_dir:
        Path(debug_dir).mkdir(parents=True, exist_ok=True)
        debug.update(rank=rank, world_size=world, backend=dist.get_backend() if world > 1 else None,
                     model_sha256=_state_sha256(model), ema_sha256=_state_sha256(ema))
        (Path(debug_dir) / f"rank{rank}.json").write_text(json.dumps(debug))
    return ema, state

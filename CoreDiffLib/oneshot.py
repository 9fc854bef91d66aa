"""One-shot learning (OSL): adapt a frozen CoreDiff model to a new dose level from ONE slice.

CoreDiff's sampler walks in T steps from the LDCT slice to its clean estimate; its state after
step k, x_k, is a mix of the two that grows cleaner step by step. A model trained at one dose
and applied to a higher one over-smooths: its last state is not the closest to the truth, and
a blend that keeps some of an earlier state's texture is (applied to a lower dose it
under-smooths, and no blend of its states can help: the last is its strongest). OSL learns T scalar logits ``w``
(initialised to zero, i.e. uniform weights) and combines the states as

    x_opt = sum_k softmax(w)_k * x_k

as the reference code's one-shot framework blends its per-step images (``imstep_imgs``, the
states; not ``direct_recons``, the per-step x0 estimates: each of those is already fully
denoised, so no blend of them can give back texture — on held-out phantoms a 5 % model on
25 % dose gains 0.08 dB from blending estimates and 1.07 dB from blending states, 86 % of its gap
to the 25 % model: docs/benchmarks/oneshot_states).

The network stays frozen, so the T-step sampling runs ONCE on the whole reference slice
and the T states are cached; the logits are then fitted on random patches of the cached
outputs, which takes seconds. The result is a tiny JSON file (:class:`Adaptation`) tied to
the base model's sha256 and to its T; the same model serves every dose level.

Two ways to supervise the logits:

* **paired** — the reference LDCT slice's own NDCT (same scan, aligned): patch MSE, with an
  optional SSIM term. This directly minimises the error the paper's metrics measure.
* **unpaired** — a normal-dose slice that is *not* aligned with the reference (by default
  two slices further on, as in the paper's reference code, or another scan altogether).
  The reference code uses a VGG perceptual loss (in both modes; paired mode here uses the MSE the
  metrics measure instead), whose ImageNet weights cannot be downloaded here.
  We use :func:`texture_loss` instead: per-patch *log band energies* of the soft tissue,
  i.e. the mean squared response of a fixed multi-scale Gaussian-derivative filter bank
  (d/dx, d/dy and Laplacian of a Gaussian, sigma = 1 px on the image average-pooled 1x, 2x
  and 4x: scales of ~1, 2 and 4 px), averaged over the pixels whose filter footprint lies
  in soft tissue (-150..250 HU after a 2-px smoothing: fat to enhanced organs).
  Output and target patches are co-located, and compared by squared log-ratio. Why:

  - What the step weights control is the noise/smoothness trade-off of the output: how much
    energy its soft tissue has in each spatial-frequency band (a coarse noise power
    spectrum plus edge sharpness). Band energies measure exactly that, and a blend whose
    band energies match the normal-dose scan's has its noise level and texture.
  - A band energy is a mean of squared filter responses over a patch region: it does not
    depend on *where* in the patch a structure or noise grain lies, so a shift of a few
    pixels, or the small anatomical change between slices two apart, barely moves it.
    Measured in ``Testing/test_oneshot.py``: shifting the target by (3, -2) px changes the
    loss of every candidate blend by < 10 % of the loss range over the blends (and keeps
    the same best blend), whereas the MSE changes by more than 30 % of its range.
  - Logarithms make bands and patches count equally whatever their contrast, and the soft
    tissue mask keeps bone and air edges (large, and the most misalignment-sensitive) from
    drowning the noise texture that distinguishes the steps.
  - The filters are fixed, hand-designed and deterministic: nothing to download or train.
  - The bank is linear and the mask fixed, so a blend's band energy is a quadratic form
    in the weights: per-patch T x T matrices are precomputed once (integral images) and the
    fit itself costs about a second (:func:`fit_step_weights`).

  - Band energies ignore the mean (the filters are zero-mean), so a step that is biased
    but has the right texture would win. An *aligned* anchor exists for free: the LDCT
    reference slice itself, an unbiased, noisy image of the same anatomy. The loss adds
    the MSE between the blend's and the LDCT's Gaussian low-pass (sigma 4 px, which removes
    most of the noise), in units of (10 HU)^2. CoreDiff is mean-preserving, so for a sound
    model this term is nearly constant and the texture decides; it only vetoes drift.

  Known limit: band energies cannot tell "noisy but sharp" from "smooth but blurred" when
  both have the same energy in every band; on held-out phantoms the unpaired weights keep too
  much texture (a 5 % model at 25 %: +0.15 dB where paired gains 1.07; at 10 %: -1.28 dB;
  docs/benchmarks/oneshot_states): prefer a paired slice.

Everything is deterministic for a given seed (patch positions come from a seeded NumPy
generator; the optimiser is plain Adam with a cosine-decayed step on a CPU tensor).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import CoreDiffError
from .adaptations import MODES, Adaptation, combine_steps, default_path, is_outdated, model_identity, validate_name
from .atomic import check_output_file
from .dose_estimate import AUTO_MODEL
from .intensity import HU_MIN, HU_RANGE
from .training import window_ssim

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------- losses
LEVELS = 3                      # filter-bank scales ~1, 2, 4 px
SOFT_TISSUE_HU = (-150.0, 250.0)  # the soft-tissue mask: fat to contrast-enhanced organs
_ENERGY_EPS_HU2 = 1.0           # floor of a band energy (HU^2): flat regions compare equal
MIN_MASK_PIXELS = 32            # a (patch, scale) needs this much soft tissue to count
FIDELITY_SIGMA_PX = 4.0         # unpaired fidelity: low-pass scale (removes most LDCT noise)
FIDELITY_TOLERANCE_HU = 10.0    # ... and the low-pass error that costs as much as 1 unit of texture


def _hu(x: torch.Tensor) -> torch.Tensor:
    return x * HU_RANGE + HU_MIN


def _gaussian_derivative_bank(sigma: float = 1.0, radius: int = 3) -> torch.Tensor:
    """(3, 1, 7, 7): d/dx, d/dy and the Laplacian of a Gaussian, zero-mean, unit L2 norm.

    With unit norm, white noise of standard deviation s gives a band energy of s^2 in every
    filter, so the energies read as "noise power in HU^2" per band.
    """
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    g = torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    bank = torch.stack([-xx / sigma ** 2 * g, -yy / sigma ** 2 * g,
                        ((xx ** 2 + yy ** 2) / sigma ** 4 - 2 / sigma ** 2) * g])
    bank = bank - bank.mean(dim=(1, 2), keepdim=True)  # no response to a constant
    bank = bank / bank.flatten(1).norm(dim=1)[:, None, None]
    return bank[:, None].float()


_BANK = _gaussian_derivative_bank()
_RADIUS = _BANK.shape[-1] // 2
#: the smallest patch (and slice) the unpaired loss can use: its coarsest filter, twice over
UNPAIRED_MIN_PATCH = 2 ** (LEVELS - 1) * (2 * _RADIUS + 1) * 2


def filter_responses(x_unit: torch.Tensor, levels: int = LEVELS) -> list[torch.Tensor]:
    """(N, 1, H, W) images in [0, 1] -> per level l, (N, 3, H/2^l - 6, W/2^l - 6) responses in HU.

    Level l filters the image average-pooled by 2^l ('valid' convolution, no padding), so
    the bank covers scales of ~1, 2 and 4 pixels. The map is linear in the image, which
    lets :func:`fit_step_weights` filter every step's output once and blend the responses.
    """
    y = _hu(x_unit)
    out = []
    for level in range(levels):
        if level:
            y = F.avg_pool2d(y, 2)
        out.append(F.conv2d(y, _BANK.to(y.device, y.dtype)))
    return out


def soft_tissue_masks(x_unit: torch.Tensor, levels: int = LEVELS) -> list[torch.Tensor]:
    """Per level, (N, 1, h, w) 0/1 weights aligned with :func:`filter_responses`: 1 where the
    filter's whole footprint lies in soft tissue of the (slightly smoothed) image.

    Keeping air, lung and bone out keeps their large edges from swamping the soft-tissue
    noise texture that distinguishes the steps; the mask is fixed (it never depends on the
    weights being learned).
    """
    lo, hi = SOFT_TISSUE_HU
    k = torch.exp(-torch.arange(-4, 5, dtype=x_unit.dtype, device=x_unit.device) ** 2 / 8.0)
    k = k / k.sum()
    hu = _hu(x_unit)
    hu = F.conv2d(F.pad(hu, (4, 4, 0, 0), mode="replicate"), k.view(1, 1, 1, 9))
    hu = F.conv2d(F.pad(hu, (0, 0, 4, 4), mode="replicate"), k.view(1, 1, 9, 1))
    m = ((hu > lo) & (hu < hi)).to(x_unit.dtype)
    out = []
    size = 2 * _RADIUS + 1
    for level in range(levels):
        if level:
            m = F.avg_pool2d(m, 2)
        inside = F.avg_pool2d(m, size, stride=1)  # footprint fraction, aligned with 'valid'
        out.append((inside > 0.999).to(x_unit.dtype))
    return out


def masked_log_energy(responses: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, h, w) responses, (B, 1, h, w) mask -> (B, 3) log mean-square over the mask,
    and (B, 1) the mask's area in pixels."""
    area = mask.sum(dim=(2, 3))
    energy = (responses.pow(2) * mask).sum(dim=(2, 3)) / area.clamp_min(1.0)
    return torch.log(energy + _ENERGY_EPS_HU2), area


def texture_distance(out_feats: Sequence[torch.Tensor], out_masks: Sequence[torch.Tensor],
                     tgt_feats: Sequence[torch.Tensor], tgt_masks: Sequence[torch.Tensor],
                     min_pixels: int = MIN_MASK_PIXELS) -> tuple[torch.Tensor, int]:
    """Mean squared difference of masked log band energies over patches, levels and filters,
    and the number of terms it averages.

    A (patch, level) pair counts only when both masks cover at least ``min_pixels`` pixels.
    """
    total = out_feats[0].new_zeros(())
    count = 0
    for fo, mo, ft, mt in zip(out_feats, out_masks, tgt_feats, tgt_masks):
        eo, ao = masked_log_energy(fo, mo)
        et, at = masked_log_energy(ft, mt)
        keep = ((ao >= min_pixels) & (at >= min_pixels)).to(eo.dtype)
        total = total + ((eo - et).pow(2) * keep).sum()
        count += int(keep.sum()) * eo.shape[1]
    return total / max(count, 1), count


def _lowpass_hu(x_unit: torch.Tensor, sigma: float = FIDELITY_SIGMA_PX) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> Gaussian low-pass in HU (replicated borders)."""
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x_unit.dtype)
    y = _hu(x_unit)[:, None]
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y[:, 0]


def texture_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Misalignment-tolerant loss between two batches of patches (B, 1, h, w) in [0, 1]:
    per-patch log band energies of the soft tissue (see the module docstring).

    Each patch's soft-tissue mask comes from the patch itself (the output's is detached). This
    is the loss in its plain form, for reading and for the tests of its properties;
    :func:`fit_step_weights` computes the same band energies in closed form (quadratic in the
    weights), takes the output's mask from the LDCT guide, and adds a low-pass fidelity term.
    """
    loss, count = texture_distance(filter_responses(output), soft_tissue_masks(output.detach()),
                                   filter_responses(target), soft_tissue_masks(target))
    if count == 0:
        raise CoreDiffError("these patches hold too little soft tissue for the unpaired loss: "
                            "pick a reference slice through the body (abdomen, pelvis, chest wall)")
    return loss


def paired_loss(output: torch.Tensor, target: torch.Tensor, ssim_weight: float = 0.0) -> torch.Tensor:
    """MSE in the network's [0, 1] range (+ ssim_weight * (1 - SSIM) on the metric window)."""
    loss = F.mse_loss(output, target)
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - window_ssim(output, target))
    return loss


# ----------------------------------------------------------------------------- fitting
def on_reference_grid(slice_hu: np.ndarray, slice_xy: Sequence[float], shape: Sequence[int],
                      reference_xy: Sequence[float]) -> np.ndarray:
    """An unpaired normal-dose slice resampled (linearly) to the reference's pixel size and
    centred on its (H, W) grid, air (-1000 HU) beyond its own field of view.

    The texture loss compares band energies at scales of 1-4 *pixels*, so a slice of another
    pixel size shows another texture; and its patches meet the reference's at the same place
    only when both are centred alike. Placing them in proportion across the slice instead fitted
    blends worse than none on phantoms (a wider or narrower field of view, another matrix);
    resampled and centred, they came within the range of a same-size slice (docs/benchmarks/oneshot_grid).
    """
    from scipy.ndimage import map_coordinates
    slice_hu = np.asarray(slice_hu, dtype=np.float64)
    h, w = (int(v) for v in shape)
    if slice_hu.shape == (h, w) and _same_spacing(slice_xy, reference_xy):
        return slice_hu.astype(np.float32)
    # (slice_xy and reference_xy are (columns, rows) in mm, as axial_view gives them)
    rows = (np.arange(h) - (h - 1) / 2) * reference_xy[1] / slice_xy[1] + (slice_hu.shape[0] - 1) / 2
    cols = (np.arange(w) - (w - 1) / 2) * reference_xy[0] / slice_xy[0] + (slice_hu.shape[1] - 1) / 2
    grid = np.meshgrid(rows, cols, indexing="ij")
    return map_coordinates(slice_hu, grid, order=1, mode="constant", cval=-1000.0).astype(np.float32)


@torch.no_grad()
def reference_step_outputs(model: torch.nn.Module, ldct_hu: np.ndarray, slice_index: int,
                           progress: Callable[[], None] | None = None, neighbours: bool = True) -> torch.Tensor:
    """Run the T-step sampler once on one slice (neighbours as context, edges replicated; with
    ``neighbours`` False the slice is its own context, as ``denoise`` does for thick slices).

    Returns the sampler's state after every step (T, 1, H, W), in [0, 1] up to the network's
    error, on the CPU. ``progress`` is called after every network evaluation.
    """
    from .diffusion import sample
    from .inference import context_stack

    n = ldct_hu.shape[0]
    if not 0 <= slice_index < n:
        raise CoreDiffError(f"reference slice {slice_index} is out of range 0..{n - 1}")
    device = next(model.parameters()).device
    stack = torch.from_numpy(context_stack(ldct_hu, slice_index, slice_index + 1, neighbours)).to(device)
    if not model.config.use_context:
        stack = stack[:, 1:2]
    handle = model.register_forward_hook(lambda *_: progress()) if progress else None
    try:
        result = sample(model, stack, None, keep_steps=True)
    finally:
        if handle is not None:
            handle.remove()
    return result.steps[:, 0].float().cpu()  # (T, 1, H, W)


def _valid_corners(mask: np.ndarray, patch: int, min_fraction: float) -> np.ndarray:
    """Top-left corners of patches with at least ``min_fraction`` of ``mask`` inside."""
    h, w = mask.shape
    ii = np.pad(np.cumsum(np.cumsum(mask.astype(np.float64), 0), 1), ((1, 0), (1, 0)))
    s = ii[patch:, patch:] - ii[:-patch, patch:] - ii[patch:, :-patch] + ii[:-patch, :-patch]
    ys, xs = np.nonzero(s >= min_fraction * patch * patch)
    return np.stack([ys, xs], axis=1)


def _patch_corners(guide_hu: np.ndarray, patch: int) -> np.ndarray:
    """Candidate patch corners, preferring soft tissue, then body, then anywhere."""
    from scipy.ndimage import gaussian_filter
    lo, hi = SOFT_TISSUE_HU
    guide_hu = gaussian_filter(np.asarray(guide_hu, dtype=np.float32), 2.0)
    for mask, frac in (((guide_hu > lo) & (guide_hu < hi), 0.5), (guide_hu > -500, 0.5)):
        corners = _valid_corners(mask, patch, frac)
        if len(corners) >= 16:
            return corners
    h, w = guide_hu.shape
    ys, xs = np.meshgrid(np.arange(h - patch + 1), np.arange(w - patch + 1), indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1)


@dataclass
class FitResult:
    logits: list[float]
    loss_uniform: float           # loss of the uniform blend on fixed evaluation patches
    loss_final: float             # loss of the learned blend on the same patches
    history: list[float]          # training loss per iteration


def _crop(x: torch.Tensor, ys: np.ndarray, xs: np.ndarray, size: int, dim: int = 0) -> torch.Tensor:
    """Stack ``x[..., y:y+size, x:x+size]`` over corners along a new dimension ``dim``."""
    return torch.stack([x[..., int(y):int(y) + size, int(x_):int(x_) + size] for y, x_ in zip(ys, xs)], dim=dim)


def _box_sums(maps: torch.Tensor, ys: np.ndarray, xs: np.ndarray, size: int) -> torch.Tensor:
    """(C, h, w) maps -> (N, C) sums over the windows [y:y+size, x:x+size] (integral image)."""
    ii = F.pad(maps.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
    y0, x0 = torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(xs, dtype=torch.long)
    y1, x1 = y0 + size, x0 + size
    return (ii[:, y1, x1] - ii[:, y0, x1] - ii[:, y1, x0] + ii[:, y0, x0]).T


def _pool(corners: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Up to ``size`` distinct patch corners, drawn with a seeded generator."""
    rng = np.random.default_rng(seed + 104729)
    if len(corners) <= size:
        return corners
    return corners[np.sort(rng.choice(len(corners), size=size, replace=False))]


def fit_step_weights(steps: torch.Tensor, target_unit: torch.Tensor, mode: str = "paired", *,
                     iterations: int = 600, patch_size: int = 96, batch_size: int = 8,
                     lr: float = 0.05, seed: int = 0, ssim_weight: float = 0.0,
                     pool_size: int = 256, guide_unit: torch.Tensor | None = None,
                     anchor_unit: torch.Tensor | None = None, fidelity_weight: float = 1.0,
                     progress: ProgressFn | None = None,
                     cancel: Callable[[], bool] | None = None) -> FitResult:
    """Fit the T logits on random patches of cached per-step outputs.

    ``steps``: (T, 1, H, W) or (T, H, W) in [0, 1]; ``target_unit``: (H', W') or (1, H', W')
    normal-dose slice in [0, 1] on the reference's grid (H' = H: :func:`on_reference_grid` puts
    an unpaired slice there). Paired: patches are co-located; loss :func:`paired_loss`.
    Unpaired: :func:`texture_distance` on patches at the same place. Both losses are
    quadratic forms in the weights on a patch (the MSE of a blend; the band energy of a blend,
    since the filter bank is linear), so their matrices are precomputed once for up to
    ``pool_size`` random patches and every iteration is a few tiny matrix products on a
    batch drawn from that pool (with ``ssim_weight`` the paired loss is computed directly).
    Adam with a cosine-decayed step size; logits start at 0 (uniform weights).

    ``guide_unit`` (H, W), default the last step, picks where patches are drawn and the
    output's soft-tissue mask. ``anchor_unit`` (H, W) adds, in unpaired mode,
    ``fidelity_weight`` x :func:`_lowpass_hu` agreement with that aligned image. :func:`adapt`
    passes the LDCT reference slice for both: it is aligned with the outputs by construction
    and does not depend on how well the model copes with the dose.
    ``progress(i, iterations)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if steps.ndim == 4:
        steps = steps[:, 0]
    target = target_unit[0] if target_unit.ndim == 3 else target_unit
    steps, target = steps.detach().float().cpu(), target.detach().float().cpu()
    T, H, W = steps.shape
    Ht, Wt = target.shape
    if (Ht, Wt) != (H, W):
        raise CoreDiffError(f"{mode} target {Ht}x{Wt} and reference slice {H}x{W} differ in size"
                            + (": put it on the reference's grid (on_reference_grid)" if mode == "unpaired" else ""))
    p = min(patch_size, H, W)
    if mode == "unpaired" and p < UNPAIRED_MIN_PATCH:
        raise CoreDiffError(f"the unpaired texture loss needs slices and patches of at least "
                            f"{UNPAIRED_MIN_PATCH}x{UNPAIRED_MIN_PATCH} pixels")
    guide = steps[-1] if guide_unit is None else guide_unit.detach().float().cpu().reshape(H, W)
    corners = _patch_corners(_hu(guide).numpy(), p)
    rng = np.random.default_rng(seed)

    if mode == "paired" and ssim_weight:
        def make_batch(cs: np.ndarray):
            return _crop(steps[:, None], cs[:, 0], cs[:, 1], p, dim=1), _crop(target[None], cs[:, 0], cs[:, 1], p)

        def batch_loss(batch, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
            src, tgt = batch
            return paired_loss(combine_steps(src, logits), tgt, ssim_weight), 1
    elif mode == "paired":
        # Since the weights sum to 1, blend - target = sum_k w_k (x_k - target), so a patch's
        # MSE is the quadratic form w^T D w with D_kl = mean(d_k d_l), d_k = x_k - target:
        # precompute D for a pool of patches; iterations are then tiny matrix products.
        pool = _pool(corners, pool_size, seed)
        d = (steps - target[None]).double()
        grams_p = torch.stack([_box_sums(d[k] * d, pool[:, 0], pool[:, 1], p) for k in range(T)], 1)
        grams_p = (grams_p / (p * p)).float()                               # (N, T, T)
        corners = np.arange(len(pool))[:, None]  # batches now index the pool

        def make_batch(cs: np.ndarray):
            return cs[:, 0]

        def batch_loss(idx, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
            w = torch.softmax(logits, 0)
            return torch.einsum("k,nkj,j->n", w, grams_p[idx], w).mean(), 1
    else:
        # The masked band energy of a blend is a quadratic form in the weights,
        # E(p) = p^T G p with G_kl = sum(M r_k r_l) / sum(M): precompute G for a pool of
        # patches once, then every iteration is a few tiny matrix products.
        resp = filter_responses(steps[:, None])            # per level (T, 3, h, w)
        out_masks = soft_tissue_masks(guide[None, None])   # the reference slice's soft tissue
        tgt_resp = filter_responses(target[None, None])
        tgt_masks = soft_tissue_masks(target[None, None])
        pool = _pool(corners, pool_size, seed)
        grams, tgt_energy, keep = [], [], []
        for level in range(LEVELS):
            q = (p >> level) - 2 * _RADIUS
            ys, xs = pool[:, 0] >> level, pool[:, 1] >> level
            r = resp[level].double()                                       # (T, 3, h, w)
            m = out_masks[level][0, 0].double()
            area = _box_sums(m[None], ys, xs, q)                           # (N, 1)
            g = torch.stack([_box_sums((r[k] * m * r).reshape(T * 3, *m.shape), ys, xs, q).view(-1, T, 3)
                             for k in range(T)], 2)                        # (N, T=l, T=k, 3)
            grams.append((g.permute(0, 3, 2, 1) / area.clamp_min(1.0)[:, :, None, None]).float())
            rt, mt = tgt_resp[level][0].double(), tgt_masks[level][0, 0].double()
            area_t = _box_sums(mt[None], ys, xs, q)
            e_t = _box_sums(rt.pow(2) * mt, ys, xs, q) / area_t.clamp_min(1.0)   # (N, 3)
            tgt_energy.append(torch.log(e_t + _ENERGY_EPS_HU2).float())
            keep.append(((area >= MIN_MASK_PIXELS) & (area_t >= MIN_MASK_PIXELS)).float()[:, 0])
        grams_all = torch.stack(grams, 1)                                  # (N, L, 3, T, T)
        tgt_all = torch.stack(tgt_energy, 1)                               # (N, L, 3)
        keep_all = torch.stack(keep, 1)[:, :, None].expand_as(tgt_all)     # (N, L, 3)
        grams_fid = None
        if anchor_unit is not None and fidelity_weight > 0:
            # fidelity: the blend's low-pass must agree with the (aligned) LDCT's low-pass
            anchor = anchor_unit.detach().float().cpu().reshape(H, W)
            d = (_lowpass_hu(steps) - _lowpass_hu(anchor[None])).double() / FIDELITY_TOLERANCE_HU
            grams_fid = (torch.stack([_box_sums(d[k] * d, pool[:, 0], pool[:, 1], p) for k in range(T)], 1)
                         / (p * p)).float()                                # (N, T, T)
        corners = np.arange(len(pool))[:, None]  # batches now index the pool

        def make_batch(cs: np.ndarray):
            return cs[:, 0]

        def batch_loss(idx, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
            w = torch.softmax(logits, 0)
            energy = torch.einsum("k,nlfkj,j->nlf", w, grams_all[idx], w)
            k = keep_all[idx]
            n = int(k.sum())
            diff = (torch.log(energy + _ENERGY_EPS_HU2) - tgt_all[idx]).pow(2) * k
            loss = diff.sum() / max(n, 1)
            if grams_fid is not None:
                loss = loss + fidelity_weight * torch.einsum("k,nkj,j->n", w, grams_fid[idx], w).mean()
            return loss, n

    # fixed evaluation patches (their own stream) to report uniform vs learned loss
    eval_rng = np.random.default_rng(seed + 7919)
    eval_batch = make_batch(corners[eval_rng.integers(len(corners), size=max(32, batch_size))])
    logits = torch.zeros(T, dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        loss_uniform, n_eval = batch_loss(eval_batch, logits)
    if n_eval == 0:
        raise CoreDiffError("the reference slices hold too little soft tissue for the unpaired loss: "
                            "pick a slice through the body (abdomen, pelvis, chest wall)")
    # Adam written out for one small vector: torch.optim's first use imports torch._dynamo,
    # which alone costs seconds on a busy CPU.
    m1, m2, t_adam = torch.zeros(T), torch.zeros(T), 0
    history: list[float] = []
    report = max(1, iterations // 50)
    if progress:
        progress(0, iterations)
    for it in range(iterations):
        if cancel is not None and cancel():
            from .inference import Cancelled
            raise Cancelled("cancelled by the user; no adaptation was written")
        step_size = lr * 0.5 * (1.0 + math.cos(math.pi * it / max(iterations, 1)))
        loss, n = batch_loss(make_batch(corners[rng.integers(len(corners), size=batch_size)]), logits)
        if n:
            (grad,) = torch.autograd.grad(loss, logits)
            t_adam += 1
            m1.mul_(0.9).add_(grad, alpha=0.1)
            m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
            with torch.no_grad():
                logits -= step_size * (m1 / (1 - 0.9 ** t_adam)) / ((m2 / (1 - 0.999 ** t_adam)).sqrt() + 1e-8)
        history.append(float(loss.detach()))
        if progress and ((it + 1) % report == 0 or it + 1 == iterations):
            progress(it + 1, iterations)
    with torch.no_grad():
        loss_final, _ = batch_loss(eval_batch, logits)
    return FitResult([float(v) for v in logits.detach()], float(loss_uniform), float(loss_final), history)


def adapt(model: torch.nn.Module, ldct_hu: np.ndarray, slice_index: int, ndct_hu: np.ndarray, *,
          mode: str = "paired", ndct_slice: int | None = None, name: str = "adaptation",
          dose: str | None = None, iterations: int = 600, patch_size: int = 96, batch_size: int = 8,
          lr: float = 0.05, seed: int = 0, ssim_weight: float = 0.0, fidelity_weight: float = 1.0,
          progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None,
          info: dict | None = None, neighbours: bool = True,
          ldct_spacing_xy: Sequence[float] | None = None, ndct_spacing_xy: Sequence[float] | None = None) -> Adaptation:
    """Learn an :class:`Adaptation` of ``model`` from one reference slice of a new dose.

    ``ldct_hu``: (S, H, W) LDCT volume in HU at the new dose; ``slice_index`` picks the
    reference slice (its neighbours are the context). ``ndct_hu``: (S', H', W') normal-dose
    volume in HU (or a single (H', W') slice). Paired: the NDCT of the same scan, aligned
    (slice ``slice_index`` is used). Unpaired: any normal-dose volume; ``ndct_slice``
    defaults to ``slice_index + 2`` clamped to the volume, as in the paper's reference code;
    it is put on the reference's grid (:func:`on_reference_grid`) with the two pixel sizes
    ``ndct_spacing_xy`` and ``ldct_spacing_xy`` ((columns, rows) mm; left out: equal).
    ``progress(done, total)`` counts T network evaluations plus the fitting iterations.
    ``neighbours`` False: the reference slice is its own context (thick slices, as ``denoise``
    then runs them: :data:`~CoreDiffLib.inference.THICK_SLICE_MM`).
    """
    validate_name(name)
    if mode not in MODES:
        raise CoreDiffError(f"mode must be 'paired' or 'unpaired', not '{mode}'")
    ldct_hu = np.asarray(ldct_hu, dtype=np.float32)
    ndct_hu = np.asarray(ndct_hu, dtype=np.float32)
    if ldct_hu.ndim == 2:
        ldct_hu = ldct_hu[None]
    if ndct_hu.ndim == 2:
        ndct_hu = ndct_hu[None]
    n = ldct_hu.shape[0]
    if not 0 <= slice_index < n:
        raise CoreDiffError(f"reference slice {slice_index} is out of range 0..{n - 1} "
                            f"(the LDCT volume has {n} slices)")
    if mode == "paired":
        alone = ndct_hu.shape[0] == 1 and ndct_hu.shape[1:] == ldct_hu.shape[1:]  # the reference's own NDCT
        if ndct_hu.shape != ldct_hu.shape and not alone:
            raise CoreDiffError(f"paired NDCT {ndct_hu.shape} and LDCT {ldct_hu.shape} differ in shape: "
                                "paired mode needs the aligned NDCT of the same scan (use unpaired mode otherwise)")
        if ndct_slice not in (None, slice_index):
            raise CoreDiffError("paired mode uses the NDCT of the reference slice itself: do not give an NDCT slice")
        ndct_slice = slice_index
        target_index = 0 if alone else slice_index
    else:
        m = ndct_hu.shape[0]
        if ndct_slice is None:
            ndct_slice = min(slice_index + 2, m - 1)
        if not 0 <= ndct_slice < m:
            raise CoreDiffError(f"NDCT slice {ndct_slice} is out of range 0..{m - 1}")
        target_index = ndct_slice
    T = model.config.steps
    total = T + iterations
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    if progress:
        progress(0, total)
    import time
    t0 = time.perf_counter()
    steps = reference_step_outputs(model, ldct_hu, slice_index, progress=tick, neighbours=neighbours)
    t_sample = time.perf_counter() - t0
    if cancel is not None and cancel():
        from .inference import Cancelled
        raise Cancelled("cancelled by the user; no adaptation was written")
    target_hu, resampled = ndct_hu[target_index], None
    if mode == "unpaired":
        # a pixel size left out is the other one's: only two given sizes can differ
        reference_xy = tuple(float(v) for v in (ldct_spacing_xy or ndct_spacing_xy or (1.0, 1.0)))
        target_xy = tuple(float(v) for v in (ndct_spacing_xy or reference_xy))
        if target_hu.shape != ldct_hu.shape[1:] or not _same_spacing(target_xy, reference_xy):
            resampled = {"ndct_pixels": list(target_hu.shape), "ndct_spacing_xy_mm": list(target_xy),
                         "ldct_spacing_xy_mm": list(reference_xy)}
        target_hu = on_reference_grid(target_hu, target_xy, ldct_hu.shape[1:], reference_xy)
    target = torch.from_numpy(((np.clip(target_hu, HU_MIN, HU_MIN + HU_RANGE) - HU_MIN)
                               / HU_RANGE).astype(np.float32))
    guide = torch.from_numpy(((np.clip(ldct_hu[slice_index], HU_MIN, HU_MIN + HU_RANGE) - HU_MIN)
                              / HU_RANGE).astype(np.float32))
    fit = fit_step_weights(steps, target, mode, iterations=iterations, patch_size=patch_size,
                           batch_size=batch_size, lr=lr, seed=seed, ssim_weight=ssim_weight,
                           guide_unit=guide, anchor_unit=guide, fidelity_weight=fidelity_weight,
                           progress=(lambda i, _n: progress(T + i, total)) if progress else None,
                           cancel=cancel)
    t_fit = time.perf_counter() - t0 - t_sample
    meta = {
        "loss": ("mse" + (f"+{ssim_weight:g}*(1-ssim)" if ssim_weight else "")) if mode == "paired"
        else ("texture: soft-tissue log band energies, Gaussian-derivative bank at 3 scales"
              + (f" + {fidelity_weight:g} x low-pass fidelity to the LDCT" if fidelity_weight else "")),
        "iterations": iterations, "patch_size": patch_size, "batch_size": batch_size, "lr": lr,
        "seed": seed, "loss_uniform": fit.loss_uniform, "loss_final": fit.loss_final,
        "seconds_sampling": round(t_sample, 2), "seconds_fitting": round(t_fit, 2),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "base_model": getattr(model, "weights_path", None),
    }
    if resampled:  # put on the LDCT's grid (on_reference_grid)
        meta["ndct_resampled"] = resampled
    meta.update(info or {})
    return Adaptation(name=name, base_sha256=model_identity(model), dose=dose, mode=mode,
                      reference_slice=int(slice_index), ndct_slice=int(ndct_slice), steps=T,
                      weights=fit.logits, info=meta)


# ----------------------------------------------------------------------------- command line
def _mm(spacing_xy: Sequence[float]) -> str:
    return "x".join(f"{v:.3g}" for v in spacing_xy) + " mm"


def _same_spacing(a: Sequence[float], b: Sequence[float], rel: float = 1e-3) -> bool:
    return all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-6) for x, y in zip(a, b))


def _check_reference_noise(args, ldct, ldct_xy, ndct_slice_hu, ndct_xy, paired: bool) -> None:
    """Refuse a reference slice without a body to learn from, and a paired normal-dose slice that
    is not quieter than the low-dose one (the same scan given twice, or the two swapped): the
    weights would learn to keep the noise, and the fit's loss would look excellent. An unpaired
    one (another patient, size or thickness) may measure noisier for other reasons: a note."""
    from .cli import info
    from .dose_estimate import measure
    try:
        low = measure(ldct[args.slice:args.slice + 1], ldct_xy).noise_index_hu
    except CoreDiffError as exc:
        raise CoreDiffError(f"--slice {args.slice} of {args.ldct}: {exc}: choose a slice through the body") from None
    try:
        normal = measure(ndct_slice_hu[None], ndct_xy).noise_index_hu
    except CoreDiffError:
        return  # an unpaired slice of little soft tissue: the fit says so if it matters
    if normal >= 0.95 * low:
        why = (f"the normal-dose reference is not quieter than the low-dose slice (noise index {normal:.1f} against "
               f"{low:.1f} HU)")
        if paired:
            raise CoreDiffError(f"{why}: is it the normal-dose scan? Weights learned from it would keep the "
                                "low-dose noise")
        info(args, f"note: {why}; if it is another patient's or thinner slices that may be so, but weights "
                   "fitted to its texture will keep much of the low-dose noise")


def cmd_oneshot(args) -> int:
    """``corediff oneshot``: learn and save an adaptation; last stdout line ``RESULT <path>``."""
    from .cli import PhasedProgress, info, note
    from .inference import axial_layout, axial_view, pick_device, uses_neighbours
    from .io import read_volume, slice_of, voxel_grid_difference
    from .models import load_model

    # everything that can be checked cheaply is checked before any heavy work
    name = validate_name(args.name)
    for flag, value in (("--ldct", args.ldct), ("--ndct", args.ndct), ("--ndct-unpaired", args.ndct_unpaired)):
        if value is not None and not value.strip():
            raise CoreDiffError(f"{flag} is empty: give a volume file or DICOM folder")
    if args.ndct_slice is not None and args.ndct_unpaired is None:
        raise CoreDiffError("--ndct-slice is for unpaired mode: use it with --ndct-unpaired")
    if args.iterations < 1:  # 0 saved the uniform blend, worse than no adaptation
        raise CoreDiffError(f"--iterations must be >= 1, got {args.iterations}")
    if args.ssim_weight and args.ndct_unpaired is not None:
        raise CoreDiffError("--ssim-weight is for paired mode: the unpaired fit compares texture, not pixels")
    if args.patch_size < 16:
        raise CoreDiffError(f"--patch-size {args.patch_size}: give 16 pixels or more (default 96)")
    if args.seed < 0:
        raise CoreDiffError(f"--seed {args.seed}: give a whole number >= 0")
    if not (math.isfinite(args.ssim_weight) and args.ssim_weight >= 0):
        raise CoreDiffError(f"--ssim-weight {args.ssim_weight}: give 0 (MSE only) or a weight > 0")
    if args.dose is not None and not (args.dose.strip() and args.dose.isprintable() and len(args.dose) <= 32):
        raise CoreDiffError(f"--dose {args.dose!r}: give a short label such as 10%")
    inputs = (args.ldct, args.ndct, args.ndct_unpaired)
    reference = args.ndct if args.ndct is not None else args.ndct_unpaired
    if Path(args.ldct).expanduser().resolve() == Path(reference).expanduser().resolve():
        raise CoreDiffError(f"--ldct and --{'ndct' if args.ndct is not None else 'ndct-unpaired'} are the same "
                            f"file ({args.ldct}): give the normal-dose scan as the reference")
    if args.out:
        out = check_output_file("--out", args.out, (".json",), inputs)
    else:
        out = default_path(name)
        if out.parent.exists() and not out.parent.is_dir():
            raise CoreDiffError(f"the adaptations folder {out.parent} is a file: move it, or use --out FILE")
        # the folder, or the nearest one above it that exists (made when the fit is saved), must be
        # writable now: the fit takes minutes
        existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            why = "is a file" if not existing.is_dir() else "is not writable by you"
            raise CoreDiffError(f"the adaptations folder {out.parent} cannot be made or written ({existing} {why}): "
                                "use --out FILE, or set COREDIFF_HOME to a folder you can write to")
    if out.is_dir():
        raise CoreDiffError(f"{out} is a folder: give another --name/--out")
    if out.exists() and not args.overwrite:
        if not is_outdated(out):
            raise CoreDiffError(f"{out} already exists: choose another --name/--out or pass --overwrite")
        info(args, f"{out} was made by an earlier CoreDiff and cannot be used any more: replacing it")
    paired = args.ndct is not None
    device = pick_device(args.device)  # an unavailable device is refused before the volumes are read
    ldct_volume = read_volume(args.ldct, log=note)
    # the axial planes, however the series is stored (a reformat): --slice counts them, as denoise runs them
    ldct, ldct_xy = axial_view(ldct_volume)
    layout = axial_layout(ldct_volume.direction, ldct_volume.array.shape)
    slice_mm = ldct_volume.axial_slice_mm()
    model_name = args.model
    if model_name == AUTO_MODEL:  # the base nearest the new dose: what the steps can be re-weighted from
        from .cli import choose_dose_model
        model_name, _ = choose_dose_model(args, ldct, ldct_xy, explicit=False)
    model = load_model(model_name, device)
    n = ldct.shape[0]
    if not 0 <= args.slice < n:
        raise CoreDiffError(f"--slice {args.slice} is out of range 0..{n - 1} ({args.ldct} has {n} slices)")
    ndct_volume = read_volume(args.ndct if paired else args.ndct_unpaired, log=note)
    ndct, ndct_xy = axial_view(ndct_volume)
    if not paired:
        # the normal-dose slice is put on the LDCT's grid: its field of view counts in the LDCT's pixels
        span = int(min(ndct.shape[1] * ndct_xy[1] / ldct_xy[1], ndct.shape[2] * ndct_xy[0] / ldct_xy[0]))
        for what, size in (("--patch-size", args.patch_size), (f"the --ldct slices ({ldct.shape[1]}x{ldct.shape[2]})",
                                                                min(ldct.shape[1:])),
                           (f"the --ndct-unpaired slices ({ndct.shape[1]}x{ndct.shape[2]} pixels of {_mm(ndct_xy)}: "
                            f"{span} of the LDCT's {_mm(ldct_xy)} pixels across)", span)):
            if size < UNPAIRED_MIN_PATCH:
                raise CoreDiffError(f"{what}: the unpaired texture loss needs at least {UNPAIRED_MIN_PATCH} pixels")
    if paired:
        differs = voxel_grid_difference(ndct_volume, ldct_volume)
        if differs == "shape" and ndct.shape[0] == 1 and ndct.shape[1:] == ldct.shape[1:] \
                and layout is None:
            # one NDCT slice, the reference's own: found on the LDCT's grid by where it lies
            found = slice_of(ldct_volume, ndct_volume)
            if found is None:
                raise CoreDiffError("the one --ndct slice is not a slice of the --ldct scan (another place, pixel "
                                    "spacing or orientation): paired mode needs the aligned normal-dose slice "
                                    "(use --ndct-unpaired otherwise)")
            if found != args.slice:
                raise CoreDiffError(f"the one --ndct slice lies at --ldct slice {found}, not at --slice "
                                    f"{args.slice}: give --slice {found} (its neighbours are the context)")
            differs = None
        if differs == "shape":
            raise CoreDiffError(f"--ndct volume {ndct_volume.shape} and --ldct volume {ldct_volume.shape} differ in "
                                "shape: paired mode needs the aligned normal-dose scan of the same patient "
                                "(use --ndct-unpaired for a non-aligned one)")
        if differs == "spacing":
            raise CoreDiffError(f"--ndct spacing {tuple(round(s, 4) for s in ndct_volume.spacing)} differs from "
                                f"--ldct spacing {tuple(round(s, 4) for s in ldct_volume.spacing)}: paired volumes "
                                "must share their geometry (use --ndct-unpaired otherwise)")
        if differs == "place":
            raise CoreDiffError("--ndct and --ldct lie in different places (origin or direction): paired volumes "
                                "must be two scans of the same voxels (use --ndct-unpaired otherwise)")
        ndct_slice = None
        ndct_index = 0 if ndct.shape[0] == 1 else args.slice
    else:
        m = ndct.shape[0]
        ndct_slice = args.ndct_slice if args.ndct_slice is not None else min(args.slice + 2, m - 1)
        if not 0 <= ndct_slice < m:
            raise CoreDiffError(f"--ndct-slice {ndct_slice} is out of range 0..{m - 1} "
                                f"({args.ndct_unpaired} has {m} slices)")
        ndct_index = ndct_slice
        info(args, "note: unpaired weights are fitted without an aligned reference and can cost PSNR (on held-out "
                   "phantoms from +0.15 to -1.28 dB, docs/benchmarks/oneshot_states): compare the result with "
                   "the unadapted one; a paired slice is safer")
        if ndct.shape[1:] != ldct.shape[1:] or not _same_spacing(ndct_xy, ldct_xy):
            info(args, f"the unpaired NDCT slice ({ndct.shape[2]}x{ndct.shape[1]} pixels of {_mm(ndct_xy)}) is "
                       f"resampled to the LDCT's pixel size ({_mm(ldct_xy)}) and centred on its "
                       f"{ldct.shape[2]}x{ldct.shape[1]} grid: texture is compared at one scale")
    _check_reference_noise(args, ldct, ldct_xy, ndct[ndct_index], ndct_xy, paired)
    info(args, f"one-shot {'paired' if paired else 'unpaired'} adaptation '{name}': reference slice {args.slice}"
               f" of {Path(args.ldct).name}, NDCT slice {args.slice if paired else ndct_slice}, "
               f"T={model.config.steps}, {args.iterations} iterations")
    neighbours = uses_neighbours(float(slice_mm), trained_neighbour_mm=getattr(model, "trained_neighbour_mm", None))
    if not neighbours:
        info(args, f"slices {slice_mm:g} mm apart: the reference slice is its own context, as "
                   "`corediff denoise --context auto` runs them with this model")
    # the T network evaluations take seconds each, the fit's iterations milliseconds: a bar each
    progress = PhasedProgress(args.progress, [("one-shot: sampling", model.config.steps, "step"),
                                              ("one-shot: fitting", args.iterations, "it")])
    try:
        adaptation = adapt(model, ldct, args.slice, ndct, mode="paired" if paired else "unpaired",
                           ndct_slice=ndct_slice, name=name, dose=args.dose, iterations=args.iterations,
                           patch_size=args.patch_size, seed=args.seed, ssim_weight=args.ssim_weight,
                           progress=progress,
                           info={"ldct": str(Path(args.ldct).resolve()),
                                 "ndct": str(Path(args.ndct if paired else args.ndct_unpaired).resolve()),
                                 "model": str(model_name)}, neighbours=neighbours,
                           ldct_spacing_xy=ldct_xy, ndct_spacing_xy=ndct_xy)
    finally:
        progress.close()
    path = adaptation.save(out, overwrite=args.overwrite, replace_outdated=True)
    probs = ", ".join(f"{p:.2f}" for p in adaptation.probabilities)
    meta = adaptation.info
    info(args, f"step weights (first..last step): {probs}")
    info(args, f"loss {meta['loss_uniform']:.4g} (uniform) -> {meta['loss_final']:.4g}; "
               f"sampling {meta['seconds_sampling']:.1f} s, fitting {meta['seconds_fitting']:.1f} s")
    use = adaptation.name if args.out is None else path  # a saved name is found by name; a file by its path
    info(args, f"wrote {path}: corediff denoise IN OUT --adaptation {use} applies it")
    print(f"RESULT {path}", flush=True)
    return 0


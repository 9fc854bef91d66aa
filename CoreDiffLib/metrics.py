"""Image-quality metrics exactly as the CoreDiff paper reports them.

Both images are clipped to the [-1000, 1000] HU window and scaled to [0, 1]; PSNR and SSIM
(11x11 Gaussian window, sigma 1.5, scikit-image's implementation) are computed per slice on
that scale, RMSE in HU on the clipped values. Volume figures are means over slices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from skimage.metrics import structural_similarity

from . import CoreDiffError
from .intensity import METRIC_WINDOW_HU

_LO, _HI = METRIC_WINDOW_HU
_SSIM_CROP = 5  # scikit-image averages the SSIM map without the (11 - 1) / 2 border pixels


#: the largest |value| of an image that looks normalised ([0, 1] or [-1, 1]) rather than in HU
_NORMALISED_MAX = 2.0


def _windowed_pair(image_hu: np.ndarray, reference_hu: np.ndarray, slice_only: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Both images on the metric scale, once they are known to be comparable: numpy would
    broadcast a slice against a volume, and normalised images would score ~116 dB, both silently."""
    image, reference = np.asarray(image_hu), np.asarray(reference_hu)
    if image.shape != reference.shape:
        raise CoreDiffError(f"the image {image.shape} and its reference {reference.shape} differ in shape: "
                            "score the same slices of the same scan")
    if slice_only and image.ndim != 2:
        raise CoreDiffError(f"SSIM takes one 2-D slice, not an array of shape {image.shape}: for a volume use "
                            "volume_metrics, which scores each slice as the paper does")
    if image.size and all(float(np.nanmax(np.abs(a))) <= _NORMALISED_MAX for a in (image, reference)) \
            and np.ptp(image) + np.ptp(reference) > 0:
        raise CoreDiffError("the metrics take images in HU, and these lie within ±2 (normalised?): convert "
                            "them back to HU first (intensity.unit_to_hu)")
    return _window(image), _window(reference)


def _window(hu: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(hu, dtype=np.float64), _LO, _HI) - _LO) / (_HI - _LO)


def psnr(image_hu: np.ndarray, reference_hu: np.ndarray) -> float:
    image, reference = _windowed_pair(image_hu, reference_hu)
    mse = float(np.mean((image - reference) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def rmse_hu(image_hu: np.ndarray, reference_hu: np.ndarray) -> float:
    image, reference = _windowed_pair(image_hu, reference_hu)
    return float(np.sqrt(np.mean((image - reference) ** 2)) * (_HI - _LO))


def ssim(image_hu: np.ndarray, reference_hu: np.ndarray) -> float:
    """SSIM of one 2-D slice (Gaussian 11x11, sigma 1.5, as in the paper)."""
    return float(ssim_map(image_hu, reference_hu).mean())


def ssim_map(image_hu: np.ndarray, reference_hu: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of one 2-D slice, cropped to where the 11x11 window fits, as :func:`ssim`
    averages it: to see which regions (air, lung, soft tissue, bone) a difference comes from."""
    _, full = structural_similarity(*_windowed_pair(image_hu, reference_hu, slice_only=True), data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
    return full[_SSIM_CROP:-_SSIM_CROP, _SSIM_CROP:-_SSIM_CROP]


def ssim_local_mean(image: np.ndarray) -> np.ndarray:
    """SSIM's local mean: scikit-image's Gaussian window (sigma 1.5, 11 taps), any scale."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(image, dtype=np.float64), sigma=1.5, truncate=3.5)


def ssim_terms(image_hu: np.ndarray, reference_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SSIM's two factors per pixel, cropped as :func:`ssim_map`: luminance and contrast-structure.

    Their product is the SSIM map. They tell a level error from a texture error: in the air the
    window's floor (−1000 HU) puts both images' local means near 0 on the [0, 1] scale, where the
    luminance factor's constant C1 = 1e-4 is all that cushions it, so local means (of the clipped
    images) 1 HU apart cost ~0.0025 there, while the same error inside the body costs almost nothing.
    """
    x, y = _windowed_pair(image_hu, reference_hu, slice_only=True)
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # scikit-image's K1, K2 with data_range 1
    mean = ssim_local_mean
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    luminance = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    contrast_structure = (2 * cxy + c2) / (vx + vy + c2)
    crop = (slice(_SSIM_CROP, -_SSIM_CROP),) * 2
    return luminance[crop], contrast_structure[crop]


@dataclass
class SliceMetrics:
    psnr: float
    ssim: float
    rmse_hu: float


def slice_metrics(image_hu: np.ndarray, reference_hu: np.ndarray) -> SliceMetrics:
    return SliceMetrics(psnr(image_hu, reference_hu), ssim(image_hu, reference_hu),
                        rmse_hu(image_hu, reference_hu))


def volume_metrics(volume_hu: np.ndarray, reference_hu: np.ndarray) -> list[SliceMetrics]:
    """Per-slice metrics of two (slices, rows, cols) volumes."""
    if np.shape(volume_hu) != np.shape(reference_hu) or np.ndim(volume_hu) != 3:
        raise CoreDiffError(f"volume_metrics takes two (slices, rows, cols) volumes of one shape, not "
                            f"{np.shape(volume_hu)} and {np.shape(reference_hu)}")
    return [slice_metrics(a, b) for a, b in zip(volume_hu, reference_hu)]


def blank_in_window(reference_hu: np.ndarray) -> bool:
    """True for a reference slice that is one value once clipped to the metric window (padding or
    air below -1000 HU only): it has nothing to score, and an identical slice would give an
    infinite PSNR that swamps a mean."""
    clipped = np.clip(np.asarray(reference_hu), _LO, _HI)
    return bool(clipped.min() == clipped.max())


def mean_metrics(per_slice: list[SliceMetrics]) -> SliceMetrics:
    return SliceMetrics(float(np.mean([m.psnr for m in per_slice])),
                        float(np.mean([m.ssim for m in per_slice])),
                        float(np.mean([m.rmse_hu for m in per_slice])))


@dataclass(frozen=True)
class PairedDifference:
    """mean(a − b) over paired samples, its confidence interval, and how often a beat b."""

    mean: float
    low: float
    high: float
    a_better: int
    n: int


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Compare two methods scored on the same slices (Student-t interval on the differences).

    Why paired: PSNR varies far more between slices than between two good methods on one
    slice; differencing per slice removes that, so a 0.2 dB gap can be told from chance.
    Slices of one phantom are correlated, so read the interval as optimistic.
    """
    from scipy import stats
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two equal-length 1-D sequences of at least 2 paired scores, got {a.shape} and {b.shape}")
    d = a - b
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    mean = float(d.mean())
    return PairedDifference(mean, mean - half, mean + half, int((d > 0).sum()), int(d.size))

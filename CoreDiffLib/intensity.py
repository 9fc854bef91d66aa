"""Hounsfield units <-> the [0, 1] range the network works in, and what a CT array in HU is.

The checks live here, not in :mod:`io`, so the compute path (training, inference,
benchmarks) runs where SimpleITK is not installed, e.g. a bare GPU server.

The paper (and its reference code) clips HU to [-1024, 3072] and maps linearly to [0, 1].
Keeping the full bone range avoids clipping cortical bone and metal-free implants.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

import numpy as np

from . import CoreDiffError

if TYPE_CHECKING:  # torch is not imported at run time: this module serves the torch-free paths too
    import torch

#: what the conversions take and give: a NumPy array (HU from a file) or a tensor (in the network)
ArrayOrTensor = Union[np.ndarray, "torch.Tensor"]

HU_MIN = -1024.0
HU_MAX = 3072.0
HU_RANGE = HU_MAX - HU_MIN

#: Window on which the paper computes PSNR / SSIM / RMSE.
METRIC_WINDOW_HU = (-1000.0, 1000.0)
#: Values at or below this are treated as "outside the field of view" padding (-2000, -3024...).
PADDING_THRESHOLD_HU = -1500.0
#: Soft-tissue display window used for figures (W 300 / L 50).
DISPLAY_WINDOW_HU = (-100.0, 200.0)


def hu_to_unit(hu: ArrayOrTensor) -> ArrayOrTensor:
    """Clip HU to [-1024, 3072] and map to [0, 1]. Works on numpy arrays and torch tensors."""
    if hasattr(hu, "clamp"):  # torch tensor
        return (hu.clamp(HU_MIN, HU_MAX) - HU_MIN) / HU_RANGE
    return ((np.clip(np.asarray(hu, dtype=np.float32), HU_MIN, HU_MAX) - HU_MIN) / HU_RANGE).astype(np.float32)


def unit_to_hu(x: ArrayOrTensor) -> ArrayOrTensor:
    """Inverse of :func:`hu_to_unit` (values outside [0, 1] are mapped linearly)."""
    return x * HU_RANGE + HU_MIN


def validate_ct_array(array: np.ndarray, name: str = "volume") -> None:
    """Reject what is not a CT volume in HU, with a message that says how to fix it."""
    if array.ndim != 3 or min(array.shape) < 1:
        raise CoreDiffError(f"{name} has shape {array.shape}: expected (slices, rows, cols)")
    if array.shape[1] < 16 or array.shape[2] < 16:
        raise CoreDiffError(f"{name} slices are {array.shape[1]}x{array.shape[2]}: at least 16x16 needed")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise CoreDiffError(f"{name} contains {bad} NaN/inf voxels: fix or mask them first")
    lo, hi = float(array.min()), float(array.max())
    if lo > -500.0:
        raise CoreDiffError(
            f"{name} does not look like CT in HU (minimum {lo:.0f}, but air is about -1000 HU). "
            "If it is CT stored without its rescale intercept (its air near 0 and water near 1024), "
            "subtract 1024; a region cropped inside the body holds no air: denoise a region with some "
            "air or the whole scan. MR, PET and ultrasound images cannot be denoised with CoreDiff")
    if hi > 40000.0:
        raise CoreDiffError(f"{name} has values up to {hi:.0f}, far beyond CT's HU range: "
                            "is it raw detector data or a non-CT image?")

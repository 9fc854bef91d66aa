"""Hounsfield units <-> the [0, 1] range the network works in.

The paper (and its reference code) clips HU to [-1024, 3072] and maps linearly to [0, 1].
Keeping the full bone range avoids clipping cortical bone and metal-free implants.
"""
from __future__ import annotations

import numpy as np

HU_MIN = -1024.0
HU_MAX = 3072.0
HU_RANGE = HU_MAX - HU_MIN

#: Window on which the paper computes PSNR / SSIM / RMSE.
METRIC_WINDOW_HU = (-1000.0, 1000.0)
#: Soft-tissue display window used for figures (W 300 / L 50).
DISPLAY_WINDOW_HU = (-100.0, 200.0)


def hu_to_unit(hu):
    """Clip HU to [-1024, 3072] and map to [0, 1]. Works on numpy arrays and torch tensors."""
    if hasattr(hu, "clamp"):  # torch tensor
        return (hu.clamp(HU_MIN, HU_MAX) - HU_MIN) / HU_RANGE
    return ((np.clip(np.asarray(hu, dtype=np.float32), HU_MIN, HU_MAX) - HU_MIN) / HU_RANGE).astype(np.float32)


def unit_to_hu(x):
    """Inverse of :func:`hu_to_unit` (values outside [0, 1] are mapped linearly)."""
    return x * HU_RANGE + HU_MIN

"""Projection-domain noise: Poisson (quantum) + Gaussian (electronic), then log.

Measurement model per detector reading (one channel, one view):
    counts = Poisson(I0 * dose * exp(-p)) + Normal(0, sigma_e^2)
    p_noisy = -log(max(counts, floor) / (I0 * dose))
I0 is the unattenuated photon count per channel and view at full dose (flat fluence, no
bowtie).  The default I0 = 4e5 was calibrated so that full-dose FBP noise (Hann filter,
1152 views, 512^2, ~0.74 mm pixels) is ~10 HU in the liver of the abdomen phantom
(measured 12.6-13.2 HU at I0 = 2.5e5 -> ~10 HU at 4e5), the level of routine-dose
clinical abdomen scans; quarter dose then gives ~20 HU.  sigma_e = sqrt(10) counts is the
electronic noise level commonly used for low-dose simulation of that scanner class.

Paired data follow the noise-insertion practice used to produce the AAPM/Mayo low-dose
data: the NDCT is itself a full-dose scan (quantum noise at I0), and the low-dose counts
are obtained from the same full-dose photons by binomial thinning
(Binomial(N_full, dose) is exactly Poisson(I0*dose*exp(-p)) distributed), plus its own
electronic noise.  Every dose level therefore has exactly the Poisson statistics of a
scan at that dose, and the dose levels of one slice are nested like real noise-inserted
data.  ``add_projection_noise`` is the simple independent version.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np

DEFAULT_I0 = 4.0e5
DEFAULT_ELECTRONIC_SIGMA = float(np.sqrt(10.0))
COUNT_FLOOR = 1.0  # counts below this (photon starvation) are clamped before the log


def _check_dose(dose) -> float:
    try:
        d = float(dose)
    except (TypeError, ValueError):
        raise ValueError(f"dose must be a number in (0, 1], got {dose!r}") from None
    if not (0.0 < d <= 1.0) or not np.isfinite(d):
        raise ValueError(f"dose must be a fraction of the full dose with 0 < dose <= 1 "
                         f"(e.g. 0.25 for quarter dose), got {dose!r}")
    return d


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _to_line_integrals(counts, i0_eff, electronic_sigma, rng):
    meas = counts.astype(np.float64)
    if electronic_sigma > 0:
        meas += rng.normal(0.0, electronic_sigma, size=meas.shape)
    np.maximum(meas, COUNT_FLOOR, out=meas)
    return (np.log(i0_eff) - np.log(meas)).astype(np.float32)


def add_projection_noise(line_integrals: np.ndarray, dose: float = 1.0, I0: float = DEFAULT_I0,
                         electronic_sigma: float = DEFAULT_ELECTRONIC_SIGMA,
                         rng: Union[None, int, np.random.Generator] = None) -> np.ndarray:
    """Noisy line integrals for a scan at ``dose`` x ``I0`` (independent realisation)."""
    d = _check_dose(dose)
    if I0 <= 0:
        raise ValueError(f"I0 must be > 0, got {I0}")
    rng = _rng(rng)
    p = np.asarray(line_integrals, dtype=np.float64)
    lam = (I0 * d) * np.exp(-np.maximum(p, 0.0))
    counts = rng.poisson(lam)
    return _to_line_integrals(counts, I0 * d, electronic_sigma, rng)


def nested_dose_noise(line_integrals: np.ndarray, doses: Sequence[float], I0: float = DEFAULT_I0,
                      electronic_sigma: float = DEFAULT_ELECTRONIC_SIGMA,
                      rng: Union[None, int, np.random.Generator] = None,
                      include_full: bool = True) -> Dict[float, np.ndarray]:
    """Noisy line integrals at full dose (key 1.0) and every dose, by binomial thinning.

    The photons of a lower dose are a random subset of those of every higher dose, exactly
    as in noise-insertion data; each output has the Poisson statistics of its dose.
    """
    ds = sorted({_check_dose(d) for d in doses} | ({1.0} if include_full else set()),
                reverse=True)
    rng = _rng(rng)
    p = np.asarray(line_integrals, dtype=np.float64)
    counts = rng.poisson(I0 * np.exp(-np.maximum(p, 0.0)))
    prev = 1.0
    out: Dict[float, np.ndarray] = {}
    for d in ds:
        if d < prev:
            counts = rng.binomial(counts, d / prev)
            prev = d
        out[d] = _to_line_integrals(counts, I0 * d, electronic_sigma, rng)
    return out


def check_noise_settings(I0, electronic_sigma, window: str) -> None:
    """Refuse, before any projection, settings the noise model or the FBP cannot use (they
    failed later in NumPy's words, or a NaN sigma passed silently as no electronic noise)."""
    from .projector import _WINDOWS
    for name, value, low, strict in (("I0 (photons per detector reading)", I0, 0.0, True),
                                     ("electronic_sigma (counts)", electronic_sigma, 0.0, False)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or not np.isfinite(number) or number < low or (strict and number == low):
            raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    if str(window).lower() not in _WINDOWS:  # the filter reads it in lower case: 'Hann' is fine
        raise ValueError(f"unknown FBP window {window!r}; choose one of {', '.join(_WINDOWS)}")


def content_radius_mm(hu: np.ndarray, pixel_mm: float, air_hu: float = -990.0) -> float:
    """How far from the rotation centre (the image centre) anything but air reaches in (B, N, N)
    slices, in mm, to the far edge of the farthest such pixel."""
    size = hu.shape[-1]
    offset = (np.arange(size) - (size - 1) / 2.0) ** 2
    r2 = offset[:, None] + offset[None, :]
    occupied = (hu > air_hu).any(axis=0) if hu.ndim == 3 else hu > air_hu
    if not occupied.any():
        return 0.0
    return float(np.sqrt(r2[occupied].max()) + np.sqrt(0.5)) * pixel_mm


def simulate_ldct(ndct_hu_slices: np.ndarray, dose: Union[float, Iterable[float]],
                  geometry=None, pixel_mm: Optional[float] = None, seed: int = 0,
                  I0: float = DEFAULT_I0, electronic_sigma: float = DEFAULT_ELECTRONIC_SIGMA,
                  window: str = "hann", return_ndct: bool = False):
    """Simulate low-dose scans of given HU slices (a phantom or a clean image).

    ``ndct_hu_slices``: (N, N) or (B, N, N) HU, treated as the object.  Returns the LDCT
    HU image(s) (float32, same shape) for one dose, or a dict dose -> images for several;
    with ``return_ndct`` also the full-dose reconstruction (same noise realisation family,
    same filter) as ``(ldct, ndct)``.  ``pixel_mm`` defaults to 380 mm / N.
    """
    from .projector import (FanBeamGeometry, as_square_batch, check_fits, fbp, forward_project, hu_to_mu,
                            mu_to_hu)

    hu, squeeze = as_square_batch(ndct_hu_slices, "simulate_ldct")
    check_noise_settings(I0, electronic_sigma, window)
    if not np.isfinite(hu).all():
        raise ValueError("simulate_ldct: the image holds NaN or infinite values: fix or mask them first")
    size = hu.shape[-1]
    geometry = geometry or FanBeamGeometry()
    if pixel_mm is None:
        pixel_mm = 380.0 / size
    elif not (isinstance(pixel_mm, (int, float, np.floating, np.integer)) and np.isfinite(pixel_mm) and pixel_mm > 0):
        raise ValueError(f"pixel_mm must be the pixel size in mm, a number > 0, got {pixel_mm!r}")
    pixel_mm = float(pixel_mm)
    check_fits(geometry, size * pixel_mm / 2.0 * 0.999, "image half-width")
    # and its corners: what lies there beyond the field of view is seen by some views only, and
    # comes back hundreds of HU off (a water-filled square: +230 HU there)
    check_fits(geometry, content_radius_mm(hu, pixel_mm), "image content (above -990 HU)")
    single = np.isscalar(dose)
    doses = [_check_dose(dose)] if single else [_check_dose(d) for d in dose]
    if not doses:  # it would project and reconstruct for nothing
        raise ValueError("dose list is empty; give at least one dose fraction in (0, 1]")
    rng = np.random.default_rng(seed)
    sino = forward_project(hu_to_mu(hu), geometry, pixel_mm)
    noisy = [nested_dose_noise(s, doses, I0, electronic_sigma, rng) for s in sino]
    keys = sorted(set(doses) | {1.0}, reverse=True)
    stack = np.stack([noisy[i][d] for d in keys for i in range(len(noisy))])
    rec = mu_to_hu(fbp(stack, geometry, size, pixel_mm, window=window))
    B = hu.shape[0]
    per = {d: rec[j * B:(j + 1) * B] for j, d in enumerate(keys)}
    if squeeze:
        per = {d: v[0] for d, v in per.items()}
    ldct = per[doses[0]] if single else {d: per[d] for d in doses}
    return (ldct, per[1.0]) if return_ndct else ldct

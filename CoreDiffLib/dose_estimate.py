"""Which dose a scan looks like, from its noise and the patient's size: ``--model auto``.

The shipped models are dose-specific, and the wrong one costs dB (held-out phantoms, one step:
the 25 % model on a 5 % abdomen gives 42.8 dB where the 5 % model gives 47.5). The noise alone
does not say the dose: a head at 5 % is as noisy as an abdomen at 25 %, and the models, which
see the anatomy, treat them differently (docs/benchmarks/auto_model/). CT noise grows with the
attenuation the beam crosses, so the scan is measured twice:

- its **noise index**: the mode of the local standard deviation (6 mm boxes) over soft tissue
  (local mean 0-100 HU), the "global noise index" of CT quality assurance (Christianson et al.,
  Radiology 2015), robust to edges and anatomy;
- the patient's **water-equivalent diameter** (AAPM Report 220): 2 sqrt(sum (1 + HU/1000) dA / pi)
  over the body: the largest connected region above -500 HU (so the table and cables, apart
  from it, do not count), the median over the slices measured that hold a body (air beyond the
  patient would count as 0 mm). Unlike Report 220, the lungs and bowel gas inside the outline
  are left out, not counted at their own HU (a thorax measures about 4 % smaller, an abdomen the
  same); the calibration was fitted on diameters measured this way, so it is kept. A body cut
  off by the image or the field of view measures too small, so the dose too low: the log says so
  (:meth:`ScanNoise.caveat`).

A calibration fitted on the training phantoms, log(noise) = a + b WED + c log(dose), inverts to
a dose, relative to the simulated normal dose; the model trained at the nearest dose (in log)
is chosen. On a real scanner the absolute numbers depend on kernel and slice thickness, so read
the estimate as "noise like our simulation at this dose", which is what the choice needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import CoreDiffError

if TYPE_CHECKING:
    from .streaming import SliceIndexable
from .intensity import PADDING_THRESHOLD_HU

#: the model name that asks for this choice (``denoise --model auto``, its default, and ``oneshot``)
AUTO_MODEL = "auto"
#: side of the boxes the local standard deviation is measured in
NOISE_BOX_MM = 6.0
#: local means taken as soft tissue (HU)
SOFT_TISSUE_HU = (0.0, 100.0)
#: what counts as the body for the water-equivalent diameter (HU)
BODY_HU = -500.0
#: slices measured, evenly spread over the volume
MAX_SLICES = 8
_MIN_PIXELS = 500  # soft-tissue pixels needed for a noise index


#: a slice counts only where the body covers this share of the largest body measured, and at
#: least MIN_BODY_MM2: slices of air beyond the patient, or the tip of the head, would pull the
#: diameter, so the dose, down (a wrist or a small phantom still counts: the share is relative)
MIN_BODY_SHARE = 0.25
MIN_BODY_MM2 = 500.0
#: body in contact with the image's edge (or its field of view's) over this length (mm) is cut off
CUT_CONTACT_MM = 10.0
#: water-equivalent diameters (mm) of real patients, a newborn's head to the largest adult abdomen
HUMAN_WED_MM = (60.0, 700.0)
#: parts of the body region thinner than this (mm) are a table or cables, not the patient
TABLE_MM = 20.0


@dataclass(frozen=True)
class ScanNoise:
    """What :func:`measure` finds: noise index (HU), water-equivalent diameter (mm), slices used,
    and how many of them cut the body off at the edge of the image or of its field of view
    (their diameter, so the estimated dose, is too small)."""

    noise_index_hu: float
    wed_mm: float
    slices: int
    cut_slices: int = 0

    def caveat(self) -> str:
        """A sentence for the log when the measurement is known to be biased, else ''."""
        spacing = (f"a water-equivalent diameter of {self.wed_mm:.0f} mm is no patient's: is the pixel spacing in "
                   "mm? The estimated dose means little; choose the model with --model")
        if self.wed_mm > HUMAN_WED_MM[1]:  # a cut-off body only looks smaller
            return spacing
        if self.cut_slices:  # the likelier cause of a small size, so said first
            return (f"the body reaches the edge of the image in {self.cut_slices} of {self.slices} slices measured, "
                    "so its size and the dose are underestimated: if the model looks too strong, choose one with "
                    "--model")
        return spacing if self.wed_mm < HUMAN_WED_MM[0] else ""


#: estimates outside these (fractions of the simulated normal dose) are no dose the calibration
#: knows: the scan's noise was changed by more than its dose (see :func:`estimate_caveat`)
PLAUSIBLE_DOSE = (0.02, 1.5)


def estimate_caveat(dose: float) -> str:
    """A sentence for the log when an estimated dose is beyond what a dose alone explains, else ''.

    The noise index reads a smooth kernel, thick slices or an earlier denoising as a high dose (a
    denoised scan read as 1,000 %), and a sharp kernel, or a contrast-enhanced scan whose soft tissue
    lies above 100 HU (its local SD then taken at edges), as a very low one (0.6 % for a 10 % scan);
    the model chosen may then be too mild or too strong."""
    if dose > PLAUSIBLE_DOSE[1]:
        return (f"the scan looks like {100 * dose:.0f} % of the normal dose, less noise than any dose explains: a "
                "smooth kernel, thick slices or an earlier denoising; if the result looks over-smoothed, or the "
                "scan needs no denoising, choose the model with --model")
    if dose < PLAUSIBLE_DOSE[0]:
        return (f"the scan looks like {100 * dose:.1f} % of the normal dose, more noise than the models were "
                "trained for: a sharp kernel, or strong contrast in the soft tissue, reads so too; if the result "
                "looks too smooth, choose the model with --model")
    return ""


def caveats(scan: ScanNoise, dose: float) -> list[str]:
    """Every doubt about a scan's measurement and its estimated dose, for a log (empty: none)."""
    return [c for c in (scan.caveat(), estimate_caveat(dose)) if c]


def _local_sd(image: np.ndarray, box: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage
    mean = ndimage.uniform_filter(image, box)
    mean_sq = ndimage.uniform_filter(image * image, box)
    return mean, np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a 2-D mask (all False when the mask is empty)."""
    from scipy import ndimage
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def measure(volume_hu: "SliceIndexable", spacing_xy: tuple[float, float], max_slices: int = MAX_SLICES) -> ScanNoise:
    """Noise index and water-equivalent diameter of an axial (slices, rows, cols) volume in HU.

    ``volume_hu`` may be any slice-indexable array (a :class:`~CoreDiffLib.streaming.VolumeSource`
    reads only the slices measured); a 2-D array is one slice.
    """
    if len(volume_hu.shape) == 2:
        volume_hu = np.asarray(volume_hu)[None]
    n = volume_hu.shape[0]
    if n == 0:  # (read_volume never gives one; an array from the API can)
        raise CoreDiffError("the scan has no slices to measure its noise in")
    picks = np.unique(np.linspace(0, n - 1, min(max_slices, n)).round().astype(int))
    # odd sides in pixels, (rows, cols): 6 mm along each axis, so non-square pixels give the same physical box
    box = tuple(max(3, int(round(NOISE_BOX_MM / float(spacing_xy[axis]))) | 1) for axis in (1, 0))
    pixel_area = float(spacing_xy[0]) * float(spacing_xy[1])
    measured = []
    for k in picks:
        image = np.asarray(volume_hu[k:k + 1], dtype=np.float64)[0]
        if not np.isfinite(image).all():  # one inf reads as a dose of 1e21, one NaN blanks its slice's noise
            raise CoreDiffError(f"slice {k} holds NaN or infinite values: its noise cannot be measured "
                                "(io.validate_ct_array says where)")
        region = largest_region(image > BODY_HU)
        measured.append((image, region, float(region.sum()) * pixel_area))
    largest = max(area for _, _, area in measured)
    if largest < MIN_BODY_MM2:
        raise CoreDiffError("no body found in this scan (nothing above -500 HU over 5 cm²) to measure its noise "
                            "(is the pixel spacing in mm?)")
    sds, weds, cut = [], [], 0
    for image, region, area in measured:
        if area < max(MIN_BODY_MM2, MIN_BODY_SHARE * largest):
            continue  # air, or the body's very end: neither says the patient's size
        mean, sd = _local_sd(image, box)
        sds.append(sd[(mean > SOFT_TISSUE_HU[0]) & (mean < SOFT_TISSUE_HU[1])])
        body = image[region]
        weds.append(2.0 * math.sqrt(float(np.clip(1.0 + body / 1000.0, 0.0, None).sum()) * pixel_area / math.pi))
        cut += _edge_contact_mm(image, region, spacing_xy) > CUT_CONTACT_MM
    sd = np.concatenate(sds) if sds else np.empty(0)
    if sd.size < _MIN_PIXELS:
        raise CoreDiffError(f"too little soft tissue (0-100 HU) in this scan to measure its noise ({sd.size} pixels "
                            f"of it, {_MIN_PIXELS} needed: a small or coarse image has few)")
    counts, edges = np.histogram(sd, bins=np.arange(0.0, float(sd.max()) + 0.5, 0.25))
    k = int(np.argmax(counts))
    return ScanNoise(float(edges[k] + edges[k + 1]) / 2.0, float(np.median(weds)), len(weds), int(cut))


def _edge_contact_mm(image: np.ndarray, body: np.ndarray, spacing_xy: tuple[float, float]) -> float:
    """Length (mm, roughly) over which the body touches the image's border or the padding
    outside the scanner's field of view: there the body is cut off. A table board that touches
    the body reaches the edge too, but is thin: what an opening of TABLE_MM removes is not body."""
    from scipy import ndimage
    outside = np.pad(image < PADDING_THRESHOLD_HU, 1, constant_values=True)
    edge = ndimage.binary_dilation(outside, structure=np.ones((3, 3), bool))[1:-1, 1:-1]
    pixel = math.sqrt(float(spacing_xy[0]) * float(spacing_xy[1]))
    contact = float((body & edge).sum()) * pixel
    if contact <= CUT_CONTACT_MM:
        return contact
    radius = max(1, int(round(TABLE_MM / 2 / pixel)))  # only now: an opening this wide takes a while
    disc = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
    thick = ndimage.binary_opening(body, structure=disc)
    return float((thick & edge).sum()) * pixel


@dataclass(frozen=True)
class DoseCalibration:
    """log(noise index) = a + b * WED + c * log(dose), fitted on the training phantoms."""

    a: float
    b: float
    c: float

    def dose(self, scan: ScanNoise) -> float:
        """The dose (fraction of the simulated normal dose) whose noise this scan shows."""
        exponent = (math.log(max(scan.noise_index_hu, 1e-3)) - self.a - self.b * scan.wed_mm) / self.c
        return math.exp(min(max(exponent, -50.0), 50.0))  # a nonsense size (spacing in µm) stays a number

    @classmethod
    def fit(cls, scans: list[ScanNoise], doses: list[float]) -> "DoseCalibration":
        X = np.array([[1.0, s.wed_mm, math.log(d)] for s, d in zip(scans, doses)])
        y = np.log([s.noise_index_hu for s in scans])
        a, b, c = np.linalg.lstsq(X, y, rcond=None)[0]
        return cls(float(a), float(b), float(c))


def nearest_model(dose: float, models_by_dose: dict[float, str]) -> str:
    """The model trained at the dose nearest to ``dose`` in log (doses above the highest: that one)."""
    if not models_by_dose:
        raise CoreDiffError("no dose-specific models are shipped for --model auto: choose one with --model")
    return min(models_by_dose.items(), key=lambda item: abs(math.log(item[0]) - math.log(dose)))[1]


def shipped_choice() -> tuple[DoseCalibration, dict[float, str]]:
    """The calibration and the models ``--model auto`` chooses from, as the manifest ships them."""
    from .manifest import load_manifest
    auto = load_manifest().get("auto")
    if not auto:
        raise CoreDiffError("this installation ships no calibration for --model auto: choose one with --model")
    calibration = DoseCalibration(**{k: float(auto["calibration"][k]) for k in ("a", "b", "c")})
    return calibration, {float(d): name for d, name in auto["models"].items()}


def choose_model(volume_hu: "SliceIndexable", spacing_xy: tuple[float, float]) -> tuple[str, ScanNoise, float]:
    """(model name, measurements, estimated dose) for a scan, with the shipped calibration; a scan
    whose body is cut off in most slices measured is refused (:func:`choose_model_or_default`
    then gives the default model)."""
    calibration, models = shipped_choice()
    scan = measure(volume_hu, spacing_xy)
    if 2 * scan.cut_slices > scan.slices:  # a crop of a scan: the patient's size is unknown
        raise CoreDiffError(f"the body reaches the edge of the image in {scan.cut_slices} of {scan.slices} slices "
                            "measured, so its size, and with it the dose, cannot be told (an image cropped inside "
                            "the body looks like a far lower dose: a 25 % crop chose the 5 % model and came out "
                            "worse than its input)")
    dose = calibration.dose(scan)
    return nearest_model(dose, models), scan, dose


@dataclass(frozen=True)
class AutoChoice:
    """What ``--model auto`` runs on a scan: the model for its estimated dose, or, when the scan
    cannot be measured (no body, too little soft tissue, no calibration shipped), the default
    model and why. ``denoise`` refuses the latter only when ``--model auto`` was asked for."""
    model: str
    scan: ScanNoise | None = None
    dose: float | None = None
    problem: str | None = None


def choose_model_or_default(volume_hu: "SliceIndexable", spacing_xy: tuple[float, float]) -> AutoChoice:
    """:func:`choose_model`, or the default model with the reason it could not be used."""
    try:
        model, scan, dose = choose_model(volume_hu, spacing_xy)
    except CoreDiffError as exc:
        from .manifest import default_model_name
        return AutoChoice(default_model_name(), problem=str(exc))
    return AutoChoice(model, scan, dose)

"""--model auto: a scan's noise index and water-equivalent diameter, the dose they imply, the model."""
from __future__ import annotations

import math

import numpy as np
import pytest

from CoreDiffLib import CoreDiffError
from CoreDiffLib.dose_estimate import DoseCalibration, ScanNoise, choose_model, measure, nearest_model
from CoreDiffLib.io import read_volume

from conftest import REPO


def water_cylinder(diameter_mm: float, noise_hu: float, pixel_mm: float = 0.8, size: int = 512,
                   slices: int = 3, seed: int = 0) -> np.ndarray:
    """A 0 HU cylinder in -1000 HU air, with white noise of ``noise_hu`` SD everywhere."""
    rng = np.random.default_rng(seed)
    r = np.hypot(*np.meshgrid(*(2 * [(np.arange(size) - size / 2 + 0.5) * pixel_mm])))
    image = np.where(r < diameter_mm / 2, 0.0, -1000.0)
    return image[None] + rng.normal(0, noise_hu, (slices, size, size))


def test_noise_index_is_the_noise_sd_and_wed_the_diameter_of_a_water_cylinder():
    for noise in (10.0, 20.0, 40.0):
        scan = measure(water_cylinder(300.0, noise), (0.8, 0.8))
        # white noise: the local SD in 7 x 7-pixel boxes centres on sigma (its own spread is ~10 %)
        assert scan.noise_index_hu == pytest.approx(noise, rel=0.06)
        assert scan.wed_mm == pytest.approx(300.0, rel=0.02)  # water: WED = its diameter
        assert scan.slices == 3
    assert measure(water_cylinder(200.0, 10.0), (0.8, 0.8)).wed_mm == pytest.approx(200.0, rel=0.02)


def test_a_single_slice_is_measured_and_values_that_are_not_numbers_are_refused():
    """A 2-D slice failed in scipy ('structure and input must have equal rank'); one row of inf
    read as a dose of 5e21 and chose a model silently; one NaN blanked its slice's noise."""
    scan = water_cylinder(300.0, 20.0, slices=1)
    assert measure(scan[0], (0.8, 0.8)) == measure(scan, (0.8, 0.8))
    for bad in (np.inf, np.nan):
        damaged = water_cylinder(300.0, 20.0)
        damaged[1, 256, 100:110] = bad
        with pytest.raises(CoreDiffError, match="slice 1 holds NaN or infinite values"):
            measure(damaged, (0.8, 0.8))
        with pytest.raises(CoreDiffError, match="slice 1 holds NaN or infinite values"):
            choose_model(damaged, (0.8, 0.8))


def test_the_table_under_the_patient_is_not_part_of_the_water_equivalent_diameter():
    scan = water_cylinder(250.0, 10.0)
    with_table = scan.copy()
    with_table[:, 430:445, 40:472] = 300.0  # a dense board below the body, separated from it by air
    assert measure(with_table, (0.8, 0.8)).wed_mm == pytest.approx(measure(scan, (0.8, 0.8)).wed_mm, rel=1e-3)


def test_a_calibration_fitted_on_exact_data_recovers_its_dose():
    truth = DoseCalibration(a=-0.2, b=0.01, c=-0.5)
    scans, doses = [], []
    for wed in (170.0, 220.0, 270.0):
        for dose in (1.0, 0.25, 0.1, 0.05):
            noise = math.exp(truth.a + truth.b * wed + truth.c * math.log(dose))
            scans.append(ScanNoise(noise, wed, 8))
            doses.append(dose)
    fitted = DoseCalibration.fit(scans, doses)
    assert (fitted.a, fitted.b, fitted.c) == pytest.approx((truth.a, truth.b, truth.c), abs=1e-9)
    # the same noise means a higher dose in a larger patient
    assert fitted.dose(ScanNoise(20.0, 270.0, 8)) > fitted.dose(ScanNoise(20.0, 170.0, 8))


def test_the_nearest_model_in_log_dose():
    models = {0.25: "m25", 0.1: "m10", 0.05: "m5"}
    # boundaries at the geometric means: 0.158 between 25 and 10 %, 0.0707 between 10 and 5 %
    for dose, want in ((1.0, "m25"), (0.3, "m25"), (0.16, "m25"), (0.155, "m10"), (0.072, "m10"),
                       (0.07, "m5"), (0.01, "m5")):
        assert nearest_model(dose, models) == want, dose
    with pytest.raises(CoreDiffError, match="no dose-specific models"):
        nearest_model(0.1, {})


def test_the_shipped_calibration_takes_the_bundled_sample_for_a_25_percent_scan():
    sample = read_volume(REPO / "CoreDiffLib" / "data" / "sample_abdomen_ldct25.nrrd")
    name, scan, dose = choose_model(sample.array, sample.spacing[:2])
    assert name == "corediff-25-w32"
    assert 0.25 / 1.5 < dose < 0.25 * 1.5, dose
    reference = read_volume(REPO / "CoreDiffLib" / "data" / "sample_abdomen_ndct.nrrd")
    _, ref_scan, ref_dose = choose_model(reference.array, reference.spacing[:2])
    assert ref_scan.noise_index_hu < scan.noise_index_hu / 1.6  # four times the dose: half the noise
    assert ref_dose > 0.6


def test_a_scan_without_soft_tissue_is_refused_with_what_to_do():
    air_and_bone = np.full((2, 64, 64), -1000.0)
    air_and_bone[:, 10:50, 10:50] = 700.0  # 10 cm² of bone: a body, without soft tissue
    with pytest.raises(CoreDiffError, match=r"too little soft tissue .* to measure its noise \(\d+ pixels of it, "
                                            r"500 needed: a small or coarse image has few\)"):
        measure(air_and_bone, (0.8, 0.8))


def test_a_nonsense_patient_size_gives_a_dose_not_an_overflow():
    """Spacing stored in micrometres makes the water-equivalent diameter 1000x: math.exp overflowed."""
    calibration = DoseCalibration(1.0, 0.01, -0.45)  # the shape of the fitted one: log noise = a + b WED + c log dose
    for wed in (1e6, -1e6):
        dose = calibration.dose(ScanNoise(noise_index_hu=30.0, wed_mm=wed, slices=1))
        assert math.isfinite(dose) and dose > 0
        assert "is no patient's: is the pixel spacing in mm?" in ScanNoise(30.0, wed, 1).caveat()
    assert ScanNoise(30.0, 280.0, 1).caveat() == ""
    assert "reaches the edge of the image" in ScanNoise(30.0, 42.0, 8, cut_slices=8).caveat()  # a crop: the cause
    assert "pixel spacing in mm" in ScanNoise(30.0, 1005.0, 3, cut_slices=3).caveat()  # a cut body is not bigger


def test_the_noise_box_is_the_same_physical_size_along_both_axes():
    """Non-square pixels: the noise index must not depend on which axis has the coarse spacing."""
    rng = np.random.default_rng(0)
    image = np.full((1, 240, 240), -1000.0)
    yy, xx = np.mgrid[0:240, 0:240]
    image[0][np.hypot(yy - 120, xx - 120) < 100] = 40.0
    noisy = image + rng.normal(0, 20, image.shape)
    wide = measure(noisy, (0.35, 3.0)).noise_index_hu
    tall = measure(np.ascontiguousarray(np.transpose(noisy, (0, 2, 1))), (3.0, 0.35)).noise_index_hu
    assert wide == pytest.approx(tall, rel=0.03)
    assert measure(noisy, (0.7, 0.7)).noise_index_hu == pytest.approx(20.0, rel=0.1)


def test_slices_without_a_body_do_not_shrink_the_patient_or_change_the_model():
    """Air slices beyond the patient counted as a 0 mm diameter: three of them turned the 25 %
    sample into a '5 %' scan and ran the 5 % model on it."""
    sample = read_volume(REPO / "CoreDiffLib" / "data" / "sample_abdomen_ldct25.nrrd")
    rng = np.random.default_rng(0)
    air = -1000.0 + rng.normal(0, 20, (3,) + sample.array.shape[1:])
    padded = np.concatenate([air, sample.array])
    name, scan, dose = choose_model(sample.array, sample.spacing[:2])
    padded_name, padded_scan, padded_dose = choose_model(padded, sample.spacing[:2])
    assert padded_name == name == "corediff-25-w32"
    assert padded_scan.wed_mm == pytest.approx(scan.wed_mm, rel=0.03)
    assert padded_dose == pytest.approx(dose, rel=0.2)
    assert scan.cut_slices == 0 and scan.caveat() == ""


def test_a_body_cut_off_by_the_image_edge_is_said_to_bias_the_estimate():
    whole = water_cylinder(300.0, 10.0)
    cut = whole[:, 100:412, 100:412]  # a 250 mm image of a 300 mm body
    scan = measure(cut, (0.8, 0.8))
    assert scan.cut_slices == scan.slices == 3 and scan.wed_mm < 290
    assert "reaches the edge of the image" in scan.caveat() and "--model" in scan.caveat()
    padded = whole.copy()  # the same, the body cut by a scanner's field of view (padding outside it)
    r = np.hypot(*np.meshgrid(*(2 * [np.arange(512) - 255.5])))
    padded[:, r > 160] = -3024.0
    assert measure(padded, (0.8, 0.8)).cut_slices == 3
    assert measure(whole, (0.8, 0.8)).cut_slices == 0


def test_a_scan_cut_off_in_most_slices_runs_the_default_model_not_a_guessed_one():
    """A crop inside the body measures a small patient, so a low dose: a 25 % crop chose the 5 %
    model and came out worse than its input. Cut off in most slices, its dose is not guessed."""
    from CoreDiffLib.dose_estimate import choose_model_or_default
    from CoreDiffLib.manifest import default_model_name
    sample = read_volume(REPO / "CoreDiffLib" / "data" / "sample_abdomen_ldct25.nrrd")
    crop = sample.array[:, 150:350, 150:350]
    with pytest.raises(CoreDiffError, match="reaches the edge of the image in 8 of 8 slices measured"):
        choose_model(crop, sample.spacing[:2])
    choice = choose_model_or_default(crop, sample.spacing[:2])
    assert choice.model == default_model_name() and "cannot be told" in choice.problem
    few = sample.array.copy()
    few[:3, :, :150] = few[:3, :, 150:151]  # 3 of 8 slices reach the edge: measured, with a caveat
    name, scan, _ = choose_model(few, sample.spacing[:2])
    assert scan.cut_slices == 3 and name == "corediff-25-w32" and "reaches the edge" in scan.caveat()
    few[3, :, :150] = few[3, :, 150:151]  # half of them: still measured ("most" is more than half)
    name, scan, _ = choose_model(few, sample.spacing[:2])
    assert scan.cut_slices == 4 and scan.slices == 8 and name == "corediff-25-w32"


def test_a_small_body_is_measured_and_a_table_is_not_taken_for_a_cut_body():
    """A wrist-sized body was refused once slices under 50 cm² were left out; a table touching
    the body at the edge of the field of view was reported as a body cut off."""
    small = measure(water_cylinder(70.0, 20.0), (0.8, 0.8))
    assert small.wed_mm == pytest.approx(70.0, rel=0.05) and small.noise_index_hu == pytest.approx(20.0, rel=0.1)
    with pytest.raises(CoreDiffError, match="no body found"):
        measure(np.full((2, 64, 64), -1000.0) + np.random.default_rng(0).normal(0, 20, (2, 64, 64)), (0.8, 0.8))
    on_table = water_cylinder(300.0, 10.0)
    on_table[:, 443:463, :] = 200.0  # a board under the body, across the whole field of view
    r = np.hypot(*np.meshgrid(*(2 * [np.arange(512) - 255.5])))
    on_table[:, r > 240] = -3024.0
    assert measure(on_table, (0.8, 0.8)).cut_slices == 0


def test_the_noise_index_estimator_is_pinned_and_the_diameter_is_the_median_body_slice():
    """The shipped calibration was fitted with this estimator: a change in its bias (the mode read at
    a histogram bin's edge instead of its centre: -0.125 HU) would move every scan's dose. The
    diameter is the median over body slices (a mean let one smaller slice shrink the patient), and
    slices with under a quarter of the largest body area (the shoulders' or feet's ends) are not
    the body (their count outnumbering the body's changed the diameter)."""
    assert measure(water_cylinder(300.0, 10.0), (0.8, 0.8)).noise_index_hu == pytest.approx(9.875, abs=0.06)
    one_smaller = np.concatenate([water_cylinder(300.0, 10.0, slices=4), water_cylinder(200.0, 10.0, slices=1)])
    assert measure(one_smaller, (0.8, 0.8)).wed_mm == pytest.approx(300.0, rel=0.02)
    ends = np.concatenate([water_cylinder(300.0, 10.0, slices=3), water_cylinder(110.0, 10.0, slices=4, seed=1)])
    scan = measure(ends, (0.8, 0.8))
    assert scan.slices == 3 and scan.wed_mm == pytest.approx(300.0, rel=0.02)


def test_the_bundled_scans_measure_as_they_did_when_the_calibration_was_fitted():
    """The pinned cylinder has white noise, on which the 6 mm box barely matters; on a CT's
    correlated noise it does (a 9 mm box: 19.1 -> 20.1 HU, the 25 % sample read as 20 %)."""
    from CoreDiffLib.orientation import axial_view
    data = REPO / "CoreDiffLib" / "data"
    low, normal = (axial_view(read_volume(data / f"sample_abdomen_{tag}.nrrd")) for tag in ("ldct25", "ndct"))
    scan = measure(*low)
    assert (scan.noise_index_hu, scan.wed_mm, scan.slices) == (pytest.approx(19.125, abs=0.15),
                                                                pytest.approx(255.28, abs=0.3), 8)
    assert measure(*normal).noise_index_hu == pytest.approx(9.875, abs=0.15)
    assert choose_model(*low)[0] == "corediff-25-w32" and choose_model(*low)[2] == pytest.approx(0.227, abs=0.005)
    assert choose_model(*normal)[2] == pytest.approx(0.972, abs=0.01)


def test_non_square_pixels_measure_the_same_patient_and_dose():
    """Every test scan had square pixels: an area taken as the column spacing squared went unnoticed
    (a 0.4 x 0.8 mm scan's patient measured 1/sqrt(2) the size, and its dose read wrong)."""
    y = (np.arange(400) - 199.5) * 0.8  # rows 0.8 mm apart, columns 0.4 mm: the same 300 mm cylinder
    x = (np.arange(800) - 399.5) * 0.4
    image = np.where(np.hypot(*np.meshgrid(x, y)) < 150.0, 0.0, -1000.0)
    wide = image[None] + np.random.default_rng(0).normal(0, 10.0, (3,) + image.shape)
    scan = measure(wide, (0.4, 0.8))
    assert scan.wed_mm == pytest.approx(300.0, rel=0.02) and scan.noise_index_hu == pytest.approx(10.0, rel=0.06)
    assert choose_model(wide, (0.4, 0.8))[2] == pytest.approx(choose_model(water_cylinder(300.0, 10.0), (0.8, 0.8))[2],
                                                              rel=0.05)
    # the noise box is 6 mm along each axis: (rows, columns) = (6 / 0.8, 6 / 0.4) pixels, made odd (white
    # noise, as above, reads the same in any box: the box's axes swapped passed)
    import CoreDiffLib.dose_estimate as dose_estimate
    boxes = []
    local_sd = dose_estimate._local_sd
    try:
        dose_estimate._local_sd = lambda image, box: (boxes.append(box), local_sd(image, box))[1]
        measure(wide, (0.4, 0.8))
    finally:
        dose_estimate._local_sd = local_sd
    assert set(boxes) == {(9, 15)}  # 7.5 rows round to 8, odd: 9


def test_an_estimate_beyond_what_a_dose_explains_is_said_to_be_so():
    """A denoised scan read as 1,000 % and a contrast-enhanced one as 0.6 % chose a model without a
    word (a dose/figure review): both are said, with what else makes a scan read so."""
    from CoreDiffLib.dose_estimate import PLAUSIBLE_DOSE, estimate_caveat
    assert PLAUSIBLE_DOSE == (0.02, 1.5)
    assert estimate_caveat(0.25) == estimate_caveat(0.03) == estimate_caveat(1.2) == ""
    assert "looks like 1010 % of the normal dose, less noise than any dose explains" in estimate_caveat(10.1)
    assert "looks like 0.6 % of the normal dose, more noise than the models were trained for" in estimate_caveat(0.006)


def test_which_slices_count_and_how_much_edge_contact_is_a_cut():
    """Three thresholds no test reached (each changed and every test passed): a slice counts when its
    body holds a quarter of the largest one's area; a body under 5 cm² is none; a body touching the
    image's edge over more than 10 mm is cut off."""
    from CoreDiffLib import CoreDiffError
    big = water_cylinder(300.0, 10.0, pixel_mm=1.0, size=400, slices=1)[0]
    thirty = water_cylinder(300.0 * np.sqrt(0.30), 10.0, pixel_mm=1.0, size=400, slices=1, seed=1)[0]
    twenty = water_cylinder(300.0 * np.sqrt(0.20), 10.0, pixel_mm=1.0, size=400, slices=1, seed=2)[0]
    assert measure(np.stack([big, thirty, twenty]), (1.0, 1.0)).slices == 2  # 30 % of the area counts, 20 % not
    tiny = water_cylinder(24.0, 10.0, pixel_mm=1.0, size=400, slices=1)  # 4.5 cm²
    with pytest.raises(CoreDiffError, match="no body found in this scan"):
        measure(tiny, (1.0, 1.0))
    # a small body's end under 5 cm² is no body either, though a quarter of the largest slice's area
    wrist = water_cylinder(36.0, 10.0, pixel_mm=0.5, size=200, slices=1)[0]  # 10 cm²
    its_end = water_cylinder(22.0, 10.0, pixel_mm=0.5, size=200, slices=1, seed=1)[0]  # 3.8 cm²
    assert measure(np.stack([wrist, its_end]), (0.5, 0.5)).slices == 1
    with pytest.raises(CoreDiffError, match="no slices"):  # an empty array from the API: said, not max()'s error
        measure(np.empty((0, 64, 64)), (1.0, 1.0))
    # a 300 mm body whose top reaches just past the image's edge
    r = np.hypot(*np.meshgrid(np.arange(400) - 199.5, np.arange(400) - 199.5 + 49.9))  # 22 mm of contact
    touching = np.where(r < 150.0, 0.0, -1000.0)[None] + np.random.default_rng(3).normal(0, 10.0, (1, 400, 400))
    assert measure(touching, (1.0, 1.0)).cut_slices == 1
    assert measure(big[None], (1.0, 1.0)).cut_slices == 0

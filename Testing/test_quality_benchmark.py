"""The quality benchmark's ceiling and noise split, on synthetic nested noise with known answers."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

def _benchmark(name: str):
    """A script of Testing/benchmarks loaded as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qb = _benchmark("quality_benchmark")


@pytest.fixture(scope="module")
def nested():
    """Soft-tissue truth; NDCT = truth + n1; LDCT at 25 % = NDCT + independent noise of 3x the variance."""
    rng = np.random.default_rng(0)
    truth = np.full((2, 96, 96), 40.0, np.float32)
    truth[:, 30:60, 30:60] = 80.0
    ndct = truth + rng.normal(0, 5.0, truth.shape).astype(np.float32)
    ldct = ndct + rng.normal(0, 5.0 * np.sqrt(3.0), truth.shape).astype(np.float32)
    return truth, ndct, ldct


def test_best_ndct_estimate_keeps_a_dose_fraction_of_the_noise_and_gains_10log10_1_over_dose(nested):
    truth, ndct, ldct = nested
    oracles = qb.ceiling_oracles(ldct, ndct, truth)
    (label_truth, img_truth), (label_best, img_best) = oracles.items()
    assert img_truth is truth
    k = float(label_best.split("+ ")[1].split("·")[0])
    assert k == pytest.approx(0.25, abs=0.02)
    gain_db = 10 * np.log10(((ldct - ndct) ** 2).mean() / ((img_best - ndct) ** 2).mean())
    assert gain_db == pytest.approx(10 * np.log10(4.0), abs=0.2)  # the +6 dB ceiling at 25 %
    # the noise-free image itself scores worse against NDCT than the best blend
    assert ((truth - ndct) ** 2).mean() > ((img_best - ndct) ** 2).mean()


def test_noise_decomposition_separates_passed_noise_from_other_error(nested):
    truth, ndct, ldct = nested
    k, rest = qb.noise_decomposition(ldct, ldct, truth)
    assert k == pytest.approx(1.0) and rest == pytest.approx(0.0, abs=1e-3)
    k, rest = qb.noise_decomposition(ndct, ldct, truth)
    assert k == pytest.approx(0.25, abs=0.02)
    assert rest == pytest.approx(5.0 * np.sqrt(0.75), rel=0.05)  # NDCT noise not explained by LDCT
    biased = truth + 0.5 * (ldct - truth) + 3.0
    k, rest = qb.noise_decomposition(biased, ldct, truth)
    assert k == pytest.approx(0.5, abs=0.02) and rest == pytest.approx(3.0, abs=0.3)  # the bias


def test_paired_comparison_sees_a_consistent_small_gain_that_slice_spread_hides():
    rng = np.random.default_rng(1)
    base = rng.uniform(45, 55, 12)                      # slices differ by up to 10 dB
    better = base + 0.2 + rng.normal(0, 0.02, 12)       # a steady 0.2 dB gain on every slice
    coin = base + rng.normal(0, 0.3, 12)                 # no gain, just jitter
    lines, stats = qb.paired_lines({"ref": list(base), "better": list(better), "coin": list(coin)},
                                   "ref", [4, 4, 4])
    assert stats["better"]["better"] == 12 and 0.15 < stats["better"]["ci"][0] < 0.2 < stats["better"]["ci"][1]
    assert stats["coin"]["ci"][0] < 0 < stats["coin"]["ci"][1]
    assert len(stats["better"]["per_case"]) == 3 and all(0.15 < x < 0.25 for x in stats["better"]["per_case"])
    assert len(lines) == 4 and lines[2].startswith("| better | +0.2")
    # each case's mean over its own slices only (a bound one slice long mixed in the next case's first)
    _, stats = qb.paired_lines({"ref": [0.0] * 6, "cases": [1.0, 1.0, 1.0, 5.0, 5.0, 5.0]}, "ref", [3, 3])
    assert stats["cases"]["per_case"] == [1.0, 5.0]
    # the same for SSIM: differences of 1e-4 need five decimals and keep the metric's name
    lines, stats = qb.paired_lines({"ref": [0.99] * 3, "up": [0.99012, 0.99011, 0.99013]}, "ref", [3],
                                   metric="SSIM", unit="", digits=5)
    assert lines[0].startswith("| Method | ΔSSIM vs ref |") and lines[2].startswith("| up | +0.00012 |")
    assert stats["up"]["delta_ssim"] == pytest.approx(0.00012) and stats["up"]["better"] == 3


def test_paired_difference_refuses_unpaired_input():
    from CoreDiffLib.metrics import paired_difference
    with pytest.raises(ValueError, match="paired"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_a_dose_not_in_the_cached_nested_set_is_refused_rather_than_redrawn(tmp_path):
    (tmp_path / "test9000_abdomen_ndct.nrrd").write_bytes(b"cached")
    with pytest.raises(SystemExit, match="simulated together"):
        qb.held_out(0.5, tmp_path, kinds=("abdomen",))
    assert (tmp_path / "test9000_abdomen_ndct.nrrd").read_bytes() == b"cached"
    # nor is it drawn into a new set unless that set is its own (--test-dir): with the held-out doses
    # it redraws them all, and the first run at 15 % made the set every later table was scored on
    with pytest.raises(SystemExit, match=r"dose 0.15 is not one of the held-out set's \(0.25, 0.1, 0.05\)"):
        qb.held_out(0.15, tmp_path / "fresh", kinds=("abdomen",))
    assert list((tmp_path / "fresh").iterdir()) == []


def test_a_cached_set_of_another_slice_count_is_refused_and_kept(tmp_path):
    from CoreDiffLib.io import Volume, write_volume
    vol = Volume(np.full((4, 16, 16), -1000, np.int16), (1.0, 1.0, 1.0), pixel_type="int16")
    for name in ("ndct", "ldct25", "ldct10", "ldct5"):
        write_volume(vol, tmp_path / f"test9000_abdomen_{name}.nrrd")
    before = (tmp_path / "test9000_abdomen_ndct.nrrd").read_bytes()
    with pytest.raises(SystemExit, match="4-slice volumes, not 6"):
        qb.held_out(0.25, tmp_path, kinds=("abdomen",), slices=6)
    assert (tmp_path / "test9000_abdomen_ndct.nrrd").read_bytes() == before
    with pytest.raises(SystemExit, match="1 mm slices, not 3 mm"):  # each spacing is a set of its own
        qb.held_out(0.25, tmp_path, kinds=("abdomen",), slices=4, slice_mm=3.0)
    assert (tmp_path / "test9000_abdomen_ndct.nrrd").read_bytes() == before


def test_each_volume_size_has_its_own_held_out_folder():
    assert qb.default_cache("test", 4) == qb.REPO / "data" / "test"
    assert qb.default_cache("test", 6) == qb.REPO / "data" / "test-6slices"
    assert qb.default_cache("validation", 6) == qb.REPO / "data" / "val-6slices"


def test_end_slices_are_scored_apart_from_the_inner_ones():
    """Two 4-slice cases; 'edgy' is perfect inside and off at the ends: only the end table sees it."""
    rng = np.random.default_rng(2)
    ndct = [rng.normal(0, 20, (4, 32, 32)).astype(np.float32) for _ in range(2)]
    cases = [(f"case{i}", nd, nd + 5.0, nd) for i, nd in enumerate(ndct)]
    edgy = []
    for nd in ndct:
        v = nd.copy()
        v[[0, -1]] += 30.0
        edgy.append(v)
    results = {"ref": [nd + 5.0 for nd in ndct], "edgy": edgy}
    by_label = {"ref": {}, "edgy": {}}
    lines = qb.end_slice_lines(results, cases, "ref", by_label)
    assert "(4; one neighbour each" in lines[1]
    end = by_label["edgy"]["end_slices"]
    assert end["rmse_hu"] == pytest.approx(30.0, rel=1e-3) and by_label["ref"]["end_slices"]["rmse_hu"] == pytest.approx(5.0, rel=1e-3)
    assert end["paired_vs_reference"]["better"] == 0 and end["paired_vs_reference"]["n"] == 4


def test_the_test_time_ensemble_turns_each_output_back_before_averaging():
    import torch
    tta = _benchmark("tta_benchmark")
    stack = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    from CoreDiffLib.intensity import unit_to_hu
    centre = unit_to_hu(stack[0, 1].numpy())
    # an orientation-blind denoiser comes back unchanged from all 8 orientations
    assert np.allclose(tta.ensemble(tta.oriented_outputs(lambda x: x[:, 1:2], stack, tta.ORIENTATIONS)), centre, atol=1e-3)
    # a denoiser that shifts its input one pixel right is, turned back, shifted in each of the 4
    # directions twice: the ensemble is the mean of the 4 shifts, not 8 copies of one
    shift_right = lambda x: torch.roll(x[:, 1:2], 1, dims=3)  # noqa: E731
    shifted = tta.ensemble(tta.oriented_outputs(shift_right, stack, tta.ORIENTATIONS))
    c = stack[0, 1]
    expected = unit_to_hu(sum(torch.roll(c, s, d) for s in (1, -1) for d in (0, 1)).numpy() / 4)
    assert np.allclose(shifted, expected, atol=1e-3)
    assert len(set(tta.ORIENTATIONS)) == 8


def test_a_freshly_simulated_held_out_set_records_the_software_that_made_it(tmp_path, monkeypatch):
    """Re-simulated on another machine a held-out set differs slightly; its manifest says by what."""
    import CoreDiffLib.simulation as sim

    asked = {"pair": [], "noise-free": []}

    def fake_pair(kind, slices, size, doses, seed, slice_mm):
        asked["pair"].append((kind, slices, size, seed, slice_mm))
        nd = np.full((slices, size, size), -1000.0, np.float32)
        return nd, {d: nd + 10.0 for d in doses}, (1.0, 1.0, slice_mm)

    def fake_noise_free(kind, slices, size, seed, slice_mm):
        asked["noise-free"].append((kind, slices, size, seed, slice_mm))
        return np.full((slices, size, size), -1000.0, np.float32)
    monkeypatch.setattr(sim, "simulate_pair", fake_pair)
    monkeypatch.setattr(sim, "noise_free_reconstruction", fake_noise_free)
    cases = qb.held_out(0.25, tmp_path, kinds=("abdomen", "head"), slices=4, size=16)
    # the noise-free truth is of the very phantoms simulated (the same kind, seed and slices)
    assert asked["pair"] == asked["noise-free"] == [("abdomen", 4, 16, 9000, 1.0), ("head", 4, 16, 9001, 1.0)]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["cases"]) == {"test9000_abdomen", "test9001_head"}
    case = manifest["cases"]["test9001_head"]
    assert case["seed"] == 9001 and case["doses"] == [0.25, 0.1, 0.05] and case["slice_mm"] == 1.0
    assert case["software"]["numpy"] == np.__version__
    line = qb.held_out_provenance(tmp_path, [c[0] for c in cases])
    assert f"numpy {np.__version__}" in line and "torch" in line
    # the data themselves: the same voxels give the same fingerprint, one changed voxel another
    key = qb.held_out_fingerprint(cases)
    assert len(key) == 16 and key == qb.held_out_fingerprint(qb.held_out(0.25, tmp_path, kinds=("abdomen", "head"),
                                                                          slices=4, size=16))
    changed = [(n, nd, ld.copy(), t) for n, nd, ld, t in cases]
    changed[1][2][0, 0, 0] += 1.0
    assert qb.held_out_fingerprint(changed) != key
    changed = [(n, nd.copy(), ld, t) for n, nd, ld, t in cases]  # the reference too
    changed[0][1][0, 0, 0] += 1.0
    assert qb.held_out_fingerprint(changed) != key

    (tmp_path / "manifest.json").unlink()  # a cache made before manifests existed
    assert "before its manifest" in qb.held_out_provenance(tmp_path, [c[0] for c in cases])


def test_air_texture_measures_how_far_the_local_level_of_open_air_wanders():
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
    import air_texture as at
    truth = np.full((128, 128), -1000.0)
    truth[40:80, 40:80] = 40.0  # a body: the air next to it is not open air
    mask = at.open_air(truth)
    assert not mask[35:85, 35:85].any() and mask[10:20, 100:120].all() and not mask[:8].any()
    rng = np.random.default_rng(1)
    ndct = truth - 2.0 + rng.normal(0, 7, truth.shape)
    itself = at.air_texture(ndct, ndct, mask)
    assert itself.offset == itself.off_std == itself.off_rms == 0 and itself.corr == pytest.approx(1.0)
    assert itself.level == pytest.approx(-2.0, abs=0.3)
    assert itself.spread == pytest.approx(7 / (2 * np.sqrt(np.pi) * 1.5), rel=0.15)  # white noise, SSIM's window
    smooth = at.air_texture(np.full_like(ndct, -1002.0), ndct, mask)
    assert smooth.spread == pytest.approx(0.0, abs=1e-9)
    # the window's floor keeps the NDCT's noise above -1000 only: E[max(0, N(-2, 7²))] = 1.91 HU
    # above the smooth image's clipped air, which sits at the floor
    assert smooth.offset == pytest.approx(-1.91, abs=0.2) and smooth.off_rms >= abs(smooth.offset)
    textured = at.air_texture(np.full_like(ndct, -1002.0) + rng.normal(0, 7, truth.shape), ndct, mask)
    assert textured.off_std > smooth.off_std  # as much texture as the NDCT, none of it the NDCT's


def test_noise_passthrough_recovers_how_much_of_each_slices_ldct_noise_an_output_keeps():
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
    import noise_passthrough as npt
    rng = np.random.default_rng(2)
    truth = np.full((3, 96, 96), -1000.0)
    truth[:, 30:70, 30:70] = 40.0
    ldct = truth + rng.normal(0, 20, truth.shape)
    blur = rng.normal(0, 1.5, truth.shape)  # error that no slice's noise explains
    out = truth.copy()  # slice 1 keeps a quarter of its own noise and 7 % of slice 0's
    out[1] = truth[1] + 0.25 * (ldct[1] - truth[1]) + 0.07 * (ldct[0] - truth[0]) + blur[1]
    air = npt.open_air(truth[1])
    fit = npt.passthrough(out, ldct, truth, 1, air)
    assert fit.centre == pytest.approx(0.25, abs=0.01) and fit.previous == pytest.approx(0.07, abs=0.01)
    assert fit.following == pytest.approx(0.0, abs=0.01) and fit.rest == pytest.approx(1.5, rel=0.05)
    tissue = npt.REGIONS["soft tissue"](truth)[1]
    assert tissue[40:60, 40:60].all() and not tissue[30:33, 30:70].any() and not (tissue & air).any()
    assert (npt.REGIONS["open air"](truth)[1] == air).all()
    # undoing a defect: without the neighbour's noise, or at the truth's level, the air is closer to the truth
    out[1] += 3.0
    fit = npt.passthrough(out, ldct, truth, 1, air)
    scores = npt.what_if(out, ldct, ldct, truth, 1, air, fit)  # (the LDCT stands in for the NDCT here)
    rmse_truth = {variant: m[5] for variant, m in scores.items()}
    assert rmse_truth["neighbours' noise out of the open air"] < rmse_truth["as it is"]
    assert rmse_truth["open air's level set to the truth's"] < rmse_truth["as it is"]


def test_denoised_context_keeps_each_centre_out_of_its_neighbours_first_pass():
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
    import denoised_context as dc
    from CoreDiffLib.inference import context_stack
    from CoreDiffLib.intensity import hu_to_unit
    volume = np.stack([np.full((4, 4), 100.0 * k) for k in range(5)])  # slice k is 100·k HU everywhere
    unit = hu_to_unit(volume.astype(np.float32))
    without_next, without_previous = dc.one_sided_stacks(unit)
    for k in range(5):  # neither one-sided context holds the slice on its missing side
        assert [s[0, 0] for s in without_next[k]] == [unit[max(k - 1, 0), 0, 0], unit[k, 0, 0], unit[k, 0, 0]]
        assert [s[0, 0] for s in without_previous[k]] == [unit[k, 0, 0], unit[k, 0, 0], unit[min(k + 1, 4), 0, 0]]
    stacks = context_stack(volume, 0, 5)
    swapped = dc.with_neighbours(stacks, volume + 1, volume + 2)  # the inner slices 1..3
    assert swapped.shape == (3, 3, 4, 4)
    for j, k in enumerate(range(1, 4)):  # centre untouched; previous from k - 1, next from k + 1
        assert swapped[j, 1, 0, 0] == stacks[k, 1, 0, 0]
        assert swapped[j, 0, 0, 0] == pytest.approx(hu_to_unit(np.float32(100.0 * (k - 1) + 1)))
        assert swapped[j, 2, 0, 0] == pytest.approx(hu_to_unit(np.float32(100.0 * (k + 1) + 2)))


def test_readme_manifest_and_the_measured_table_agree_on_every_shipped_models_score():
    """The numbers a user reads (README), the ones a model carries (manifest) and the run that
    measured them (docs/benchmarks/shipped/) must not drift apart when a model is replaced."""
    from CoreDiffLib.models import shipped_models
    manifest = shipped_models()
    readme = (qb.REPO / "README.md").read_text(encoding="utf-8")
    for pct in ("25", "10", "5"):
        rows = {r["method"]: r for r in json.loads(
            (qb.REPO / "docs" / "benchmarks" / "shipped" / f"quality_{pct}.json").read_text())}
        for name, label in ((f"corediff-{pct}", f"CoreDiff corediff-{pct} (width 16) T=10"),
                            (f"corediff-{pct}-w32", f"CoreDiff corediff-{pct}-w32 (default) T=10")):
            measured, carried = rows[label], manifest[name]["validation"]
            assert round(measured["psnr"], 2) == pytest.approx(carried["psnr_t10"], abs=1e-9), name
            assert round(measured["ssim"], 4) == pytest.approx(round(carried["ssim_t10"], 4), abs=1e-9), name
            assert round(measured["rmse_hu"], 2) == pytest.approx(carried["rmse_hu_t10"], abs=1e-9), name
            cell = f"{measured['psnr']:.2f} / {measured['ssim']:.4f} / {measured['rmse_hu']:.2f}"
            assert cell in readme, f"README lacks {name}'s measured {cell}"


def test_lesions_are_placed_in_uniform_soft_tissue_and_scored_on_what_a_method_keeps():
    lb = _benchmark("lesion_benchmark")
    # a disk's pixels hold its area, partial volume at the edge
    assert lb.disk((64, 64), 31.5, 30.2, 6.0).sum() == pytest.approx(np.pi * 36, rel=0.01)
    truth = np.full((6, 128, 128), -1000.0, np.float32)
    yy, xx = np.mgrid[:128, :128]
    truth[:, (yy - 64) ** 2 + (xx - 64) ** 2 < 55 ** 2] = 40.0   # soft tissue
    truth[:, (yy - 64) ** 2 + (xx - 40) ** 2 < 10 ** 2] = 700.0  # bone
    lesions = lb.place_lesions(truth, 1.0, 6, seed=0)
    assert [les["diameter_mm"] for les in lesions] == [4.0, 6.0, 10.0, 4.0, 6.0, 10.0]
    for les in lesions:  # margin kept from the bone and the body's edge
        reach = les["diameter_mm"] / 2 + lb.MARGIN_MM
        assert (les["y"] - 64) ** 2 + (les["x"] - 64) ** 2 <= (55 - reach + 1) ** 2  # a pixel for the disk's edge
        assert (les["y"] - 64) ** 2 + (les["x"] - 40) ** 2 >= (10 + reach - 1) ** 2
    # a sphere centred between slices 2 and 3: cut the same in both, not at all 3 mm away
    big = lesions[2]
    assert lb.section_radius_mm(big, 2, 1.0) == lb.section_radius_mm(big, 3, 1.0) == pytest.approx(np.sqrt(24.75))
    assert lb.section_radius_mm(lesions[0], 5, 1.0) == 0.0
    # scoring: an image that halves the lesion keeps 0.5 of it, whatever the noise it adds
    added = np.zeros_like(truth)
    for k in range(6):
        added[k] = big["contrast_hu"] * lb.disk((128, 128), big["y"], big["x"], lb.section_radius_mm(big, k, 1.0))
    noisy = truth + np.random.default_rng(1).normal(0, 10, truth.shape).astype(np.float32)
    kept, cnr = lb.score(noisy + 0.5 * added, noisy, added, big, 1.0, 1.0)
    assert kept == pytest.approx(0.5, abs=1e-5)
    assert cnr == pytest.approx(0.5 * 20 / 10, rel=0.25)  # half the 20 HU over the 10 HU noise
    # NPW observer: white noise of SD 10 gives d' = kept x |template| / 10; the same noise
    # blurred to the same SD (a blotchy residual) hides the lesion more
    background = lb.background_positions(truth, 1.0, 300, seed=2)
    template = np.sqrt((added[2] ** 2).sum() + (added[3] ** 2).sum()) / np.sqrt(2)
    d_white = lb.npw_detectability(noisy + 0.5 * added, noisy, truth, added, big, background, 1.0, 1.0)
    assert d_white == pytest.approx(0.5 * template / 10, rel=0.2)
    from scipy import ndimage
    blotchy = ndimage.gaussian_filter(noisy - truth, (0, 2, 2))
    blotchy = truth + blotchy * (10 / blotchy.std())
    d_blotchy = lb.npw_detectability(blotchy + 0.5 * added, blotchy, truth, added, big, background, 1.0, 1.0)
    assert d_blotchy < 0.5 * d_white


def test_real_anatomy_noise_insertion_brings_a_scan_to_the_simulated_dose():
    """A scan that already carries noise gets only what it lacks: its LDCT is as noisy as the
    simulation of its noise-free object at that dose, and its reference is the scan itself."""
    pytest.importorskip("astra")
    from CoreDiffLib.simulation import FanBeamGeometry, simulate_ldct
    ra = _benchmark("real_anatomy")
    n, px = 128, 380.0 / 128
    geometry = FanBeamGeometry.small(n_views=360, n_detectors=368)
    y, x = (np.mgrid[:n, :n] - (n - 1) / 2) * px
    body = np.where(x ** 2 + y ** 2 < 110.0 ** 2, 40.0, -1000.0).astype(np.float32)
    roi = x ** 2 + y ** 2 < 60.0 ** 2
    objects = np.stack([body] * 4)
    expected = np.std(simulate_ldct(objects, 0.25, geometry, px, seed=1)[:, roi])
    scan = simulate_ldct(objects, 0.5, geometry, px, seed=2)  # "a real scan": noise at half the normal dose
    reference, ldct, scan_dose, inserted = ra.noise_inserted(scan, px, [0.25], geometry, seed=3)
    assert 0.25 < inserted[0.25] < 0.6  # less noise inserted than a 25 % scan has on its own
    # the reference is the scan, its noise included (a little smoothed by the second reconstruction)
    assert np.corrcoef(reference[:, roi].ravel(), scan[:, roi].ravel())[0, 1] > 0.9
    assert np.std(ldct[0.25][:, roi]) == pytest.approx(expected, rel=0.15)
    assert np.mean(ldct[0.25][:, roi]) == pytest.approx(40.0, abs=2.0)


def test_rows_of_one_label_and_a_malformed_also_are_refused_before_any_work():
    """Two --redcnn files without labels were both timed, and the second's results replaced the
    first's in the table and the figure; --also without '=' failed after BM3D and RED-CNN ran."""
    from types import SimpleNamespace
    args = dict(also=[], ablation=[], redcnn=[], baselines_only=False, model_label="CoreDiff", reference=None,
                no_bm3d=False)
    qb.check_row_labels(SimpleNamespace(**dict(args, redcnn=["a.pt", "RED-CNN 2=b.pt"])))  # distinct: fine
    with pytest.raises(SystemExit, match="two rows would be named RED-CNN"):
        qb.check_row_labels(SimpleNamespace(**dict(args, redcnn=["a.pt", "b.pt"])))
    with pytest.raises(SystemExit, match="two rows would be named CoreDiff T=1, CoreDiff T=10"):
        qb.check_row_labels(SimpleNamespace(**dict(args, also=["CoreDiff=corediff-25"])))
    with pytest.raises(SystemExit, match="--also corediff-25: give LABEL=MODEL"):
        qb.check_row_labels(SimpleNamespace(**dict(args, also=["corediff-25"])))
    # --reference: refused before any work (it was after every row had been denoised)
    qb.check_row_labels(SimpleNamespace(**dict(args, reference="CoreDiff T=1")))
    qb.check_row_labels(SimpleNamespace(**dict(args, reference="BM3D (σ=35 HU)")))  # its sigma is tuned later
    with pytest.raises(SystemExit, match="--reference 'CoreDif T=10' is not a row; rows: LDCT, CoreDiff T=1"):
        qb.check_row_labels(SimpleNamespace(**dict(args, reference="CoreDif T=10")))
    with pytest.raises(SystemExit, match="is not a row"):
        qb.check_row_labels(SimpleNamespace(**dict(args, reference="BM3D (σ=35 HU)", no_bm3d=True)))


def test_the_held_out_splits_use_phantom_seeds_of_their_own():
    """Validation (which picks the shipped weights) and test phantoms must differ from each other
    and from the training recipe's (`corediff simulate --seed 1`: case seeds 100003 + c)."""
    kinds = 3
    seeds = {name: set(range(first, first + kinds)) for name, (_, first, _) in qb.SPLITS.items()}
    assert set(seeds) == {"test", "validation"} and not seeds["test"] & seeds["validation"]
    training = {1 * 100003 + c for c in range(6)}
    assert not (seeds["test"] | seeds["validation"]) & training


def test_the_held_out_set_refuses_a_corediff_simulate_folder_before_simulating(tmp_path, monkeypatch):
    """docs/models.md made data/test (the benchmark's default cache) with `corediff simulate`: its
    manifest lists its own cases, and the benchmark crashed on it after writing its first case."""
    import CoreDiffLib.simulation as sim
    (tmp_path / "manifest.json").write_text(json.dumps({"cases": [{"name": "case000", "seed": 900000000}]}))
    monkeypatch.setattr(sim, "simulate_pair", lambda *a, **k: pytest.fail("simulated into a simulate folder"))
    with pytest.raises(SystemExit, match="holds a `corediff simulate` output"):
        qb.held_out(0.25, tmp_path, kinds=("abdomen",), slices=4, size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]



def test_the_benchmark_table_scores_the_inner_slices_against_the_ndct_and_the_noise_free_image(tmp_path, monkeypatch):
    """main() had no test: the margin slices scored, the noise-free column against the NDCT, or the
    noise split against the NDCT instead of the LDCT would all have printed plausible tables."""
    import sys

    from CoreDiffLib.metrics import psnr
    rng = np.random.default_rng(0)
    truth = np.full((6, 48, 48), 40.0, np.float32)
    truth[:, 14:34, 14:34] = 90.0
    cases = []
    for k in range(2):
        ndct = truth + rng.normal(0, 5, truth.shape).astype(np.float32)
        ldct = ndct + rng.normal(0, 20, truth.shape).astype(np.float32)
        ldct[[0, -1]] += rng.normal(0, 300, (2, 48, 48)).astype(np.float32)  # the margins: nothing like the rest
        cases.append((f"test{9000 + k}_abdomen", ndct, ldct, truth.copy()))
    monkeypatch.setattr(qb, "held_out", lambda *args, **kwargs: cases)
    monkeypatch.setattr(qb, "denoise_volume", lambda volume, model, device, steps=None: 0.5 * volume + 20.0)
    monkeypatch.setattr(sys, "argv", ["quality_benchmark.py", "--no-bm3d", "--dose", "0.25", "--slices", "4",
                                      "--margin", "1", "--test-dir", str(tmp_path / "cache"), "--out", str(tmp_path)])
    assert qb.main() == 0
    rows = {row["method"]: row for row in json.loads((tmp_path / "quality_25.json").read_text())}
    inner = slice(1, 5)

    def mean_psnr(images, reference):
        return np.mean([psnr(a, b) for c, r in zip(images, reference) for a, b in zip(c[inner], r[inner])])
    ldct, ndct = [c[2] for c in cases], [c[1] for c in cases]
    assert rows["LDCT"]["psnr"] == pytest.approx(mean_psnr(ldct, ndct), abs=1e-6)
    assert rows["LDCT"]["psnr_noisefree"] == pytest.approx(mean_psnr(ldct, [c[3] for c in cases]), abs=1e-6)
    assert rows["CoreDiff T=10"]["psnr"] == pytest.approx(mean_psnr([0.5 * v + 20 for v in ldct], ndct), abs=1e-6)
    assert rows["LDCT"]["noise_kept_k"] == pytest.approx(1.0, abs=1e-6)  # the LDCT passes all of its own noise
    assert (tmp_path / "quality_25.md").exists() and (tmp_path / "quality_25.png").exists()

"""The `corediff` command as a user runs it: a real subprocess, real files."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CoreDiffLib import CoreDiffError
from CoreDiffLib.io import read_volume
from CoreDiffLib.network import ClearNet, NetworkConfig

from conftest import dicom_positions, synthetic_ct, write_dicom_series, write_image, write_study_folder

REPO = Path(__file__).resolve().parents[1]


def corediff(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "CoreDiffLib.cli", *map(str, args)], capture_output=True,
                          encoding="utf-8", cwd=cwd or REPO, timeout=300)  # the CLI prints UTF-8 whatever this process's locale


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_denoise_keeps_geometry_and_leaves_the_input_untouched(tmp_path, ct_file, identity_model_path):
    before = digest(ct_file)
    out = tmp_path / "den.nrrd"
    r = corediff("denoise", ct_file, out, "--model", identity_model_path, "--progress", "lines",
                 "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    progress = [tuple(map(int, line.split()[1:])) for line in lines if line.startswith("PROGRESS")]
    assert progress[0] == (0, 6) and progress[-1] == (6, 6)
    assert digest(ct_file) == before
    src, den = read_volume(ct_file), read_volume(out)
    assert den.shape == src.shape and den.pixel_type == "int16"
    assert den.spacing == pytest.approx(src.spacing) and den.origin == pytest.approx(src.origin)
    assert den.direction == pytest.approx(src.direction)
    # an identity network gives back the input, clipped to the model's [-1024, 3072] HU range
    np.testing.assert_allclose(den.array, np.clip(src.array, -1024, 3072), atol=1.0)
    assert files_in(tmp_path) == {"ldct.nrrd", "den.nrrd"}


def test_denoise_keeps_an_existing_output_unless_told_to_overwrite_it(tmp_path, ct_file, identity_model_path):
    """``denoise ldct.nrrd ndct.nrrd``, a slip of the hand, must not replace the reference scan."""
    reference = tmp_path / "ndct.nrrd"
    reference.write_bytes(ct_file.read_bytes()[:-7] + b"REFDATA")  # not a volume this run could write
    before = digest(reference)
    r = corediff("denoise", ct_file, reference, "--model", identity_model_path)
    assert r.returncode == 2 and "ndct.nrrd exists" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert digest(reference) == before
    header = tmp_path / "den.nhdr"  # a detached header's data file counts as the output
    (tmp_path / "den.raw.gz").write_bytes(b"someone's data")
    r = corediff("denoise", ct_file, header, "--model", identity_model_path)
    assert r.returncode == 2 and "its data file den.raw.gz" in r.stderr, r.stderr
    assert (tmp_path / "den.raw.gz").read_bytes() == b"someone's data" and not header.exists()
    r = corediff("denoise", ct_file, reference, "--model", identity_model_path, "--overwrite")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(read_volume(reference).array, np.clip(read_volume(ct_file).array, -1024, 3072),
                               atol=1.0)


def test_steps_default_to_auto_one_on_a_cpu_and_a_number_overrides_it(tmp_path, ct_file, changing_model_path):
    model = changing_model_path
    outputs = {}
    for steps in (None, "auto", "1", "10"):
        out = tmp_path / f"den_{steps}.nrrd"
        r = corediff("denoise", ct_file, out, "--model", model, "--device", "cpu", "--progress", "lines",
                     *(["--steps", steps] if steps else []))
        assert r.returncode == 0, r.stderr
        assert f"{1 if steps in (None, 'auto', '1') else 10} of T=10 steps" in r.stdout
        assert ("one sampling step on the CPU (--steps auto)" in r.stdout) == (steps in (None, "auto"))
        # what one step costs was measured for the shipped models, not for this one
        assert ("for a model of your own, measure what it costs" in r.stdout) == (steps in (None, "auto"))
        assert "dB below them for the -w32 models" not in r.stdout
        assert "slice spacing 2.5 mm: the models were trained on 1 mm slices" in r.stdout
        outputs[steps] = read_volume(out).array
    np.testing.assert_array_equal(outputs[None], outputs["1"])
    np.testing.assert_array_equal(outputs["auto"], outputs["1"])
    assert np.abs(outputs["10"].astype(float) - outputs["1"]).max() > 0  # ten steps are another result


@pytest.mark.parametrize("name", ["out.nrrd", "out.mha", "out.nii.gz", "out.nii", "out.mhd", "dicom_out"])
def test_the_output_says_which_model_and_how_many_steps_made_it(tmp_path, ct_file, identity_model_path, name):
    import SimpleITK as sitk
    out = tmp_path / name
    r = corediff("denoise", ct_file, out, "--model", identity_model_path, "--device", "cpu", "--progress", "none")
    assert r.returncode == 0, r.stderr
    summary = "CoreDiff identity, 1 of 10 steps"  # --steps auto on a CPU
    image = sitk.ReadImage(str(sorted(out.iterdir())[0] if out.is_dir() else out))
    if name.startswith("dicom"):
        assert image.GetMetaData("0020|4000").strip() == summary  # ImageComments
        assert image.GetMetaData("0008|103e").strip().endswith("CoreDiff denoised (identity)")  # SeriesDescription
    elif name.startswith("out.nii"):
        assert image.GetMetaData("descrip") == summary
    else:
        assert image.GetMetaData("corediff_model") == "identity"
        assert image.GetMetaData("corediff_steps") == "1 of 10"
        assert image.GetMetaData("corediff_model_sha256") == digest(identity_model_path)
        assert image.GetMetaData("corediff_device") == "cpu"


def test_a_volume_stored_sagittally_or_coronally_is_denoised_in_its_axial_planes(tmp_path, changing_model_path):
    """A reformatted series keeps its axial planes along another array axis: they are what gets
    denoised (as the models were trained), and the output keeps the input's own layout."""
    model = changing_model_path
    axial = synthetic_ct(20, 48)  # (z, y, x)
    spacing_xyz = (0.7, 0.8, 2.5)
    cases = {  # name: (array, direction, spacing, how the axial result maps onto it)
        "axial": (axial, (1, 0, 0, 0, 1, 0, 0, 0, 1), spacing_xyz, lambda a: a),
        "sagittal": (axial.transpose(2, 1, 0), (0, 0, 1, 0, 1, 0, 1, 0, 0), (2.5, 0.8, 0.7),
                     lambda a: a.transpose(2, 1, 0)),
        "coronal": (axial.transpose(1, 0, 2), (1, 0, 0, 0, 0, 1, 0, 1, 0), (0.7, 2.5, 0.8),
                    lambda a: a.transpose(1, 0, 2)),
        "sagittal, y reversed": (axial.transpose(2, 1, 0)[:, ::-1], (0, 0, 1, 0, -1, 0, 1, 0, 0), (2.5, 0.8, 0.7),
                                 lambda a: a.transpose(2, 1, 0)[:, ::-1]),
        # as DICOM stores reformats (IOP 0\1\0\0\0\-1, 1\0\0\0\0\-1): head-foot runs down the rows,
        # and the axis permutations are not their own inverses (a wrong inverse passed the cases above)
        "sagittal, DICOM": (axial[::-1, :, ::-1].transpose(2, 0, 1), (0, 0, -1, 1, 0, 0, 0, -1, 0), (0.8, 2.5, 0.7),
                            lambda a: a[::-1, :, ::-1].transpose(2, 0, 1)),
        "coronal, DICOM": (axial[::-1].transpose(1, 0, 2), (1, 0, 0, 0, 0, 1, 0, -1, 0), (0.7, 2.5, 0.8),
                           lambda a: a[::-1].transpose(1, 0, 2)),
        # axial, its rows along the patient's left-right and its columns reversed: turned in-plane
        "axial, swapped and flipped": (axial[:, :, ::-1].transpose(0, 2, 1), (0, -1, 0, 1, 0, 0, 0, 0, 1),
                                       (0.8, 0.7, 2.5), lambda a: a[:, :, ::-1].transpose(0, 2, 1)),
    }
    results, slabs = {}, {}
    for name, (array, direction, spacing, _) in cases.items():
        src = write_image(tmp_path / f"{name}.nrrd", array, spacing=spacing, direction=direction)
        before = digest(src)
        r = corediff("denoise", src, tmp_path / f"{name}_out.nrrd", "--model", model, "--device", "cpu",
                     "--progress", "lines")
        assert r.returncode == 0, r.stderr
        assert ("its slices are not axial" in r.stdout) == (not name.startswith("axial")), r.stdout
        for storage in ("sagittal", "coronal"):
            assert (f"({storage} storage)" in r.stdout) == name.startswith(storage), r.stdout
        assert "slice spacing 2.5 mm" in r.stdout  # the head-foot axis's, whatever the storage
        assert digest(src) == before
        out = read_volume(tmp_path / f"{name}_out.nrrd")
        assert out.shape == array.shape and out.direction == pytest.approx(direction)
        results[name] = out.array.astype(np.float64)
        # --slices counts axial planes too, and places them where they lie
        r = corediff("denoise", src, tmp_path / f"{name}_slab.nrrd", "--model", model, "--device", "cpu",
                     "--progress", "none", "--slices", "5:8")
        assert r.returncode == 0, r.stderr
        slab = sitk.ReadImage(str(tmp_path / f"{name}_slab.nrrd"))  # 3 planes thick: not a CT input itself
        head_foot = int(np.argmax(np.abs(np.reshape(direction, (3, 3))[2])))  # ITK index axis
        index = [0, 0, 0]
        index[head_foot] = 5
        assert slab.GetOrigin() == pytest.approx(sitk.ReadImage(str(src)).TransformIndexToPhysicalPoint(index))
        assert slab.GetDirection() == pytest.approx(direction)
        # the stored planes 5-7 along the head-foot axis (in stored order, reversed or not), as the full run has them
        slabs[name] = (sitk.GetArrayFromImage(slab).astype(np.float64),
                       np.take(results[name], [5, 6, 7], axis=2 - head_foot))
    assert np.abs(results["axial"] - axial).max() > 1  # the model does change the image
    for name, (_, _, _, as_stored) in cases.items():
        np.testing.assert_allclose(results[name], as_stored(results["axial"]), atol=1.0, err_msg=name)
        np.testing.assert_allclose(*slabs[name], atol=1.0, err_msg=name)


@pytest.mark.parametrize("name", ["out.nrrd", "out.nii.gz", "dicom_out"])
def test_slices_denoises_part_of_a_volume_as_the_whole_run_would(tmp_path, changing_model_path, name):
    """One slice (a preview) or a slab, with its true neighbours as context, placed where it lies."""
    # right-handed axes: DICOM stores a left-handed volume with its slices in the other order
    src = write_image(tmp_path / "ct.nrrd", synthetic_ct(12, 48), spacing=(0.7, 0.7, 1.25),
                      origin=(-20.0, 10.0, 300.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    before = digest(src)
    assert corediff("denoise", src, tmp_path / "full.nrrd", "--model", changing_model_path,
                    "--progress", "none").returncode == 0
    full = read_volume(tmp_path / "full.nrrd")
    for arg, (a, b) in (("4", (4, 5)), ("0:3", (0, 3)), ("9:", (9, 12))):
        out = tmp_path / f"{arg.replace(':', '_')}_{name}"
        r = corediff("denoise", src, out, "--model", changing_model_path, "--progress", "lines", "--slices", arg)
        assert r.returncode == 0, r.stderr
        assert f"slices {a}:{b} of 12" in r.stdout
        assert [line for line in r.stdout.splitlines() if line.startswith("PROGRESS")][-1] == f"PROGRESS {b - a} {b - a}"
        part = read_volume(out)
        assert part.shape == (b - a, 48, 48)
        np.testing.assert_allclose(part.array, full.array[a:b], atol=1.0)  # batch size may round a voxel
        assert part.origin == pytest.approx((-20.0, 10.0, 300.0 + 1.25 * a), abs=1e-4)
        assert part.spacing == pytest.approx(full.spacing, abs=1e-4)
        if name.endswith(".nrrd"):  # the header says which part of which volume it is
            assert sitk.ReadImage(str(out)).GetMetaData("corediff_slices") == f"{a}:{b} of 12"
    assert digest(src) == before


def test_slices_4_mm_apart_or_more_are_their_own_context_unless_asked(tmp_path, changing_model_path):
    """--context auto: the neighbours below 4 mm of slice spacing, each slice itself from there on."""
    from CoreDiffLib.inference import denoise_volume
    ct = synthetic_ct(6, 48)
    ct[1::2] += 500.0  # neighbours unlike the slice: the context then shows in the result
    thin = write_image(tmp_path / "thin.nrrd", ct, spacing=(0.7, 0.7, 1.0))
    thick = write_image(tmp_path / "thick.nrrd", ct, spacing=(0.7, 0.7, 5.0))
    before = digest(thick)

    def run(src: Path, *extra: str) -> tuple[np.ndarray, str, str]:
        out = tmp_path / f"{src.stem}_{'_'.join(extra)}.nrrd"
        r = corediff("denoise", src, out, "--model", changing_model_path, "--progress", "lines", *extra)
        assert r.returncode == 0, r.stderr
        return read_volume(out).array, r.stdout, sitk.ReadImage(str(out)).GetMetaData("corediff_context")

    thin_auto, thin_log, thin_context = run(thin)
    thick_auto, thick_log, thick_context = run(thick)
    thick_neighbours, _, thick_neighbours_context = run(thick, "--context", "neighbours")
    thin_own, _, thin_own_context = run(thin, "--context", "own")
    assert thin_context == thick_neighbours_context == "adjacent slices"
    assert thick_context == thin_own_context == "each slice itself"
    assert "each slice is its own context" in thick_log and "own context" not in thin_log
    # the voxels are the same in both files: only the context differs, and it changes the result
    np.testing.assert_allclose(thick_neighbours, thin_auto, atol=1.0)
    np.testing.assert_allclose(thick_auto, thin_own, atol=1.0)
    assert np.abs(thick_auto - thin_auto).max() > 2
    # its own context is each slice denoised as a volume of one slice
    stored = read_volume(thick)
    voxels = stored.array
    alone = np.concatenate([denoise_volume(voxels[k:k + 1], model=str(changing_model_path), device="cpu", steps=1,
                                           direction=stored.direction)  # its rows run toward -y
                            for k in range(len(voxels))])
    np.testing.assert_allclose(thick_auto, alone, atol=1.0)
    np.testing.assert_allclose(denoise_volume(voxels, model=str(changing_model_path), device="cpu", steps=1,
                                              neighbours=False, direction=stored.direction), alone, atol=1e-3)
    assert digest(thick) == before
    single = write_image(tmp_path / "single.nrrd", ct[:1], spacing=(0.7, 0.7, 1.0))
    assert run(single)[2] == "each slice itself"  # no neighbours: the slice stands in for them (said otherwise before)


def test_coarse_pixels_get_a_caveat_with_a_shipped_model_only(tmp_path, identity_model_path):
    """A scan of 3 mm pixels (a 128² reconstruction) was denoised without a word; the shipped
    models learned from 0.49-0.78 mm pixels and remove much less noise there. A model of one's
    own learned from pixels the library does not know: no caveat."""
    import shutil

    from CoreDiffLib.inference import COARSE_PIXEL_MM, Denoiser, denoise_file
    from CoreDiffLib.models import resolve_model
    ct = synthetic_ct(3, 48)
    copy = tmp_path / "shipped-copy.safetensors"  # the shipped weights under another name: still theirs
    shutil.copy(resolve_model("corediff-25")[0], copy)
    for spacing, model, warned in (((2.97, 2.97, 1.0), "corediff-25", True), ((0.7, 1.25, 1.0), str(copy), True),
                                   ((0.7, 1.15, 1.0), "corediff-25", False),
                                   ((2.97, 2.97, 1.0), identity_model_path, False)):
        src = write_image(tmp_path / f"in_{spacing[1]}.nrrd", ct, spacing=spacing)
        log: list[str] = []
        denoise_file(src, tmp_path / "out.nrrd", Denoiser.load(model, "cpu", 1), log=log.append)
        caveats = [m for m in log if "coarser than the 0.49-0.78 mm the shipped models learned from" in m]
        assert len(caveats) == warned, (spacing, model, log)
        if warned:
            assert caveats[0].startswith(f"warning: pixels of {max(spacing[:2]):.2g} mm") and \
                "docs/benchmarks/pixel_size" in caveats[0]
    assert 1.15 < COARSE_PIXEL_MM <= 1.25
    # asked-for bf16 on a CPU runs, and is said to be slower there (5-25x measured)
    for precision, said in (("bf16", True), ("fp32", False)):
        log = []
        denoise_file(src, tmp_path / "out.nrrd", Denoiser.load(identity_model_path, "cpu", 1, precision=precision),
                     log=log.append)
        assert any(m.startswith("note: bf16 on a CPU without bf16 units") for m in log) == said, log


def test_a_model_trained_on_thick_slices_keeps_their_neighbours_as_context(tmp_path):
    """--context auto took each 5 mm slice as its own context whatever the model, so a model
    fine-tuned on 5 mm pairs met a context it had never seen; it now follows the spacing the
    model records, and the shipped (1 mm) models keep the measured 4 mm rule."""
    from CoreDiffLib.inference import uses_neighbours
    from CoreDiffLib.models import load_model, save_weights
    assert not uses_neighbours(5.0) and uses_neighbours(3.0) and not uses_neighbours(5.0, "own")
    assert uses_neighbours(5.0, trained_neighbour_mm=5.0) and not uses_neighbours(10.0, trained_neighbour_mm=5.0)
    torch.manual_seed(0)
    net = ClearNet(NetworkConfig(width=8))
    torch.nn.init.normal_(net.out.weight, std=0.05)
    save_weights(net, tmp_path / "thick.safetensors", {"neighbour_mm": 5.0})
    assert load_model(tmp_path / "thick.safetensors").trained_neighbour_mm == 5.0
    assert load_model("corediff-25-w32").trained_neighbour_mm is None
    src = write_image(tmp_path / "scan.nrrd", synthetic_ct(4, 48), spacing=(0.7, 0.7, 5.0))
    r = corediff("denoise", src, tmp_path / "out.nrrd", "--model", tmp_path / "thick.safetensors",
                 "--progress", "lines")
    assert r.returncode == 0, r.stderr
    assert sitk.ReadImage(str(tmp_path / "out.nrrd")).GetMetaData("corediff_context") == "adjacent slices"
    assert "own context" not in r.stdout


@pytest.mark.parametrize("explicit", [False, True])
def test_model_auto_picks_the_model_for_the_dose_the_scan_looks_like(tmp_path, explicit):
    """--model auto is the default; the log and the header say what it chose."""
    sample = REPO / "CoreDiffLib" / "data" / "sample_abdomen_ldct25.nrrd"
    out = tmp_path / "den.nrrd"
    r = corediff("denoise", sample, out, *(["--model", "auto"] if explicit else []), "--slices", "3",
                 "--progress", "lines")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if "model for this scan:" in line)
    assert "corediff-25-w32 (noise index" in line and "water-equivalent diameter" in line
    header = sitk.ReadImage(str(out))
    assert header.GetMetaData("corediff_model") == "corediff-25-w32"
    assert header.GetMetaData("corediff_model_choice").startswith("auto: noise index ")  # why that model


def test_dose_reports_what_model_auto_measures_whatever_the_storage(tmp_path):
    import json
    sample = read_volume(REPO / "CoreDiffLib" / "data" / "sample_abdomen_ldct25.nrrd")
    volume = np.concatenate([sample.array, sample.array[::-1], sample.array[:4]])  # 20 slices: a reformat's
    axial = write_image(tmp_path / "axial.nrrd", volume, spacing=sample.spacing,  # planes need >= 16 pixels
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    sagittal = write_image(tmp_path / "sagittal.nrrd", volume.transpose(2, 1, 0),
                           spacing=(sample.spacing[2], sample.spacing[1], sample.spacing[0]),
                           direction=(0, 0, 1, 0, 1, 0, 1, 0, 0))
    reports = []
    for path in (axial, sagittal):
        r = corediff("dose", path, "--json")
        assert r.returncode == 0, r.stderr
        reports.append(json.loads(r.stdout))
    assert reports[0]["model"] == "corediff-25-w32" and 0.17 < reports[0]["estimated_dose"] < 0.36
    from CoreDiffLib.dose_estimate import measure
    scan = measure(sample.array, sample.spacing[:2])  # each figure under its own name
    assert reports[0]["noise_index_hu"] == pytest.approx(scan.noise_index_hu, abs=0.5)
    assert reports[0]["water_equivalent_diameter_mm"] == pytest.approx(scan.wed_mm, abs=2.0)
    assert reports[0]["caveat"] is None and reports[0]["slices_measured"] == scan.slices
    few = sample.array.copy()
    few[:3, :, :150] = few[:3, :, 150:151]  # 3 of its 8 slices reach the image's edge: measured, and counted
    row = json.loads(corediff("dose", write_image(tmp_path / "few.nrrd", few, spacing=sample.spacing), "--json").stdout)
    assert (row["slices_measured"], row["slices_cut_off"], row["model"]) == (8, 3, "corediff-25-w32")
    for key in ("noise_index_hu", "water_equivalent_diameter_mm", "estimated_dose", "model"):
        assert reports[1][key] == reports[0][key], key  # the same axial planes measured
    r = corediff("dose", axial)
    assert r.stdout.strip().endswith("--model auto runs corediff-25-w32")
    cut = write_image(tmp_path / "cut.nrrd", volume[:, 150:350, 150:350], spacing=sample.spacing)  # body cut off
    r, text = corediff("dose", cut, "--json"), corediff("dose", cut)
    assert "reaches the edge of the image" in json.loads(r.stdout)["caveat"]
    assert "note: the body reaches the edge of the image" in text.stdout


def test_a_scan_auto_cannot_measure_gets_the_default_model_unless_auto_was_asked_for(tmp_path):
    fat_and_bone = synthetic_ct(2, 48) - 140.0  # the 'water' ellipse becomes fat: no soft tissue
    src = write_image(tmp_path / "fat.nrrd", fat_and_bone)
    r = corediff("denoise", src, tmp_path / "out.nrrd", "--progress", "lines")
    assert r.returncode == 0, r.stderr
    assert "INFO warning: too little soft tissue" in r.stdout and "using the default model corediff-25-w32" in r.stdout
    r = corediff("denoise", src, tmp_path / "out2.nrrd", "--model", "auto", "--progress", "none")
    assert r.returncode == 2 and "--model auto: too little soft tissue" in r.stderr
    assert "choose the model for its dose with --model" in r.stderr
    assert not (tmp_path / "out2.nrrd").exists()
    r = corediff("dose", src, "--json")  # what denoise then runs, and why
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["estimated_dose"] is None and row["model"] == "corediff-25-w32"
    assert "so its dose cannot be estimated: denoise runs the default model corediff-25-w32" in row["caveat"]


def test_steps_beyond_the_models_t_are_refused_before_the_scan_is_measured(tmp_path):
    src = write_image(tmp_path / "scan.nrrd", synthetic_ct(2, 48, noise_hu=15))
    r = corediff("denoise", src, tmp_path / "out.nrrd", "--steps", "11", "--progress", "lines")
    assert r.returncode == 2 and "between 1 and 10" in r.stderr and "model for this scan" not in r.stdout
    assert not (tmp_path / "out.nrrd").exists()


def test_main_called_in_process_leaves_sigterm_and_the_warning_format_as_it_found_them(capsys):
    """A notebook calling main() got SystemExit on SIGTERM, and Python's warnings in the CLI's format."""
    import signal
    import warnings

    from CoreDiffLib.cli import main
    before = signal.getsignal(signal.SIGTERM), warnings.formatwarning
    assert main(["models"]) == 0
    assert (signal.getsignal(signal.SIGTERM), warnings.formatwarning) == before


def test_an_interrupted_command_exits_with_the_shells_code_for_the_signal(capsys):
    """A training run stopped by SIGTERM (a scheduler's limit) exited 130, Ctrl-C's code; every
    other command exits 143 for it."""
    import argparse
    import signal

    from CoreDiffLib.cli import _run
    from CoreDiffLib.training import TrainingInterrupted

    def stopped(exc):
        def func(args):
            raise exc
        return argparse.Namespace(func=func)
    assert _run(stopped(TrainingInterrupted("interrupted at iteration 7; c.ckpt holds it", signal.SIGTERM))) == 143
    assert "interrupted at iteration 7; c.ckpt holds it" in capsys.readouterr().err
    assert _run(stopped(TrainingInterrupted("interrupted at iteration 7"))) == 130
    assert _run(stopped(KeyboardInterrupt())) == 130
    assert "interrupted; no output was written" in capsys.readouterr().err


def test_progress_none_hides_the_progress_not_the_model_choice_or_the_caveats(tmp_path):
    """--progress none silenced every message: a script lost the model chosen for its scan and
    the dose and geometry caveats, with exit code 0."""
    src = write_image(tmp_path / "small.nrrd", synthetic_ct(2, 48, noise_hu=15))
    r = corediff("denoise", src, tmp_path / "out.nrrd", "--progress", "none", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "model for this scan:" in r.stderr and "wrote " in r.stderr and "PROGRESS" not in r.stdout
    assert "it/s" not in r.stderr  # no tqdm bar


def test_single_slice_volume_denoises_with_replicated_neighbours(tmp_path, identity_model_path):
    src = write_image(tmp_path / "one.nrrd", synthetic_ct(1, 48))
    r = corediff("denoise", src, tmp_path / "out.mha", "--model", identity_model_path, "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert read_volume(tmp_path / "out.mha").shape == (1, 48, 48)


def test_padding_outside_the_field_of_view_and_metal_beyond_the_networks_range_are_kept(tmp_path,
                                                                                       identity_model_path):
    arr = synthetic_ct(3, 48)
    arr[:, :4, :] = -3024
    arr[:, 20:24, 20:24] = 8000  # metal on an extended HU scale: the network sees it clipped to 3072
    arr[:, 30, 30] = 3500
    arr[:, 26, 26], arr[:, 27, 27], arr[:, 28, 28] = -1100, -1500, -1600  # denoised (air) / kept (padding)
    src = write_image(tmp_path / "pad.nrrd", arr)
    out = tmp_path / "o.nrrd"
    assert corediff("denoise", src, out, "--model", identity_model_path, "--progress", "none").returncode == 0
    result = read_volume(out).array
    assert (result[:, :4, :] == -3024).all()
    assert (result[:, 20:24, 20:24] == 8000).all() and (result[:, 30, 30] == 3500).all()
    # padding starts at -1500 HU: air below -1024 is denoised (the identity gives it back clipped)
    assert (result[:, 26, 26] == -1024).all() and (result[:, 27, 27] == -1500).all()
    assert (result[:, 28, 28] == -1600).all()
    # the identity's float HU come back as the input's integers
    stored = read_volume(src).array
    inside = (stored > -1024) & (stored <= 3072)
    np.testing.assert_array_equal(result[inside], stored[inside])
    # a part (--slices) keeps its own slices' metal, not the metal of the slices the volume starts with
    arr = synthetic_ct(5, 48)
    arr[2, 20:24, 20:24] = 5000
    r = corediff("denoise", write_image(tmp_path / "metal.nrrd", arr), tmp_path / "part.nrrd", "--model",
                 identity_model_path, "--slices", "2:4", "--progress", "none")
    assert r.returncode == 0, r.stderr
    part = read_volume(tmp_path / "part.nrrd").array
    assert (part[0, 20:24, 20:24] == 5000).all() and (part[1, 20:24, 20:24] <= 3072).all()


def test_nan_in_a_neighbour_of_a_part_is_said_to_be_the_inputs(tmp_path, identity_model_path):
    """A NaN in the slice next to a --slices part reached the network as context: the run said the
    weights were damaged or the precision overflowed, not that the input holds NaN."""
    from CoreDiffLib.inference import Denoiser, denoise_file
    arr = synthetic_ct(5, 32).astype(np.float32)
    arr[1, 10, 10] = np.nan
    src = write_image(tmp_path / "nan.nrrd", arr, dtype=np.float32)
    with pytest.raises(CoreDiffError, match="contains 1 NaN/inf voxels"):
        denoise_file(src, tmp_path / "out.nrrd", Denoiser.load(identity_model_path, "cpu", 1), slices=(2, 4))
    assert not (tmp_path / "out.nrrd").exists()


def test_an_input_replaced_while_it_is_read_mixes_nothing_into_an_output(tmp_path, identity_model_path):
    """A streamed input is read slab by slab: a re-export or rsync that put another scan in its
    place mid-run gave an output of two scans, and exit 0."""
    from CoreDiffLib.inference import Denoiser, denoise_file
    for suffix in (".nrrd", ".mha", ".mhd"):
        src = write_image(tmp_path / f"in{suffix}", synthetic_ct(6, 32, seed=1))
        other = write_image(tmp_path / f"other{suffix}", synthetic_ct(6, 32, seed=2))
        out = tmp_path / f"out{suffix.replace('.mhd', '.nrrd')}"
        swapped = []

        def swap_once(done, total):
            if done >= 2 and not swapped:  # mid-run, as another program saves over it
                if suffix == ".mhd":  # a .mhd is streamed from its .raw, which can be replaced alone
                    os.replace(tmp_path / "other.raw", tmp_path / "in.raw")
                else:
                    os.replace(other, src)
                swapped.append(done)
        with pytest.raises(CoreDiffError, match="changed while it was being read .*nothing was written"):
            denoise_file(src, out, Denoiser.load(identity_model_path, "cpu", 1), batch_size=1, progress=swap_once)
        assert swapped and not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_denoise_names_what_a_killed_run_into_the_same_output_left(tmp_path, identity_model_path):
    """A denoise killed outright (the out-of-memory killer) leaves its hidden raw data, the
    volume's size, beside the output; no later run said so. One of a live run is not named."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    src = write_image(tmp_path / "in.nrrd", synthetic_ct(2, 32))
    killed = tmp_path / f".out.nrrd.partial-{dead.pid}-x1y2z3.raw"
    live = tmp_path / f".out.nrrd.partial-{os.getpid()}-a1b2c3.raw"
    for leftover in (killed, live):
        leftover.write_bytes(b"\0" * 1000)
    r = corediff("denoise", src, tmp_path / "out.nrrd", "--model", identity_model_path, "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert f"note: {killed} was left by an earlier run into out.nrrd that was killed" in r.stderr, r.stderr
    assert live.name not in r.stderr and killed.exists() and live.exists()  # said, not deleted


def test_an_integer_output_array_gets_rounded_hu_not_hu_cut_toward_zero(changing_model_path):
    """denoise_volume into an int16 array (what the streamed writer hands it): truncation would
    pull every voxel up to 1 HU toward 0, a bias no file test saw (the file writers round too)."""
    from CoreDiffLib.inference import denoise_volume
    ct = synthetic_ct(3, 48)
    exact = denoise_volume(ct, model=str(changing_model_path), device="cpu", steps=1)
    assert np.abs(exact - np.rint(exact)).max() > 0.3  # fractional HU to round
    as_int = denoise_volume(ct, model=str(changing_model_path), device="cpu", steps=1,
                            out=np.empty(ct.shape, np.int16))
    np.testing.assert_array_equal(as_int, np.rint(exact).astype(np.int16))


def test_a_model_that_returns_nan_is_an_error_not_a_volume_of_zeros(tmp_path, ct_file):
    """A diverged or damaged model wrote 0 HU everywhere and exited 0."""
    import json

    from safetensors.torch import load_file, save_file
    from CoreDiffLib.models import load_model, read_weights_config
    src = REPO / "CoreDiffLib" / "weights"
    shipped = sorted(src.glob("*.safetensors"))[0]
    state = load_file(str(shipped))
    _, meta = read_weights_config(shipped)
    state["out.bias"] = torch.full_like(state["out.bias"], float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    r = corediff("denoise", ct_file, tmp_path / "o.nrrd", "--model", tmp_path / "nan.safetensors",
                 "--progress", "none")
    assert r.returncode == 2 and "NaN or infinite weights (out.bias)" in r.stderr
    assert not (tmp_path / "o.nrrd").exists()
    config = json.loads(meta["config"])
    config["hu_scale"] = float("nan")
    save_file(load_file(str(shipped)), str(tmp_path / "scale.safetensors"),
              metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(CoreDiffError, match="unreadable network config"):
        load_model(tmp_path / "scale.safetensors")
    from CoreDiffLib.inference import Denoiser, denoise_volume
    net = ClearNet(NetworkConfig(width=8))  # what an overflow in half precision turns into
    torch.nn.init.constant_(net.out.bias, float("nan"))
    # eager too (every GPU, wide models, no onnxruntime): ONNX's export check refused the model first,
    # so the denoise loop's own check went untested
    for runtime in ("onnx", "eager"):
        with pytest.raises(CoreDiffError, match="returned NaN or infinite values"):
            denoise_volume(synthetic_ct(2, 32), denoiser=Denoiser.load(net, "cpu", runtime=runtime))


def test_dicom_in_dicom_out(tmp_path, ct_file, identity_model_path):
    series = tmp_path / "series"
    assert corediff("denoise", ct_file, series, "--model", identity_model_path, "--progress", "none").returncode == 0
    r = corediff("denoise", series, tmp_path / "series_den", "--model", identity_model_path, "--progress", "none")
    assert r.returncode == 0, r.stderr
    out = read_volume(tmp_path / "series_den")
    assert len(list((tmp_path / "series_den").iterdir())) == 6
    assert "CoreDiff" in out.dicom_tags["0008|103e"]


def test_a_study_folder_denoises_the_scan_it_names_or_the_one_asked_for(tmp_path, identity_model_path):
    study = tmp_path / "study"
    scan = write_study_folder(study)
    before = {p: digest(p) for p in study.rglob("*.dcm")}
    r = corediff("denoise", study, tmp_path / "scan.nrrd", "--model", identity_model_path, "--progress", "lines")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if not line.startswith("PROGRESS")]
    assert all(line.startswith("INFO ") for line in notes)  # a GUI reading the lines sees every one
    assert any("holds 4 DICOM series; reading number 2" in line for line in notes)
    assert any("3. 'Lung 1.0 B70f'" in line for line in notes)
    np.testing.assert_allclose(read_volume(tmp_path / "scan.nrrd").array, scan, atol=1.0)
    r = corediff("denoise", study, tmp_path / "lung", "--series", "3", "--model", identity_model_path,
                 "--progress", "none")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(read_volume(tmp_path / "lung").array, scan[:4] + 100, atol=1.0)
    assert {p: digest(p) for p in study.rglob("*.dcm")} == before


def test_a_series_with_a_missing_slice_is_denoised_in_place_or_refused_for_a_grid(tmp_path, identity_model_path):
    folder = write_dicom_series(tmp_path / "gap", synthetic_ct(6, 32, noise_hu=0).round(), "1.2.826.4.1")
    (folder / "3.dcm").unlink()
    r = corediff("denoise", folder, tmp_path / "out.nrrd", "--model", identity_model_path, "--progress", "none")
    assert r.returncode == 2 and "not evenly spaced" in r.stderr and "write a DICOM folder" in r.stderr, r.stderr
    assert not (tmp_path / "out.nrrd").exists() and "WARNING" not in r.stderr  # ITK's own warning is replaced
    r = corediff("denoise", folder, tmp_path / "den", "--model", identity_model_path)
    assert r.returncode == 0, r.stderr
    assert "4 mm between slices 2 and 3: a missing slice?" in r.stderr
    assert dicom_positions(tmp_path / "den") == [0, 2, 4, 8, 10]
    r = corediff("denoise", folder, tmp_path / "part", "--slices", "2:4", "--model", identity_model_path)
    assert r.returncode == 0, r.stderr
    assert dicom_positions(tmp_path / "part") == [4, 8]
    numbers = set()  # the scan's own numbers (the 3rd and the 5th: the 4th is missing), not from 1
    for f in (tmp_path / "part").iterdir():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        numbers.add(int(reader.GetMetaData("0020|0013")))
    assert numbers == {3, 5}


def _corrupt_model(tmp_path: Path) -> Path:
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    return p


def _other_architecture(tmp_path: Path) -> Path:
    from safetensors.torch import save_file
    import torch
    p = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(p), metadata={"format": "something-else"})
    return p


def _mismatched_tensors(tmp_path: Path) -> Path:
    """Declares width 8 but holds width-16 tensors."""
    import json
    from safetensors.torch import save_file
    net = ClearNet(NetworkConfig(width=16))
    p = tmp_path / "mismatch.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p),
              metadata={"format": "corediff-clearnet-v1", "config": json.dumps(NetworkConfig(width=8).to_dict())})
    return p


@pytest.mark.parametrize("case, message", [
    ("missing_input", "does not exist"),
    ("output_is_input", "is the input"),
    ("mr_input", "does not look like CT"),
    ("nan_input", "NaN/inf"),
    ("corrupt_model", "not a readable safetensors"),
    ("other_architecture", "not a CoreDiff CLEAR-Net"),
    ("mismatched_model", "does not match the CLEAR-Net architecture"),
    ("unknown_model", "neither a shipped model"),
    ("empty_model", "model '' is not a model name"),
    ("folder_as_model", "is not a model name (corediff-"),
    ("bad_steps", "steps must be 'auto' or between 1 and 10"),
    ("word_steps", "'fast' is not 'auto' or a whole number of steps"),
    ("slice_beyond_the_end", "slices 6:7 are not within this volume's 0:6"),
    ("empty_slice_range", "slices 4:2 hold no slice: A:B means slices A to B-1, with A < B (this volume has 0 to 5)"),
    ("unknown_device", "unknown device 'tpu'"),
    ("malformed_slices", "'2-4' is not K or A:B"),
    ("auto_model_with_an_adaptation", "--model auto chooses a dose model; an adaptation brings its own"),
    ("series_of_a_file", "--series picks a series in a DICOM folder"),
    ("zero_batch", "batch size must be a whole number of slices >= 1, not 0"),
])
def test_bad_input_gets_one_clear_line_and_writes_nothing(tmp_path, ct_file, tiny_model_path, case, message):
    inp, out, model, extra = ct_file, tmp_path / "out.nrrd", tiny_model_path, []
    if case == "missing_input":
        inp = tmp_path / "nope.nrrd"
    elif case == "output_is_input":
        out = ct_file
    elif case == "mr_input":
        inp = write_image(tmp_path / "mr.nrrd", np.random.default_rng(0).uniform(0, 900, (3, 32, 32)))
    elif case == "nan_input":
        arr = synthetic_ct(2, 32)
        arr[1, 5, 5] = np.inf
        inp = write_image(tmp_path / "nan.nrrd", arr, dtype=np.float32)
    elif case == "corrupt_model":
        model = _corrupt_model(tmp_path)
    elif case == "other_architecture":
        model = _other_architecture(tmp_path)
    elif case == "mismatched_model":
        model = _mismatched_tensors(tmp_path)
    elif case == "unknown_model":
        model = "no-such-model"
    elif case == "empty_model":  # '' is the folder '.': "not a readable safetensors file (os error 19)"
        model = ""
    elif case == "folder_as_model":
        model = tmp_path
    elif case == "bad_steps":
        extra = ["--steps", "50"]
    elif case == "word_steps":
        extra = ["--steps", "fast"]
    elif case == "slice_beyond_the_end":
        extra = ["--slices", "6"]
    elif case == "empty_slice_range":
        extra = ["--slices", "4:2"]
    elif case == "malformed_slices":
        extra = ["--slices", "2-4"]
    elif case == "auto_model_with_an_adaptation":
        model, extra = "auto", ["--adaptation", "some-adaptation"]
    elif case == "series_of_a_file":
        extra = ["--series", "2"]
    elif case == "zero_batch":
        extra = ["--batch-size", "0"]
    elif case == "unknown_device":  # refused before the scan is measured for --model auto, which takes seconds
        model, extra = "auto", ["--device", "tpu"]
    before = {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    r = corediff("denoise", inp, out, "--model", model, "--progress", "none", *extra)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    # argparse's own refusals (a malformed option) name the subcommand
    assert last.startswith(("corediff: error: ", "corediff denoise: error: ")) and message in last, r.stderr
    assert "Traceback" not in r.stderr and "model for this scan" not in r.stderr
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()} == before


def test_compare_writes_table_csv_and_figure(tmp_path):
    ref = synthetic_ct(3, 48, noise_hu=0)
    ldct = ref + np.random.default_rng(0).normal(0, 40, ref.shape)
    den = ref + np.random.default_rng(1).normal(0, 10, ref.shape)
    paths = [write_image(tmp_path / f"{n}.nrrd", a) for n, a in (("ref", ref), ("ldct", ldct), ("den", den))]
    r = corediff("compare", paths[2], "--ldct", paths[1], "--reference", paths[0], "--csv", tmp_path / "m.csv",
                 "--figure", tmp_path / "fig.png")
    assert r.returncode == 0, r.stderr
    mean = [line for line in r.stdout.splitlines() if line.startswith("mean")][0].split()[1:]
    den_psnr, den_ssim, den_rmse, ld_psnr, ld_ssim, ld_rmse = map(float, mean)
    assert den_psnr > ld_psnr + 6 and den_ssim > ld_ssim and den_rmse < ld_rmse
    assert den_rmse == pytest.approx(10, rel=0.15) and ld_rmse == pytest.approx(40, rel=0.15)
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0].startswith("slice,denoised_psnr") and len(rows) == 4
    # each mean is the mean of its own column (a mean PSNR printed as the SSIM passed above)
    per_slice = np.array([[float(v) for v in row.split(",")[1:7]] for row in rows[1:]])
    header = rows[0].split(",")[1:7]
    assert header == ["denoised_psnr", "denoised_ssim", "denoised_rmse_hu", "ldct_psnr", "ldct_ssim", "ldct_rmse_hu"]
    np.testing.assert_allclose(list(map(float, mean)), per_slice.mean(axis=0), atol=0.051)  # as printed, rounded
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_writes_its_files_before_a_reader_that_leaves_early_closes_the_pipe(tmp_path):
    """`corediff compare ... | head -1`: the table is printed last, so the CSV and the figure are
    written even when stdout closes; the closed pipe ends the run quietly (the message used to
    say no output was written, and the CSV was lost)."""
    ref = synthetic_ct(3, 48, noise_hu=0)
    paths = [write_image(tmp_path / f"{n}.nrrd", ref + k) for k, n in enumerate(("ref", "den"))]
    proc = subprocess.Popen([sys.executable, "-m", "CoreDiffLib.cli", "compare", str(paths[1]), "--reference",
                             str(paths[0]), "--csv", str(tmp_path / "m.csv"), "--figure", str(tmp_path / "f.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err and "no output was written" not in err, err
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 4
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_writes_both_its_files_or_neither(tmp_path, monkeypatch, capsys):
    """A figure that cannot be written (a full disk) left the CSV behind while the error said no
    output was written."""
    import CoreDiffLib.figures as figures
    from CoreDiffLib.cli import main
    ref = synthetic_ct(3, 48, noise_hu=0)
    paths = [write_image(tmp_path / f"{n}.nrrd", ref + k) for k, n in enumerate(("ref", "den"))]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(figures, "comparison_figure", full_disk)
    assert main(["compare", str(paths[1]), "--reference", str(paths[0]), "--csv", str(tmp_path / "m.csv"),
                 "--figure", str(tmp_path / "f.png")]) == 2
    assert "No space left on device; no output was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den.nrrd", "ref.nrrd"]

    def full_disk_on_the_temporary_file(panels, path, **kwargs):  # names what the user never sees
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(figures, "comparison_figure", full_disk_on_the_temporary_file)
    assert main(["compare", str(paths[1]), "--reference", str(paths[0]), "--figure", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert f"No space left on device (writing in {tmp_path}); no output was written" in err and ".partial-" not in err


def test_radiological_slice_shows_the_same_anatomy_however_the_file_stores_the_plane():
    """The compare figure turns each axial slice so patient left is on the image's right and anterior
    at the top: a plane stored mirrored, flipped (RAS) or with rows and columns swapped shows as
    the one stored the usual (LPS) way; it was drawn upside down or transposed."""
    from CoreDiffLib.orientation import radiological_slice
    image = np.arange(12.0).reshape(3, 4)  # rows along +y (posterior), columns along +x (left)
    stored = {(1, 0, 0, 0, 1, 0, 0, 0, 1): (image, False),
              (-1, 0, 0, 0, -1, 0, 0, 0, 1): (image[::-1, ::-1], False),  # RAS
              (-1, 0, 0, 0, 1, 0, 0, 0, 1): (image[:, ::-1], False),
              (0, 1, 0, 1, 0, 0, 0, 0, 1): (image.T, True),  # columns run along y, rows along x
              (0, -1, 0, 1, 0, 0, 0, 0, 1): (image.T[::-1], True)}  # ... and rows toward -x
    for direction, (array, swapped) in stored.items():
        shown, was_swapped = radiological_slice(array, direction)
        assert np.array_equal(shown, image) and was_swapped == swapped, direction


def test_compare_refuses_outputs_that_would_overwrite_an_input_or_could_not_be_written(tmp_path):
    ref = synthetic_ct(3, 48, noise_hu=0)
    paths = [write_image(tmp_path / f"{n}.nrrd", ref + k) for k, n in enumerate(("ref", "ldct", "den"))]
    before = {p: digest(p) for p in paths}
    cases = [(("--csv", paths[0]), "--csv"),  # a CSV on the reference volume: it used to be overwritten
             (("--csv", tmp_path / "m.nrrd"), "ending in .csv"), (("--figure", paths[1]), "--figure"),
             (("--figure", tmp_path / "fig.xyz"), "ending in .png"),
             (("--csv", tmp_path / "nowhere" / "m.csv"), "does not exist"),
             (("--figure", tmp_path / ("f" * 230 + ".png")), "under 200 bytes"),
             (("--csv", tmp_path / "m.csv", "--figure", tmp_path / "f.png", "--slice", "9"), "--slice 9")]
    for extra, message in cases:
        r = corediff("compare", paths[2], "--ldct", paths[1], "--reference", paths[0], *extra)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
    r = corediff("compare", paths[2], "--csv", tmp_path / "m.csv")
    assert r.returncode == 2 and "need --reference" in r.stderr
    r = corediff("compare", paths[2], "--ldct", paths[1])  # it used to say "writing the figure" and write none
    assert r.returncode == 2 and "nothing to do" in r.stderr
    r = corediff("compare", paths[2], "--reference", paths[0], "--slice", "99")  # it was ignored
    assert r.returncode == 2 and "give --figure FILE too" in r.stderr
    assert {p: digest(p) for p in paths} == before and sorted(tmp_path.iterdir()) == sorted(paths)


def test_compare_scores_a_slices_output_against_the_matching_slices_of_the_scan(tmp_path, identity_model_path):
    """`denoise --slices` writes part of a scan where it lies: compare cuts the reference and the
    LDCT to it and numbers the rows by the scan's slices; a part from elsewhere is refused."""
    ref = synthetic_ct(10, 48, noise_hu=0)
    ldct = ref + np.random.default_rng(0).normal(0, 40, ref.shape)
    ref_path, ldct_path = write_image(tmp_path / "ref.nrrd", ref), write_image(tmp_path / "ldct.nrrd", ldct)
    assert corediff("denoise", ldct_path, tmp_path / "part.nrrd", "--model", identity_model_path,
                    "--slices", "4:7", "--progress", "none").returncode == 0
    r = corediff("compare", tmp_path / "part.nrrd", "--ldct", ldct_path, "--reference", ref_path,
                 "--csv", tmp_path / "m.csv", "--figure", tmp_path / "fig.png", "--slice", "5")
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "m.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [4, 5, 6]
    for row in rows:  # the identity model gives back the LDCT: the same scores on the same slices
        den_psnr, ld_psnr = float(row.split(",")[1]), float(row.split(",")[4])
        assert den_psnr == pytest.approx(ld_psnr, abs=0.05)
    assert (tmp_path / "fig.png").exists()
    assert "--slice 9 is out of range 4..6" in corediff("compare", tmp_path / "part.nrrd", "--reference", ref_path,
                                                          "--figure", tmp_path / "f2.png", "--slice", "9").stderr
    # a reference stored the other way round cannot number the part: the rows say whose numbers they are
    flipped = write_image(tmp_path / "flipped.nrrd", ref[::-1], origin=(-10.0, 20.0, 30.0 + 9 * 2.5),
                          direction=(1, 0, 0, 0, -1, 0, 0, 0, -1))
    r = corediff("compare", tmp_path / "part.nrrd", "--reference", flipped, "--csv", tmp_path / "f.csv")
    assert r.returncode == 0 and "count part.nrrd's own slices from 0 (give --ldct" in r.stderr, r.stderr
    assert [int(row.split(",")[0]) for row in (tmp_path / "f.csv").read_text().splitlines()[1:]] == [0, 1, 2]
    r = corediff("compare", tmp_path / "part.nrrd", "--reference", flipped, "--ldct", ldct_path,
                 "--csv", tmp_path / "f.csv", "--overwrite")
    assert r.returncode == 0 and "own slices" not in r.stderr
    assert [int(row.split(",")[0]) for row in (tmp_path / "f.csv").read_text().splitlines()[1:]] == [4, 5, 6]
    # the reference cut to the same part (its own slice 0) and the whole LDCT: still the scan's numbers
    part_ref = write_image(tmp_path / "part_ref.nrrd", ref[4:7], origin=(-10.0, 20.0, 30.0 + 4 * 2.5))
    r = corediff("compare", tmp_path / "part.nrrd", "--ldct", ldct_path, "--reference", part_ref,
                 "--csv", tmp_path / "f.csv", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [int(row.split(",")[0]) for row in (tmp_path / "f.csv").read_text().splitlines()[1:]] == [4, 5, 6]
    elsewhere = write_image(tmp_path / "elsewhere.nrrd", ldct[4:7], origin=(-10.0, 20.0, 31.0))  # not on a slice
    r = corediff("compare", elsewhere, "--reference", ref_path)
    assert r.returncode == 2 and "differ in shape" in r.stderr


def test_compare_scores_axial_planes_of_the_same_voxels_however_each_file_stores_them(tmp_path):
    """A reference stored mirrored or sagittally is the same scan: compare finds its voxels where
    the denoised volume's are (it compared stored arrays: 16 dB for a mirrored copy), scores
    axial planes, leaves blank slices out of the means, and refuses a reference on another grid."""
    ref = synthetic_ct(20, 48, noise_hu=0)
    ref[0] = -3024.0  # padding only: nothing to score there
    den = ref + np.random.default_rng(1).normal(0, 10, ref.shape)
    den[0] = -3024.0
    spacing, origin, axial = (0.7, 0.8, 2.5), (-10.0, 20.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    den_path = write_image(tmp_path / "den.nrrd", den, spacing, origin, axial)
    stored = {
        "axial": write_image(tmp_path / "ref.nrrd", ref, spacing, origin, axial),
        "mirrored": write_image(tmp_path / "mirrored.nrrd", ref[:, :, ::-1], spacing,
                                (origin[0] + 47 * spacing[0],) + origin[1:], (-1, 0, 0, 0, 1, 0, 0, 0, 1)),
        "sagittal": write_image(tmp_path / "sagittal.nrrd", ref.transpose(2, 1, 0), spacing[::-1], origin,
                                (0, 0, 1, 0, 1, 0, 1, 0, 0)),
        # rows run anterior: the origin is the other corner, which the axial view must move back to
        "sagittal, y reversed": write_image(tmp_path / "sagittal_y.nrrd", ref.transpose(2, 1, 0)[:, ::-1],
                                            spacing[::-1], (origin[0], origin[1] + 47 * spacing[1], origin[2]),
                                            (0, 0, 1, 0, -1, 0, 1, 0, 0)),
    }
    tables = {}
    for name, path in stored.items():
        r = corediff("compare", den_path, "--reference", path, "--csv", tmp_path / f"{name}.csv")
        assert r.returncode == 0, (name, r.stderr)
        tables[name] = (tmp_path / f"{name}.csv").read_text()
        mean = [line for line in r.stdout.splitlines() if line.startswith("mean")][0].split()[1:]
        assert float(mean[0]) > 35 and float(mean[2]) == pytest.approx(10, rel=0.15), (name, mean)
        assert "1 slice left out of the means" in r.stderr
    assert tables["mirrored"] == tables["sagittal"] == tables["sagittal, y reversed"] == tables["axial"]
    rows = tables["axial"].splitlines()
    assert len(rows) == 21 and rows[1] == "0,,," and rows[2].startswith("1,")
    # the same shape on another grid (another slice spacing here) is a different place: refused
    other = write_image(tmp_path / "other.nrrd", ref, (0.7, 0.8, 5.0), origin, axial)
    r = corediff("compare", den_path, "--reference", other)
    assert r.returncode == 2 and "lies on another grid" in r.stderr


def _paired_training_folder(tmp_path: Path) -> Path:
    """One NDCT/LDCT pair, named as `corediff train` finds pairs."""
    data = tmp_path / "data"
    data.mkdir()
    ref = synthetic_ct(4, 48, noise_hu=0)
    write_image(data / "c1_ndct.nrrd", ref)
    write_image(data / "c1_ldct.nrrd", ref + np.random.default_rng(0).normal(0, 40, ref.shape))
    return data


def test_train_command_writes_a_loadable_model(tmp_path):
    data = _paired_training_folder(tmp_path)
    out = tmp_path / "m.safetensors"
    r = corediff("train", data, "--out", out, "--iterations", "20", "--width", "8", "--batch-size", "2",
                 "--patch-size", "32", "--progress", "none", "--checkpoint-every", "10")
    assert r.returncode == 0, r.stderr
    from CoreDiffLib.models import load_model, read_weights_config
    assert load_model(out).config.width == 8
    _, meta = read_weights_config(out)  # what it was trained from, wherever the command ran
    assert [Path(p).is_absolute() for p in json.loads(meta["data"])[0]] == [True, True]
    assert load_model(out).trained_neighbour_mm == pytest.approx(2.5)  # write_image's slice spacing x gap 1
    assert json.loads(meta["train_config"])["ema_start"] == 4  # the default: averaging over the last 4/5
    # more iterations for the same run: the default --ema-start (iterations / 5) follows the checkpoint's
    r = corediff("train", data, "--out", out, "--iterations", "40", "--width", "8", "--batch-size", "2",
                 "--patch-size", "32", "--progress", "lines", "--checkpoint-every", "10", "--lr", "1e-4")
    assert r.returncode == 0 and "resumed from" in r.stdout and "at iteration 20" in r.stdout, r.stderr
    assert (tmp_path / "m.ckpt").exists()
    # each leg of the resumed run is recorded (the weights kept only the last leg's settings)
    _, meta = read_weights_config(out)
    legs = json.loads(meta["legs"])
    assert [(leg["from_iteration"], leg["to_iteration"], leg["lr"]) for leg in legs] == [(0, 20, 2e-4), (20, 40, 1e-4)]
    assert all(leg["device"] == "cpu" and leg["started_utc"].endswith("Z") for leg in legs)
    r = corediff("train", data, "--out", out, "--iterations", "40", "--width", "8", "--batch-size", "2",
                 "--patch-size", "32", "--progress", "none", "--checkpoint-every", "10")
    assert r.returncode == 0 and "nothing left to train" in r.stderr, r.stderr
    assert json.loads(read_weights_config(out)[1]["legs"]) == legs  # a leg that trained nothing is none
    r = corediff("train", data, "--out", out, "--iterations", "60", "--width", "8", "--batch-size", "2",
                 "--patch-size", "32", "--progress", "none", "--checkpoint-every", "10", "--ema-start", "7")
    assert r.returncode == 2 and "other settings (ema_start 4 -> 7)" in r.stderr, r.stderr  # asked, not swapped


def test_a_second_train_run_writing_the_same_files_is_refused_while_the_first_runs(tmp_path):
    """Two runs with one --out (or checkpoint) overwrote each other's checkpoints and weights."""
    import signal
    import time
    data = _paired_training_folder(tmp_path)
    out = tmp_path / "m.safetensors"
    common = ("--width", "4", "--batch-size", "1", "--patch-size", "32", "--progress", "lines")
    first = subprocess.Popen([sys.executable, "-m", "CoreDiffLib.cli", "train", str(data), "--out", str(out),
                              "--iterations", "1000000", "--checkpoint-every", "1000000", *common],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        for line in first.stdout:  # training has begun
            if line.startswith("PROGRESS 1 "):
                break
        second = corediff("train", data, "--out", out, "--iterations", "2", *common)
        assert second.returncode == 2 and f"another corediff train is writing {out} now (process {first.pid})" \
            in second.stderr, second.stderr
        other_ckpt = corediff("train", data, "--out", tmp_path / "n.safetensors", "--checkpoint", tmp_path / "m.ckpt",
                              "--iterations", "2", *common)
        assert other_ckpt.returncode == 2 and "m.ckpt now" in other_ckpt.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # no cleanup at all: the lock goes with the process
        first.wait(timeout=60)
    time.sleep(0.1)
    import tempfile
    locks = set(Path(tempfile.gettempdir()).glob("corediff-lock-*"))
    again = corediff("train", data, "--out", out, "--iterations", "2", *common)
    assert again.returncode == 0 and out.exists(), again.stderr
    assert set(Path(tempfile.gettempdir()).glob("corediff-lock-*")) <= locks  # a run that ends removes its own


def test_one_shot_progress_shows_a_bar_per_phase_so_the_sampling_does_not_set_the_fits_eta(capsys):
    """One bar counted 10 network evaluations of seconds each and 600 fitting iterations of
    milliseconds as one unit: its first ETA was minutes for a fit of seconds. 'lines' keeps the
    whole count a GUI parses."""
    from CoreDiffLib.cli import PhasedProgress
    bars = PhasedProgress("bar", [("one-shot: sampling", 3, "step"), ("one-shot: fitting", 5, "it")])
    seen = []
    for done in range(9):
        bars(done, 8)
        seen.append([(b._bar.n, b._bar.total) if b._bar is not None else None for b in bars.bars])
    bars.close()
    assert seen[0] == [(0, 3), None] and seen[2] == [(2, 3), None]
    assert seen[3] == [(3, 3), (0, 5)] and seen[5] == [(3, 3), (2, 5)] and seen[8] == [(3, 3), (5, 5)]
    err = capsys.readouterr().err
    assert "one-shot: sampling: 100%" in err and "3/3" in err and "one-shot: fitting: 100%" in err and "5/5" in err
    lines = PhasedProgress("lines", [("one-shot: sampling", 3, "step"), ("one-shot: fitting", 5, "it")])
    for done in (0, 3, 8):
        lines(done, 8)
    assert capsys.readouterr().out.split("\n")[:3] == ["PROGRESS 0 8", "PROGRESS 3 8", "PROGRESS 8 8"]


def test_train_shows_progress_takes_doses_as_simulate_writes_them_and_says_why_it_stopped(tmp_path):
    """From a journey through the commands: --progress showed nothing; --dose-tag 0.1 (as simulate
    takes doses) found 'no pairs' in a folder of ldct10 files; the weights recorded the tag as
    typed, or none; a --time-limit ended a run without a word; --init-weights was recorded relative
    to where the command ran."""
    from CoreDiffLib.models import read_weights_config
    data = tmp_path / "sim"
    data.mkdir()
    ref = synthetic_ct(3, 32, noise_hu=0)
    write_image(data / "case000_abdomen_ndct.nrrd", ref)
    for tag, sd in (("25", 30), ("10", 50)):
        write_image(data / f"case000_abdomen_ldct{tag}.nrrd", ref + np.random.default_rng(0).normal(0, sd, ref.shape))
    common = ("--width", "4", "--batch-size", "1", "--patch-size", "32", "--checkpoint-every", "100")
    r = corediff("train", data, "--out", tmp_path / "m.safetensors", "--dose-tag", "0.1", "--iterations", "3",
                 *common, "--progress", "lines")
    assert r.returncode == 0, r.stderr
    assert "PROGRESS 0 3" in r.stdout.splitlines() and "PROGRESS 3 3" in r.stdout.splitlines()
    assert f"checkpoint {tmp_path / 'm.ckpt'} every 100 iterations and at the end: the same command resumes" \
        in r.stdout + r.stderr
    _, meta = read_weights_config(tmp_path / "m.safetensors")
    assert meta["dose_tag"] == "10"
    import torch  # the checkpoint keeps the same record: weights exported from it (ship_model.py) carry it
    kept = json.loads(torch.load(tmp_path / "m.ckpt", weights_only=True)["record"])
    assert kept["dose_tag"] == "10" and kept["neighbour_mm"] == json.loads(meta["neighbour_mm"]) > 0
    assert kept["data"] == json.loads(meta["data"]) and kept["patch_size_used"] == 32
    r = corediff("train", data, "--out", tmp_path / "n.safetensors", "--dose-tag", "5%", *common)
    assert r.returncode == 2 and "no LDCT of dose tag '5' beside its NDCT" in r.stderr
    assert "the tags there are 10, 25" in r.stderr
    r = corediff("train", "sim", "--out", "t.safetensors", "--dose-tag", "ldct25", "--iterations", "100000",
                 "--time-limit", "0.002", "--init-weights", "m.safetensors", *common, "--progress", "none",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "time limit of 0.002 min reached at iteration" in r.stderr and "of 100000" in r.stderr
    _, meta = read_weights_config(tmp_path / "t.safetensors")
    assert meta["init_weights"] == str((tmp_path / "m.safetensors").resolve()) and meta["dose_tag"] == "25"
    stopped_at = int(re.search(r"reached at iteration (\d+)", r.stderr).group(1))
    assert int(meta["iterations"]) == stopped_at < 100000  # what it trained, not what was asked for


def test_train_takes_the_axial_planes_of_a_sagittally_stored_pair(tmp_path):
    data = tmp_path / "sag"
    data.mkdir()
    ref = synthetic_ct(20, 48, noise_hu=0)  # (z, y, x)
    for name, vol in (("c1_ndct", ref), ("c1_ldct", ref + np.random.default_rng(0).normal(0, 40, ref.shape))):
        write_image(data / f"{name}.nrrd", np.transpose(vol, (2, 1, 0)), spacing=(1.0, 0.8, 0.8),
                    direction=(0, 0, 1, 0, 1, 0, 1, 0, 0))  # index axis i runs along z: stored sagittally
    r = corediff("train", data, "--out", tmp_path / "m.safetensors", "--iterations", "2", "--width", "4",
                 "--batch-size", "2", "--patch-size", "16", "--progress", "lines")
    assert r.returncode == 0, r.stderr
    assert "c1_ndct.nrrd: stored sagittally; trained on its axial planes" in r.stdout + r.stderr


def test_models_and_devices_list_as_json():
    import json
    r = corediff("devices", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == "cpu"
    r = corediff("models", "--json")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), list)
    from CoreDiffLib.manifest import default_model_name, load_manifest
    rows = json.loads(r.stdout)
    shipped = [row["name"] for row in rows if row["kind"] == "model"]
    assert shipped == list(load_manifest()["models"])
    assert [row["name"] for row in rows if row["default"]] == [default_model_name()]
    text = corediff("models").stdout.splitlines()
    assert [line.split()[1] for line in text if line.startswith("*")] == [default_model_name()]
    assert {line.split()[0] for line in text if not line.startswith("*")} >= set(shipped) - {default_model_name()}
    assert text[-1].startswith("(* = the model run where --model auto, the default, cannot measure")  # the legend


def test_devices_lists_every_gpu_with_its_memory(monkeypatch, capsys):
    """Checked on a CPU-only machine, the GPU rows (the Slicer module's device list) were never seen."""
    import types

    import torch

    from CoreDiffLib.cli import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=f"GPU {i}", total_memory=(80 + i) * 2**30))
    assert main(["devices", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["memory_gb"]) for r in rows] == [("cpu", None), ("cuda:0", 80.0), ("cuda:1", 81.0)]
    assert rows[1]["label"] == "GPU 0 (80 GiB)"


def _fine_tune_shipped(tmp_path, *extra) -> tuple:
    """corediff-25 and what `train --init-weights corediff-25 EXTRA` at a negligible lr wrote."""
    data = _paired_training_folder(tmp_path)
    out = tmp_path / "ft.safetensors"
    r = corediff("train", data, "--out", out, "--iterations", "2", "--batch-size", "2", "--patch-size", "32",
                 "--init-weights", "corediff-25", "--lr", "1e-12", "--progress", "lines", *extra)
    assert r.returncode == 0, r.stderr
    from CoreDiffLib.models import load_model
    return data, load_model("corediff-25").eval(), load_model(out).eval()


def test_train_can_start_from_shipped_weights(tmp_path):
    _, start, tuned = _fine_tune_shipped(tmp_path, "--width", "8")
    assert tuned.config == start.config  # the file's architecture, not --width 8
    for (k, a), b in zip(start.state_dict().items(), tuned.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_train_can_widen_shipped_weights_into_a_wider_model_of_the_same_function(tmp_path):
    data, start, wide = _fine_tune_shipped(tmp_path, "--widen", "2")
    from CoreDiffLib.diffusion import sample
    assert wide.config.width == 2 * start.config.width
    stack = torch.rand(1, 3, 32, 32) * 0.1 + 0.22
    assert float((sample(start, stack).final - sample(wide, stack).final).abs().max()) * 4096 < 0.05  # HU
    r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--widen", "2", "--progress", "none")
    assert r.returncode == 2 and "--init-weights" in r.stderr and not (tmp_path / "x.safetensors").exists()
    r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--init-weights", "corediff-25", "--widen", "1",
                 "--progress", "none")
    assert r.returncode == 2 and ">= 2" in r.stderr and not (tmp_path / "x.safetensors").exists()


def test_train_refuses_bad_options_and_outputs_before_reading_the_data(tmp_path):
    data = _paired_training_folder(tmp_path)
    r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--ssim-weight", "-1", "--progress", "none")
    assert r.returncode == 2 and "--ssim-weight" in r.stderr and not (tmp_path / "x.safetensors").exists()
    for bad in ("-1", "nan"):
        r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--level-weight", bad, "--progress", "none")
        assert r.returncode == 2 and "--level-weight" in r.stderr and not (tmp_path / "x.safetensors").exists()
    r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--level-weight", "1", "--level-window", "ssim",
                 "--patch-size", "8", "--checkpoint", tmp_path / "x.ckpt", "--progress", "none")
    assert r.returncode == 2 and "--patch-size 11" in r.stderr
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.ckpt").exists()
    for bad in ("1.5", "-0.1", "nan"):
        r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--anywhere-share", bad, "--progress", "none")
        assert r.returncode == 2 and "--anywhere-share" in r.stderr and not (tmp_path / "x.safetensors").exists()
    r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--max-neighbour-gap", "0", "--progress", "none")
    assert r.returncode == 2 and "--max-neighbour-gap" in r.stderr and not (tmp_path / "x.safetensors").exists()
    for bad in ("1.5", "nan"):
        r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--own-slice-share", bad, "--progress", "none")
        assert r.returncode == 2 and "--own-slice-share" in r.stderr and not (tmp_path / "x.safetensors").exists()
    for flag, bad in (("--batch-size", "0"), ("--iterations", "0"), ("--lr", "0"), ("--lr", "nan"),
                      ("--patch-size", "-8"), ("--time-limit", "-1"), ("--threads", "-1"),
                      ("--checkpoint-every", "0"), ("--ema-start", "-5"), ("--keep-every", "-1")):
        r = corediff("train", data, "--out", tmp_path / "x.safetensors", flag, bad, "--progress", "none")
        assert r.returncode == 2 and flag in r.stderr and not (tmp_path / "x.safetensors").exists()
    nd, init = data / "c1_ndct.nrrd", tmp_path / "start.safetensors"
    shutil.copy(REPO / "CoreDiffLib" / "weights" / "corediff-25.safetensors", init)
    kept = digest(nd), digest(init)
    for extra, message in (((nd,), "ending in .safetensors"),  # weights on a training volume
                           ((tmp_path / "x.safetensors", "--checkpoint", nd), "--checkpoint"),
                           ((init, "--init-weights", init), "also an input"),  # the starting weights kept
                           ((tmp_path / "no" / "x.safetensors",), "does not exist")):
        r = corediff("train", data, "--out", *extra, "--progress", "none")
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
    assert (digest(nd), digest(init)) == kept and not (tmp_path / "x.safetensors").exists()
    r = corediff("train", data, "--out", tmp_path / "x.safetensors", "--no-context", "--context-noise-weight", "1",
                 "--checkpoint", tmp_path / "x.ckpt", "--progress", "none")
    assert r.returncode == 2 and "--context-noise-weight" in r.stderr and "adjacent slices" in r.stderr
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.ckpt").exists()


def test_train_keeps_an_existing_out_that_no_checkpoint_goes_on_from(tmp_path):
    """A fresh `train` (its checkpoint deleted, or --checkpoint elsewhere) onto last week's model
    said 'is replaced when training ends' and replaced it hours later; a resumed run writes its
    own --out again, and --overwrite replaces another."""
    data = _paired_training_folder(tmp_path)
    out = tmp_path / "last_week.safetensors"
    out.write_bytes(b"last week's model")
    base = ["train", data, "--out", out, "--iterations", "2", "--width", "4", "--batch-size", "2", "--patch-size", "32",
            "--progress", "none"]
    r = corediff(*base)
    assert r.returncode == 2 and f"--out {out} exists and there is no checkpoint" in r.stderr
    assert "--overwrite" in r.stderr
    assert out.read_bytes() == b"last week's model" and not out.with_suffix(".ckpt").exists()
    r = corediff(*base, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() != b"last week's model" and out.with_suffix(".ckpt").exists()
    r = corediff(*base[:4], "--iterations", "3", *base[6:])  # its own run goes on: no --overwrite needed
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr


def test_ctrl_c_says_so(monkeypatch, capsys):
    from CoreDiffLib import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_models", interrupted)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "corediff: error: interrupted; no output was written"


def test_sigterm_says_so_like_ctrl_c(monkeypatch, capsys):
    """SIGTERM (Slicer's Cancel, `timeout`) ended a command with exit code 143 and not a word: a
    log could not tell a stopped run from one that had nothing to say."""
    import os
    import signal

    from CoreDiffLib import cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")
    monkeypatch.setattr(cli, "cmd_models", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["models"]) == 143
    assert capsys.readouterr().err.strip() == "corediff: error: stopped by SIGTERM; no output was written"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_just_after_an_output_is_in_place_does_not_call_it_unwritten(tmp_path, monkeypatch, capsys,
                                                                               identity_model_path):
    """Ctrl-C (or a failure) right after the output was renamed into place said "no output was
    written" of a complete output: a GUI took the run as failed, and a rerun was refused since
    the output existed."""
    import CoreDiffLib.atomic as atomic
    from CoreDiffLib.cli import main
    src = write_image(tmp_path / "in.nrrd", synthetic_ct(2, 32))
    real = atomic.publish

    out = tmp_path / "out.nrrd"

    def then_interrupted(done, target, *args):
        real(done, target, *args)
        if Path(target) == out:  # not a cache the library writes on the way (an ONNX export)
            raise KeyboardInterrupt
    monkeypatch.setattr(atomic, "publish", then_interrupted)
    assert main(["denoise", str(src), str(out), "--model", str(identity_model_path), "--progress", "none"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"corediff: error: interrupted; {out} was written (complete); what would have come after was not done"
    assert read_volume(out).shape == (2, 32, 32)


def test_a_file_name_that_is_not_utf8_is_refused_in_one_line_not_a_crash(tmp_path, capsys):
    """A Latin-1 name (bytes that are no UTF-8; Python keeps them as surrogates) gave a Python
    traceback for an output and a C++ abort (SimpleITK) for an input."""
    from CoreDiffLib.cli import main
    bad = os.fsdecode(b"M\xfcller.nrrd")  # the bytes a Latin-1 system writes for "Müller"
    for argv in (["denoise", str(tmp_path / bad), str(tmp_path / "o.nrrd")],
                 ["denoise", str(tmp_path / "i.nrrd"), str(tmp_path / bad)], ["dose", bad]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("corediff: error: ") and "M\\xfcller.nrrd is not valid UTF-8" in err, err
        assert "rename" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_train_keeps_the_installed_models_and_records_what_it_did(tmp_path):
    """A shipped name given to --init-weights is that file (an --out of it was not an input, so
    it was overwritten); the installed models folder takes no output (its checkpoints had no data
    fingerprint and were resumed in place); a shipped file given by path is checked as by name;
    an unusable --device, --width or --steps is refused before the data are read; the weights
    record the patch size used and the farthest neighbours a 5-slice volume could show."""
    from CoreDiffLib.models import WEIGHTS_DIR, load_model, read_weights_config
    data = _paired_training_folder(tmp_path)
    shipped = WEIGHTS_DIR / "corediff-25.safetensors"
    kept = digest(shipped), digest(WEIGHTS_DIR / "checkpoints" / "corediff-25.ckpt")
    for extra, message in (((shipped, "--init-weights", "corediff-25", "--checkpoint", tmp_path / "c.ckpt"),
                            "also an input"),
                           ((tmp_path / "m.safetensors", "--checkpoint",
                             WEIGHTS_DIR / "checkpoints" / "corediff-25.ckpt"), "lies in the installed models folder"),
                           ((WEIGHTS_DIR / "mine.safetensors",), "lies in the installed models folder"),
                           ((tmp_path / "m.safetensors", "--device", "bogus"), "unknown device 'bogus'"),
                           ((tmp_path / "m.safetensors", "--width", "0"), "--width must be"),
                           ((tmp_path / "m.safetensors", "--steps", "0"), "--steps must be")):
        r = corediff("train", data / "missing", "--out", *extra, "--progress", "none")  # no data read: none there
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
    assert (digest(shipped), digest(WEIGHTS_DIR / "checkpoints" / "corediff-25.ckpt")) == kept
    assert not (WEIGHTS_DIR / "mine.safetensors").exists()
    assert load_model(str(shipped)).weights_sha256 == load_model("corediff-25").weights_sha256
    out = tmp_path / "m.safetensors"
    r = corediff("train", data, "--out", out, "--iterations", "4", "--width", "4", "--steps", "2", "--batch-size", "1",
                 "--patch-size", "64", "--max-neighbour-gap", "3", "--progress", "none")
    assert r.returncode == 0, r.stderr
    _, meta = read_weights_config(out)
    assert json.loads(meta["patch_size_used"]) == 48  # the 48-pixel slices allow no more
    assert json.loads(meta["neighbour_mm"]) == pytest.approx(2.5)  # 4 slices of 2.5 mm: only adjacent ones
    tall = tmp_path / "tall"  # 7 slices show neighbours up to 3 apart: --max-neighbour-gap 2 learns 5 mm
    tall.mkdir()
    ref = synthetic_ct(7, 48, noise_hu=0)
    write_image(tall / "c1_ndct.nrrd", ref)
    write_image(tall / "c1_ldct.nrrd", ref + np.random.default_rng(0).normal(0, 40, ref.shape))
    r = corediff("train", tall, "--out", tmp_path / "tall.safetensors", "--iterations", "2", "--width", "4",
                 "--steps", "2", "--batch-size", "1", "--patch-size", "32", "--max-neighbour-gap", "2",
                 "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert json.loads(read_weights_config(tmp_path / "tall.safetensors")[1]["neighbour_mm"]) == pytest.approx(5.0)


def test_train_refuses_a_pair_of_one_scan_or_the_wrong_way_round(tmp_path):
    data = _paired_training_folder(tmp_path)
    nd, ld = data / "c1_ndct.nrrd", data / "c1_ldct.nrrd"
    for rows, message in ((f"{ld},{ld}", "as both the NDCT and the LDCT"),
                          (f"{ld},{tmp_path / 'copy.nrrd'}", "hold the same voxels"),
                          (f"{ld},{nd}", "is no noisier than")):
        shutil.copy(ld, tmp_path / "copy.nrrd")
        (tmp_path / "pairs.txt").write_text(rows + "\n")
        r = corediff("train", tmp_path / "pairs.txt", "--out", tmp_path / "m.safetensors", "--iterations", "2",
                     "--width", "4", "--progress", "none")
        assert r.returncode == 2 and message in r.stderr, (rows, r.stderr)
        assert not (tmp_path / "m.safetensors").exists()


def test_a_resumed_run_records_what_its_first_leg_started_from(tmp_path):
    """The weights of a run started from corediff-25 and resumed with another --init-weights
    descend from corediff-25: that is what they record, and the ignored option is said."""
    from CoreDiffLib.models import read_weights_config
    data = _paired_training_folder(tmp_path)
    out, common = tmp_path / "ft.safetensors", ("--batch-size", "1", "--patch-size", "32", "--progress", "none")
    r = corediff("train", data, "--out", out, "--init-weights", "corediff-25", "--iterations", "2", *common)
    assert r.returncode == 0, r.stderr
    r = corediff("train", data, "--out", out, "--init-weights", "corediff-10", "--iterations", "3", *common)
    assert r.returncode == 0, r.stderr
    assert "descend from what its first leg started from (corediff-25)" in r.stderr
    assert "--init-weights corediff-10 was not used" in r.stderr
    _, meta = read_weights_config(out)
    assert meta["init_weights"] == "corediff-25" and json.loads(meta["iterations"]) == 3


def test_a_run_resumed_from_a_checkpoint_without_its_origin_records_it_as_unknown(tmp_path):
    import torch as _torch
    from CoreDiffLib.models import read_weights_config
    data = _paired_training_folder(tmp_path)
    out, common = tmp_path / "r.safetensors", ("--batch-size", "1", "--patch-size", "32", "--width", "4",
                                               "--steps", "2", "--progress", "none")
    assert corediff("train", data, "--out", out, "--iterations", "2", *common).returncode == 0
    ckpt = _torch.load(tmp_path / "r.ckpt", weights_only=True)
    del ckpt["origin"]  # as checkpoints made before 2026-12-05 are
    _torch.save(ckpt, tmp_path / "r.ckpt")
    r = corediff("train", data, "--out", out, "--iterations", "3", "--init-weights", out, *common[:4],
                 "--progress", "none")
    assert r.returncode == 2 and "also an input" in r.stderr  # (its own --out is no starting point)
    other = tmp_path / "other.safetensors"
    shutil.copy(out, other)
    r = corediff("train", data, "--out", out, "--iterations", "3", "--init-weights", other, *common[:4],
                 "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "--init-weights was not used" in r.stderr
    assert read_weights_config(out)[1]["init_weights"].startswith("unknown")


def test_a_scan_denoised_twice_says_so_and_its_dicom_description_keeps_the_model(tmp_path, identity_model_path):
    """From a journey through the commands: denoising a CoreDiff output ran without a word and its
    record named only the second pass; a long series description was cut at 64 characters from the
    end, which lost the model's name PACS lists show; a series from a non-DICOM file lacked
    SliceThickness (type 2)."""
    import SimpleITK as sitk
    long_name = "Abdomen 1.0 B30f portal venous phase contrast"
    series = write_dicom_series(tmp_path / "scan", synthetic_ct(3, 48), "1.2.3.77", tags={"0008|103e": long_name})
    once, twice = tmp_path / "once", tmp_path / "twice"
    for source, out in ((series, once), (once, twice)):
        r = corediff("denoise", source, out, "--model", identity_model_path, "--progress", "lines")
        assert r.returncode == 0, r.stderr
    assert "warning: " not in corediff("denoise", series, tmp_path / "x.nrrd", "--model", identity_model_path,
                                       "--progress", "lines").stdout
    assert "INFO warning: once was already denoised by CoreDiff" in r.stdout
    reader = sitk.ImageFileReader()
    for folder in (once, twice):
        reader.SetFileName(str(sorted(folder.iterdir())[0]))
        reader.ReadImageInformation()
        description = reader.GetMetaData("0008|103e").strip()
        assert len(description) <= 64 and description.endswith("CoreDiff denoised (identity)"), description
        assert description.startswith("Abdomen 1.0 B30f portal") and description.count("CoreDiff") == 1
        assert reader.HasMetaDataKey("0018|0050")  # SliceThickness present (empty: not known)
    assert "on a CoreDiff output (identity, 1 of 10 steps)" in reader.GetMetaData("0020|4000")  # --steps auto
    for detached in ("x.nhdr", "x.mhd"):  # read whole, not streamed: said all the same
        assert corediff("denoise", tmp_path / "x.nrrd", tmp_path / detached, "--model", identity_model_path,
                        "--progress", "none").returncode == 0
        r = corediff("denoise", tmp_path / detached, tmp_path / f"second_{detached}", "--model", identity_model_path,
                     "--progress", "lines")
        assert r.returncode == 0 and f"{detached} was already denoised by CoreDiff" in r.stdout, r.stdout
    r = corediff("denoise", tmp_path / "x.nrrd", tmp_path / "xx.nrrd", "--model", identity_model_path,
                 "--progress", "lines")
    assert r.returncode == 0 and "x.nrrd was already denoised by CoreDiff (identity, 1 of 10 steps)" in r.stdout
    header = sitk.ReadImage(str(tmp_path / "xx.nrrd"))
    assert header.GetMetaData("corediff_input_denoised_by") == "identity, 1 of 10 steps"


def test_the_command_line_starts_without_pytorch_and_its_copied_choices_match_the_library():
    """`corediff --help`, compare, simulate and dose loaded PyTorch (seconds) to build the parser."""
    r = subprocess.run([sys.executable, "-c", "import sys; from CoreDiffLib.cli import build_parser; build_parser(); "
                        "print('torch' in sys.modules, 'scipy.ndimage' in sys.modules)"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.stdout.split() == ["False", "False"], r.stdout + r.stderr
    from CoreDiffLib.cli import DENOISE_CONTEXTS, SIMULATION_KINDS
    from CoreDiffLib.inference import CONTEXTS
    from CoreDiffLib.simulation.phantom import KINDS
    assert DENOISE_CONTEXTS == CONTEXTS and SIMULATION_KINDS == tuple(KINDS)


def test_corediff_dose_and_models_run_where_pytorch_is_not_installed(tmp_path):
    """They only measure noise and read files: importing PyTorch was 0.9 of dose's 2 s and most of
    models' 2.3 s (0.25 s now), and in Slicer before PyTorch is installed the model list is there."""
    sample = REPO / "CoreDiffLib" / "data" / "sample_abdomen_ldct25.nrrd"
    home = tmp_path / "home"
    (home / "adaptations").mkdir(parents=True)
    from CoreDiffLib.adaptations import Adaptation
    Adaptation("mine", "0" * 64, "10%", "paired", 1, 1, 10, [0.0] * 10).save(home / "adaptations" / "mine.json")
    blocked = "import sys; sys.modules['torch'] = sys.modules['safetensors'] = None; from CoreDiffLib.cli import main; "
    r = subprocess.run([sys.executable, "-c", blocked + f"sys.exit(main(['dose', {str(sample)!r}]))"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and "--model auto runs corediff-" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", blocked + "sys.exit(main(['models', '--json']))"], capture_output=True,
                       text=True, cwd=REPO, timeout=120, env={**os.environ, "COREDIFF_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["corediff-25"]["kind"] == "model" and rows["corediff-25"]["dose"] == 0.25
    assert rows["mine"]["kind"] == "adaptation" and not rows["mine"]["base_found"]
    assert "peak weight 0.10 on step 1" in rows["mine"]["description"]


def test_a_volume_nifti_cannot_hold_is_refused_before_the_run(tmp_path, identity_model_path):
    """NIfTI-1 stores each dimension in 16 bits: a 32768-slice result was denoised whole, then
    refused by the writer at the end ('unexpected NIfTI header'), the run's hours lost."""
    tall = np.full((32768, 16, 16), -1000, np.int16)
    tall[:, 4:12, 4:12] = 40
    sitk.WriteImage(sitk.GetImageFromArray(tall), str(tmp_path / "tall.nrrd"))
    for name in ("out.nii", "out.nii.gz"):
        r = corediff("denoise", tmp_path / "tall.nrrd", tmp_path / name, "--model", identity_model_path,
                     "--progress", "none")
        assert r.returncode == 2 and f"{name}: NIfTI holds at most 32767 voxels along an axis and this volume " \
            "has 32768: write .nrrd or .mha instead" in r.stderr, r.stderr
        assert "of 16x16" not in r.stdout + r.stderr  # refused before the run began
    r = corediff("denoise", tmp_path / "tall.nrrd", tmp_path / "out.nii", "--slices", "5:7", "--model",
                 identity_model_path, "--progress", "none")  # a part of it fits
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii", "tall.nrrd"]
    assert read_volume(tmp_path / "out.nii").shape == (2, 16, 16)


def test_compare_figure_shows_each_volume_in_its_own_panel_at_the_slice_it_names(tmp_path, identity_model_path,
                                                                                  monkeypatch):
    """Nothing looked inside the figure: the LDCT in the 'CoreDiff' panel, or the middle slice of a
    `denoise --slices 4:7` part counted from 0 (refused as out of range 4..6), went unnoticed."""
    import CoreDiffLib.figures as figures
    from CoreDiffLib.cli import main
    from CoreDiffLib.orientation import radiological_slice
    drawn = []

    def draw(panels, path, title="", **kwargs):
        drawn.append((panels, title))
        Path(path).write_bytes(b"a figure")
    monkeypatch.setattr(figures, "comparison_figure", draw)
    ref = synthetic_ct(10, 48, noise_hu=0)
    ldct = ref + np.random.default_rng(0).normal(0, 40, ref.shape)
    den = ref + np.random.default_rng(1).normal(0, 10, ref.shape)
    paths = {n: write_image(tmp_path / f"{n}.nrrd", a) for n, a in (("ref", ref), ("ldct", ldct), ("den", den))}
    assert main(["compare", str(paths["den"]), "--ldct", str(paths["ldct"]), "--reference", str(paths["ref"]),
                 "--figure", str(tmp_path / "fig.png"), "--slice", "3"]) == 0
    panels, title = drawn[-1]
    assert title == "slice 3" and list(panels) == ["LDCT", "CoreDiff", "NDCT (reference)"]
    direction = read_volume(paths["den"]).direction
    for name, volume in (("LDCT", paths["ldct"]), ("CoreDiff", paths["den"]), ("NDCT (reference)", paths["ref"])):
        np.testing.assert_array_equal(panels[name], radiological_slice(read_volume(volume).array[3], direction)[0])
    assert corediff("denoise", paths["ldct"], tmp_path / "part.nrrd", "--model", identity_model_path,
                    "--slices", "4:7", "--progress", "none").returncode == 0
    assert main(["compare", str(tmp_path / "part.nrrd"), "--reference", str(paths["ref"]),
                 "--figure", str(tmp_path / "part.png")]) == 0
    panels, title = drawn[-1]
    assert title == "slice 5"  # the part's middle, numbered as the scan numbers it
    np.testing.assert_array_equal(panels["NDCT (reference)"],
                                  radiological_slice(read_volume(paths["ref"]).array[5], direction)[0])


def test_compare_figure_keeps_the_pixel_shape_shows_ldct_minus_corediff_and_takes_only_slices_it_has(
        tmp_path, monkeypatch):
    """Non-square pixels drawn square, the difference panel upside down in sign, or a --slice one
    past the end accepted (and then failing inside the figure) all passed every test."""
    import CoreDiffLib.figures as figures
    from CoreDiffLib.cli import main
    drawn = []

    def draw(panels, path, title="", **kwargs):
        drawn.append(kwargs)
        Path(path).write_bytes(b"a figure")
    monkeypatch.setattr(figures, "comparison_figure", draw)
    ref = synthetic_ct(4, 32, noise_hu=0)
    paths = {n: write_image(tmp_path / f"{n}.nrrd", ref + k, spacing=(0.5, 1.5, 2.0))
             for k, n in ((0, "ref"), (30, "ldct"), (5, "den"))}
    base = ["compare", str(paths["den"]), "--ldct", str(paths["ldct"]), "--reference", str(paths["ref"])]
    assert main(base + ["--figure", str(tmp_path / "a.png"), "--slice", "3"]) == 0
    assert drawn[-1]["difference"] == ("LDCT", "CoreDiff")  # LDCT - CoreDiff: what the denoiser removed
    assert drawn[-1]["pixel_aspect"] == pytest.approx(1.5 / 0.5)  # rows 1.5 mm apart, columns 0.5 mm
    assert main(base + ["--figure", str(tmp_path / "b.png"), "--slice", "4"]) == 2  # slices 0..3
    assert not (tmp_path / "b.png").exists()
    # stored with its in-plane axes swapped (rows along x): drawn turned, the aspect turns with it
    swapped = {n: write_image(tmp_path / f"{n}_t.nrrd", ref + k, spacing=(0.5, 1.5, 2.0),
                              direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)) for k, n in ((0, "ref"), (30, "ldct"), (5, "den"))}
    assert main(["compare", str(swapped["den"]), "--ldct", str(swapped["ldct"]), "--reference", str(swapped["ref"]),
                 "--figure", str(tmp_path / "c.png")]) == 0
    assert drawn[-1]["pixel_aspect"] == pytest.approx(0.5 / 1.5)


def test_compare_keeps_an_existing_csv_or_figure_unless_overwrite_and_writes_both_or_neither(tmp_path, monkeypatch,
                                                                                              capsys):
    """compare replaced an existing --csv or --figure without a word (a results.csv of one's own
    given by a slip of the hand); a figure that appears while the CSV is placed is kept, and the
    CSV, new, taken back: both files or neither."""
    import CoreDiffLib.figures as figures
    from CoreDiffLib.cli import main
    monkeypatch.setattr(figures, "comparison_figure", lambda panels, path, **kwargs: Path(path).write_bytes(b"fig"))
    ref = synthetic_ct(3, 32, noise_hu=0)
    paths = {n: write_image(tmp_path / f"{n}.nrrd", ref + k) for k, n in ((0, "ref"), (20, "den"))}
    csv, fig = tmp_path / "mine.csv", tmp_path / "mine.png"
    base = ["compare", str(paths["den"]), "--reference", str(paths["ref"]), "--csv", str(csv), "--figure", str(fig)]
    for existing in (csv, fig):
        existing.write_text("my own results")
        assert main(base) == 2  # refused before anything is read, by name
        assert f"{existing} exists: choose a new name, or give --overwrite" in capsys.readouterr().err
        assert existing.read_text() == "my own results" and [p.name for p in tmp_path.iterdir() if
                                                             p.name.startswith(".")] == []
        assert not (fig if existing == csv else csv).exists()  # neither written
        existing.unlink()
    csv.write_text("my own results")
    assert main(base + ["--overwrite"]) == 0
    assert csv.read_text().startswith("slice,denoised_psnr") and fig.read_bytes() == b"fig"
    csv.unlink(), fig.unlink()
    import CoreDiffLib.atomic as atomic
    real = atomic.publish

    def figure_appears(done, target, *args):
        if Path(target) == fig:
            fig.write_text("another program's figure")
        return real(done, target, *args)
    monkeypatch.setattr(atomic, "publish", figure_appears)
    assert main(base) == 2  # OutputAppeared, said as an error
    assert fig.read_text() == "another program's figure" and not csv.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    def figure_fails(done, target, *args):  # a folder in the way, a permission: any failure
        if Path(target) == fig:
            raise PermissionError(13, "Permission denied", str(fig))
        return real(done, target, *args)
    monkeypatch.setattr(atomic, "publish", figure_fails)
    fig.unlink()
    assert main(base) == 2 and not csv.exists() and not fig.exists()  # the new CSV taken back
    csv.write_text("my old table")
    fig.write_text("my old figure")
    assert main(base + ["--overwrite"]) == 2  # the replaced CSV is put back: both old, not one new
    assert csv.read_text() == "my old table" and fig.read_text() == "my old figure"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setattr(atomic, "publish", real)
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is the user's folder, as the shell would have expanded it
    assert main(["compare", str(paths["den"]), "--reference", str(paths["ref"]), "--csv", "~/home.csv",
                 "--figure", "~/home.png"]) == 0
    assert (tmp_path / "home.csv").exists() and (tmp_path / "home.png").exists()


def test_the_figure_zooms_where_its_box_is_and_draws_the_difference_a_minus_b(tmp_path, monkeypatch):
    """The zoomed row is the boxed region of each panel (not its transpose), chosen where the
    soft tissue is busiest, and the difference panel is a - b."""
    from matplotlib.axes import Axes

    from CoreDiffLib.figures import busiest_region, comparison_figure
    rng = np.random.default_rng(0)
    b = np.full((64, 64), 40.0)
    b[40:56, 8:24] += rng.normal(0, 60.0, (16, 16))  # the only structure: rows 40-55, columns 8-23
    a = b + 25.0
    assert busiest_region(b, 16) == (40, 8)
    shown = []
    imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, img, *args, **kw: (shown.append((np.array(img), kw)),
                                                                         imshow(self, img, *args, **kw))[1])
    comparison_figure({"A": a, "B": b}, tmp_path / "f.png", difference=("A", "B"), zoom=16, pixel_aspect=2.0)
    full = [img for img, _ in shown[0::2]]
    zoomed = [img for img, _ in shown[1::2]]
    np.testing.assert_array_equal(full[2], a - b)
    for whole, crop in zip(full, zoomed):
        np.testing.assert_array_equal(crop, whole[40:56, 8:24])
    assert all(kw["aspect"] == 2.0 for _, kw in shown)
    assert (tmp_path / "f.png").stat().st_size > 0
    # what the figure says is what it draws: each panel's label and window, the box over the zoomed
    # pixels, the windows in the title (each of these could change and every test passed)
    import CoreDiffLib.figures as figures
    from CoreDiffLib.intensity import DISPLAY_WINDOW_HU
    drawn = []
    close = figures.plt.close
    monkeypatch.setattr(figures.plt, "close", drawn.append)
    comparison_figure({"A": a, "B": b}, tmp_path / "g.png", difference=("A", "B"), zoom=16)
    fig = drawn[0]
    top, bottom = fig.axes[:3], fig.axes[3:]
    assert [ax.get_title() for ax in top] == ["A", "B", "A − B"]
    windows = [tuple(DISPLAY_WINDOW_HU)] * 2 + [(-100, 100)]
    for row in (top, bottom):
        assert [tuple(ax.get_images()[0].get_clim()) for ax in row] == windows
    for ax in top:
        (box,) = ax.patches
        assert (box.get_xy(), box.get_width(), box.get_height()) == ((8 - 0.5, 40 - 0.5), 16, 16)
    lo, hi = DISPLAY_WINDOW_HU
    assert fig._suptitle.get_text() == f"window [{lo:.0f}, {hi:.0f}] HU, difference [-100, 100] HU"
    close(fig)
    comparison_figure({"A": a}, tmp_path / "h.png", title="slice 3", zoom=200)  # a zoom beyond the image
    fig = drawn[1]
    assert fig._suptitle.get_text() == f"slice 3 · window [{lo:.0f}, {hi:.0f}] HU"
    assert fig.axes[0].patches[0].get_width() == 64 == fig.axes[1].get_images()[0].get_array().shape[1]
    close(fig)


def test_the_zoom_box_lands_on_the_references_soft_tissue_structure(tmp_path, monkeypatch):
    """From a mutation review: the box chosen on the noisy LDCT instead of the reference, a bone
    edge or the body's outline winning over soft-tissue structure, a coarser search that misses it,
    and the default zoom's size each passed every test."""
    import CoreDiffLib.figures as figures
    from CoreDiffLib.figures import busiest_region, comparison_figure
    rng = np.random.default_rng(1)
    checker = np.indices((16, 16)).sum(axis=0) % 2
    tissue = np.full((64, 64), 40.0)
    tissue[44:60, 12:28] = np.where(checker, 100.0, -20.0)  # soft-tissue structure, SD 60 HU
    assert busiest_region(tissue, 16) == (44, 12)  # found where it is, not on a coarser grid's nearest point
    bone = tissue.copy()
    bone[:, 44:] = 1000.0  # a bone edge: outside the window it is no brighter than 200 HU
    bone[44:60, 12:28] = np.where(checker, 190.0, -90.0)  # structure of SD 140 HU inside the window
    assert busiest_region(bone, 16) == (44, 12)
    outline = tissue.copy()
    outline[:, 40:] = -1000.0  # air beside the body: its edge is no structure
    assert busiest_region(outline, 16) == (44, 12)
    drawn = []
    close = figures.plt.close
    monkeypatch.setattr(figures.plt, "close", drawn.append)
    noisy = 40.0 + rng.normal(0, 60.0, (64, 64))  # noise everywhere, the reference's structure in one place
    comparison_figure({"LDCT": noisy, "NDCT": tissue}, tmp_path / "f.png")  # the default zoom: a quarter
    for ax in drawn[0].axes[:2]:
        (box,) = ax.patches
        assert (box.get_xy(), box.get_width()) == ((12 - 0.5, 44 - 0.5), 16)
    close(drawn[0])
    tall = np.full((128, 64), 40.0)
    comparison_figure({"A": tall}, tmp_path / "g.png", zoom=100)  # capped at the narrower side
    assert drawn[1].axes[0].patches[0].get_width() == 64 == drawn[1].axes[1].get_images()[0].get_array().shape[1]
    close(drawn[1])


def test_compare_refuses_a_reference_with_nothing_to_score(tmp_path):
    padding = np.full((3, 48, 48), -3024.0)
    paths = [write_image(tmp_path / f"{n}.nrrd", a) for n, a in (("ref", padding), ("den", synthetic_ct(3, 48)))]
    r = corediff("compare", paths[1], "--reference", paths[0], "--csv", tmp_path / "m.csv")
    assert r.returncode == 2 and "the reference holds nothing above -1000 HU (padding or air only)" in r.stderr
    assert not (tmp_path / "m.csv").exists()


def test_the_dose_is_said_in_per_cent_of_what_is_measured(tmp_path, identity_model_path):
    """`corediff dose` and denoise's log printed the estimate; nothing tied the printed
    percentage to the measured fraction (0.2 % instead of 22.7 % went unnoticed)."""
    import re
    sample = REPO / "CoreDiffLib" / "data" / "sample_abdomen_ldct25.nrrd"
    row = json.loads(corediff("dose", sample, "--json").stdout)
    measured = row["estimated_dose"]
    assert row["denoised_by_corediff"] is None
    said = re.search(r"looks like ([\d.]+) % of the simulated normal dose", corediff("dose", sample).stdout)
    assert said and float(said.group(1)) == pytest.approx(100 * measured, abs=0.06)
    r = corediff("denoise", sample, tmp_path / "out.nrrd", "--slices", "2:5", "--progress", "lines")
    said = re.search(r"like (\d+) % of the simulated normal dose", r.stdout)
    assert r.returncode == 0 and said and int(said.group(1)) == round(100 * measured), r.stdout
    # the rate is the slices' own: the model's loading and the scan's measuring were counted in it
    # and the output's writing after the last slice is not: said on its own
    took = re.search(r"wrote .*out.nrrd \(([\d.]+) s; denoising ([\d.]+) s/slice, writing ([\d.]+) s\)", r.stdout)
    assert took and 0 < 3 * float(took.group(2)) + float(took.group(3)) < float(took.group(1)), r.stdout
    # a denoised scan reads as a far higher dose: said to be one, not measured as if it were a scan
    r = corediff("dose", tmp_path / "out.nrrd", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["denoised_by_corediff"].startswith("corediff-25-w32, ")
    assert "less noise than any dose explains" in json.loads(r.stdout)["caveat"]
    assert "out.nrrd was denoised by CoreDiff (corediff-25-w32, " in r.stderr
    assert "measure the original scan" in r.stderr


def test_python_m_corediff_lib_is_the_corediff_command():
    """Where pip's `corediff` script is not on the PATH (a venv not activated, Slicer's Python),
    `python -m CoreDiffLib` failed: the package had no __main__."""
    r = subprocess.run([sys.executable, "-m", "CoreDiffLib", "--version"], capture_output=True, encoding="utf-8",
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("corediff "), r.stderr
    r = subprocess.run([sys.executable, "-m", "CoreDiffLib", "nonsense"], capture_output=True, encoding="utf-8",
                       cwd=REPO, timeout=120)
    assert r.returncode == 2 and "corediff: error: argument command: invalid choice: 'nonsense'" in r.stderr


def test_every_default_a_help_line_states_is_the_default():
    """A help line that says '(default 16)' while the parser's default moved on misleads silently
    (a review changed simulate's --slices default and no test noticed)."""
    import argparse
    import re
    from CoreDiffLib.cli import build_parser
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = []
    for command, parser in subparsers.choices.items():
        for action in parser._actions:
            assert action.help, f"corediff {command} {action.option_strings or action.dest} has no help text"
            said = re.search(r"default:? (-?\d[\d.e+-]*)\b", action.help or "")
            if said:
                checked.append(f"{command} {action.option_strings[0]}")
                assert float(said.group(1)) == float(action.default), (command, action.option_strings, action.default)
    assert {"simulate --slices", "simulate --size", "simulate --count", "oneshot --iterations", "train --iterations",
            "train --batch-size", "train --lr", "train --checkpoint-every", "bench --repeats"} <= set(checked)

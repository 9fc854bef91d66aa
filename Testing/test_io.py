"""Volume I/O: geometry and values survive a round trip; bad inputs are refused clearly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CoreDiffLib import CoreDiffError
from CoreDiffLib.dicom import find_dicom_series
from CoreDiffLib.io import check_output_path, read_volume, write_volume
from CoreDiffLib.pairs import find_pairs, read_pair_list

from conftest import dicom_positions, synthetic_ct, write_dicom_series, write_image, write_study_folder


@pytest.mark.parametrize("name", ["v.nrrd", "v.nii.gz", "v.mha", "v.mhd", "v.nhdr", "dicom_out"])
def test_round_trip_keeps_geometry_and_values(tmp_path, name):
    src = write_image(tmp_path / "src.nrrd", synthetic_ct(4, 32),
                      direction=(1, 0, 0, 0, 1, 0, 0, 0, 1) if name == "dicom_out" else (1, 0, 0, 0, -1, 0, 0, 0, 1))
    vol = read_volume(src)
    assert vol.pixel_type == "int16" and vol.array.dtype == np.float32
    out = write_volume(vol, tmp_path / name)
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-4)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)
    # nothing hidden left behind; a detached header (.mhd/.nhdr) names its data file's final name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dicom_output_keeps_patient_tags_with_a_new_series(tmp_path):
    vol = read_volume(write_image(tmp_path / "s.nrrd", synthetic_ct(3, 32), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
    first = write_volume(vol, tmp_path / "first")
    src = read_volume(first)
    src.dicom_tags["0010|0010"] = "Doe^Jane"
    src.dicom_tags["0010|0020"] = "PID123"
    src.dicom_tags["0028|1050"], src.dicom_tags["0028|1051"] = "40\\-600", "400\\1500"
    assert src.dicom_tags["0020|0052"].strip()  # made for a series from a non-DICOM file
    second = write_volume(src.with_array(src.array), tmp_path / "second", "CoreDiff denoised")
    out = read_volume(second)
    # same grid, same frame of reference; the scanner's window presets carried over
    assert out.dicom_tags["0020|0052"] == src.dicom_tags["0020|0052"]
    assert out.dicom_tags["0028|1050"].strip() == "40\\-600" and out.dicom_tags["0028|1051"].strip() == "400\\1500"
    assert out.dicom_tags["0008|0016"].strip() == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage, not a capture
    assert out.dicom_tags["0010|0010"].strip() == "Doe^Jane"
    assert out.dicom_tags["0010|0020"].strip() == "PID123"
    assert out.dicom_tags["0020|000e"] != src.dicom_tags["0020|000e"]
    assert out.dicom_tags["0020|000d"] == src.dicom_tags["0020|000d"]
    assert "CoreDiff" in out.dicom_tags["0008|103e"]
    assert out.dicom_tags["0008|0008"].strip() == "DERIVED\\SECONDARY\\AXIAL"  # value 3: the slices' plane
    # listed after the scan's own series, not with its number; SliceThickness (type 2) kept, or empty
    assert int(out.dicom_tags["0020|0011"]) == int(src.dicom_tags["0020|0011"]) + 1000 >= 1000
    assert out.dicom_tags["0018|0050"].strip() == src.dicom_tags.get("0018|0050", "").strip() == ""  # present
    src.dicom_tags["0018|0050"] = "1.5"
    third = read_volume(write_volume(src.with_array(src.array), tmp_path / "third"))
    assert third.dicom_tags["0018|0050"].strip() == "1.5"
    # a study and frame of reference made for a non-DICOM input share no UID with any slice
    reader = sitk.ImageFileReader()
    instances = set()
    for f in sorted(first.iterdir()):
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        instances.add(reader.GetMetaData("0008|0018").strip())
    assert len(instances) == 3 and all(len(uid) <= 64 for uid in instances)  # DICOM's limit
    assert out.dicom_tags["0020|000e"].startswith("2.25.") and len(out.dicom_tags["0020|000e"].strip()) <= 44
    assert not instances & {src.dicom_tags["0020|000d"].strip(), src.dicom_tags["0020|0052"].strip()}


def test_dicom_output_slices_are_numbered_as_in_the_scan_and_located_along_the_normal(tmp_path):
    """A --slices part numbered its slices from 1, and no slice had a SliceLocation (viewers sort
    and label slices by it): the input's had."""
    vol = read_volume(write_image(tmp_path / "s.nrrd", synthetic_ct(5, 32), spacing=(0.7, 0.7, 2.0),
                                  origin=(0.0, 0.0, -40.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))

    def tags(folder):
        reader, out = sitk.ImageFileReader(), []
        for f in sorted(folder.iterdir()):
            reader.SetFileName(str(f))
            reader.ReadImageInformation()
            out.append((int(reader.GetMetaData("0020|0013")), float(reader.GetMetaData("0020|1041")),
                        float(reader.GetMetaData("0020|0032").split("\\")[2])))
        return out
    whole = tags(write_volume(vol, tmp_path / "whole"))
    assert [(n, loc) for n, loc, _ in whole] == [(k + 1, -40.0 + 2.0 * k) for k in range(5)]
    assert all(loc == z for _, loc, z in whole)
    part = vol.with_array(vol.array[2:4])
    part.origin = tuple(np.add(vol.origin, (0.0, 0.0, 4.0)))
    written = write_volume(part, tmp_path / "part", metadata={"corediff_slices": "2:4 of 5"}, first_slice=2)
    assert [(n, loc) for n, loc, _ in tags(written)] == [(3, -36.0), (4, -34.0)]


def test_a_nifti_header_says_what_made_it_in_whole_parts(tmp_path):
    """NIfTI's descrip holds 79 bytes: a second pass's summary was cut mid-phrase there
    ('..., on a CoreDiff output (corediff-25-w32,')."""
    from CoreDiffLib.io import provenance_summary
    once = {"corediff_model": "corediff-25-w32", "corediff_steps": "1 of 10"}
    twice = dict(once, corediff_input_denoised_by="corediff-25-w32, 1 of 10 steps, onnx/fp32 on cpu")
    assert provenance_summary(once, limit=79) == provenance_summary(once) == "CoreDiff corediff-25-w32, 1 of 10 steps"
    assert provenance_summary(twice).endswith("on a CoreDiff output (corediff-25-w32, 1 of 10 steps, onnx/fp32 on cpu)")
    vol = read_volume(write_image(tmp_path / "s.nrrd", synthetic_ct(2, 16)))
    out = write_volume(vol, tmp_path / "twice.nii.gz", metadata=twice)
    assert sitk.ReadImage(str(out)).GetMetaData("descrip") == "second pass, CoreDiff corediff-25-w32, 1 of 10 steps"


def test_dicom_text_in_iso_2022_sets_and_patient_position_are_kept(tmp_path):
    from CoreDiffLib.io import _dicom_text
    japanese = "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B".encode("latin-1").decode("utf-8", "surrogateescape")
    assert _dicom_text(japanese, "\\ISO 2022 IR 87") == "Yamada^Tarou=山田^太郎"
    korean = "Hong^Gildong=\x1b$)C\xc8\xab^\xb1\xe6\xb5\xbf".encode("latin-1").decode("utf-8", "surrogateescape")
    assert _dicom_text(korean, "\\ISO 2022 IR 149") == "Hong^Gildong=홍^길동"
    equals_inside = "Suzuki^Ichiro=\x1b$B8^==Mr\x1b(B^\x1b$B0lO:\x1b(B"  # 五十嵐 holds '=' bytes
    assert _dicom_text(equals_inside.encode("latin-1").decode("utf-8", "surrogateescape"),
                       "\\ISO 2022 IR 87") == "Suzuki^Ichiro=五十嵐^一郎"
    katakana = b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3".decode("utf-8", "surrogateescape")  # PS3.5 H.3.1's example
    assert _dicom_text(katakana, "ISO 2022 IR 13\\ISO 2022 IR 87") == "ﾔﾏﾀﾞ^ﾀﾛｳ"
    # a single-byte set designated after ASCII (the last one): Cyrillic, not Latin-1
    cyrillic = (b"Lyubimov^Pavel=\x1b-L" + "Любимов^Павел".encode("iso8859_5")).decode("utf-8", "surrogateescape")
    assert _dicom_text(cyrillic, "ISO 2022 IR 6\\ISO 2022 IR 144") == "Lyubimov^Pavel=Любимов^Павел"
    folder = write_dicom_series(tmp_path / "ffs", synthetic_ct(3, 32), "1.2.3.44",
                                {"0018|5100": "FFS", "0018|0015": "ABDOMEN"})
    out = read_volume(write_volume(read_volume(folder), tmp_path / "out"))
    assert out.dicom_tags["0018|5100"].strip() == "FFS" and out.dicom_tags["0018|0015"].strip() == "ABDOMEN"


def test_a_metaimage_written_key_equals_value_is_read(tmp_path):
    """'CompressedData=True' without spaces, as some writers put it, was refused as truncated."""
    vol = synthetic_ct(3, 32).round().astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "c.mha"), True)
    raw = (tmp_path / "c.mha").read_bytes()
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header = raw[:end].decode().replace(" = ", "=")
    (tmp_path / "tight.mha").write_bytes(header.encode() + raw[end:])
    np.testing.assert_array_equal(read_volume(tmp_path / "tight.mha").array, vol)


def test_an_interrupted_inflation_leaves_no_temporary_file(tmp_path, monkeypatch):
    import shutil as shutil_module

    from CoreDiffLib.streaming import VolumeSource
    sitk.WriteImage(sitk.GetImageFromArray(synthetic_ct(3, 32).astype(np.int16)), str(tmp_path / "v.nii.gz"), True)
    (tmp_path / "temp").mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil_module, "copyfileobj", interrupted)
    with pytest.raises(KeyboardInterrupt):
        VolumeSource.open(tmp_path / "v.nii.gz", temp_dir=tmp_path / "temp")
    assert list((tmp_path / "temp").iterdir()) == []


def test_an_input_unpacked_by_a_killed_run_is_removed_by_the_next_one(tmp_path):
    """SIGKILL (the out-of-memory killer) runs no cleanup: the unpacked input, gigabytes for a big
    compressed scan, stayed in TMPDIR for good."""
    import socket

    from CoreDiffLib.streaming import VolumeSource
    sitk.WriteImage(sitk.GetImageFromArray(synthetic_ct(3, 32).astype(np.int16)), str(tmp_path / "v.nii.gz"), True)
    temp = tmp_path / "temp"
    temp.mkdir()
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(killed.stdout)  # a process that has ended
    host = socket.gethostname().replace("-", "_")
    orphan = temp / f"corediff-in-{host}.{dead_pid}-abc.raw"
    alive = temp / f"corediff-in-{host}.{os.getppid()}-def.raw"   # a run still going
    elsewhere = temp / f"corediff-in-otherhost.{dead_pid}-ghi.raw"  # a container's, sharing the folder
    unrelated = temp / "notes.raw"
    for f in (orphan, alive, elsewhere, unrelated):
        f.write_bytes(b"x")
    with VolumeSource.open(tmp_path / "v.nii.gz", temp_dir=temp) as source:
        assert np.array_equal(source[0:3], sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v.nii.gz"))))
        mine = [f for f in temp.iterdir() if f"{host}.{os.getpid()}-" in f.name]
        assert len(mine) == 1  # its own unpacked input, named after it
    assert sorted(f.name for f in temp.iterdir()) == sorted(f.name for f in (alive, elsewhere, unrelated))


def test_dicom_rescaled_to_int32_is_written_as_int16_when_it_fits(tmp_path):
    folder = write_dicom_series(tmp_path / "s", synthetic_ct(3, 32), "1.2.3.55")
    vol = read_volume(folder)
    assert vol.pixel_type == "int32"  # int16 stored with intercept -1024: ITK widens it
    out = write_volume(vol, tmp_path / "o.nrrd")
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(read_volume(out).array, vol.array)


@pytest.mark.parametrize("extreme", [-33792, 40000])
def test_dicom_output_keeps_values_beyond_int16_with_an_intercept(tmp_path, extreme):
    """Padding of -32768 stored under intercept -1024 is -33792 HU (and extended-scale metal can
    pass 32767): the output shifts its intercept instead of clipping them."""
    hu = synthetic_ct(2, 32, noise_hu=0).round()
    hu[:, :3, :3] = extreme
    vol = read_volume(write_image(tmp_path / "v.nrrd", hu, dtype=np.int32))
    back = read_volume(write_volume(vol, tmp_path / "dicom_out"))
    np.testing.assert_array_equal(back.array, hu)
    assert float(back.dicom_tags["0028|1052"]) != 0


def test_dicom_stored_values_keep_the_top_of_a_range_wider_than_16_bits_and_dose_tags_read_as_typed():
    from CoreDiffLib.io import _dicom_stored_values, _series_description
    from CoreDiffLib.pairs import as_dose_tag
    stored, intercept = _dicom_stored_values(np.array([-40000.0, 0.0, 30000.0]))  # padding, water, metal
    assert intercept == 30000 - 32767 and stored.tolist() == [intercept - 32768, 0.0, 30000.0]  # padding clipped
    typed = {"25": "25", "0.25": "25", "25%": "25", "ldct25": "25", "12.5": "12p5", "12p5": "12p5", "0p5": "0p5",
             "0.005": "0p5", "5p0": "5", "1e-1": "10", "mine": "mine"}
    assert {text: as_dose_tag(text) for text in typed} == typed
    # a second pass names CoreDiff once, whether the first came from a DICOM series or not
    assert _series_description("CoreDiff denoised (a)", "CoreDiff denoised (b)") == "CoreDiff denoised (b)"
    assert _series_description("Abdomen - CoreDiff denoised (a)", "CoreDiff denoised (b)") == \
        "Abdomen - CoreDiff denoised (b)"
    # within DICOM's 64 characters the model's name stays whole; the source's is shortened, or left out
    # where fewer than 8 of its characters would fit
    long_source = "Abdomen arterial phase 1.0 mm B30f soft tissue kernel iDose level 4"
    made = _series_description(long_source, "CoreDiff denoised (corediff-25-w32)")
    assert len(made) <= 64 and made.endswith(" - CoreDiff denoised (corediff-25-w32)") and made.startswith("Abdomen")
    wordy = "CoreDiff denoised (my-own-model-trained-on-site-data-v12)"  # 57 characters: room for 4
    assert _series_description(long_source, wordy) == wordy


def test_dicom_rescale_slope_and_intercept_are_honoured(tmp_path):
    """CT stored with intercept -1024 (typical scanners: raw values = HU + 1024) reads back in HU.

    GDCM stores (value - intercept) / slope, so giving it HU with these tags produces files
    whose raw pixels are HU + 1024, as a scanner writes them."""
    hu = synthetic_ct(2, 32, noise_hu=0).round()
    folder = write_dicom_series(tmp_path / "scanner", hu, "1.2.3.4.5")
    vol = read_volume(folder)
    assert float(vol.dicom_tags["0028|1052"]) == -1024
    np.testing.assert_allclose(vol.array, hu, atol=0.5)


def test_a_folder_with_several_series_reads_the_scan_and_says_which(tmp_path):
    scan = write_study_folder(tmp_path / "study")
    found = find_dicom_series(tmp_path / "study")
    assert [s.description for s in found] == ["Topogram", "Abdomen 1.0 B30f", "Lung 1.0 B70f", "CoreDiff denoised"]
    assert [len(s.files) for s in found] == [1, 6, 4, 8] and found[1].kernel == "B30f"
    notes = []
    vol = read_volume(tmp_path / "study", log=notes.append)
    # not the localizer, not the derived series with more slices: the scanner's largest reconstruction
    np.testing.assert_allclose(vol.array, scan, atol=0.5)
    assert len(notes) == 1 and "holds 4 DICOM series; reading number 2" in notes[0]
    assert "Lung 1.0 B70f" in notes[0] and "kernel B70f" in notes[0] and "in S3_lung/" in notes[0]
    # --series by number or UID
    for wanted in ("3", "1.2.826.1.3"):
        np.testing.assert_allclose(read_volume(tmp_path / "study", series=wanted).array, scan[:4] + 100, atol=0.5)
    with pytest.raises(CoreDiffError, match=r"has no DICOM series '9': give the number or UID of one of 1\. "
                                             r"'Topogram'.*4\. 'CoreDiff denoised'"):
        read_volume(tmp_path / "study", series="9")
    with pytest.raises(CoreDiffError, match="picks a series in a DICOM folder"):
        read_volume(write_image(tmp_path / "v.nrrd", scan), series="1")


def test_a_series_without_a_modality_tag_is_read(tmp_path):
    """Some anonymisers and converters drop Modality (0008,0060): such a series is still a scan."""
    from CoreDiffLib.dicom import choose_dicom_series
    folder = write_dicom_series(tmp_path / "anon", synthetic_ct(3, 32), "1.2.3.71", {"0008|0060": ""})
    (series,) = find_dicom_series(folder)
    assert series.modality == ""
    assert choose_dicom_series([series], None, str(folder))[0] is series
    assert read_volume(folder).shape == (3, 32, 32)
    # a series that says it is another modality is not read as CT (an MR's grey levels are no HU)
    folder = write_dicom_series(tmp_path / "mr", synthetic_ct(3, 32), "1.2.3.72", {"0008|0060": "MR"})
    with pytest.raises(CoreDiffError, match=r"holds no CT series CoreDiff can denoise .* \(3 slices, MR;"):
        read_volume(folder)
    with pytest.raises(CoreDiffError, match=r"0.dcm is a MR series, not CT: CoreDiff denoises CT in HU only"):
        read_volume(folder / "0.dcm")  # one file, read without choosing among series


def test_two_series_that_fit_equally_well_are_for_the_user_to_choose(tmp_path):
    """Soft and sharp kernels of one scan, or a Mayo case's full and quarter dose: same slices."""
    scan = synthetic_ct(4, 32, noise_hu=0)
    write_dicom_series(tmp_path / "L067" / "full_1mm", scan, "1.2.826.5.1", {"0008|103e": "full dose"})
    write_dicom_series(tmp_path / "L067" / "quarter_1mm", scan + 5, "1.2.826.5.2", {"0008|103e": "quarter dose"})
    with pytest.raises(CoreDiffError, match=r"holds 2 series that fit equally well \(1, 2\): choose one with "
                                            r"--series N .*'full dose' in full_1mm/.*'quarter dose' in quarter_1mm/"):
        read_volume(tmp_path / "L067")
    np.testing.assert_allclose(read_volume(tmp_path / "L067", series="2").array, scan + 5, atol=0.5)


def test_a_folder_with_only_a_localizer_is_refused_with_what_it_holds(tmp_path):
    write_dicom_series(tmp_path / "scout", synthetic_ct(1, 32), "1.2.826.2.1",
                       {"0008|103e": "Topogram", "0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    with pytest.raises(CoreDiffError, match="holds no CT series CoreDiff can denoise .* only 1. 'Topogram'"):
        read_volume(tmp_path)


def test_a_series_with_a_missing_slice_keeps_its_slice_positions(tmp_path):
    """A regular grid would put the slices after the gap 1-2 mm from where they were scanned."""
    scan = synthetic_ct(6, 32, noise_hu=0).round()
    folder = write_dicom_series(tmp_path / "gap", scan, "1.2.826.3.1", slice_mm=2.0)
    (folder / "3.dcm").unlink()  # positions 0 2 4 _ 8 10
    notes = []
    vol = read_volume(folder, log=notes.append)
    assert [p[2] for p in vol.slice_positions] == [0, 2, 4, 8, 10]
    assert "not evenly spaced (2 to 4 mm apart; 4 mm between slices 2 and 3: a missing slice?)" in notes[0]
    with pytest.raises(CoreDiffError, match=r"a volume file \(out.nrrd\) has one slice spacing and would misplace "
                                            "them: write a DICOM folder"):
        write_volume(vol, tmp_path / "out.nrrd")
    assert not (tmp_path / "out.nrrd").exists()
    out = write_volume(vol.with_array(vol.array + 1), tmp_path / "out_dicom")
    assert dicom_positions(out) == [0, 2, 4, 8, 10]
    back = read_volume(out)
    np.testing.assert_allclose(back.array, vol.array + 1, atol=0.5)
    assert back.slice_positions == vol.slice_positions
    # an evenly spaced series has none: the grid says it all
    assert read_volume(write_dicom_series(tmp_path / "even", scan, "1.2.826.3.2")).slice_positions is None


def test_a_tilted_series_keeps_its_sheared_slice_positions(tmp_path):
    """A gantry tilt is stored as each slice shifted in-plane from the last; a grid drops the shift."""
    scan = synthetic_ct(5, 32, noise_hu=0).round()
    folder = write_dicom_series(tmp_path / "tilt", scan, "1.2.826.3.3", slice_mm=2.0, shear_mm=0.35)
    notes = []
    vol = read_volume(folder, log=notes.append)
    assert [round(p[1], 3) for p in vol.slice_positions] == [0, 0.35, 0.7, 1.05, 1.4]
    assert "its slices are sheared" in notes[0] and "a gantry tilt of 9.9°?" in notes[0]
    assert "not evenly spaced" not in notes[0]
    with pytest.raises(CoreDiffError, match="sheared.*would misplace them"):
        write_volume(vol, tmp_path / "out.nii.gz")
    back = read_volume(write_volume(vol, tmp_path / "out_dicom"))
    np.testing.assert_allclose(back.slice_positions, vol.slice_positions, atol=1e-4)


def test_output_path_checks(tmp_path, ct_file):
    with pytest.raises(CoreDiffError, match="is the input"):
        check_output_path(ct_file, ct_file)
    with pytest.raises(CoreDiffError, match="unknown output type"):
        check_output_path(ct_file, tmp_path / "out.txt")
    with pytest.raises(CoreDiffError, match="does not exist"):
        check_output_path(ct_file, tmp_path / "nope" / "out.nrrd")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.dcm").write_bytes(b"x")
    with pytest.raises(CoreDiffError, match="not empty"):
        check_output_path(ct_file, tmp_path / "full")
    check_output_path(ct_file, tmp_path / "fresh.nii.gz")
    (tmp_path / "fresh.nii").write_bytes(b"an older result")  # ITK would read it for fresh.nii.gz
    with pytest.raises(CoreDiffError, match="fresh.nii lies beside output .*fresh.nii.gz.*move it"):
        check_output_path(ct_file, tmp_path / "fresh.nii.gz")
    with pytest.raises(CoreDiffError, match="the input fresh.nii .*choose another output name"):
        check_output_path(tmp_path / "fresh.nii", tmp_path / "fresh.nii.gz")  # not "remove" the scan


def test_denoise_file_called_from_a_script_refuses_to_overwrite_its_input(tmp_path, ct_file):
    """Only the CLI checked: denoise_file(p, p) replaced the scan with its denoised copy."""
    from CoreDiffLib.inference import denoise_file
    before = ct_file.read_bytes()
    with pytest.raises(CoreDiffError, match="is the input"):
        denoise_file(ct_file, ct_file, lambda *a: pytest.fail("the model must not even be loaded"))
    assert ct_file.read_bytes() == before


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("garbage", "cannot read"),
    ("mr", "does not look like CT"),
    ("rgb", "components per voxel"),
    ("four_d", "4-D"),
    ("nan", "NaN/inf"),
    ("suffix", "unsupported input type"),
])
def test_bad_inputs_are_refused_clearly(tmp_path, case, message):
    path = tmp_path / "in.nrrd"
    if case == "garbage":
        path.write_bytes(b"NRRD0004\nthis is not a volume\n")
    elif case == "mr":
        write_image(path, np.random.default_rng(0).uniform(0, 1200, (3, 32, 32)))
    elif case == "rgb":
        img = sitk.GetImageFromArray(np.zeros((3, 32, 32, 3), np.uint8), isVector=True)
        sitk.WriteImage(img, str(path))
    elif case == "four_d":
        frame = sitk.GetImageFromArray(np.full((3, 32, 32), -1000, np.int16))
        sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))
    elif case == "nan":
        arr = synthetic_ct(2, 32)
        arr[0, 3, 3] = np.nan
        write_image(path, arr, dtype=np.float32)
    elif case == "suffix":
        path = tmp_path / "in.txt"
        path.write_text("x")
    with pytest.raises(CoreDiffError, match=message):
        read_volume(path)


def test_single_slice_and_2d_images_read_as_one_slice(tmp_path):
    img = sitk.GetImageFromArray(synthetic_ct(1, 32)[0].astype(np.int16))
    sitk.WriteImage(img, str(tmp_path / "slice.nrrd"))
    assert read_volume(tmp_path / "slice.nrrd").shape == (1, 32, 32)


def test_pairs_are_matched_by_name(tmp_path):
    for name in ["case000_abdomen_ndct.nrrd", "case000_abdomen_ldct25.nrrd", "case000_abdomen_ldct10.nrrd",
                 "case001_head_ndct.nrrd", "case001_head_ldct25.nrrd", "notes.nrrd"]:
        (tmp_path / name).write_bytes(b"")
    pairs = find_pairs(tmp_path, dose="25")
    assert [(a.name, b.name) for a, b in pairs] == [
        ("case000_abdomen_ndct.nrrd", "case000_abdomen_ldct25.nrrd"),
        ("case001_head_ndct.nrrd", "case001_head_ldct25.nrrd")]
    with pytest.raises(CoreDiffError, match="several LDCT doses"):
        find_pairs(tmp_path)


def test_mayo_style_dicom_folders_pair_up(tmp_path):
    for d in ["L067/full_1mm", "L067/quarter_1mm", "L096/full_1mm", "L096/quarter_1mm"]:
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "001.IMA").write_bytes(b"")
    pairs = find_pairs(tmp_path)
    assert [(a.relative_to(tmp_path).as_posix(), b.relative_to(tmp_path).as_posix()) for a, b in pairs] == [
        ("L067/full_1mm", "L067/quarter_1mm"), ("L096/full_1mm", "L096/quarter_1mm")]


def test_pairs_are_found_by_their_file_names_whatever_their_folders_are_called(tmp_path):
    """A role word in a folder above ('hd/', 'low_dose_study/', 'input_scans/') gave every file the
    folder's role; names that differ after the role word are other scans; a dose tag is matched
    whole ('--dose-tag 1' is not 10 %)."""
    roles = tmp_path / "roles"
    for folder in ("hd", "low_dose_study", "input_scans"):
        (roles / folder).mkdir(parents=True)
        for name in ("case1_ndct.nrrd", "case1_ldct.nrrd"):
            (roles / folder / name).write_bytes(b"")
    assert [(a.relative_to(roles).as_posix(), b.name) for a, b in find_pairs(roles)] == [
        (f"{folder}/case1_ndct.nrrd", "case1_ldct.nrrd") for folder in ("hd", "input_scans", "low_dose_study")]
    other = tmp_path / "other"
    other.mkdir()
    for name in ("case1_ndct_abdomen.nrrd", "case1_ldct_head.nrrd"):
        (other / name).write_bytes(b"")
    with pytest.raises(CoreDiffError, match="no NDCT/LDCT pairs found"):
        find_pairs(other)
    for name in ("case2_ndct.nrrd", "case2_ldct10.nrrd", "case2_ldct1.nrrd"):
        (other / name).write_bytes(b"")
    assert [(a.name, b.name) for a, b in find_pairs(other, dose="1")] == [("case2_ndct.nrrd", "case2_ldct1.nrrd")]
    assert [(a.name, b.name) for a, b in find_pairs(other, dose="10")] == [("case2_ndct.nrrd", "case2_ldct10.nrrd")]


def test_a_case_saved_twice_is_refused_and_only_dicom_makes_a_folder_a_series(tmp_path):
    """Two formats of one case paired twice (or failed as 'several LDCT doses ( , )'); a README
    without a suffix made its folder a DICOM series, and two such folders a pair."""
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("case1_ndct.nrrd", "case1_ldct25.nrrd", "case1_ldct25.nii.gz"):
        (twice / name).write_bytes(b"")
    with pytest.raises(CoreDiffError, match=r"case1_ldct25.nii.gz and .*case1_ldct25.nrrd are both the LDCT of "
                                            r"case1 \(dose tag 25\): keep one"):
        find_pairs(twice, dose="25")
    (twice / "case1_ldct25.nii.gz").unlink()
    (twice / "case1_ndct.mha").write_bytes(b"")
    with pytest.raises(CoreDiffError, match="are both the NDCT of case1"):
        find_pairs(twice)
    notes = tmp_path / "notes"
    for folder in ("ndct", "ldct"):
        (notes / folder).mkdir(parents=True)
        (notes / folder / "README").write_text("scans of 2026-12-01\n")
        (notes / folder / "case1.nrrd").write_bytes(b"")
    assert [(a.relative_to(notes).as_posix(), b.relative_to(notes).as_posix()) for a, b in find_pairs(notes)] == [
        ("ndct/case1.nrrd", "ldct/case1.nrrd")]
    pacs = tmp_path / "pacs"  # slices without a suffix, as PACS exports name them, are DICOM
    for role, uid in (("full_1mm", "1.2.3.61"), ("quarter_1mm", "1.2.3.62")):
        written = write_dicom_series(tmp_path / uid, synthetic_ct(2, 16), uid)
        (pacs / "L001" / role).mkdir(parents=True)
        for k, f in enumerate(sorted(written.iterdir())):
            shutil.copy(f, pacs / "L001" / role / f"IM{k:06d}")
    assert [(a.relative_to(pacs).as_posix(), b.relative_to(pacs).as_posix()) for a, b in find_pairs(pacs)] == [
        ("L001/full_1mm", "L001/quarter_1mm")]


def test_training_pairs_come_back_normal_dose_first_and_must_share_their_grid(tmp_path):
    """The pair read back the wrong way round trained a model to add noise, with every train test
    passing; a pair on two grids is refused."""
    from CoreDiffLib.pairs import read_training_pairs
    ndct = synthetic_ct(3, 48, noise_hu=5)
    ldct = ndct + np.random.default_rng(0).normal(0, 40, ndct.shape)
    nd, ld = write_image(tmp_path / "a_ndct.nrrd", ndct), write_image(tmp_path / "a_ldct.nrrd", ldct)
    ((first, second),) = read_training_pairs([(nd, ld)])
    assert np.std(second - first) > 30  # the second is the low-dose scan
    np.testing.assert_array_equal(first, read_volume(nd).array)  # its axial planes, as stored
    moved = write_image(tmp_path / "b_ldct.nrrd", ldct, spacing=(0.8, 0.8, 2.5))
    with pytest.raises(CoreDiffError, match="differ in spacing, origin or direction"):
        read_training_pairs([(nd, moved)])
    barely = write_image(tmp_path / "c_ndct.nrrd", ndct + np.random.default_rng(1).normal(0, 12, ndct.shape))
    with pytest.raises(CoreDiffError, match="is no noisier than"):  # 'NDCT' a little noisier: swapped, or one dose
        read_training_pairs([(barely, write_image(tmp_path / "c_ldct.nrrd", ndct + 0.9 * (read_volume(barely).array
                                                                                            - ndct)))])
    # stored sagittally, a pair's neighbours are its axial slices: the spacing recorded is theirs (2.5 mm)
    spacing, sagittal = [], dict(spacing=(2.5, 0.8, 0.7), direction=(0, 0, 1, 0, 1, 0, 1, 0, 0))
    stored = [write_image(tmp_path / f"s_{name}.nrrd", v.transpose(2, 1, 0), **sagittal)
              for name, v in (("ndct", ndct), ("ldct", ldct))]
    read_training_pairs([tuple(stored)], slice_mm=spacing)
    assert spacing == [pytest.approx(2.5)]


def test_a_series_of_mixed_matrix_sizes_is_refused_and_an_oblique_series_measured_along_its_normal(tmp_path):
    """Images of two matrix sizes under one series UID are no volume; and the slice gap and the
    off-grid check read the slice normal (the direction's third column), not its third row."""
    from CoreDiffLib.dicom import median_slice_gap, off_grid_slices
    mixed = write_dicom_series(tmp_path / "mixed", synthetic_ct(3, 32), "1.2.3.91")
    write_dicom_series(tmp_path / "small", synthetic_ct(1, 16), "1.2.3.91.7", {"0020|000e": "1.2.3.91"})
    shutil.copy(tmp_path / "small" / "0.dcm", mixed / "small.dcm")
    with pytest.raises(CoreDiffError, match="mixes images of different orientations or sizes"):
        read_volume(mixed)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    direction = (1, 0, 0, 0, c, -s, 0, s, c)  # tilted 30 degrees about x: its normal is (0, -s, c)
    normal = np.array([0, -s, c])
    positions = [tuple(2.0 * k * normal) for k in (0, 1, 2, 4, 5)]  # slice 3 missing
    assert median_slice_gap(positions, direction) == pytest.approx(2.0)
    found = off_grid_slices(positions, direction)
    assert "a missing slice?" in found and "sheared" not in found
    assert off_grid_slices([tuple(2.0 * k * normal) for k in range(5)], direction) is None


def test_pair_list_file(tmp_path):
    (tmp_path / "list.csv").write_text("ndct,ldct\na_nd.nrrd,a_ld.nrrd\n# comment\n/abs/b.nrrd, /abs/c.nrrd\n")
    pairs = read_pair_list(tmp_path / "list.csv")
    assert pairs[0] == (tmp_path / "a_nd.nrrd", tmp_path / "a_ld.nrrd")
    assert str(pairs[1][0]) == "/abs/b.nrrd"
    (tmp_path / "bad.csv").write_text("only_one_column\n")
    with pytest.raises(CoreDiffError, match="expected"):
        read_pair_list(tmp_path / "bad.csv")
    # the header after a comment or a blank line is still the header, not a pair of files named ndct and ldct
    (tmp_path / "commented.csv").write_text("# my training set\n\nNDCT,LDCT\na_nd.nrrd,a_ld.nrrd\n")
    assert read_pair_list(tmp_path / "commented.csv") == [(tmp_path / "a_nd.nrrd", tmp_path / "a_ld.nrrd")]


def test_the_dose_tag_a_model_records_is_the_one_its_pairs_carry_or_none():
    """From a mutation review: untagged LDCT names (c_ldct.nrrd) would record the tag "" in the
    trained weights instead of none, unnoticed."""
    from CoreDiffLib.pairs import pairs_dose_tag
    d = Path("/data")
    a10 = (d / "a_ndct.nrrd", d / "a_ldct10.nrrd")
    assert pairs_dose_tag(d, [a10, (d / "b_ndct.nrrd", d / "b_ldct10.nrrd")]) == "10"
    assert pairs_dose_tag(d, [a10, (d / "b_ndct.nrrd", d / "b_ldct25.nrrd")]) is None
    assert pairs_dose_tag(d, [(d / "c_ndct.nrrd", d / "c_ldct.nrrd")]) is None
    assert pairs_dose_tag(d, [(d / "ndct" / "c.nrrd", d / "ldct" / "c.nrrd")]) is None


def test_atomic_path_replaces_only_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    from CoreDiffLib.atomic import atomic_path, partial_path, write_text_atomic

    target = tmp_path / "table.md"
    target.write_text("old")
    for stop in (RuntimeError("writer failed"), KeyboardInterrupt(), SystemExit(143)):  # a failure, Ctrl-C, SIGTERM
        with pytest.raises(type(stop)):
            with atomic_path(target) as tmp:
                tmp.write_text("half a ta")
                raise stop
        assert target.read_text() == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]  # no partial left behind
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    # the writer picks the format by extension: the temporary name keeps it (".nii.gz" whole)
    assert partial_path(tmp_path / "v.nii.gz").name.endswith(".nii.gz")
    assert partial_path(tmp_path / "fig.png").suffix == ".png"
    assert partial_path(target) != partial_path(target)  # concurrent writers never collide


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc (Linux)")
@pytest.mark.parametrize("name", ["out.nrrd", "out.nhdr", "series"])
def test_an_output_is_on_the_disk_before_its_name_is(tmp_path, monkeypatch, ct_file, identity_model_path, name):
    """The rename that puts an output in place can reach the disk before its data: after a power
    cut the output's name held an empty or torn file (a checkpoint, a series with blank slices)."""
    import os

    from CoreDiffLib.inference import Denoiser, denoise_file
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):  # everything placed, once placed, was flushed first (a folder: its files)
        flushed = [p for p in synced if p == Path(src) or p.parent == Path(src)]
        if Path(dst).parent == tmp_path:  # (not the library's ONNX cache, flushed as well)
            replaced.append((Path(dst).name, len(flushed)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / name
    denoise_file(ct_file, out, Denoiser.load(str(identity_model_path), device="cpu"))
    slices = read_volume(ct_file).shape[0]
    expected = {"out.nrrd": [("out.nrrd", 1)], "out.nhdr": [("out.raw.gz", 1), ("out.nhdr", 1)],
                "series": [("series", slices + 1)]}[name]  # a DICOM folder: each slice, and the folder
    assert replaced == expected
    assert synced[-1] == tmp_path  # and the rename itself


def test_a_file_system_without_fsync_still_gets_its_output_a_failed_write_back_none(tmp_path, monkeypatch):
    """Some FUSE and network mounts answer fsync with EINVAL or ENOTSUP: that is no reason to
    fail a finished run; EIO (the data did not reach the disk) is."""
    import errno
    import os

    from CoreDiffLib.atomic import write_text_atomic

    def fsync_says(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync
    monkeypatch.setattr(os, "fsync", fsync_says(errno.EINVAL))
    assert write_text_atomic(tmp_path / "t.csv", "a\n").read_text() == "a\n"
    monkeypatch.setattr(os, "fsync", fsync_says(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        write_text_atomic(tmp_path / "u.csv", "a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no partial file, no output


def test_outputs_placed_without_hard_links_or_taken_back_are_kept_and_said_right(tmp_path, monkeypatch):
    """From a mutation review: on a file system without hard links (FAT, some network drives) a
    file that appeared at a new output's path would be replaced; an output taken back when its
    partner failed would still be reported as written; a killed run's leftover beside an output
    named with brackets would never be found."""
    import errno
    import os
    import subprocess
    import sys

    import CoreDiffLib.atomic as atomic
    from CoreDiffLib.atomic import OutputAppeared, atomic_paths, left_by_killed_runs, publish
    done, target = tmp_path / "done.csv", tmp_path / "t.csv"
    done.write_text("this run's")
    target.write_text("another program's")

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "no hard links here")
    with monkeypatch.context() as m:
        m.setattr(os, "link", no_links)
        with pytest.raises(OutputAppeared):
            publish(done, target, replace=False)
        assert target.read_text() == "another program's"
        target.unlink()
        publish(done, target, replace=False)  # free: moved into place
        assert target.read_text() == "this run's"
    atomic.published.clear()
    real = atomic.publish

    def second_fails(tmp, dest, *args, **kwargs):
        if Path(dest).name == "b.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, dest, *args, **kwargs)
    monkeypatch.setattr(atomic, "publish", second_fails)
    with pytest.raises(OSError):
        with atomic_paths(tmp_path / "a.csv", tmp_path / "b.png") as (a, b):
            a.write_text("rows")
            b.write_bytes(b"figure")
    assert atomic.published == [] and not (tmp_path / "a.csv").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".scan[1].nrrd.partial-{dead.pid}-abc123.raw"
    left.write_bytes(b"\0")
    assert left_by_killed_runs(tmp_path / "scan[1].nrrd") == [left]


def test_atomic_outputs_get_ordinary_permissions_not_a_private_temp_files(tmp_path):
    import os
    import stat

    from CoreDiffLib.atomic import write_text_atomic

    old = os.umask(0o022)
    try:
        out = write_text_atomic(tmp_path / "metrics.csv", "a,b\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_output_path_checks_refuse_what_could_not_be_written_before_any_work(tmp_path, ct_file):
    (tmp_path / "isdir.nrrd").mkdir()
    for output, message in ((tmp_path / "isdir.nrrd", "is a folder"),
                            (tmp_path / "o.MHA", "write the extension as .mha"),
                            (tmp_path / "o.nii.GZ", "write the extension as .nii.gz"),
                            (tmp_path / "o.Nii", "write the extension as .nii"),
                            (tmp_path / ("x" * 230 + ".nrrd"), "too long"),
                            (ct_file / "x.nrrd", "is a file, not a folder")):
        with pytest.raises(CoreDiffError, match=message):
            check_output_path(ct_file, output)
    check_output_path(ct_file, tmp_path / "Abd_1.0_B30f denoised")  # a DICOM folder named after its series
    with pytest.raises(CoreDiffError, match="unknown output type '.png'"):
        check_output_path(ct_file, tmp_path / "out.png")


def test_a_detached_output_may_not_write_its_data_over_the_inputs(tmp_path):
    """A .mhd input keeps its pixels in case.zraw: an output case.mhd would write case.zraw too."""
    import hashlib
    img = sitk.GetImageFromArray(synthetic_ct(3, 32).astype(np.int16))
    sitk.WriteImage(img, str(tmp_path / "case.mhd"), True)
    (tmp_path / "case.mhd").rename(tmp_path / "case_ldct.mhd")  # its header still names case.zraw
    kept = hashlib.sha256((tmp_path / "case.zraw").read_bytes()).hexdigest()
    with pytest.raises(CoreDiffError, match="case.zraw, which the input uses"):
        check_output_path(tmp_path / "case_ldct.mhd", tmp_path / "case.mhd")
    check_output_path(tmp_path / "case_ldct.mhd", tmp_path / "other.mhd")
    assert hashlib.sha256((tmp_path / "case.zraw").read_bytes()).hexdigest() == kept


def test_truncated_or_incomplete_files_are_refused_not_filled_with_zeros(tmp_path):
    from CoreDiffLib.streaming import VolumeSource
    vol = synthetic_ct(4, 48).astype(np.int16)
    for name in ("v.nii.gz", "v.nii", "v.mha"):
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / name), False)
        data = (tmp_path / name).read_bytes()
        (tmp_path / ("cut_" + name)).write_bytes(data[:len(data) // 2])
        with pytest.raises(CoreDiffError, match="truncated"):
            VolumeSource.open(tmp_path / ("cut_" + name))
        with pytest.raises(CoreDiffError, match="truncated"):  # compare, dose: the same refusal
            read_volume(tmp_path / ("cut_" + name))
    data = (tmp_path / "v.mha").read_bytes()  # short by less than its header: counted with the header
    (tmp_path / "cut_a_little.mha").write_bytes(data[:-8])
    with pytest.raises(CoreDiffError, match="truncated"):
        VolumeSource.open(tmp_path / "cut_a_little.mha")
    for compress in (False, True):  # NRRD: SimpleITK's reader refuses it, in its words ("fread got only...")
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "v.nrrd"), compress)
        data = (tmp_path / "v.nrrd").read_bytes()
        (tmp_path / "cut.nrrd").write_bytes(data[:len(data) * 2 // 3])
        with pytest.raises(CoreDiffError, match=r"cut.nrrd is truncated(: it holds 6\d % of the data its header "
                                                r"describes)?: copy or export it again$"):
            read_volume(tmp_path / "cut.nrrd")
    for name in ("v.nrrd", "v.mha"):  # compressed: refused as it is unpacked, before any work (streamed)
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / name), True)
        data = (tmp_path / name).read_bytes()
        (tmp_path / ("cut_" + name)).write_bytes(data[:len(data) * 2 // 3])
        with pytest.raises(CoreDiffError, match="is truncated or damaged \\(its compressed data end early\\)"):
            VolumeSource.open(tmp_path / ("cut_" + name))
    (tmp_path / "empty.nrrd").write_bytes(b"")
    with pytest.raises(CoreDiffError, match=r"empty.nrrd: it is empty \(0 bytes\)$"):
        read_volume(tmp_path / "empty.nrrd")
    (tmp_path / "notes.nrrd").write_text("not an image")
    with pytest.raises(CoreDiffError, match=r"no image reader recognises it \(12 bytes\): is it really a .nrrd file"):
        read_volume(tmp_path / "notes.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "d.mhd"), False)
    (tmp_path / "d.raw").unlink()
    with pytest.raises(CoreDiffError, match="data file d.raw is missing"):
        VolumeSource.open(tmp_path / "d.mhd")


def test_a_compressed_file_is_inflated_once_and_read_from_that(tmp_path, monkeypatch):
    """The completeness check inflates .nii.gz and compressed .mha; read_volume takes the voxels
    from that copy instead of handing the file to SimpleITK to inflate again."""
    import CoreDiffLib.io as io_module
    vol = synthetic_ct(4, 48).round().astype(np.int16)
    for name in ("v.nii.gz", "v.mha", "v.nii"):
        image = sitk.GetImageFromArray(vol)
        image.SetSpacing((0.7, 0.8, 2.5))
        image.SetOrigin((-10.0, 20.0, 30.0))
        sitk.WriteImage(image, str(tmp_path / name), True)
    monkeypatch.setattr(io_module.sitk, "ReadImage", lambda *a, **k: pytest.fail("read a second time"))
    for name in ("v.nii.gz", "v.mha", "v.nii"):
        back = read_volume(tmp_path / name)
        np.testing.assert_array_equal(back.array, vol)
        assert back.pixel_type == "int16"
        np.testing.assert_allclose(back.spacing, (0.7, 0.8, 2.5), atol=1e-6)
        np.testing.assert_allclose(back.origin[2], 30.0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mha", "v.nii", "v.nii.gz"]  # no temp left


def test_a_sagittally_stored_part_of_a_scan_is_read_and_found_in_its_axial_planes(tmp_path):
    """`denoise --slices 5:8` of a sagittal series writes 3 axial planes stored sagittally: its
    stored slices are 3 pixels wide, which read_volume refused; compare finds it in the scan."""
    from CoreDiffLib.io import axial_volume, on_grid_of
    scan = synthetic_ct(12, 48).round()
    sagittal = (0, 0, 1, 0, 1, 0, 1, 0, 0)
    whole = read_volume(write_image(tmp_path / "whole.nrrd", scan.transpose(2, 1, 0), (2.5, 0.8, 0.7),
                                    (-10.0, 20.0, 30.0), sagittal))
    part = read_volume(write_image(tmp_path / "part.nrrd", scan[5:8].transpose(2, 1, 0), (2.5, 0.8, 0.7),
                                   (-10.0, 20.0, 30.0 + 5 * 2.5), sagittal))
    axial_whole, axial_part = axial_volume(whole), axial_volume(part)
    np.testing.assert_array_equal(axial_whole.array, scan)
    assert axial_part.shape == (3, 48, 48) and axial_part.spacing == (0.7, 0.8, 2.5)
    array, first = on_grid_of(axial_whole, axial_part)
    assert first == 5
    np.testing.assert_array_equal(array, scan[5:8])
    shifted = read_volume(write_image(tmp_path / "shifted.nrrd", scan[5:8].transpose(2, 1, 0), (2.5, 0.8, 0.7),
                                      (-10.0, 20.0, 31.0 + 5 * 2.5), sagittal))
    assert on_grid_of(axial_whole, axial_volume(shifted)) is None  # between slices: not a part of it
    reversed_order = read_volume(write_image(tmp_path / "rev.nrrd", scan[::-1], (0.7, 0.8, 2.5),
                                             (-10.0, 20.0, 30.0 + 11 * 2.5), (1, 0, 0, 0, 1, 0, 0, 0, -1)))
    array, first = on_grid_of(reversed_order, axial_part)
    assert first is None  # its slice numbers run the other way: they do not number the part's
    np.testing.assert_array_equal(array, scan[5:8])
    # one slice: its spacing along the normal is a thickness, recorded as 1 mm by one file and 5 by another
    thin = read_volume(write_image(tmp_path / "thin.nrrd", scan[5:6], (0.7, 0.8, 1.0), (-10.0, 20.0, 30.0)))
    thick = read_volume(write_image(tmp_path / "thick.nrrd", scan[5:6], (0.7, 0.8, 5.0), (-10.0, 20.0, 30.0)))
    np.testing.assert_array_equal(on_grid_of(thick, thin)[0], scan[5:6])


def test_an_unpacked_copy_of_another_users_live_run_is_kept(monkeypatch):
    """Another user's process cannot be signalled (PermissionError): it is alive, and its unpacked
    input in a shared temporary folder is not swept away (the error crashed every such run)."""
    from CoreDiffLib import streaming

    def kill(pid, signal):
        raise {1: PermissionError, 2: ProcessLookupError, 3: OSError}[pid]()
    monkeypatch.setattr(streaming.os, "kill", kill)
    assert streaming.process_alive(1) and not streaming.process_alive(2) and streaming.process_alive(3)


def test_a_scaled_nifti_is_read_in_hu_not_refused_as_truncated(tmp_path):
    """uint16 voxels with scl_inter = -1024 (how some converters store CT): SimpleITK reads them
    as float32, and the completeness check expected twice the bytes the file holds."""
    import gzip
    import struct
    hu = np.clip(synthetic_ct(3, 32).round(), -1024, None)
    sitk.WriteImage(sitk.GetImageFromArray((hu + 1024).astype(np.uint16)), str(tmp_path / "raw.nii"))
    data = bytearray((tmp_path / "raw.nii").read_bytes())
    data[112:120] = struct.pack("<ff", 1.0, -1024.0)  # scl_slope, scl_inter
    (tmp_path / "scaled.nii").write_bytes(bytes(data))
    (tmp_path / "scaled.nii.gz").write_bytes(gzip.compress(bytes(data)))
    for name in ("scaled.nii", "scaled.nii.gz"):
        np.testing.assert_array_equal(read_volume(tmp_path / name).array, hu)
    (tmp_path / "cut.nii").write_bytes(bytes(data[:-200]))
    with pytest.raises(CoreDiffError, match="truncated"):
        read_volume(tmp_path / "cut.nii")


def test_dicom_series_as_exports_store_them_split_with_copies_or_a_localizer(tmp_path):
    """What CDs and PACS exports do to a series: split it across folders (one part was read
    as the scan), put the topogram under the same UID (it became a slice), copy files twice
    (each slice's neighbour was itself); and an enhanced CT as one multi-frame file."""
    import shutil
    hu = synthetic_ct(8, 32).round()
    whole = write_dicom_series(tmp_path / "whole", hu, "1.2.3.77")
    split = tmp_path / "split"
    for part, ks in (("DICOM/00000001", range(5, 8)), ("DICOM/00000002", range(0, 5))):  # the head end first
        (split / part).mkdir(parents=True)
        for k in ks:
            shutil.copy(whole / f"{k}.dcm", split / part / f"{k}.dcm")
    notes = []
    np.testing.assert_array_equal(read_volume(split, log=notes.append).array, hu)
    assert "(and 1 more folder)" in find_dicom_series(split)[0].folder
    copies = tmp_path / "copies"
    shutil.copytree(whole, copies)
    for k in range(8):
        shutil.copy(whole / f"{k}.dcm", copies / f"{k} (1).dcm")
    notes.clear()
    np.testing.assert_array_equal(read_volume(copies, log=notes.append).array, hu)
    assert any("left out 8 repeated copies" in n for n in notes)
    with_topogram = tmp_path / "topogram"
    shutil.copytree(whole, with_topogram)
    write_dicom_series(tmp_path / "topo", synthetic_ct(1, 32), "1.2.3.77.8",  # its own SOP UID, the series'
                       {"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER", "0020|0037": "1\\0\\0\\0\\0\\-1",
                        "0020|000e": "1.2.3.77"})
    shutil.copy(tmp_path / "topo" / "0.dcm", with_topogram / "topogram.dcm")
    notes.clear()
    np.testing.assert_array_equal(read_volume(with_topogram, log=notes.append).array, hu)
    assert any("left out 1 localizer image" in n for n in notes)
    pacs = tmp_path / "pacs"  # named as PACS exports do, the topogram first: the series was taken for a localizer
    pacs.mkdir()
    shutil.copy(tmp_path / "topo" / "0.dcm", pacs / "IM0001")
    for k in range(8):
        shutil.copy(whole / f"{k}.dcm", pacs / f"IM{k + 2:04d}")
    notes.clear()
    np.testing.assert_array_equal(read_volume(pacs, log=notes.append).array, hu)
    assert any("left out 1 localizer image" in n for n in notes)
    (with_topogram / "topogram.dcm").unlink()
    write_dicom_series(tmp_path / "cor", synthetic_ct(1, 32), "1.2.3.77.9",
                       {"0020|0037": "1\\0\\0\\0\\0\\-1", "0020|000e": "1.2.3.77"})
    shutil.copy(tmp_path / "cor" / "0.dcm", with_topogram / "coronal.dcm")
    with pytest.raises(CoreDiffError, match="mixes images of different orientations"):
        read_volume(with_topogram)
    # the same positions again, other SOP Instance UIDs: a second acquisition under the one series UID
    second = write_dicom_series(tmp_path / "second", hu + 5, "1.2.3.77.2", {"0020|0012": "2", "0020|000e": "1.2.3.77"})
    twice = tmp_path / "twice"
    shutil.copytree(whole, twice)
    for k in range(8):
        shutil.copy(second / f"{k}.dcm", twice / f"b{k}.dcm")
    with pytest.raises(CoreDiffError, match="two acquisitions in one series"):
        read_volume(twice)
    enhanced = tmp_path / "enhanced"
    enhanced.mkdir()
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetMetaData("0008|0060", "CT")
    sitk.WriteImage(image, str(enhanced / "ct.dcm"))
    back = read_volume(enhanced)
    np.testing.assert_array_equal(back.array, hu)
    assert back.spacing == pytest.approx((0.7, 0.7, 2.5))


def test_orientations_written_to_other_precisions_are_one_orientation(monkeypatch):
    """Grouped by rounding to 3 decimals, 0.9395 and 0.93950001 fell on two sides of a boundary."""
    from CoreDiffLib import dicom
    from CoreDiffLib.dicom import DicomSeries, series_slices
    iop = {"a": "1\\0\\0\\0\\0.9395\\0.3425", "b": "1.0\\0.0\\0.0\\0.0\\0.93950001\\0.34249999",
           "c": "1\\0\\0\\0\\0.9395\\0.3425"}
    heads = {f: {"0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0008|0018": f"1.2.{k}", "0020|0037": iop[f],
                 "0020|0032": f"0\\0\\{k}", "0028|0010": "32", "0028|0011": "32", "0020|0012": "1"}
             for k, f in enumerate("abc")}
    monkeypatch.setattr(dicom, "_header_tags", lambda f, keys: heads[f])
    assert series_slices(DicomSeries("1.2", ("a", "b", "c"), "."))[0] == ("a", "b", "c")
    heads["c"]["0020|0037"] = "1\\0\\0\\0\\0.94\\0.3425"
    with pytest.raises(CoreDiffError, match="mixes images of different orientations"):
        series_slices(DicomSeries("1.2", ("a", "b", "c"), "."))


def test_a_big_endian_compressed_metaimage_is_read_by_the_full_reader(tmp_path):
    import zlib

    from CoreDiffLib.streaming import VolumeSource
    vol = synthetic_ct(3, 32).round().astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "u.mha"), False)
    raw = (tmp_path / "u.mha").read_bytes()
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    data = zlib.compress(vol.astype(">i2").tobytes())
    header = raw[:end].decode().replace("ByteOrderMSB = False", "ByteOrderMSB = True").replace(
        "ElementType", f"CompressedData = True\nCompressedDataSize = {len(data)}\nElementType")
    (tmp_path / "be.mha").write_bytes(header.encode() + data)
    assert VolumeSource.open(tmp_path / "be.mha") is None  # not the little-endian slab reader
    np.testing.assert_array_equal(read_volume(tmp_path / "be.mha").array, vol)
    # a raw big-endian NRRD likewise (read by slabs as little-endian, it was garbage)
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 32 32 3\n"
              "space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: big\nencoding: raw\nspace origin: (0,0,0)\n\n")
    (tmp_path / "be.nrrd").write_bytes(header.encode() + vol.astype(">i2").tobytes())
    assert VolumeSource.open(tmp_path / "be.nrrd") is None
    np.testing.assert_array_equal(read_volume(tmp_path / "be.nrrd").array, vol)


def test_dicom_text_in_another_character_set_is_kept_and_monochrome1_is_refused(tmp_path):
    vol = synthetic_ct(3, 32).round()
    series = write_dicom_series(tmp_path / "latin1", vol, "1.2.3.9",
                                {"0008|0005": "ISO_IR 100", "0010|0010": "Mxller^Jxrgen"})
    for f in series.iterdir():  # the name as a Latin-1 scanner writes it: one byte per letter
        f.write_bytes(f.read_bytes().replace(b"Mxller^Jxrgen", b"M\xfcller^J\xfcrgen"))
    src = read_volume(series)
    out = read_volume(write_volume(src, tmp_path / "out"))  # it used to fail here, after the work
    assert out.dicom_tags["0008|0005"].strip() == "ISO_IR 192"
    assert out.dicom_tags["0010|0010"].strip() == "Müller^Jürgen"
    mono1 = write_dicom_series(tmp_path / "mono1", vol, "1.2.3.10")
    for f in mono1.iterdir():  # grey levels stored inverted: ITK would invert the HU with them
        assert b"MONOCHROME2" in f.read_bytes()
        f.write_bytes(f.read_bytes().replace(b"MONOCHROME2", b"MONOCHROME1"))
    with pytest.raises(CoreDiffError, match="MONOCHROME1"):
        read_volume(mono1)
    with pytest.raises(CoreDiffError, match="MONOCHROME1"):
        read_volume(next(mono1.iterdir()))


def test_one_slice_dicom_output_keeps_its_spacing_and_a_dcm_file_keeps_its_tags(tmp_path):
    vol = synthetic_ct(4, 32).round()
    series = write_dicom_series(tmp_path / "base", vol, "1.2.3.11", {"0010|0010": "Doe^Jane", "0010|0020": "P7"},
                                slice_mm=2.0)
    src = read_volume(series)
    part = src.with_array(src.array[2:3])
    assert read_volume(write_volume(part, tmp_path / "one")).spacing[2] == pytest.approx(2.0)
    single = read_volume(series / "0.dcm")
    assert single.dicom_tags["0010|0020"].strip() == "P7"
    out = read_volume(write_volume(single, tmp_path / "from_file"))
    assert out.dicom_tags["0010|0010"].strip() == "Doe^Jane"
    assert out.dicom_tags["0020|000d"] == single.dicom_tags["0020|000d"]


def test_a_dicom_output_folder_gets_ordinary_permissions(tmp_path):
    import os
    import stat
    vol = read_volume(write_image(tmp_path / "s.nrrd", synthetic_ct(2, 32)))
    old = os.umask(0o022)
    try:
        out = write_volume(vol, tmp_path / "series")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_a_pair_list_takes_only_its_first_line_as_a_header_and_refuses_a_volume(tmp_path):
    (tmp_path / "list.csv").write_text("\ufeffndct,ldct\nndct/a.nrrd,ldct/a.nrrd  # case a\nn2.nrrd,l2.nrrd\n",
                                       encoding="utf-8")
    assert read_pair_list(tmp_path / "list.csv") == [(tmp_path / "ndct/a.nrrd", tmp_path / "ldct/a.nrrd"),
                                                     (tmp_path / "n2.nrrd", tmp_path / "l2.nrrd")]
    (tmp_path / "latin.txt").write_bytes(b"n\xfc.nrrd,l.nrrd\n")
    with pytest.raises(CoreDiffError, match="not a UTF-8 text list"):
        read_pair_list(tmp_path / "latin.txt")
    with pytest.raises(CoreDiffError, match="is a volume"):
        read_pair_list(write_image(tmp_path / "v.nrrd", synthetic_ct(2, 16)))


def test_a_nifti_output_may_not_hide_or_be_hidden_by_its_compressed_twin(tmp_path, ct_file):
    """ITK reads X.nii when asked for X.nii.gz: `denoise scan.nii.gz scan.nii` made every ITK
    tool (Slicer too) open the denoised copy when asked for the untouched scan."""
    scan = write_image(tmp_path / "scan.nii.gz", synthetic_ct(3, 32))
    with pytest.raises(CoreDiffError, match="the input scan.nii.gz lies beside output .*scan.nii.*reads scan.nii "
                                            "when asked for scan.nii.gz.*choose another output name"):
        check_output_path(scan, tmp_path / "scan.nii")
    (tmp_path / "other.nii.gz").write_bytes(b"an older result")
    with pytest.raises(CoreDiffError, match="other.nii.gz lies beside output .*move it"):
        check_output_path(ct_file, tmp_path / "other.nii")
    check_output_path(ct_file, tmp_path / "fresh.nii")


def test_a_plain_nifti_named_nii_gz_is_read(tmp_path):
    vol = synthetic_ct(3, 32).round().astype(np.int16)
    plain = write_image(tmp_path / "plain.nii", vol)
    named = tmp_path / "named.nii.gz"
    named.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(read_volume(named).array, vol)


def test_iso_2022_single_byte_sets_decode_as_their_iso_ir_twins():
    from CoreDiffLib.io import _dicom_text

    def stored(raw: bytes) -> str:  # as SimpleITK hands the tag over
        return raw.decode("utf-8", "surrogateescape")
    assert _dicom_text(stored("Buc^Jérôme".encode("latin-1")), "ISO 2022 IR 100") == "Buc^Jérôme"
    assert _dicom_text(stored(b"\x1b-AM\xfcller^J\xfcrgen"), "ISO 2022 IR 6\\ISO 2022 IR 100") == "Müller^Jürgen"
    assert _dicom_text(stored("Люкceмбypг".encode("iso8859_5")), "ISO 2022 IR 144") == "Люкceмбypг"


def test_a_series_with_a_missing_slice_keeps_its_own_slice_spacing(tmp_path, tiny_model_path):
    """ITK's spacing of a series with a gap is the mean (12 slices at 1 mm in two runs 55 mm apart
    read as 5.9 mm), which turned neighbour context off and was written as the output's spacing."""
    from CoreDiffLib.dicom import median_slice_gap
    from CoreDiffLib.inference import Denoiser, denoise_file
    folder = write_dicom_series(tmp_path / "gap", synthetic_ct(33, 32), "1.2.3.88", slice_mm=1.0)
    for k in range(3, 30):  # two runs of 3 slices, 28 mm apart
        (folder / f"{k}.dcm").unlink()
    vol = read_volume(folder)
    assert vol.slice_positions is not None and vol.spacing[2] == pytest.approx(6.4)
    assert median_slice_gap(vol.slice_positions, vol.direction) == pytest.approx(1.0)
    assert vol.axial_slice_mm() == pytest.approx(1.0)  # what oneshot, train and the README's snippet take
    lines = []
    denoise_file(folder, tmp_path / "out", Denoiser.load(str(tiny_model_path), device="cpu"), log=lines.append)
    assert not any("its own context" in line for line in lines), lines
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(sorted((tmp_path / "out").iterdir())[0]))
    reader.ReadImageInformation()
    assert float(reader.GetMetaData("0018|0088")) == pytest.approx(1.0)


def test_a_multi_frame_ct_read_with_gdcms_fallback_geometry_is_refused(tmp_path):
    """GDCM gives 1 mm voxels in file order when an enhanced CT's frames are missing, uneven or
    out of order; the pixel size the file states is lost, so it is refused with a way out. A
    file whose voxels really are 1 mm reads as it is."""
    image = sitk.GetImageFromArray(synthetic_ct(4, 32).round().astype(np.int16))
    image.SetMetaData("0008|0060", "CT")
    image.SetSpacing((0.7, 0.7, 2.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "regular.dcm"))  # one multi-frame (enhanced CT) file
    assert read_volume(tmp_path / "regular.dcm").spacing == pytest.approx((0.7, 0.7, 2.0))
    raw = (tmp_path / "regular.dcm").read_bytes()
    assert raw.count(b"10\\20\\32") == 1 and raw.count(b"10\\20\\34") == 1  # frames 1 and 2's positions
    swapped = (raw.replace(b"10\\20\\32", b"10\\20\\XX").replace(b"10\\20\\34", b"10\\20\\32")
               .replace(b"10\\20\\XX", b"10\\20\\34"))  # same lengths: the file stays well formed
    (tmp_path / "swapped.dcm").write_bytes(swapped)
    assert sitk.ReadImage(str(tmp_path / "swapped.dcm")).GetSpacing() == (1.0, 1.0, 1.0)  # GDCM's fallback
    with pytest.raises(CoreDiffError, match="multi-frame .*could not read.*classic one-file-per-slice series"):
        read_volume(tmp_path / "swapped.dcm")
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "iso1mm.dcm"))
    assert read_volume(tmp_path / "iso1mm.dcm").spacing == (1.0, 1.0, 1.0)
    image.SetSpacing((1.0, 1.0, 2.0))  # 1 mm pixels, frames 2 mm apart, two of them swapped: GDCM's 1 mm again
    sitk.WriteImage(image, str(tmp_path / "px1mm.dcm"))
    raw = (tmp_path / "px1mm.dcm").read_bytes()
    swapped = (raw.replace(b"10\\20\\32", b"10\\20\\XX").replace(b"10\\20\\34", b"10\\20\\32")
               .replace(b"10\\20\\XX", b"10\\20\\34"))
    (tmp_path / "px1mm_swapped.dcm").write_bytes(swapped)
    with pytest.raises(CoreDiffError, match="could not read"):
        read_volume(tmp_path / "px1mm_swapped.dcm")


def test_a_multi_frame_ct_with_per_frame_rescale_reads_only_when_the_frames_agree(tmp_path):
    """An enhanced CT may state its rescale per frame; GDCM applies the first frame's to all
    (a frame stored under intercept -1000 read 24 HU low), so differing ones are refused."""
    hu = np.full((4, 16, 16), 40.0, np.float32)
    hu[:, :4] = -1000.0
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.7, 2.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    for tag, value in {"0008|0060": "CT", "0028|1052": "-1024", "0028|1053": "1", "0028|0100": "16",
                       "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"}.items():
        image.SetMetaData(tag, value)
    sitk.WriteImage(image, str(tmp_path / "shared.dcm"))  # GDCM: one shared Pixel Value Transformation
    raw = (tmp_path / "shared.dcm").read_bytes()
    # implicit VR, undefined lengths: move the shared group into each frame's item, one of them -1000
    item, item_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\r\xe0\0\0\0\0"
    seq_end = b"\xfe\xff\xdd\xe0\0\0\0\0"

    def transformation(intercept: bytes) -> bytes:
        return (b"(\x00E\x91\xff\xff\xff\xff" + item + b"(\x00R\x10\x06\0\0\0" + intercept
                + b"(\x00S\x10\x02\0\0\x001 " + item_end + seq_end)

    assert raw.count(transformation(b"-1024 ")) == 1
    raw = raw.replace(transformation(b"-1024 "), b"")
    for intercepts, name in (([b"-1024 "] * 4, "agree.dcm"),
                             ([b"-1024 ", b"-1024 ", b"-1000 ", b"-1024 "], "differ.dcm")):
        per_frame = raw
        for k, intercept in enumerate(intercepts):
            position_end = b"10\\20\\%d" % (30 + 2 * k) + item_end + seq_end
            assert per_frame.count(position_end) == 1
            per_frame = per_frame.replace(position_end, position_end + transformation(intercept))
        (tmp_path / name).write_bytes(per_frame)
    np.testing.assert_array_equal(read_volume(tmp_path / "agree.dcm").array, hu)
    gdcm = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "differ.dcm")))
    np.testing.assert_array_equal(gdcm, hu)  # frame 3 holds 64 HU, not 40
    with pytest.raises(CoreDiffError, match="different rescale slopes or intercepts.*classic one-file-per-slice"):
        read_volume(tmp_path / "differ.dcm")


def test_a_slice_with_its_own_fractional_rescale_slope_keeps_its_fraction(tmp_path):
    """ITK takes the pixel type from the first slice (int32 here): a later slice stored with
    slope 0.5 lost its half HU."""
    folder = tmp_path / "slopes"
    folder.mkdir()
    hu = np.full((4, 32, 32), -1000.0, np.float32)
    hu[:, 8:24, 8:24] = 40.5
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(4):
        half = k == 2
        image = sitk.GetImageFromArray(hu[k:k + 1] if half else np.rint(hu[k:k + 1]).astype(np.int16))
        tags = {"0008|0060": "CT", "0028|1052": "-1024", "0028|1053": "0.5" if half else "1",
                "0020|000e": "1.2.3.9", "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": f"0\\0\\{k}",
                "0020|0013": str(k + 1), "0008|0018": f"1.2.3.9.{k + 1}"}
        if half:  # GDCM stores a float buffer as the integer type these name, (value - intercept) / slope
            tags.update({"0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(image)
    np.testing.assert_array_equal(read_volume(folder).array[:, 16, 16], [40, 40, 40.5, 40])


def test_a_single_slice_is_found_in_its_volume_whichever_way_its_normal_points():
    """A one-slice file's third axis may point either way (exports differ); it is the same slice.
    Its position decides, within the 0.5 mm a whole pair is allowed."""
    from CoreDiffLib.io import Volume, slice_of
    vol = Volume(np.zeros((6, 8, 8), np.float32), (0.7, 0.7, 2.5), (10.0, 20.0, 30.0))
    flipped = (1, 0, 0, 0, 1, 0, 0, 0, -1)
    assert slice_of(vol, Volume(np.zeros((1, 8, 8), np.float32), (0.7, 0.7, 1.0), (10.0, 20.0, 40.0), flipped)) == 4
    assert slice_of(vol, Volume(np.zeros((1, 8, 8), np.float32), (0.7, 0.7, 1.0), (10.0, 20.0, 41.0))) is None
    assert slice_of(vol, Volume(np.zeros((1, 8, 8), np.float32), (0.8, 0.7, 1.0), (10.0, 20.0, 40.0))) is None
    # at the slice's place, its rows reversed: a mirrored slice, no pair for a one-shot fit
    rows_flipped = (1, 0, 0, 0, -1, 0, 0, 0, 1)
    assert slice_of(vol, Volume(np.zeros((1, 8, 8), np.float32), (0.7, 0.7, 1.0), (10.0, 20.0, 40.0),
                                rows_flipped)) is None


def test_values_written_are_rounded_and_kept_whatever_the_volumes_type(tmp_path):
    """From a mutation review: a float volume written as DICOM (a float NIfTI denoised, a series
    with a fractional rescale slope) would be cut toward 0 HU without the rounding, and a
    uint16 volume holding negative HU would wrap around; no test saw either."""
    from CoreDiffLib.io import Volume
    hu = np.full((3, 32, 32), -1000.0, np.float32)
    hu[:, 10:20, 10:20] = 40.6
    hu[:, 20:25, 20:25] = -40.6
    for pixel_type in ("float32", "uint16"):
        out = write_volume(Volume(hu, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0), pixel_type=pixel_type),
                           tmp_path / f"dicom_{pixel_type}")
        back = read_volume(out).array
        assert back[1, 15, 15] == 41 and back[1, 22, 22] == -41 and back[1, 0, 0] == -1000, pixel_type
        back = read_volume(write_volume(Volume(hu, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0), pixel_type=pixel_type),
                                        tmp_path / f"{pixel_type}.nrrd")).array
        assert back[1, 0, 0] == -1000 and back[1, 22, 22] == pytest.approx(-40.6 if pixel_type == "float32" else -41)


def test_a_thin_sagittal_slab_is_denoised_as_stored(tmp_path, identity_model_path):
    """A slab of 10 sagittal slices has axial planes 10 pixels wide, too narrow to denoise: it
    is denoised in its stored planes (a limit of 4 pixels sent it to the 16-pixel refusal)."""
    from CoreDiffLib.inference import Denoiser, denoise_file
    slab = synthetic_ct(48, 48).transpose(2, 1, 0)[:10]  # stored sagittally: (x, y, z), 10 x positions
    src = write_image(tmp_path / "slab.nrrd", slab, spacing=(2.5, 0.8, 0.7), direction=(0, 0, 1, 0, 1, 0, 1, 0, 0))
    notes = []
    denoise_file(src, tmp_path / "out.nrrd", Denoiser.load(str(identity_model_path), device="cpu"), log=notes.append)
    out = read_volume(tmp_path / "out.nrrd")
    assert out.shape == slab.shape and out.direction == pytest.approx((0, 0, 1, 0, 1, 0, 1, 0, 0))
    assert not any("not axial" in n for n in notes)


def test_the_file_standing_for_a_series_is_no_localizer(tmp_path):
    """A topogram under the scan's series UID sorting into the middle of its files made the whole
    series a localizer ("holds no CT series")."""
    from CoreDiffLib.dicom import _representative_tags
    write_dicom_series(tmp_path / "ct", synthetic_ct(2, 32), "1.2.3.5")
    write_dicom_series(tmp_path / "topo", synthetic_ct(1, 32), "1.2.3.5", {"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    files = (str(tmp_path / "ct" / "0.dcm"), str(tmp_path / "topo" / "0.dcm"), str(tmp_path / "ct" / "1.dcm"))
    assert "LOCALIZER" not in _representative_tags(files, ("0008|0008",))["0008|0008"].upper()
    assert "LOCALIZER" in _representative_tags(files[1:2], ("0008|0008",))["0008|0008"].upper()


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.mha", "dicom_out"])
def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, name):
    """SimpleITK's NIfTI writer only prints an error when the disk fills: the short file was
    renamed into place and reported as written; other writers raised a RuntimeError traceback.
    A file size limit (ulimit -f) stands in for the full disk."""
    import subprocess
    import sys
    src = write_image(tmp_path / "src.nrrd", synthetic_ct(4, 96), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))\n"
              "from CoreDiffLib import CoreDiffError\n"
              "from CoreDiffLib.io import read_volume, write_volume\n"
              "v = read_volume(sys.argv[1])\n"
              "v = v.with_array(v.array + __import__('numpy').random.default_rng(0).normal(0, 30, v.shape))\n"
              "try:\n    write_volume(v, sys.argv[2])\nexcept CoreDiffError as e:\n    print('REFUSED', e)\n")
    out = tmp_path / "out" / name
    out.parent.mkdir()
    r = subprocess.run([sys.executable, "-c", script, str(src), str(out)], capture_output=True, encoding="utf-8",
                       timeout=120)
    assert r.stdout.startswith("REFUSED could not write"), (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr and list(out.parent.iterdir()) == []
    # GDCM blames the pixel type for any failed write: with room on the disk, the limit is named
    assert "component type" not in r.stdout and ("file size limit" in r.stdout or name != "dicom_out"), r.stdout


def test_a_detached_input_whose_data_file_name_has_a_space_is_protected(tmp_path):
    """'ElementDataFile = res ult.zraw' was taken for a list of files: an output res ult.mhd
    overwrote the input's data."""
    vol = read_volume(write_image(tmp_path / "src.nrrd", synthetic_ct(2, 32)))
    write_volume(vol, tmp_path / "other.mhd")
    (tmp_path / "other.zraw").rename(tmp_path / "res ult.zraw")
    header = (tmp_path / "other.mhd").read_text()
    (tmp_path / "other.mhd").write_text(header.replace("= other.zraw", "= res ult.zraw"))
    np.testing.assert_array_equal(read_volume(tmp_path / "other.mhd").array, vol.array)  # ITK reads the name
    with pytest.raises(CoreDiffError, match="would write its data to res ult.zraw, which the input uses"):
        check_output_path(tmp_path / "other.mhd", tmp_path / "res ult.mhd")


def test_an_input_truncated_while_it_is_read_is_one_clear_error(tmp_path):
    """A raw NRRD cut short mid-run raised a ValueError traceback."""
    from CoreDiffLib.streaming import VolumeSource
    path = tmp_path / "raw.nrrd"
    image = sitk.GetImageFromArray(synthetic_ct(6, 32).astype(np.int16))
    sitk.WriteImage(image, str(path), False)  # uncompressed: read slab by slab from the file
    with VolumeSource.open(path) as source:
        assert source[0:2].shape == (2, 32, 32)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 3000)
        with pytest.raises(CoreDiffError, match="shorter than its header says: was it changed or truncated"):
            source[4:6]


def test_a_dicom_output_folder_given_as_a_symbolic_link_is_refused_before_any_work(tmp_path):
    """It passed the checks and failed after the whole run ('Not a directory')."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for link in ("link", "dangling"):
        with pytest.raises(CoreDiffError, match="is a symbolic link: give a new folder's own path"):
            check_output_path(tmp_path / "in.nrrd", tmp_path / link)


def test_whole_volume_writes_round_and_check_what_they_are_given(tmp_path):
    """DICOM, .mhd and .nhdr outputs are written whole: HU are rounded (not truncated) to the
    input's integer type; slice positions must match the slices; a folder is no file name; an
    output inside the input DICOM folder is refused."""
    from CoreDiffLib.atomic import check_output_file
    from CoreDiffLib.io import Volume
    values = np.full((2, 16, 16), 10.7, np.float32)
    values[1] = -10.7
    values[:, :4] = -1000.0  # air: a CT
    out = write_volume(Volume(values, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), pixel_type="int16"), tmp_path / "o.mhd")
    assert sorted(np.unique(read_volume(out).array).tolist()) == [-1000, -11, 11]
    with pytest.raises(CoreDiffError, match="3 slice positions for 2 slices"):
        write_volume(Volume(values, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), pixel_type="int16",
                            slice_positions=((0, 0, 0), (0, 0, 1), (0, 0, 2))), tmp_path / "p.nrrd")
    (tmp_path / "m.csv").mkdir()
    with pytest.raises(CoreDiffError, match="is a folder"):
        check_output_file("--csv", tmp_path / "m.csv", (".csv",), ())
    series = write_dicom_series(tmp_path / "series", synthetic_ct(3, 32), "1.2.3.77")
    with pytest.raises(CoreDiffError, match="inside the input DICOM folder"):
        check_output_path(series, series / "x.nrrd")


def test_multi_file_outputs_land_in_one_move_or_data_before_header(tmp_path, monkeypatch):
    """A DICOM series moves into place as one folder (file by file, a crash would leave half a
    series a PACS could import); a detached header moves after its data (never pointing at
    missing data)."""
    import os as os_module
    vol = read_volume(write_image(tmp_path / "src.nrrd", synthetic_ct(3, 32)))
    moves = []
    real = os_module.replace

    def recording(src, dst):
        moves.append((Path(src), Path(dst)))
        return real(src, dst)
    monkeypatch.setattr(os_module, "replace", recording)
    write_volume(vol, tmp_path / "dicom_out")
    assert [dst for _, dst in moves] == [tmp_path / "dicom_out"] and moves[0][0].is_relative_to(tmp_path)
    moves.clear()
    write_volume(vol, tmp_path / "v.mhd")
    assert [dst.name for _, dst in moves][-1] == "v.mhd" and len(moves) == 2  # the data file, then the header


@pytest.mark.skipif(os.name == "nt", reason="flock is POSIX")
def test_a_header_and_its_data_are_placed_under_one_lock(tmp_path, monkeypatch):
    """Two runs replacing one .mhd placed their data files and headers interleaved: one's header
    could end up beside the other's data."""
    import fcntl

    import CoreDiffLib.io as io_module
    vol = read_volume(write_image(tmp_path / "src.nrrd", synthetic_ct(3, 32)))
    real, held = io_module.publish, []

    def placing(done, target, *args):
        fd = os.open(tmp_path, os.O_RDONLY)
        try:  # another run's attempt to place its pair now must wait
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        real(done, target, *args)
    monkeypatch.setattr(io_module, "publish", placing)
    write_volume(vol, tmp_path / "v.mhd")
    assert held == [True, True]  # the data file, then the header
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and released once both are in place
    os.close(fd)


def test_a_streamed_output_keeps_values_its_input_type_holds():
    """int32 (ITK's type for int16 DICOM with an intercept) narrows to int16 only when the input's
    values fit: padding of -33792 HU would be clipped to -32768 otherwise."""
    from CoreDiffLib.streaming import output_dtype
    assert output_dtype("int32", (-1024.0, 3071.0)) == np.int16
    assert output_dtype("int32", (-33792.0, 3071.0)) == np.int32
    assert output_dtype("int32", (-1024.0, 40000.0)) == np.int32
    assert output_dtype("int16", (-1024.0, 3071.0)) == np.int16 and output_dtype("float64") == np.float32


@pytest.mark.parametrize("name, appears", [("out.nrrd", "out.nrrd"), ("out.nii.gz", "out.nii.gz"),
                                           ("out.mha", "out.mha"), ("out.nhdr", "out.raw.gz"),
                                           ("out.nhdr", "out.nhdr")])
def test_an_output_that_appears_during_the_run_is_kept_unless_replacing(tmp_path, ct_file, identity_model_path,
                                                                         name, appears):
    """`corediff denoise` checks that its output is free before it starts; a file another program
    wrote there during the run was replaced all the same (only oneshot placed its result with a
    hard link, in one step with the check)."""
    from CoreDiffLib.atomic import OutputAppeared
    from CoreDiffLib.inference import Denoiser, denoise_file

    def denoiser_while_another_program_writes(volume, spacing_xy):  # called once the input is read
        (tmp_path / appears).write_text("another program's file")
        return Denoiser.load(str(identity_model_path), device="cpu")

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputAppeared, match=f"{appears} appeared while this run worked .*: kept it"):
        denoise_file(ct_file, tmp_path / name, denoiser_while_another_program_writes, replace=False)
    assert (tmp_path / appears).read_text() == "another program's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + [appears])  # nothing of this run's
    denoise_file(ct_file, tmp_path / name, denoiser_while_another_program_writes)  # replace: the default
    assert read_volume(tmp_path / name).shape == read_volume(ct_file).shape


def test_a_dicom_folder_filled_during_the_run_is_kept(tmp_path, ct_file, identity_model_path):
    """Two runs into one new DICOM folder: the second to finish failed with a raw "Directory not
    empty" and no word on whose series the folder holds."""
    from CoreDiffLib.atomic import OutputAppeared
    from CoreDiffLib.inference import Denoiser, denoise_file
    out = tmp_path / "series"

    def denoiser_while_another_run_writes(volume, spacing_xy):  # called once the input is read
        out.mkdir()
        (out / "IM1.dcm").write_text("another run's slice")
        return Denoiser.load(str(identity_model_path), device="cpu")

    with pytest.raises(OutputAppeared, match=f"{out} was filled while this run worked .*: kept it"):
        denoise_file(ct_file, out, denoiser_while_another_run_writes)
    assert [p.name for p in out.iterdir()] == ["IM1.dcm"] and (out / "IM1.dcm").read_text() == "another run's slice"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ct_file.name, "series"])  # no partial folder


def test_a_compressed_output_names_no_temporary_file_and_no_time(tmp_path, ct_file, identity_model_path):
    """The gzip stream of a .nrrd / .nii.gz output carried the temporary file's name (FNAME) and the
    time it was written: two runs on the same scan differed in those bytes."""
    from CoreDiffLib.inference import Denoiser, denoise_file
    den = Denoiser.load(str(identity_model_path), device="cpu")
    for name in ("a.nrrd", "b.nrrd", "a.nii.gz"):
        denoise_file(ct_file, tmp_path / name, den)
    for name in ("a.nrrd", "a.nii.gz"):
        data = (tmp_path / name).read_bytes()
        stream = data[data.index(b"\n\n") + 2:] if name.endswith(".nrrd") else data
        assert stream[:3] == b"\x1f\x8b\x08" and stream[3] & 0x08 == 0 and stream[4:8] == bytes(4)
        assert b"partial" not in data
    a, b = ((tmp_path / n).read_bytes() for n in ("a.nrrd", "b.nrrd"))
    assert a[a.index(b"\n\n"):] == b[b.index(b"\n\n"):]  # the same voxels, the same bytes


def test_a_dicom_output_keeps_the_instance_numbers_of_a_series_numbered_head_to_foot(tmp_path, identity_model_path):
    """Scanners number slices head to foot (z falling); ITK orders them by rising position, and the
    output was numbered in that order: its image 1 lay where the scan's image 8 did, and a viewer
    that sorts by number scrolled it backwards."""
    from CoreDiffLib.inference import Denoiser, denoise_file
    folder = write_dicom_series(tmp_path / "scan", synthetic_ct(6, 32), "1.2.3.77", slice_mm=-2.0)  # IM1 at z=0

    def numbers(series):
        reader, out = sitk.ImageFileReader(), {}
        for f in series.iterdir():
            reader.SetFileName(str(f))
            reader.ReadImageInformation()
            out[float(reader.GetMetaData("0020|0032").split("\\")[2])] = int(reader.GetMetaData("0020|0013"))
        return out
    scan = numbers(folder)
    assert scan == {-2.0 * k: k + 1 for k in range(6)}
    volume = read_volume(folder)
    assert volume.instance_numbers == (6, 5, 4, 3, 2, 1)  # in ITK's order, rising z
    den = Denoiser.load(str(identity_model_path), device="cpu")
    denoise_file(folder, tmp_path / "whole", den)
    assert numbers(tmp_path / "whole") == scan
    denoise_file(folder, tmp_path / "part", den, slices=(1, 3))  # axial slices 1, 2: z = -8, -6
    assert numbers(tmp_path / "part") == {-8.0: 5, -6.0: 4}
    assert write_volume(volume.with_array(volume.array), tmp_path / "again").is_dir()
    assert numbers(tmp_path / "again") == scan
    # numbers that do not tell the slices apart (every one 1, as some exports write) are not kept:
    # the output is numbered 1..n along the scan
    ones = write_dicom_series(tmp_path / "ones", synthetic_ct(6, 32), "1.2.3.78")
    for f in ones.iterdir():  # (the helper numbers each slice itself)
        image = sitk.ReadImage(str(f))
        image.SetMetaData("0020|0013", "1")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(f))
        writer.Execute(image)
    assert read_volume(ones).instance_numbers is None
    assert sorted(numbers(write_volume(read_volume(ones), tmp_path / "renumbered")).values()) == [1, 2, 3, 4, 5, 6]


def test_an_oblique_dicom_output_reads_back_in_place_with_slice_locations_along_its_normal(tmp_path):
    """Every DICOM output test had an axis-aligned direction: ImageOrientationPatient written from
    the direction's rows instead of its columns, or SliceLocation as z instead of the position
    along the slice normal, passed them all (an oblique series then read back up to 5,000 HU off)."""
    a, b = np.radians(20), np.radians(-12)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    direction = tuple((rz @ rx).ravel())
    volume = read_volume(write_image(tmp_path / "oblique.nrrd", synthetic_ct(4, 32), spacing=(0.7, 0.8, 2.5),
                                     origin=(-10.0, 20.0, 30.0), direction=direction))
    back = read_volume(write_volume(volume, tmp_path / "dcm"))
    np.testing.assert_allclose(back.direction, direction, atol=1e-5)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-4)
    np.testing.assert_array_equal(back.array, volume.array)
    normal = (rz @ rx)[:, 2]
    reader = sitk.ImageFileReader()
    for f in (tmp_path / "dcm").iterdir():
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        assert float(reader.GetMetaData("0020|1041")) == pytest.approx(float(np.dot(position, normal)), abs=1e-4)
        assert reader.GetMetaData("0008|0008").strip() == "DERIVED\\SECONDARY\\AXIAL"  # 20 degrees off: axial
    # the image type's AXIAL: slices whose normal runs head-foot, either way; not a sagittal stack
    for name, turned, axial in (("feet", (1, 0, 0, 0, -1, 0, 0, 0, -1), True),
                                ("side", (0, 0, 1, 1, 0, 0, 0, 1, 0), False)):
        again = volume.with_array(volume.array)
        again.direction = turned
        folder = write_volume(again, tmp_path / name)
        reader.SetFileName(str(next(folder.iterdir())))
        reader.ReadImageInformation()
        assert reader.GetMetaData("0008|0008").strip().endswith("AXIAL") == axial, name


def test_the_grid_tolerances_tell_a_shift_from_an_export_rounding(tmp_path):
    """How far apart two grids may lie and still be one scan's: loosened tenfold, each went
    through every test (a sub-voxel shift scored by compare as the same places, a pair 5 mm apart
    trained on as one scan, slices 10 % unevenly spaced written to a one-spacing file)."""
    from CoreDiffLib.dicom import off_grid_slices
    from CoreDiffLib.io import on_grid_of, voxel_grid_difference
    volume = read_volume(write_image(tmp_path / "v.nrrd", synthetic_ct(3, 16), spacing=(0.7, 0.7, 2.0)))

    def moved(mm):
        other = volume.with_array(volume.array)
        other.origin = tuple(np.add(volume.origin, (mm, 0.0, 0.0)))
        return other
    assert on_grid_of(volume, moved(0.0005)) is not None  # rounding in an export: the same voxels
    assert on_grid_of(volume, moved(0.05)) is None  # a twentieth of a millimetre: other places
    assert voxel_grid_difference(volume, moved(0.3)) is None
    assert voxel_grid_difference(volume, moved(1.0)) == "place"
    axial = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    even = [(0.0, 0.0, 2.0 * k) for k in range(5)]
    assert off_grid_slices(even, axial) is None
    assert off_grid_slices([(0.0, 0.0, z + (0.01 if k == 2 else 0.0)) for k, (_, _, z) in enumerate(even)],
                           axial) is None  # 0.5 % off: within what a grid holds
    uneven = off_grid_slices([(0.0, 0.0, z + (0.06 if k == 2 else 0.0)) for k, (_, _, z) in enumerate(even)], axial)
    assert uneven is not None and "not evenly spaced" in uneven  # 3 % off


@pytest.mark.parametrize("name, handed", [("slice.nii", 1.0), ("slice.nii.gz", 1.0), ("slice.nii", -1.0)])
def test_a_2d_nifti_slice_is_denoised_where_it_lies(tmp_path, name, handed, identity_model_path):
    """SimpleITK reads a 2-D NIfTI file as a 2-D image, with the in-plane part of its placement
    only: the denoised slice was written at z = 0, not where the slice lies (here 50 mm below, in a
    scan turned 30 degrees about the head-foot axis)."""
    import gzip
    import struct
    from CoreDiffLib.inference import Denoiser, denoise_file
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, handed)  # -1: a left-handed grid (qfac -1 in its qform)
    image = sitk.GetImageFromArray(synthetic_ct(1, 32).astype(np.int16))
    image.SetOrigin((-10.0, 20.0, -50.0))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / "one.nii"))
    head = bytearray((tmp_path / "one.nii").read_bytes())
    head[40:42] = struct.pack("<h", 2)  # the same file, as a 2-D one (its sform and qform kept)
    (tmp_path / name).write_bytes(gzip.compress(bytes(head)) if name.endswith(".gz") else bytes(head))
    assert sitk.ReadImage(str(tmp_path / name)).GetDimension() == 2
    for source in ("sform", "qform"):
        if source == "qform":  # qform only
            data = bytearray(head)
            data[254:256] = struct.pack("<h", 0)
            (tmp_path / name).write_bytes(gzip.compress(bytes(data)) if name.endswith(".gz") else bytes(data))
        volume = read_volume(tmp_path / name)
        assert volume.shape == (1, 32, 32)
        np.testing.assert_allclose(volume.origin, (-10.0, 20.0, -50.0), atol=1e-4)
        np.testing.assert_allclose(volume.direction, direction, atol=1e-5)
        np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5), atol=1e-5)
    out = denoise_file(tmp_path / name, tmp_path / "den.nrrd", Denoiser.load(str(identity_model_path), device="cpu"))[0]
    np.testing.assert_allclose(read_volume(out).origin, (-10.0, 20.0, -50.0), atol=1e-4)


def test_a_nifti_whose_sform_holds_a_shear_is_read_by_its_qform_and_said_so(tmp_path, identity_model_path, capfd):
    """A tilt kept as a shear in the sform: ITK places the volume by its qform and printed four
    lines of "unexpected scales in sform" to stderr, while CoreDiff said nothing."""
    import struct
    from CoreDiffLib.inference import Denoiser, denoise_file
    image = sitk.GetImageFromArray(synthetic_ct(3, 32).astype(np.int16))
    image.SetOrigin((-10.0, 20.0, -50.0))
    image.SetSpacing((0.7, 0.8, 2.5))
    sitk.WriteImage(image, str(tmp_path / "plain.nii"))
    data = bytearray((tmp_path / "plain.nii").read_bytes())
    assert struct.unpack("<2h", data[252:256]) == (1, 1)  # qform and sform both set
    srow_y = list(struct.unpack("<4f", data[296:312]))
    srow_y[2] = 0.6  # each slice 0.6 mm further along y: a gantry tilt of 13.5 degrees
    data[296:312] = struct.pack("<4f", *srow_y)
    (tmp_path / "tilted.nii").write_bytes(bytes(data))
    capfd.readouterr()
    lines = []
    volume = read_volume(tmp_path / "tilted.nii", log=lines.append)
    np.testing.assert_allclose(volume.origin, (-10.0, 20.0, -50.0), atol=1e-4)  # the qform's place
    np.testing.assert_allclose(volume.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1), atol=1e-6)
    assert len(lines) == 1 and "tilted.nii's sform holds a shear" in lines[0] and "placed by its qform" in lines[0]
    denoise_file(tmp_path / "tilted.nii", tmp_path / "den.nii", Denoiser.load(str(identity_model_path), device="cpu"),
                 log=lines.append)
    assert sum("sform holds a shear" in line for line in lines) == 2
    assert "sform" not in capfd.readouterr().err  # ITK's own lines are not shown
    said = len(lines)
    read_volume(tmp_path / "plain.nii", log=lines.append)  # no shear: nothing to say
    assert lines[said:] == []
    data[40:42] = struct.pack("<h", 2)  # one slice of it, as a 2-D file: placed by the qform as well
    (tmp_path / "tilted_slice.nii").write_bytes(bytes(data[:352 + 32 * 32 * 2]))
    np.testing.assert_allclose(read_volume(tmp_path / "tilted_slice.nii").direction, (1, 0, 0, 0, 1, 0, 0, 0, 1),
                               atol=1e-6)

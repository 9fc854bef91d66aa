"""Reading and writing CT volumes (NRRD, NIfTI, MHA/MHD, DICOM series) with SimpleITK.

Arrays are (slices, rows, cols) float32 in HU — the same (K, J, I) order as Slicer's
``arrayFromVolume`` — and carry their geometry (spacing, origin, direction) so nothing is
lost on the way back. Outputs are written atomically: a temporary sibling, then a rename,
so a crash or a cancel never leaves a half-written file, and the input is never touched.

Sections: the :class:`Volume` and its geometry (axial view, grids, slices, whether two volumes
share voxels), output paths and their checks, reading, and writing (files, DICOM series). Training
data (NDCT/LDCT pairs, dose tags in file names) is :mod:`CoreDiffLib.pairs`.
"""
from __future__ import annotations

import datetime as _dt
import errno
import gzip
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import CoreDiffError
from .atomic import (OutputAppeared, atomic_path, check_output_place, deferred_interrupts, folder_lock, partial_folder,
                     publish)
from .dicom import (check_series_input, choose_dicom_series, find_dicom_series, itk_warnings_off, median_slice_gap,
                    off_grid_slices, series_slices)
from .intensity import PADDING_THRESHOLD_HU, validate_ct_array  # noqa: F401  (re-exported)
from .orientation import axial_layout, axial_spacing, slice_at
from .streaming import DETACHED_SUFFIXES, VolumeSource, detached_data_file

FILE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: DICOM tags copied from the source series to a denoised series (patient / study level).
_COPIED_TAGS = (
    "0010|0010", "0010|0020", "0010|0030", "0010|0040", "0010|1010",  # patient
    "0020|000d", "0008|0020", "0008|0030", "0008|0050", "0008|0090", "0020|0010",  # study
    "0008|1030", "0008|0070", "0008|1090", "0018|0050", "0018|0060", "0018|1150", "0018|1151",
    "0018|1210", "0020|0052", "0020|1040", "0008|0080",
    "0028|1050", "0028|1051", "0028|1055",  # the scanner's window presets: the same anatomy, the same HU
    "0018|5100", "0018|0015", "0020|0012",  # patient position (type 2C for CT), body part, acquisition
)


@dataclass
class Volume:
    """A CT volume in HU with its physical geometry (ITK/LPS conventions)."""

    array: np.ndarray                       # (slices, rows, cols) float32 HU
    spacing: tuple[float, float, float]     # (x, y, z) mm
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    pixel_type: str = "float32"             # numpy dtype of the stored pixels, for writing back
    dicom_tags: dict[str, str] = field(default_factory=dict)  # first slice's tags (DICOM input)
    source: str = ""
    #: each slice's ImagePositionPatient when a DICOM series' slices are off a regular grid (a
    #: missing slice, a gantry tilt): the grid misplaces them, so a DICOM output writes these instead
    slice_positions: tuple[tuple[float, float, float], ...] | None = None
    #: each slice's InstanceNumber in the DICOM series it was read from: scanners number head to
    #: foot, ITK orders the slices by rising position, so a DICOM output numbered in array order
    #: gave "image 3" of the two series different places
    instance_numbers: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def axial_slice_mm(self) -> float:
        """The distance (mm) between adjacent axial slices, which decides the neighbour context:
        :func:`slice_spacing_mm` for this volume, however it is stored."""
        return slice_spacing_mm(self.spacing, self.direction, axial_layout(self.direction, self.shape),
                                self.slice_positions)

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry and tags, new voxels (used for outputs)."""
        return Volume(np.asarray(array, dtype=np.float32), self.spacing, self.origin, self.direction,
                      self.pixel_type, dict(self.dicom_tags), self.source, self.slice_positions,
                      self.instance_numbers)


def axial_volume(volume: Volume) -> Volume:
    """The volume with its axial planes along array axis 0, and the geometry that says so.

    A series stored sagittally or coronally (:func:`~CoreDiffLib.orientation.axial_layout`) is
    transposed (a view, no copy); its spacing, direction columns and origin follow, so every
    voxel keeps its place in the scanner's frame. Axial volumes come back as they are, in the
    in-plane layout they were stored in (:func:`CoreDiffLib.inference.axial_view` gives the planes
    in the LPS layout the network runs them in).
    """
    layout = axial_layout(volume.direction, volume.shape)
    if layout is None:
        return volume
    d = np.reshape(np.asarray(volume.direction, dtype=np.float64), (3, 3))
    origin = np.asarray(volume.origin, dtype=np.float64)
    columns, spacing = [], []
    for c in range(3):  # the new ITK index axis c is the new array axis 2 - c
        a = 2 - c
        old_c = 2 - layout.perm[a]
        column = d[:, old_c].copy()
        if a in layout.flips:  # index 0 is now the old last voxel along that axis
            origin = origin + (volume.shape[layout.perm[a]] - 1) * float(volume.spacing[old_c]) * column
            column = -column
        columns.append(column)
        spacing.append(float(volume.spacing[old_c]))
    direction = tuple(float(v) for v in np.stack(columns, axis=1).ravel())
    return Volume(layout.to_axial(volume.array), tuple(spacing), tuple(float(o) for o in origin), direction,
                  volume.pixel_type, dict(volume.dicom_tags), volume.source, None)


def slice_spacing_mm(spacing, direction, layout, slice_positions=None) -> float:
    """The distance (mm) between a volume's adjacent axial slices (``layout``: its
    :func:`~CoreDiffLib.orientation.axial_layout`), which decides the neighbour context
    (``denoise``, ``oneshot``, and what ``train`` records): for a DICOM series with a gap, its
    usual spacing (the median), not ITK's mean, which one missing slice inflates."""
    if layout is None and slice_positions is not None:
        return median_slice_gap(slice_positions, direction)
    return axial_spacing(spacing, layout)[2]


def slice_of(volume: Volume, one: Volume, tolerance_mm: float = 0.5) -> int | None:
    """Which slice of ``volume`` the one-slice ``one`` is (a paired one-shot reference given
    alone), or None: the same in-plane grid and direction, and a position within
    ``tolerance_mm`` of that slice's, as loose as :func:`voxel_grid_difference` is for a whole
    pair (exports round positions differently; a slice's thickness is not compared)."""
    in_plane = [np.reshape(np.asarray(v.direction, dtype=np.float64), (3, 3))[:, :2] for v in (volume, one)]
    if one.shape[0] != 1 or one.shape[1:] != volume.shape[1:] \
            or not np.allclose(one.spacing[:2], volume.spacing[:2], rtol=1e-3) \
            or not np.allclose(*in_plane, atol=1e-3):  # a single slice's normal may point either way
        return None
    d = np.reshape(np.asarray(volume.direction, dtype=np.float64), (3, 3))
    origin = np.asarray(volume.origin, dtype=np.float64)
    positions = (np.asarray(volume.slice_positions, dtype=np.float64) if volume.slice_positions is not None
                 else origin + np.outer(np.arange(volume.shape[0]) * float(volume.spacing[2]), d[:, 2]))
    return slice_at(positions, one.origin, tolerance_mm)


def on_grid_of(other: Volume, target: Volume, tolerance_mm: float = 1e-3) -> tuple[np.ndarray, int | None] | None:
    """``other``'s voxels at ``target``'s voxel positions, and the number of ``other``'s slice that
    ``target``'s first one is (None when their slices run in another order), when every voxel of
    ``target`` is a voxel of ``other``: the same scan stored in another order or orientation, or
    ``target`` a part of it (``denoise --slices``). A single slice's spacing along its normal is
    its thickness, which two files of one slice may record differently: it is not compared.
    None when the grids do not coincide (another spacing, a shift, a rotation): then the metrics
    would compare different places, and nothing is resampled to hide it."""
    dt = np.reshape(np.asarray(target.direction, dtype=np.float64), (3, 3))
    do = np.reshape(np.asarray(other.direction, dtype=np.float64), (3, 3))
    so, st = np.asarray(other.spacing, dtype=np.float64), np.asarray(target.spacing, dtype=np.float64).copy()
    to_other = np.linalg.inv(do @ np.diag(so))  # a point in mm -> other's continuous index
    for c in range(3):  # a single slice has no spacing along its normal: a thickness, not a step
        step = to_other @ dt[:, c]
        if target.shape[2 - c] == 1 and np.abs(step).max() > 0:
            st[c] = 1.0 / float(np.abs(step).max())
    a = to_other @ dt @ np.diag(st)             # target index -> other index (linear part)
    b = to_other @ (np.asarray(target.origin, dtype=np.float64) - np.asarray(other.origin, dtype=np.float64))
    signs = np.rint(a)
    if not np.allclose(a, signs, atol=1e-4) or not (np.abs(signs).sum(axis=0) == 1).all() \
            or not (np.abs(signs).sum(axis=1) == 1).all():
        return None
    if (np.abs(b - np.rint(b)) * so > tolerance_mm).any():
        return None
    cut, flips, order = [slice(None)] * 3, [], [0, 0, 0]
    for c in range(3):  # target index axis c is other's index axis m, forwards or backwards
        m = int(np.argmax(np.abs(signs[:, c])))
        n, start = target.shape[2 - c], int(np.rint(b[m]))
        low = start if signs[m, c] > 0 else start - (n - 1)
        if low < 0 or low + n > other.shape[2 - m]:
            return None
        cut[2 - m] = slice(low, low + n)
        if signs[m, c] < 0:
            flips.append(2 - m)
        order[2 - c] = 2 - m
    array = other.array[tuple(cut)]
    array = np.transpose(np.flip(array, flips) if flips else array, order)
    first = cut[0].start if order[0] == 0 and 0 not in flips else None  # None: not the same slice order
    return array, first


def voxel_grid_difference(a: Volume, b: Volume) -> str | None:
    """What keeps two volumes from being scans of the same voxels (a training or one-shot pair):
    "shape", "spacing" or "place" (origin or direction), or None when nothing does."""
    if a.shape != b.shape:
        return "shape"
    if not np.allclose(a.spacing, b.spacing, rtol=1e-3):
        return "spacing"
    if not (np.allclose(a.origin, b.origin, atol=0.5) and np.allclose(a.direction, b.direction, atol=1e-3)):
        return "place"
    return None


# ----------------------------------------------------------------------------- paths
def is_file_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(FILE_SUFFIXES)


def output_data_file(output: Path) -> Path | None:
    """The data file :func:`write_volume` writes beside a .mhd / .nhdr header (compressed)."""
    name = output.name
    if name.lower().endswith(".mhd"):
        return output.with_name(name[:-4] + ".zraw")
    if name.lower().endswith(".nhdr"):
        return output.with_name(name[:-5] + ".raw.gz")
    return None


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike) -> None:
    """Refuse, before any work, outputs that would overwrite or live inside the input (a
    detached header's data file included), have an unknown type, or could not be written."""
    given = Path(output_path).expanduser()
    out = given.resolve()
    if input_path is not None:
        src = Path(input_path).expanduser().resolve()
        if out == src:
            raise CoreDiffError(f"output {output_path} is the input: choose a different output path "
                                "(the input is never overwritten)")
        if src.is_dir() and src in out.parents:
            raise CoreDiffError(f"output {output_path} is inside the input DICOM folder: write it elsewhere")
        src_data = detached_data_file(src)
        data = output_data_file(out)
        if data is not None and data.resolve() in {p.resolve() for p in (src, src_data) if p is not None}:
            raise CoreDiffError(f"output {output_path} would write its data to {data.name}, which the input uses: "
                                "choose another output name (the input is never overwritten)")
    for suffix in FILE_SUFFIXES:
        if given.name.lower().endswith(suffix) and not given.name.endswith(suffix):
            raise CoreDiffError(f"output {output_path}: write the extension as {suffix}, in lower case: "
                                "SimpleITK, and so other tools, read only that")
    if is_file_path(out) and out.is_dir():
        raise CoreDiffError(f"output {output_path} is a folder: give a file name (or a new folder name "
                            "without extension for a DICOM series)")
    if not is_file_path(out):
        # an extension (.png, .dcm, .vtk...) names a file type we do not write; a dot inside a
        # folder name ('Abd_1.0_B30f denoised', an existing empty folder) is a DICOM series' folder
        if re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,4}", out.suffix) and not out.is_dir():
            raise CoreDiffError(f"unknown output type '{out.suffix}': use .nrrd, .nii.gz, .mha or a "
                                "folder name for a DICOM series (a name with a dot: make the empty folder first)")
        if given.is_symlink():  # the series is moved into place by renaming a folder onto it
            raise CoreDiffError(f"output folder {output_path} is a symbolic link: give a new folder's own path "
                                "for the DICOM series")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CoreDiffError(f"output folder {output_path} exists and is not empty: "
                                "choose a new folder for the DICOM series")
    # ITK reads X.nii when asked for X.nii.gz: either of the two beside the other hides it
    shadow, hidden = None, None
    if out.name.endswith(".nii.gz"):
        shadow, hidden = out.with_name(out.name[:-3]), out
    elif out.name.endswith(".nii"):
        shadow, hidden = out, out.with_name(out.name + ".gz")
    twin = hidden if shadow == out else shadow
    if twin is not None and twin.exists():
        is_input = input_path is not None and twin == Path(input_path).expanduser().resolve()
        raise CoreDiffError(f"{'the input ' if is_input else ''}{twin.name} lies beside output {output_path}: "
                            f"ITK (and so Slicer) reads {shadow.name} when asked for {hidden.name}; "
                            + ("choose another output name" if is_input else "move it or choose another name"))
    check_output_place(out, f"output {output_path}")


#: NIfTI-1, which SimpleITK writes, stores each dimension as a signed 16-bit number
NIFTI_MOST_VOXELS_PER_AXIS = 32767


def check_output_dimensions(output_path: str | os.PathLike, shape: tuple[int, ...]) -> None:
    """Refuse, before any work, a volume the output's format cannot hold (found otherwise when the
    result is written, at the end of the run)."""
    name = Path(output_path).name
    if name.lower().endswith((".nii", ".nii.gz")) and max(shape) > NIFTI_MOST_VOXELS_PER_AXIS:
        raise CoreDiffError(f"{name}: NIfTI holds at most {NIFTI_MOST_VOXELS_PER_AXIS} voxels along an axis and "
                            f"this volume has {max(shape)}: write .nrrd or .mha instead")


# ----------------------------------------------------------------------------- reading
def check_grid_output(positions, direction, output_path: str | os.PathLike, source: str) -> None:
    """Refuse a volume file (one slice spacing, no shear) for slices off such a grid: it would
    misplace them silently. A DICOM folder keeps each slice's position."""
    off_grid = off_grid_slices(positions, direction)
    if off_grid is not None and is_file_path(output_path):
        raise CoreDiffError(f"{source}: {off_grid}; a volume file ({Path(output_path).name}) has one slice spacing "
                            "and would misplace them: write a DICOM folder (an output name without extension), "
                            "which keeps each slice's position")


def _read_dicom_series(folder: Path, series: str | None = None, log=None
                       ) -> tuple[sitk.Image, dict[str, str], tuple[tuple[float, float, float], ...] | None,
                                  tuple[int, ...] | None]:
    """The series' image in HU, its first slice's tags, each slice's position when they lie off a
    regular grid (else None), and each slice's InstanceNumber when every slice has its own."""
    found = find_dicom_series(folder)
    if not found:
        raise CoreDiffError(f"{folder} holds no DICOM series: point to a folder of .dcm slices "
                            "or to a .nrrd/.nii.gz/.mha file")
    chosen, note = choose_dicom_series(found, series, str(folder))
    if note and log:
        log(note)
    files, left_out = series_slices(chosen)
    for line in left_out:
        if log:
            log(f"{folder}: {line}")
    if len(files) == 1:  # one file: a single slice, or an enhanced CT holding every frame
        image, tags = _read_dicom_file(Path(files[0]))
        return image, tags, None, None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    with itk_warnings_off():  # ITK's "non uniform sampling" warning: said below, with what follows
        image = reader.Execute()  # applies RescaleSlope / RescaleIntercept -> HU
    tags = {k: reader.GetMetaData(0, k) for k in reader.GetMetaDataKeys(0)}
    _check_ct_tags(tags, folder)
    rescales = {tuple(reader.GetMetaData(k, t).strip() if reader.HasMetaDataKey(k, t) else ""
                      for t in ("0028|1053", "0028|1052")) for k in range(image.GetDepth())}
    if len(rescales) > 1 and "float" not in image.GetPixelIDTypeAsString() and not all(
            _is_whole(v) for pair in rescales for v in pair):
        # ITK takes the pixel type from the first slice: a later slice's fractional slope would be
        # rounded away; each slice's own rescale holds in floating point
        reader.SetOutputPixelType(sitk.sitkFloat32)
        with itk_warnings_off():
            image = reader.Execute()
    try:
        positions = tuple(tuple(float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\"))
                          for k in range(image.GetDepth()))
    except (RuntimeError, ValueError):  # a slice without a readable ImagePositionPatient
        positions = None
    numbers = _instance_numbers(reader, image.GetDepth())
    off_grid = off_grid_slices(positions, image.GetDirection())
    if off_grid is None:
        return image, tags, None, numbers
    if log:
        log(f"{folder}: {off_grid}; each slice is read at its own position")  # compare, dose, oneshot too
    return image, tags, positions, numbers


def _instance_numbers(reader: sitk.ImageSeriesReader, depth: int) -> tuple[int, ...] | None:
    """Each slice's InstanceNumber, in the reader's (position) order; None unless every slice has
    one of its own."""
    try:
        numbers = tuple(int(reader.GetMetaData(k, "0020|0013").strip()) for k in range(depth))
    except (RuntimeError, ValueError):  # missing, or not a whole number
        return None
    return numbers if len(set(numbers)) == depth and min(numbers) >= 0 else None


def _is_whole(text: str) -> bool:
    """A DICOM decimal string (or an absent one) that holds a whole number."""
    try:
        return not text or float(text).is_integer()
    except ValueError:
        return False


def _stated_values(head: bytes, tag: bytes) -> list[list[float]]:
    """Every value of a decimal-string tag (e.g. b"\\x28\\x00\\x30\\x00" for PixelSpacing) in a
    DICOM header's raw bytes, in either little-endian VR form (explicit 'DS' or implicit)."""
    found = []
    for m in re.finditer(re.escape(tag) + rb"(?:DS(..)|(....))", head, re.S):
        size = int.from_bytes(m.group(1) or m.group(2), "little")
        try:
            found.append([float(v) for v in head[m.end():m.end() + size].decode("ascii").strip("\x00 ").split("\\")])
        except (UnicodeDecodeError, ValueError):
            continue
    return found


def _header_bytes(path: Path) -> bytes:
    """A DICOM file's bytes up to its image's pixel data (an icon's comes earlier)."""
    with open(path, "rb") as f:
        head = f.read(1 << 24)
    end = head.rfind(b"\xe0\x7f\x10\x00")
    return head[:end] if end > 0 else head


def _uneven_frame_rescale(head: bytes) -> bool:
    """Whether a multi-frame file's frames state different rescale intercepts or slopes
    (per-frame Pixel Value Transformation): GDCM applies the first frame's to all of them."""
    intercepts = {v[0] for v in _stated_values(head, b"\x28\x00\x52\x10") if len(v) == 1}
    slopes = {v[0] for v in _stated_values(head, b"\x28\x00\x53\x10") if len(v) == 1}
    return len(intercepts) > 1 or len(slopes) > 1


def _gdcm_fallback(head: bytes, image: sitk.Image, frames: int) -> bool:
    """Whether GDCM gave up on a multi-frame (enhanced) file's geometry: it then returns 1 mm voxels
    in file order when the frames are missing, uneven or out of order. A 1 mm (1, 1, 1) result is
    believed only when the header (read as raw bytes: SimpleITK does not expose the functional
    groups) states 1 mm pixels and one position per frame, in order, 1 mm apart. ``head``: the
    file's header bytes (:func:`_header_bytes`)."""
    if image.GetSpacing() != (1.0, 1.0, 1.0):
        return False
    spacing = [v for v in _stated_values(head, b"\x28\x00\x30\x00") if len(v) == 2]
    positions = np.array([v for v in _stated_values(head, b"\x20\x00\x32\x00") if len(v) == 3])
    if not spacing or not np.allclose(spacing[-1], 1.0) or len(positions) != frames:
        return True
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    return not np.allclose(steps, 1.0, atol=1e-3) or not np.allclose(np.diff(positions, axis=0),
                                                                     positions[1] - positions[0], atol=1e-3)


def _check_ct_tags(tags: dict[str, str], source) -> None:
    """Refuse DICOM that is not CT, or whose grey levels run backwards (MONOCHROME1): ITK inverts
    those, which turns HU into nonsense, and CT is stored as MONOCHROME2 in practice."""
    modality = tags.get("0008|0060", "CT").strip()
    if modality and modality != "CT":
        raise CoreDiffError(f"{source} is a {modality} series, not CT: CoreDiff denoises CT in HU only")
    if tags.get("0028|0004", "").strip().upper() == "MONOCHROME1":
        raise CoreDiffError(f"{source} is stored as MONOCHROME1 (inverted grey levels), which gives no HU "
                            "here: export it as MONOCHROME2, as CT normally is")


def _read_dicom_file(path: Path) -> tuple[sitk.Image, dict[str, str]]:
    """One DICOM file (a single slice, or a multi-frame image) with its tags, as a series gets them."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOn()
    image = reader.Execute()
    tags = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    _check_ct_tags(tags, path)
    frames = tags.get("0028|0008", "1").strip()
    if not frames.isdigit() or int(frames) < 2:
        return image, tags
    fault, head = None, _header_bytes(path)
    if _gdcm_fallback(head, image, int(frames)):
        fault = ("whose frame geometry GDCM could not read (frames missing, unevenly spaced or out of "
                 "order?): it reads as 1 mm voxels in file order")
    elif _uneven_frame_rescale(head):
        fault = ("whose frames have different rescale slopes or intercepts: GDCM reads every frame with "
                 "the first one's, which gives wrong HU")
    if fault:
        raise CoreDiffError(f"{path}: a multi-frame (enhanced) CT {fault}. Convert it to a classic "
                            "one-file-per-slice series (e.g. dcm2niix, or your PACS's 'legacy' export) "
                            "and denoise that")
    return image, tags


def read_volume(path: str | os.PathLike, series: str | None = None,
                log: Callable[[str], None] | None = None) -> Volume:
    """Read a CT volume in HU. Raises :class:`CoreDiffError` with an actionable message.

    A DICOM folder may hold several series (:func:`choose_dicom_series`): ``series`` picks
    one; ``log`` hears which was chosen among others."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CoreDiffError(f"input {path} does not exist")
    check_series_input(p, series)
    try:
        if p.is_dir():
            image, tags, positions, numbers = _read_dicom_series(p, series, log)
        else:
            if not is_file_path(p) and p.suffix.lower() != ".dcm":
                raise CoreDiffError(f"unsupported input type '{p.suffix}': use .nrrd, .nii(.gz), .mha, "
                                    "or a DICOM folder")
            if p.suffix.lower() == ".dcm":  # its patient and study tags travel to a DICOM output
                image, tags = _read_dicom_file(p)
                positions = numbers = None
            else:
                shear = nifti_shear_warning(p)
                if shear and log:
                    log(shear)
                if p.name.lower().endswith((".nii", ".nii.gz", ".mha", ".mhd")):
                    # the streamed reader's checks refuse truncated data, which SimpleITK reads as
                    # zeros (NIfTI) or fails on halfway through; what it opened (a compressed file
                    # already inflated) is read from it rather than inflated a second time
                    source = VolumeSource.open(p)
                    if source is not None:
                        with source:
                            array = source[0:len(source)]
                        return _checked_volume(array, source.info["spacing"], source.info["origin"],
                                               source.info["direction"], {}, str(p), None)
                with itk_warnings_off():
                    image, tags, positions, numbers = sitk.ReadImage(str(p)), {}, None, None
    except RuntimeError as exc:  # SimpleITK's reader errors
        raise CoreDiffError(_reader_failure(path, str(exc))) from None

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CoreDiffError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                            "(colour or vector image): CoreDiff needs a scalar CT volume in HU")
    if image.GetDimension() not in (2, 3):
        raise CoreDiffError(f"{path} is {image.GetDimension()}-D: give one 3-D CT volume "
                            "(split time series into separate volumes)")
    if image.GetDimension() == 2:
        placement = _nifti_placement(p) if p.name.lower().endswith((".nii", ".nii.gz")) else None
        spacing_xy = image.GetSpacing()
        image = sitk.JoinSeries(image)
        if placement is not None:  # ITK drops a 2-D NIfTI slice's place in the scanner (its z, its tilt)
            origin, direction, slice_mm = placement
            image.SetOrigin(origin)
            image.SetDirection(direction)
            image.SetSpacing((*spacing_xy, slice_mm))
    grid = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    voxels = sitk.GetArrayFromImage(image)
    del image  # before the float32 copy: two copies of a long series at a time, not three (a DICOM one
    # is read whole, as int32 when rescaled)
    return _checked_volume(voxels, *grid, tags, str(p), positions, numbers)


def _nifti_affines(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A NIfTI-1 file's sform and qform (3 x 4, voxel index -> mm in NIfTI's RAS), each None where
    its code says unset (or the file is no NIfTI-1: NIfTI-2 files are 3-D in practice)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(348)
    except OSError:
        return None, None
    order = next((o for o in "<>" if len(head) == 348 and struct.unpack(o + "i", head[:4])[0] == 348), None)
    if order is None:
        return None, None
    pixdim = struct.unpack(order + "8f", head[76:108])
    qform_code, sform_code = struct.unpack(order + "2h", head[252:256])
    sform = (np.array(struct.unpack(order + "12f", head[280:328]), dtype=np.float64).reshape(3, 4)
             if sform_code > 0 else None)
    qform = None
    if qform_code > 0:
        b, c, d = struct.unpack(order + "3f", head[256:268])
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                             [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                             [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
        rotation[:, 2] *= -1.0 if pixdim[0] < 0 else 1.0  # qfac
        offset = np.array(struct.unpack(order + "3f", head[268:280]), dtype=np.float64)
        qform = np.hstack([rotation * np.abs(pixdim[1:4]), offset[:, None]])
    return sform, qform


def _sheared(affine: np.ndarray) -> bool:
    columns = affine[:, :3] / np.maximum(np.linalg.norm(affine[:, :3], axis=0), 1e-12)
    return not np.allclose(columns.T @ columns, np.eye(3), atol=1e-4)


def _nifti_placement(path: Path) -> tuple[tuple[float, ...], tuple[float, ...], float] | None:
    """(origin, direction, spacing along the normal), in ITK's LPS, of a NIfTI file's voxel grid,
    from its sform (when set and free of shear) or else its qform, as ITK chooses; None without
    either.

    For 2-D files: SimpleITK reads them as 2-D images, with the in-plane part of the placement
    only, and a denoised slice came out at z = 0 instead of where it lies."""
    sform, qform = _nifti_affines(path)
    affine = sform if sform is not None and not _sheared(sform) else qform
    if affine is None:
        return None
    affine = np.diag([-1.0, -1.0, 1.0]) @ affine  # RAS (NIfTI) -> LPS (ITK)
    lengths = np.linalg.norm(affine[:, :3], axis=0)
    if lengths[0] <= 0 or lengths[1] <= 0:
        return None
    direction = affine[:, :3] / np.where(lengths > 0, lengths, 1.0)
    if lengths[2] <= 0:  # a slice without a thickness along its normal: the normal is that of its plane
        direction[:, 2] = np.cross(direction[:, 0], direction[:, 1])
    return (tuple(float(v) for v in affine[:, 3]), tuple(float(v) for v in direction.ravel()),
            float(lengths[2]) if lengths[2] > 0 else 1.0)


def nifti_shear_warning(path: str | os.PathLike) -> str | None:
    """What is lost when a NIfTI file's sform holds a shear (a gantry tilt kept in the header):
    ITK cannot represent it and places the volume by its qform, without the tilt, and so every
    output made from it; ITK itself printed four lines of "unexpected scales in sform"."""
    p = Path(path)
    if not p.name.lower().endswith((".nii", ".nii.gz")) or not p.is_file():
        return None
    sform, _ = _nifti_affines(p)
    if sform is None or not _sheared(sform):
        return None
    return (f"warning: {p.name}'s sform holds a shear (slices shifted in-plane one from the next, as a gantry "
            "tilt is stored), which cannot be read here: it is placed by its qform, without the shear, and so is "
            "the output; resample it onto a regular grid first where the shear matters")


def _reader_failure(path, text: str) -> str:
    """SimpleITK's reader error in words: its NRRD reader says "fread got only 6094 2-sized things,
    not 9216" of a cut file, and every reader "Unable to determine ImageIO reader" of an empty one."""
    last = text.strip().splitlines()[-1] if text.strip() else "unreadable"
    short = re.search(r"fread got only .*\((\d+(?:\.\d+)?)% of expected\)|expected \d+ bytes but received \d+", last)
    if short:
        held = f": it holds {float(short.group(1)):.0f} % of the data its header describes" if short.group(1) else ""
        return f"{path} is truncated{held}: copy or export it again"
    if "Unable to determine ImageIO reader" in last:
        size = Path(path).expanduser().stat().st_size
        return (f"cannot read {path}: " + ("it is empty (0 bytes)" if size == 0 else
                f"no image reader recognises it ({size} bytes): is it really a {Path(path).suffix} file?"))
    return f"cannot read {path}: {last}"


def _checked_volume(array: np.ndarray, spacing, origin, direction, tags: dict[str, str], source: str,
                    positions, numbers: tuple[int, ...] | None = None) -> Volume:
    """The read voxels as float32 HU, refused unless they look like CT."""
    if array.ndim != 3:
        raise CoreDiffError(f"{source} has shape {array.shape}: expected (slices, rows, cols)")
    pixel_type = str(array.dtype)
    array = array.astype(np.float32, copy=False)
    layout = axial_layout(direction, array.shape)  # the planes CoreDiff works on must be big enough
    validate_ct_array(layout.to_axial(array) if layout is not None else array, source)
    return Volume(array, tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                  tuple(float(d) for d in direction), pixel_type, tags, source, positions, numbers)


# ----------------------------------------------------------------------------- writing
def _to_image(volume: Volume, array: np.ndarray, metadata: dict[str, str] | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in volume.direction))
    set_provenance(image, metadata)
    return image


def provenance_summary(metadata: dict[str, str], limit: int | None = None) -> str:
    """One line for the formats with a single free-text field (DICOM ImageComments; NIfTI descrip,
    ``limit`` 79 bytes): which model, how many steps, which adaptation, whether a second pass.
    Cut to ``limit``, it keeps whole parts, and a second pass is said in two words."""
    parts = [f"CoreDiff {metadata.get('corediff_model', '?')}", f"{metadata.get('corediff_steps', '?')} steps"]
    if metadata.get("corediff_adaptation"):
        parts.append(f"adaptation {metadata['corediff_adaptation']}")
    earlier = metadata.get("corediff_input_denoised_by")
    text = ", ".join(parts + ([f"on a CoreDiff output ({earlier})"] if earlier else []))
    if limit is None or len(text.encode("utf-8")) <= limit:
        return text
    parts = ["second pass"] + parts if earlier else parts  # what matters most first
    while len(parts) > 1 and len(", ".join(parts).encode("utf-8")) > limit:
        parts.pop()
    return ", ".join(parts).encode("utf-8")[:limit].decode("utf-8", "ignore")


def set_provenance(image: sitk.Image, metadata: dict[str, str] | None) -> None:
    """Record what made an image in its header: NRRD and MetaImage keep every key (read back
    with SimpleITK's GetMetaData), NIfTI the one-line summary in its descrip field."""
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, str(value))
    if metadata:
        image.SetMetaData("ITK_FileNotes", provenance_summary(metadata, limit=79))  # NIfTI's descrip: 79 bytes


def _cast_like_input(volume: Volume) -> np.ndarray:
    """Write in the input's pixel type when it can hold the values (rounded), else float32; a
    wider integer type narrowed to int16 when the values fit (DICOM's rescale makes int32 of
    int16 CT, which would double the file for nothing)."""
    arr = volume.array
    dtype = np.dtype(volume.pixel_type)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        rounded = np.rint(arr)
        low, high = rounded.min(), rounded.max()
        fits_int16 = low >= -32768 and high <= 32767
        if dtype.itemsize > 2 and fits_int16:
            return rounded.astype(np.int16)
        if low >= info.min and high <= info.max:
            return rounded.astype(dtype)
        if fits_int16:
            return rounded.astype(np.int16)
    return arr.astype(np.float32)


def write_volume(volume: Volume, path: str | os.PathLike, series_description: str | None = None,
                 metadata: dict[str, str] | None = None, first_slice: int = 0, replace: bool = True) -> Path:
    """Write atomically to a file (by extension) or a new DICOM series folder.

    ``metadata``: what made the volume (:meth:`inference.Denoiser.provenance`), kept in the
    header (:func:`set_provenance`; DICOM: ImageComments). ``first_slice``: where the volume's
    first slice lies in the scan it was cut from (a ``--slices`` part), so that its DICOM slices
    keep the scan's InstanceNumbers. ``replace`` False: a file that appeared at ``path`` while the
    volume was made is kept (:class:`atomic.OutputAppeared`); a DICOM folder must be new or empty
    either way."""
    out = Path(path).expanduser()
    check_grid_output(volume.slice_positions, volume.direction, out, volume.source or "the volume")
    if volume.slice_positions is not None and len(volume.slice_positions) != volume.shape[0]:
        raise CoreDiffError(f"{len(volume.slice_positions)} slice positions for {volume.shape[0]} slices: "
                            "a volume cut from a series off a regular grid needs its positions cut the same way")
    pixels = _cast_like_input(volume)
    if out.name.lower().endswith(DETACHED_SUFFIXES):
        return _write_detached(_to_image(volume, pixels, metadata), out, replace)
    if is_file_path(out):
        with atomic_path(out, replace) as tmp:
            write_image_file(_to_image(volume, pixels, metadata), tmp, out)
        return out
    with partial_folder(out) as tmpdir:
        model = (metadata or {}).get("corediff_model")  # in PACS lists, which model made the series
        _write_dicom_series(volume, pixels, tmpdir,
                            series_description or ("CoreDiff denoised" + (f" ({model})" if model else "")),
                            provenance_summary(metadata) if metadata else None, first_instance=first_slice + 1)
        try:
            if out.exists():
                out.rmdir()  # check_output_path guaranteed it was empty
            publish(tmpdir, out)  # moved whole, and recorded as complete (an interrupted command says so)
        except OSError as exc:  # filled meanwhile: another program, or a second run into the same folder
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise OutputAppeared(f"{out} was filled while this run worked (another program or run wrote it): kept "
                                 "it, and discarded this run's result") from None
    return out


def write_image_file(image: sitk.Image, path: Path, target: Path, compress: bool = True) -> None:
    """``sitk.WriteImage`` to ``path`` (a temporary name for ``target``), its failures as one
    line: a full disk raises ITK's RuntimeError from most writers, and none at all from the NIfTI
    writer, whose short file is caught here."""
    from .streaming import nifti_written_completely
    try:
        sitk.WriteImage(image, str(path), compress)
    except RuntimeError as exc:
        raise CoreDiffError(f"could not write {target}{writer_failure(exc, Path(target).parent)}") from None
    if not nifti_written_completely(path):
        raise CoreDiffError(f"could not write {target} completely{full_disk_hint(Path(target).parent)}")


def full_disk_hint(folder: Path) -> str:
    """': the disk is full' when ``folder`` has little room left (under 64 MB), else ''."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f": the disk is full ({free / 1e6:.1f} MB free)" if free < 64e6 else ""


def writer_failure(exc: RuntimeError, folder: Path) -> str:
    """An ITK writer's error as the end of a one-line message: a full disk (of ``folder``) said as
    such (GDCM then blames the pixel type), else the writer's own reason without ITK's
    'Class(0x...):' prefix."""
    hint = full_disk_hint(folder)
    if hint:
        return hint
    reason = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else "the writer failed"
    reason = re.sub(r"^ITK ERROR: [A-Za-z]+\(0x[0-9a-f]+\):\s*", "", reason)
    if "does not support this component type" in reason:  # GDCM's words for any failed write: the types
        # written here are ones DICOM takes, so it was the disk (a quota, a file size limit, an I/O error)
        return " (the file could not be written: a disk quota, a file size limit or an I/O error)"
    return f" ({reason})"


def _write_detached(image: sitk.Image, out: Path, replace: bool = True) -> Path:
    """.mhd / .nhdr: a header plus a data file the header names (v.zraw, v.raw.gz).

    Written under a temporary name, the header would point to a temporary data file name;
    so both are written with their final names in a hidden folder beside the target, and
    moved out data first, header last: no header ever points to missing or partial data.
    ``replace`` False: if either file appeared meanwhile, both are kept as they are, and nothing
    of this run's stays.
    """
    with partial_folder(out) as tmpdir:
        header = tmpdir / out.name
        write_image_file(image, header, out)
        placed: list[Path] = []
        # a replaced header must not be left beside the new data, nor another run's header beside this one's
        with deferred_interrupts(str(out)), folder_lock(out.parent):
            try:
                for data in tmpdir.iterdir():
                    if data != header:
                        publish(data, out.parent / data.name, replace)
                        placed.append(out.parent / data.name)
                publish(header, out, replace)
            except OutputAppeared:
                for path in placed:  # this run's own data file, without its header
                    path.unlink()
                raise
    return out


def _series_description(source: str, description: str) -> str:
    """'<source's description> - CoreDiff denoised (model)' within DICOM's 64 characters: the
    source's part is shortened, so that PACS lists still name the model; a source that is itself
    a CoreDiff output is named without its earlier suffix (the comments say it was one)."""
    source = re.sub(r"(?:^|\s*-\s*)CoreDiff denoised.*$", "", source).strip()
    if not source:
        return description[:64]
    room = 64 - len(description) - len(" - ")
    if room < 8:  # a description too long to share: it alone
        return description[:64]
    return f"{source[:room].rstrip()} - {description}"


def _dicom_stored_values(hu: np.ndarray) -> tuple[np.ndarray, int]:
    """16-bit stored values and the rescale intercept that gives them back in HU.

    Intercept 0 (stored = HU) when the values fit int16, as most CT does; a volume reaching
    below -32768 HU (padding of -32768 stored values under intercept -1024) or above 32767
    shifts the intercept so that nothing is clipped. A range wider than 16 bits hold, 65,536 HU,
    keeps its top: its bottom, padding, is clipped."""
    rounded = np.rint(hu)
    low, high = float(rounded.min()), float(rounded.max())
    if low >= -32768 and high <= 32767:
        return rounded.astype(np.int16), 0
    # the bottom when it fits, else the top: what is clipped then lies below, in the padding
    intercept = int(low) + 32768 if low < -32768 and high - low <= 65535 else int(high) - 32767
    stored = np.clip(rounded, intercept - 32768, intercept + 32767)
    return stored.astype(np.float32), intercept


def _write_dicom_series(volume: Volume, pixels: np.ndarray, folder: Path, description: str,
                        comments: str | None = None, first_instance: int = 1) -> None:
    """One file per slice; patient/study tags kept, a new series UID, DERIVED image type;
    ``comments`` (what made it) go to ImageComments. Slices keep the scan's InstanceNumbers
    (``volume.instance_numbers``), else are numbered from ``first_instance`` (a --slices part
    keeps its slices' numbers in the scan), and are located along the slice normal
    (SliceLocation, which viewers sort and label by)."""
    intercept = 0
    if pixels.dtype not in (np.int16, np.uint16):
        pixels, intercept = _dicom_stored_values(volume.array)
    image = _to_image(volume, pixels)
    src = volume.dicom_tags
    now = _dt.datetime.now()
    # a UUID-derived UID (PS3.5 B.2): at most 44 characters, so '.3.' and a slice number stay
    # within the 64 DICOM allows (a date, PID and random number went past it for big PIDs)
    series_uid = f"2.25.{uuid.uuid4().int}"
    charset = src.get("0008|0005", "").strip()
    source_desc = _dicom_text(src.get("0008|103e", ""), charset).strip()
    common = {k: _dicom_text(src[k], charset) for k in _COPIED_TAGS if k in src}
    # one branch per kind of UID under the series': a study or frame of reference made here may
    # not share a UID with a slice (series.1 was once both the study and slice 1)
    if "0020|000d" not in common:  # no source study: make one so viewers group it properly
        common["0020|000d"] = series_uid + ".1"
    if "0020|0052" not in common:  # Frame of Reference is mandatory for CT images (the source's otherwise)
        common["0020|0052"] = series_uid + ".2"
    common.update({
        "0008|0005": "ISO_IR 192",  # UTF-8: every copied text was decoded from the source's own set
        "0008|0060": "CT",
        "0008|0008": "DERIVED\\SECONDARY\\AXIAL" if _is_axial(volume.direction) else "DERIVED\\SECONDARY",
        "0020|000e": series_uid,
        "0008|103e": _series_description(source_desc, description),
        "0008|0021": f"{now:%Y%m%d}", "0008|0031": f"{now:%H%M%S}",
        "0020|0011": str(int(src.get("0020|0011", "0") or 0) + 1000),
        "0028|1052": str(intercept), "0028|1053": "1", "0028|1054": "HU",
        "0020|0037": "\\".join(f"{d:.6f}" for d in (*volume.direction[0::3], *volume.direction[1::3])),
        # SpacingBetweenSlices: readers take a one-slice series' spacing (a --slices K preview) from it
        "0018|0088": f"{float(volume.spacing[2]):.6g}",
    })
    common.setdefault("0018|0050", "")  # SliceThickness, type 2: unknown unless the source series says
    if intercept:  # GDCM stores (HU - intercept) as 16-bit signed when told the stored type
        common.update({"0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
    if comments:
        common["0020|4000"] = comments
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # a series with a gap: its usual spacing, not the mean that ITK gave the volume
    gap = median_slice_gap(volume.slice_positions, volume.direction)
    if gap:
        common["0018|0088"] = f"{gap:.6g}"
    normal = np.reshape(np.asarray(volume.direction, dtype=np.float64), (3, 3))[:, 2]
    numbers = volume.instance_numbers if volume.instance_numbers is not None \
        and len(volume.instance_numbers) == image.GetDepth() else None  # the scan's own, where known
    for k in range(image.GetDepth()):
        sl = image[:, :, k:k + 1]  # 3-D, one slice: ITK writes SpacingBetweenSlices from its spacing
        if gap:
            sl.SetSpacing((*sl.GetSpacing()[:2], gap))
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        pos = (volume.slice_positions[k] if volume.slice_positions is not None  # where the scanner put it
               else image.TransformIndexToPhysicalPoint((0, 0, k)))
        sl.SetMetaData("0020|0032", "\\".join(f"{p:.6f}" for p in pos))
        sl.SetMetaData("0020|1041", f"{float(np.dot(pos, normal)):.6f}")
        sl.SetMetaData("0020|0013", str(numbers[k] if numbers is not None else first_instance + k))
        sl.SetMetaData("0008|0018", f"{series_uid}.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice_{k + 1:04d}.dcm"))
        try:
            writer.Execute(sl)
        except RuntimeError as exc:  # a full disk (GDCM's reason: 'does not support this component type')
            raise CoreDiffError(f"could not write slice {k + 1} of the DICOM series"
                                f"{writer_failure(exc, folder)}") from None


#: Python codecs of the single-byte DICOM character sets (0008,0005); others are read leniently
_DICOM_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 101": "iso8859_2",
                 "ISO_IR 109": "iso8859_3", "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5",
                 "ISO_IR 127": "iso8859_6", "ISO_IR 126": "iso8859_7", "ISO_IR 138": "iso8859_8",
                 "ISO_IR 148": "iso8859_9", "ISO_IR 166": "tis_620", "ISO_IR 192": "utf-8", "GB18030": "gb18030",
                 "GBK": "gbk"}
# the same single-byte sets with code extensions (ISO 2022 IR nnn): one set per value in practice,
# its G1 designation escape (ESC - A for Latin-1...) carries no character of the name
_DICOM_CODECS.update({name.replace("ISO_IR", "ISO 2022 IR"): codec for name, codec in list(_DICOM_CODECS.items())
                      if name.startswith("ISO_IR") and name != "ISO_IR 192"})


def _is_axial(direction) -> bool:
    """Slices whose normal runs head-foot: DICOM's image type value 3 for CT says AXIAL."""
    normal = np.reshape(np.asarray(direction, dtype=np.float64), (3, 3))[:, 2]
    return bool(abs(normal[2]) > 0.9)


#: the code-extension character sets (ISO 2022 escapes) of Japanese names (Korean's, IR 149, is EUC-KR)
_DICOM_ISO2022 = ("ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 13")


def _dicom_text(value: str, charset: str) -> str:
    """A tag's text as real characters. SimpleITK hands over the file's bytes decoded as UTF-8
    with surrogate escapes, so a Latin-1 name (ISO_IR 100, 'Müller') arrives unwritable; the
    bytes are decoded with the series' own character set instead, and written back as UTF-8
    (the output declares ISO_IR 192)."""
    raw = value.encode("utf-8", "surrogateescape")
    sets = [c.strip().upper() for c in charset.split("\\")] if charset else []
    if "ISO 2022 IR 149" in sets:  # KS X 1001, designated once (ESC $ ) C), then in high bytes: EUC-KR
        return raw.replace(b"\x1b$)C", b"").decode("euc_kr", "replace")
    if any(c in _DICOM_ISO2022 for c in sets):  # Japanese: the whole value, escapes and all
        # half-width katakana (IR 13) are bare high bytes: give them the escape the codec knows
        raw = re.sub(rb"[\xa1-\xdf]+", lambda m: b"\x1b(I" + bytes(b - 0x80 for b in m.group()) + b"\x1b(B", raw)
        return raw.decode("iso2022_jp_2" if "ISO 2022 IR 159" in sets else "iso2022_jp_ext", "replace")
    codec = _DICOM_CODECS.get(sets[-1] if sets else "", "utf-8")
    if any(c.startswith("ISO 2022") for c in sets):
        raw = re.sub(rb"\x1b[-()*+.][A-Z@]", b"", raw)  # designation escapes: no characters of their own
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        return raw.decode(codec, "replace")

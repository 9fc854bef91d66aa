"""Which series of a DICOM folder to read, and whether its slices sit on a regular grid.

A folder a user points to is often a whole study as a PACS exports it: subfolders, a
localizer, soft- and sharp-kernel reconstructions, maybe an earlier CoreDiff output. These
helpers list the series from their headers (no pixels), choose the one to denoise or say why
they cannot, and tell when slice positions leave the one-spacing grid a NRRD / NIfTI / MHA file
can hold (a missing slice, a gantry tilt). Reading and writing the pixels is :mod:`io`'s.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import CoreDiffError


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder: what a user needs to tell series apart."""

    uid: str
    files: tuple[str, ...]       # sorted by GDCM along the slice direction
    folder: str                  # relative to the folder searched ("." for itself)
    modality: str = ""
    description: str = ""
    image_type: str = ""
    kernel: str = ""
    thickness_mm: str = ""

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type.upper()

    @property
    def is_original(self) -> bool:
        """ORIGINAL image type: reconstructed by the scanner, not derived (a CoreDiff output is DERIVED)."""
        return self.image_type.upper().startswith("ORIGINAL")

    def label(self) -> str:
        parts = [f"{len(self.files)} slice{'s' if len(self.files) != 1 else ''}", self.modality or "?"]
        if self.thickness_mm:
            parts.append(f"{float(self.thickness_mm):g} mm")
        if self.kernel:
            parts.append(f"kernel {self.kernel}")
        if self.image_type:
            parts.append(self.image_type.replace("\\", "/"))
        where = "" if self.folder == "." else f" in {self.folder}/"
        return f"'{self.description or 'no description'}'{where} ({', '.join(parts)}; UID {self.uid})"


@contextmanager
def itk_warnings_off() -> Iterator[None]:
    """Silence ITK/GDCM warnings for a call whose findings we report ourselves, in words: they go
    to stderr unasked, e.g. for every folder without a series, or "non uniform sampling"."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def check_series_input(path: str | os.PathLike, series: str | None) -> None:
    """``series`` picks a series in a DICOM folder; refuse it for a file rather than ignore it."""
    if series is not None and Path(path).is_file():
        raise CoreDiffError(f"--series picks a series in a DICOM folder; {path} is not a folder")


def _header_tags(file: str, keys: tuple[str, ...]) -> dict[str, str]:
    """Some tags of one DICOM file, header only (no pixels); missing ones are ''."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return dict.fromkeys(keys, "")
    return {k: reader.GetMetaData(k).strip() if reader.HasMetaDataKey(k) else "" for k in keys}


def _representative_tags(files: tuple[str, ...], keys: tuple[str, ...]) -> dict[str, str]:
    """Header tags of a file that stands for its series: the middle one, else the first or the last
    that is no localizer. A topogram may share the scan's series UID and sort first (PACS names
    IM0001, IM0002...): judged by its first file the whole scan was taken for a localizer."""
    for file in dict.fromkeys((files[len(files) // 2], files[0], files[-1])):
        tags = _header_tags(file, keys)
        if "LOCALIZER" not in tags["0008|0008"].upper():
            break
    return tags


def find_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every DICOM series in ``folder`` and its subfolders (PACS exports nest one folder per
    series), in a stable order: by subfolder, then series number. Reads headers only."""
    root = Path(folder)
    reader = sitk.ImageSeriesReader()
    keys = ("0020|0011", "0008|0060", "0008|103e", "0008|0008", "0018|1210", "0018|0050")
    folders: dict[str, list[str]] = {}  # series UID -> the subfolders holding its files
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        with itk_warnings_off():  # GDCM warns of every folder without a series (reports, notes)
            for uid in reader.GetGDCMSeriesIDs(dirpath):
                folders.setdefault(uid, []).append(dirpath)
    found = []
    for uid, dirpaths in folders.items():
        if len(dirpaths) == 1:
            files = tuple(reader.GetGDCMSeriesFileNames(dirpaths[0], uid))
        else:  # CDs and PACS exports cap files per folder: one series, sorted across them all
            files = tuple(f for d in dirpaths for f in reader.GetGDCMSeriesFileNames(d, uid))  # series_slices sorts
        if not files:
            continue
        where = str(Path(dirpaths[0]).relative_to(root))
        if len(dirpaths) > 1:
            where += f" (and {len(dirpaths) - 1} more folder{'s' if len(dirpaths) > 2 else ''})"
        number, *tags = _representative_tags(files, keys).values()
        order = int(number) if number.lstrip("-").isdigit() else 0
        found.append((where, order, DicomSeries(uid, files, where, *tags)))
    return [s for *_, s in sorted(found, key=lambda f: f[:2])]


def _sorted_along_normal(heads: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    """Files of one series (with their header tags) in slice order: by ImagePositionPatient along
    the first file's slice normal, as GDCM sorts the files of one folder."""
    try:
        row_col = np.array([float(v) for v in heads[0][1]["0020|0037"].split("\\")]).reshape(2, 3)
        normal = np.cross(row_col[0], row_col[1])
        keys = [float(np.dot([float(v) for v in t["0020|0032"].split("\\")], normal)) for _, t in heads]
    except ValueError:  # no usable geometry: the folders' own order
        return heads
    return [head for _, head in sorted(zip(keys, heads), key=lambda pair: pair[0])]


def series_slices(series: DicomSeries) -> tuple[tuple[str, ...], list[str]]:
    """The files of ``series`` that are slices of one volume, and notes on what was left out.

    A series UID may also cover a localizer (its image type says LOCALIZER) or the same file
    twice (copied, same SOP Instance UID): those are dropped and said. Images of another
    orientation or size, or two slices at one position (two acquisitions in one series), are
    refused: no one volume holds them, and a neighbour would be the wrong image. A series
    gathered from several folders is put in slice order here, from the same headers."""
    if len(series.files) < 2:
        return series.files, []
    keys = ("0008|0008", "0008|0018", "0020|0037", "0020|0032", "0028|0010", "0028|0011", "0020|0012")
    heads = [(f, _header_tags(f, keys)) for f in series.files]
    notes = []
    localizers = [f for f, t in heads if "LOCALIZER" in t["0008|0008"].upper()]
    if localizers and len(localizers) < len(heads):
        heads = [(f, t) for f, t in heads if f not in localizers]
        notes.append(f"left out {len(localizers)} localizer image{'s' if len(localizers) > 1 else ''} of the series")
    seen, unique = set(), []
    for f, t in heads:
        if t["0008|0018"] and t["0008|0018"] in seen:
            continue
        seen.add(t["0008|0018"])
        unique.append((f, t))
    repeated = len(heads) - len(unique)
    if repeated:
        notes.append(f"left out {repeated} repeated cop{'ies' if repeated > 1 else 'y'} of slices "
                     "(the same SOP Instance UID)")
    heads = unique

    def orientation(t):
        try:
            return np.array([float(v) for v in t["0020|0037"].split("\\")])
        except ValueError:
            return np.empty(0)
    kinds = []  # (orientation, rows, cols, files): orientations within 1e-4 are one (written to other precisions)
    for f, t in heads:
        o = orientation(t)
        for kind in kinds:
            if kind[1:3] == (t["0028|0010"], t["0028|0011"]) and kind[0].shape == o.shape \
                    and (not o.size or np.abs(kind[0] - o).max() < 1e-4):
                kind[3].append(f)
                break
        else:
            kinds.append((o, t["0028|0010"], t["0028|0011"], [f]))
    if len(kinds) > 1:
        parts = "; ".join(f"{len(v)} of {rows or '?'} x {cols or '?'} pixels, "
                          f"orientation {' '.join(f'{x:g}' for x in o) or '?'}" for o, rows, cols, v in kinds)
        raise CoreDiffError(f"series {series.uid} mixes images of different orientations or sizes ({parts}): "
                            "they are not one volume; export the axial slices as a series of their own")
    if len({os.path.dirname(f) for f, _ in heads}) > 1:
        heads = _sorted_along_normal(heads)  # GDCM sorted each folder's part, not the whole
    positions = [t["0020|0032"] for _, t in heads]
    if len(set(positions)) < len(positions):
        acquisitions = sorted({t["0020|0012"] for _, t in heads if t["0020|0012"]})
        which = f" (acquisitions {', '.join(acquisitions)})" if len(acquisitions) > 1 else ""
        raise CoreDiffError(f"series {series.uid} has {len(positions) - len(set(positions))} slices at the position of "
                            f"another{which}: two acquisitions in one series, which no one volume holds; put each "
                            "in a folder of its own")
    return tuple(f for f, _ in heads), notes


def choose_dicom_series(found: list[DicomSeries], wanted: str | None, where: str) -> tuple[DicomSeries, str | None]:
    """The series to read, and a note naming the others when there was a choice.

    ``wanted``: the series' number in the listing (1, 2, ...) or its UID. Without it: the CT
    series that is no localizer, preferring scanner (ORIGINAL) images to derived ones — so a
    folder holding a scan and its CoreDiff output denoises the scan — then the most slices; a
    tie (two kernels of one scan, a full- and a low-dose scan) is for the user to settle."""
    listing = "\n".join(f"  {i}. {s.label()}" for i, s in enumerate(found, 1))
    inline = "; ".join(f"{i}. {s.label()}" for i, s in enumerate(found, 1))  # errors are one line
    if wanted is not None:
        pick = [s for i, s in enumerate(found, 1) if wanted.strip() in (str(i), s.uid)]
        if not pick:
            raise CoreDiffError(f"{where} has no DICOM series '{wanted}': give the number or UID of one of {inline}")
        return pick[0], None
    volumes = [s for s in found if s.modality in ("CT", "") and not s.is_localizer]
    if not volumes:
        raise CoreDiffError(f"{where} holds no CT series CoreDiff can denoise (CT in HU, not a localizer), "
                            f"only {inline}")

    def fitness(s: DicomSeries) -> tuple[bool, int]:
        return s.is_original, len(s.files)

    best = max(volumes, key=fitness)
    ties = [i for i, s in enumerate(found, 1) if s in volumes and fitness(s) == fitness(best)]
    if len(ties) > 1:  # e.g. soft and sharp kernels of one scan, or a Mayo case's full and quarter dose
        raise CoreDiffError(f"{where} holds {len(ties)} series that fit equally well ({', '.join(map(str, ties))}): "
                            f"choose one with --series N (denoise, dose; read_volume(series=...)) or point to "
                            f"its own subfolder, from {inline}")
    if len(found) == 1:
        return best, None
    return best, (f"{where} holds {len(found)} DICOM series; reading number {found.index(best) + 1} "
                  f"(--series N or its subfolder picks another):\n{listing}")


def median_slice_gap(positions, direction) -> float | None:
    """The usual distance (mm, along the slice normal) between a series' adjacent slices: its
    slice spacing, which one missing slice does not change as ITK's mean spacing does."""
    if positions is None or len(positions) < 2:
        return None
    normal = np.reshape(np.asarray(direction, dtype=np.float64), (3, 3))[:, 2]
    along = (np.asarray(positions, dtype=np.float64) - np.asarray(positions[0], dtype=np.float64)) @ normal
    return float(np.median(np.abs(np.diff(along))))


def off_grid_slices(positions, direction) -> str | None:
    """How a series' slice positions leave a regular grid, or None when one spacing along the
    slice normal places every slice within 1 % of it (what a NRRD / NIfTI / MHA grid can hold).

    Two ways are common: uneven spacing (a slice lost in transfer) and a shear, each slice
    shifted in-plane from the last, which is how a gantry tilt is stored."""
    if positions is None or len(positions) < 2:
        return None
    normal = np.reshape(np.asarray(direction, dtype=np.float64), (3, 3))[:, 2]
    offsets = np.asarray(positions, dtype=np.float64) - np.asarray(positions[0], dtype=np.float64)
    along = offsets @ normal
    gaps = np.abs(np.diff(along))
    step = median_slice_gap(positions, direction)
    tolerance = 0.01 * step + 1e-3
    found = []
    if np.abs(gaps - step).max() > tolerance:
        k = int(np.argmax(np.abs(gaps - step)))
        why = ": a missing slice?" if gaps[k] > 1.5 * step else ""
        found.append(f"not evenly spaced ({gaps.min():g} to {gaps.max():g} mm apart; {gaps[k]:g} mm between "
                     f"slices {k} and {k + 1}{why})")
    shift = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    if shift.max() > tolerance:
        tilt = np.degrees(np.arctan2(shift[-1], abs(along[-1])))
        found.append(f"sheared, each shifted in-plane from the one before ({shift[-1]:.3g} mm over the series: "
                     f"a gantry tilt of {tilt:.1f}°?)")
    return f"its slices are {' and '.join(found)}" if found else None

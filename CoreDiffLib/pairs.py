"""Training data: NDCT/LDCT pairs, found in a folder by their names or listed in a file, read as
the axial planes denoise runs, and checked (same voxels, the LDCT the noisier), and the dose
tags LDCT file names carry (``case1_ldct25.nrrd``, ``case1_ldct12p5.nrrd``).

Why names: a folder of simulated pairs (``corediff simulate``) or a Mayo-style DICOM tree
(``L067/full_1mm`` beside ``L067/quarter_1mm``) says which scan is which only in its paths,
so the role word is taken out of each path and the rest must match.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from . import CoreDiffError
from .io import FILE_SUFFIXES, Volume, axial_volume, is_file_path, read_volume, voxel_grid_difference
from .orientation import axial_layout

_NDCT_TOKENS = {"ndct", "full", "fulldose", "fd", "nd", "hd", "normal", "normaldose", "target"}
_LDCT_PREFIXES = ("ldct", "quarter", "quarterdose", "qd", "ld", "low", "lowdose", "input")
_DICOM_SUFFIXES = (".dcm", ".ima")  # and files without a suffix that are DICOM: _is_dicom_file
_DOSE_TAG = re.compile(r"(\d+(p\d+)?)?")  # '', '25', or '12p5' as simulate names a 12.5 % scan


def _role_and_key(rel: str) -> tuple[str, str, str] | None:
    """('ndct'|'ldct', pairing key, dose tag) from a relative path, or None if neither."""
    name = rel.lower()
    for suf in FILE_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    tokens = [t for t in re.split(r"[/\\_\-. ]+", name) if t]
    # the role word nearest the file's own name: folders above may hold one too ('hd/', 'low_dose_study/')
    for i in reversed(range(len(tokens))):
        tok = tokens[i]
        rest = "_".join(tokens[:i] + tokens[i + 1:])
        if tok in _NDCT_TOKENS:
            return "ndct", rest, ""
        for prefix in _LDCT_PREFIXES:
            if tok.startswith(prefix) and _DOSE_TAG.fullmatch(tok[len(prefix):]):
                return "ldct", rest, tok[len(prefix):]
    return None


def _is_dicom_file(path: Path) -> bool:
    """A .dcm / .ima file, or one without a suffix (PACS exports name slices IM000001) that starts
    as DICOM files do ('DICM' after a 128-byte preamble): a README in a folder is no slice."""
    suffix = path.suffix.lower()
    if suffix in _DICOM_SUFFIXES:
        return True
    if suffix:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _volume_candidates(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        vis = [f for f in files if not f.startswith(".")]
        found += [Path(root) / f for f in sorted(vis) if is_file_path(f)]
        if Path(root) != folder and any(not is_file_path(f) and _is_dicom_file(Path(root) / f) for f in vis):
            found.append(Path(root))
    return found


def dose_tag(dose: float) -> str:
    """0.25 -> '25', 0.05 -> '5', 0.125 -> '12p5': the dose in LDCT file names (case1_ldct25.nrrd)."""
    pct = round(float(dose) * 100.0, 4)
    if abs(pct - round(pct)) < 1e-6:
        return str(int(round(pct)))
    return ("%g" % pct).replace(".", "p")


def dose_from_tag(tag: str) -> float:
    """'25' -> 0.25, '12p5' -> 0.125: the inverse of :func:`dose_tag` (file names back to doses)."""
    return float(tag.replace("p", ".")) / 100.0


def as_dose_tag(text: str) -> str:
    """A dose as a user may give it, as file names tag it: '25', '12p5', '10%', 'ldct10', a
    fraction '0.1' (as simulate --dose takes it) or '12.5' (per cent) -> '25', '12p5', '10'...
    Anything else is returned as it is (a tag of one's own naming)."""
    text = str(text).strip()
    bare = text.lower().removeprefix("ldct").rstrip("%").strip()
    if re.fullmatch(r"\d*p\d+", bare):  # a file name's own form, per cent already: 12p5, 0p5, 5p0 -> 5
        return dose_tag(float("0" + bare.replace("p", ".")) / 100.0)
    try:
        value = float(bare)
    except ValueError:
        return text
    if not 0 < value <= 100:
        return text
    fraction = value < 1 and "%" not in text
    return dose_tag(value if fraction else value / 100.0)


def find_pairs(folder: str | os.PathLike, dose: str | None = None) -> list[tuple[Path, Path]]:
    """NDCT/LDCT pairs in a folder, matched by name.

    Works for this project's simulations (``case000_ndct.nrrd`` / ``case000_ldct25.nrrd``),
    Mayo-style DICOM trees (``L067/full_1mm/`` / ``L067/quarter_1mm/``) and similar layouts:
    the role token (ndct/full/fd vs ldct/quarter/qd, optionally with a dose number) is
    removed and the rest of the path must match. ``dose`` picks one LDCT dose, in any form
    :func:`as_dose_tag` reads ('25', '10%', '0.1').
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CoreDiffError(f"training data folder {folder} does not exist")
    ndct: dict[str, Path] = {}
    ldct: dict[str, list[tuple[str, Path]]] = {}
    for path in _volume_candidates(folder):
        parsed = _role_and_key(str(path.relative_to(folder)))
        if parsed is None:
            continue
        role, key, tag = parsed
        twin = ndct.get(key) if role == "ndct" else next((p for t, p in ldct.get(key, []) if t == tag), None)
        if twin is not None:  # one case saved twice (two formats): which to train on is the user's to say
            raise CoreDiffError(f"{twin} and {path} are both the {'NDCT' if role == 'ndct' else 'LDCT'} of "
                                f"{key}{f' (dose tag {tag})' if tag else ''}: keep one of them in {folder}, or "
                                "pass a list file")
        if role == "ndct":
            ndct[key] = path
        else:
            ldct.setdefault(key, []).append((tag, path))
    pairs = []
    wanted = None if dose is None else as_dose_tag(dose)
    for key, options in sorted(ldct.items()):
        if key not in ndct:
            continue
        chosen = [p for tag, p in options if wanted is None or tag == wanted]
        if dose is None and len(chosen) > 1:
            tags = sorted(tag or "(none)" for tag, _ in options)
            raise CoreDiffError(f"{key} has several LDCT doses ({', '.join(tags)}): choose one with "
                                "--dose-tag")
        pairs += [(ndct[key], p) for p in chosen]
    tags = sorted({tag or "(none)" for key, options in ldct.items() if key in ndct for tag, _ in options})
    if not pairs and tags:
        raise CoreDiffError(f"no LDCT of dose tag '{wanted}' beside its NDCT in {folder}: the tags there are "
                            f"{', '.join(tags)} (--dose-tag 10, or 0.1, or 10% for case1_ldct10.nrrd)")
    if not pairs:
        raise CoreDiffError(f"no NDCT/LDCT pairs found in {folder}: name them like case1_ndct.nrrd / "
                            "case1_ldct.nrrd (or full_*/quarter_* DICOM folders), or pass a list file")
    return pairs


def pairs_dose_tag(folder: str | os.PathLike, pairs: list[tuple[Path, Path]]) -> str | None:
    """The one dose tag the LDCTs of ``pairs`` (found in ``folder``) carry in their names, or None
    (several, or none): what a model trained on them records."""
    tags = {(_role_and_key(str(Path(ld).relative_to(folder))) or (None, None, None))[2] for _, ld in pairs}
    return tags.pop() if len(tags) == 1 and None not in tags and "" not in tags else None


def _check_pair_noise(nd, ld, a: Volume, b: Volume) -> None:
    """Refuse a pair (axial volumes) whose 'LDCT' is no noisier than its 'NDCT' (the same scan
    twice, or a list's columns swapped): a model trained on it learns to keep or add noise.
    Judged by the noise index ``--model auto`` measures; a pair it cannot measure (little soft
    tissue) passes."""
    from .dose_estimate import measure
    if np.array_equal(a.array, b.array):
        raise CoreDiffError(f"{nd} and {ld} hold the same voxels: a pair is a normal-dose and a low-dose scan")
    try:
        normal, low = (measure(v.array, v.spacing[:2]).noise_index_hu for v in (a, b))
    except CoreDiffError:
        return
    if low <= normal:
        raise CoreDiffError(f"{ld} (noise index {low:.1f} HU) is no noisier than {nd} ({normal:.1f} HU): is the pair "
                            "the wrong way round? A list file gives 'ndct_path,ldct_path' per line")


def read_training_pairs(pairs: list[tuple[Path, Path]], log: Callable[[str], None] | None = None,
                        slice_mm: list[float] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The axial planes of each NDCT/LDCT pair, as denoise runs them, after checking that the two
    are scans of the same voxels (shape, spacing, origin, direction); ``log`` hears which were
    stored sagittally or coronally; ``slice_mm``, when given, receives each pair's axial slice
    spacing (a model records the spacing it learned its neighbours at)."""
    volumes = []
    for nd, ld in pairs:
        if Path(nd).expanduser().resolve() == Path(ld).expanduser().resolve():
            raise CoreDiffError(f"{nd} is given as both the NDCT and the LDCT of a pair")
        a, b = read_volume(nd), read_volume(ld)
        differs = voxel_grid_difference(a, b)
        if differs == "shape":
            raise CoreDiffError(f"{nd} {a.shape} and {ld} {b.shape} differ in shape: pairs must be aligned")
        if differs:
            raise CoreDiffError(f"{nd} and {ld} differ in spacing, origin or direction: a pair must be two scans "
                                "of the same voxels (resample one onto the other first)")
        axial_a, axial_b = axial_volume(a), axial_volume(b)  # views, no copies
        _check_pair_noise(nd, ld, axial_a, axial_b)
        layout = axial_layout(a.direction, a.array.shape)
        if layout is not None and log:  # trained on axial planes with axial neighbours, as denoise runs them
            log(f"{Path(nd).name}: stored {layout.storage}ly; trained on its axial planes")
        volumes.append((axial_a.array, axial_b.array))
        if slice_mm is not None:
            slice_mm.append(a.axial_slice_mm())
    return volumes


def read_pair_list(path: str | os.PathLike) -> list[tuple[Path, Path]]:
    """A text/CSV file with one 'ndct_path,ldct_path' per line (relative to the file)."""
    base = Path(path).parent
    if is_file_path(path):
        raise CoreDiffError(f"{path} is a volume: give a folder of NDCT/LDCT pairs, or a text file listing "
                            "'ndct_path,ldct_path' per line")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet export is dropped
    except UnicodeDecodeError:
        raise CoreDiffError(f"{path} is not a UTF-8 text list of 'ndct_path,ldct_path' lines") from None
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split(" #")[0].strip()  # a trailing comment
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",")]
        if not pairs and [p.lower() for p in parts] == ["ndct", "ldct"]:  # a header, after any comments
            continue
        if len(parts) != 2:
            raise CoreDiffError(f"{path}:{n}: expected 'ndct_path,ldct_path', got '{line}'")
        pairs.append(tuple(p if Path(p).is_absolute() else base / p for p in map(Path, parts)))
    if not pairs:
        raise CoreDiffError(f"{path} lists no pairs")
    return pairs  # type: ignore[return-value]

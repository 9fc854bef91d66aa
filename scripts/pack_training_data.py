#!/usr/bin/env python
"""Pack simulated NDCT/LDCT pairs into one small file for a GPU machine without SimpleITK.

    python scripts/pack_training_data.py --dose-tag 25 --train data/train --test data/test --out .gpu
    python scripts/pack_training_data.py --dose-tag 25 10 5 --test "" --out .gpu   # three doses, no test set

A rented GPU server often has PyTorch but no SimpleITK and little room for uploads, so the
pairs travel as int16 arrays in an xz-compressed .npz (``train.npz.xz``, ``test.npz.xz``);
several doses share one copy of each NDCT volume (their LDCTs are simulated from it).
Training volumes are cropped to the body (plus a margin): air outside the patient costs
upload bytes and teaches nothing. Held-out volumes stay whole so they are scored on full slices.
``scripts/gpu_session.py`` reads them back with :func:`load_packed`.
"""
from __future__ import annotations

import argparse
import io
import lzma
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def body_box(ndct: np.ndarray, margin: int, min_size: int) -> tuple[slice, slice]:
    """Rows/cols holding anything denser than air in any slice, grown by margin and to min_size."""
    inside = (ndct > -900).any(axis=0)
    boxes = []
    for axis, n in ((1, ndct.shape[1]), (0, ndct.shape[2])):
        idx = np.where(inside.any(axis=axis))[0]
        lo, hi = (idx.min(), idx.max() + 1) if idx.size else (0, n)
        lo, hi = max(lo - margin, 0), min(hi + margin, n)
        while hi - lo < min(min_size, n):  # grow symmetrically until a patch fits
            lo, hi = max(lo - 1, 0), min(hi + 1, n)
        boxes.append(slice(int(lo), int(hi)))
    return boxes[0], boxes[1]


def pack(folder: Path, dose_tags: Sequence[str], crop: bool, margin: int = 16, min_size: int = 256) -> bytes:
    """``NAME/ndct`` and ``NAME/ldct-TAG`` int16 arrays for every case, xz-compressed."""
    from CoreDiffLib.io import read_volume
    from CoreDiffLib.pairs import find_pairs
    arrays, boxes = {}, {}
    for tag in dose_tags:
        for nd_path, ld_path in find_pairs(folder, tag):
            name = Path(nd_path).name.split("_ndct")[0]
            if name not in boxes:  # the NDCT is shared by every dose: read and crop it once
                nd = read_volume(nd_path).array
                boxes[name] = body_box(nd, margin, min_size) if crop else (slice(None), slice(None))
                arrays[f"{name}/ndct"] = np.round(nd[:, boxes[name][0], boxes[name][1]]).astype(np.int16)
            rows, cols = boxes[name]
            arrays[f"{name}/ldct-{tag}"] = np.round(read_volume(ld_path).array[:, rows, cols]).astype(np.int16)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return lzma.compress(buf.getvalue(), preset=6)


def load_packed(path: str | Path, dose_tag: str = "25") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(case name, ndct HU float32, ldct HU float32)] at one dose from a packed file."""
    data = np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())))
    names = sorted({k.split("/")[0] for k in data.files})
    tags = sorted({k.split("/ldct-")[1] for k in data.files if "/ldct-" in k})
    if dose_tag not in tags:
        raise KeyError(f"{path} holds dose tags {tags}, not {dose_tag!r}")
    return [(n, data[f"{n}/ndct"].astype(np.float32), data[f"{n}/ldct-{dose_tag}"].astype(np.float32))
            for n in names]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dose-tag", nargs="+", default=["25"], help="one or more dose tags")
    p.add_argument("--train", default=str(REPO / "data" / "train"))
    p.add_argument("--test", default=str(REPO / "data" / "test"), help='"" packs no test set')
    p.add_argument("--out", default=str(REPO / ".gpu"))
    a = p.parse_args()
    for flag, folder in (("--train", a.train), ("--test", a.test)):  # both, before minutes of packing
        if folder and not Path(folder).is_dir():
            p.error(f"{flag} {folder} is not a folder of NDCT/LDCT pairs (simulate it first, or {flag} '' to skip)"
                    if flag == "--test" else f"{flag} {folder} is not a folder of NDCT/LDCT pairs")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, folder, crop in (("train", a.train, True), ("test", a.test, False)):
        if not folder:
            continue
        blob = pack(Path(folder), a.dose_tag, crop)
        (out / f"{split}.npz.xz").write_bytes(blob)
        cases = load_packed(out / f"{split}.npz.xz", a.dose_tag[0])
        print(f"{split}: {len(cases)} cases at dose tags {a.dose_tag}, {len(blob) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which way a volume's axial planes run: the one rule the library and the Slicer module share.

CLEAR-Net denoises axial slices with their axial neighbours as context, as it was trained, so a
series stored sagittally or coronally (a reformat) is viewed as axial slices and written back in
its own layout. NumPy only, so that the Slicer module can ask before PyTorch is installed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AxialLayout:
    """How to view a volume stored sagittally or coronally as axial slices, and back.

    ``perm`` transposes the (k, j, i) array to (head-foot, anterior-posterior, left-right)
    order; ``flips`` are the axes (after it) that run against the usual axial layout.
    """
    perm: tuple[int, int, int]
    flips: tuple[int, ...]
    storage: str  # "sagittal" or "coronal"

    def to_axial(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.perm)
        return np.flip(out, self.flips) if self.flips else out

    def from_axial(self, array: np.ndarray) -> np.ndarray:
        out = np.flip(array, self.flips) if self.flips else array
        return np.transpose(out, np.argsort(self.perm))


def axial_layout(direction, shape) -> AxialLayout | None:
    """None when the volume's slices (array axis 0) are axial, else how to make them so.

    CLEAR-Net denoises axial slices with their axial neighbours as context, as it was trained;
    a reformatted series stored sagittally or coronally has its axial planes along another
    array axis. Column c of the ITK direction matrix is index axis c in LPS space (index axis c
    is array axis 2 - c); the axis closest to each of z, y, x is matched to it. A single image,
    an oblique matrix without a clear match, or a slab too thin to give axial planes of at least
    16 pixels is left as it is (None): it has no other way to be denoised.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    index_axes = [int(np.argmax(np.abs(d[row]))) for row in (2, 1, 0)]  # for z, y, x
    if sorted(index_axes) != [0, 1, 2] or index_axes[0] == 2 or shape[0] == 1:
        return None
    perm = tuple(2 - c for c in index_axes)
    if min(shape[perm[1]], shape[perm[2]]) < 16:
        return None
    flips = tuple(k for k, (row, c) in enumerate(zip((2, 1, 0), index_axes))
                  if d[row, c] < 0 and k > 0)  # in-plane only: the slice order does not matter
    # the stored slices (ITK index axis 2) are sagittal when that axis runs along x
    return AxialLayout(perm, flips, "sagittal" if index_axes[2] == 2 else "coronal")


def axial_spacing(spacing, layout: AxialLayout | None) -> tuple[float, float, float]:
    """(x, y, slice) spacing in mm of the axial planes, for a volume stored in ``layout``
    (None: axial already): ITK index axis a is array axis 2 - a."""
    perm = layout.perm if layout is not None else (0, 1, 2)
    return tuple(float(spacing[2 - perm[k]]) for k in (2, 1, 0))


def radiological_slice(image: np.ndarray, direction) -> tuple[np.ndarray, bool]:
    """An axial slice (rows = ITK index j, columns = i) turned to the way radiologists read it:
    the patient's left on the image's right and anterior at the top (columns toward +x, rows
    toward +y in LPS), and whether rows and columns were swapped (so the caller swaps the pixel
    spacing too). Files store axial planes with either in-plane axis reversed or the two swapped
    (a RAS-stored NIfTI has both reversed); a figure drawn in array order would show those
    mirrored or upside down.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:2, :2]  # x, y rows; index i, j columns
    swapped = abs(d[0, 1]) + abs(d[1, 0]) > abs(d[0, 0]) + abs(d[1, 1])
    if swapped:
        image, d = image.T, d[:, ::-1]
    if d[0, 0] < 0:
        image = image[:, ::-1]
    if d[1, 1] < 0:
        image = image[::-1, :]
    return image, bool(swapped)

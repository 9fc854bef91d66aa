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
                  if d[row, c] < 0 and k > 0)  # in-plane only: the slices keep their order (README)
    # the stored slices (ITK index axis 2) are sagittal when that axis runs along x
    return AxialLayout(perm, flips, "sagittal" if index_axes[2] == 2 else "coronal")


def axial_spacing(spacing, layout: AxialLayout | None) -> tuple[float, float, float]:
    """(x, y, slice) spacing in mm of the axial planes, for a volume stored in ``layout``
    (None: axial already): ITK index axis a is array axis 2 - a."""
    perm = layout.perm if layout is not None else (0, 1, 2)
    return tuple(float(spacing[2 - perm[k]]) for k in (2, 1, 0))


@dataclass(frozen=True)
class InPlaneView:
    """How an axial plane stored with reversed or swapped in-plane axes is turned to the usual
    LPS layout — columns toward the patient's left (+x), rows toward posterior (+y) — and back.
    Works on the last two axes of an array (a slice, or a batch of context stacks)."""
    swap: bool
    flip_rows: bool
    flip_cols: bool

    @property
    def identity(self) -> bool:
        return not (self.swap or self.flip_rows or self.flip_cols)

    def to_lps(self, array: np.ndarray) -> np.ndarray:
        if self.swap:
            array = np.swapaxes(array, -1, -2)
        if self.flip_cols:
            array = array[..., ::-1]
        return array[..., ::-1, :] if self.flip_rows else array

    def from_lps(self, array: np.ndarray) -> np.ndarray:
        if self.flip_rows:
            array = array[..., ::-1, :]
        if self.flip_cols:
            array = array[..., ::-1]
        return np.swapaxes(array, -1, -2) if self.swap else array


def in_plane_view(direction) -> InPlaneView:
    """The :class:`InPlaneView` of an axial volume's ITK direction (index i along the columns,
    j along the rows). The models learned from planes in the LPS layout; a RAS-stored NIfTI has
    both axes reversed, and CLEAR-Net, not exactly equivariant to flips, gave it other HU (up
    to 20 HU apart on the shipped sample; the same PSNR)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:2, :2]  # x, y rows; index i, j columns
    swap = bool(abs(d[0, 1]) + abs(d[1, 0]) > abs(d[0, 0]) + abs(d[1, 1]))
    if swap:
        d = d[:, ::-1]
    return InPlaneView(swap, bool(d[1, 1] < 0), bool(d[0, 0] < 0))


def radiological_slice(image: np.ndarray, direction) -> tuple[np.ndarray, bool]:
    """An axial slice (rows = ITK index j, columns = i) turned to the way radiologists read it:
    the patient's left on the image's right and anterior at the top (the LPS layout of
    :func:`in_plane_view`), and whether rows and columns were swapped (so the caller swaps the
    pixel spacing too). A figure drawn in array order would show a RAS-stored plane upside down."""
    view = in_plane_view(direction)
    return view.to_lps(image), view.swap


def slice_at(positions, point, tolerance_mm: float = 0.5) -> int | None:
    """The index of the slice whose position (one row of ``positions``, mm) lies within
    ``tolerance_mm`` of ``point``, the nearest one, or None: how a one-slice reference is found
    in its scan by the library (:func:`CoreDiffLib.io.slice_of`) and by the Slicer module."""
    distance = np.linalg.norm(np.asarray(positions, dtype=np.float64) - np.asarray(point, dtype=np.float64), axis=1)
    k = int(np.argmin(distance))
    return k if distance[k] <= tolerance_mm else None


def axial_view(volume) -> tuple[np.ndarray, tuple[float, float]]:
    """A read :class:`~CoreDiffLib.io.Volume`'s axial planes in the LPS in-plane layout the models
    run them in, and their spacing (columns, rows) in mm, however it is stored: as
    ``denoise_file`` feeds the network, so that ``corediff oneshot`` fits its weights on the states
    denoise will blend, and ``--model auto`` measures what it sees. (:func:`CoreDiffLib.io.axial_volume`
    keeps the stored in-plane layout and the geometry: a Volume, for comparing and training.)"""
    layout = axial_layout(volume.direction, volume.array.shape)
    if layout is not None:  # a reformat: its layout turns the planes in-plane too
        return layout.to_axial(volume.array), axial_spacing(volume.spacing, layout)[:2]
    view = in_plane_view(volume.direction)
    x_mm, y_mm = (float(volume.spacing[0]), float(volume.spacing[1]))
    return view.to_lps(volume.array), ((y_mm, x_mm) if view.swap else (x_mm, y_mm))  # a view: no copy

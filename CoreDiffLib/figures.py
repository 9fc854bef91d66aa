"""Side-by-side comparison figures in the soft-tissue window (matplotlib, no display needed)."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_path  # noqa: E402
from .intensity import DISPLAY_WINDOW_HU  # noqa: E402

#: the file types a figure may be written as (matplotlib picks the format by the extension)
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff")


def busiest_region(image_hu: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size window with the most soft-tissue structure."""
    h, w = image_hu.shape
    size = min(size, h, w)
    soft = np.clip(image_hu, *DISPLAY_WINDOW_HU)
    best, corner = -1.0, (0, 0)
    step = max(size // 4, 1)
    for y in range(0, h - size + 1, step):
        for x in range(0, w - size + 1, step):
            patch = soft[y:y + size, x:x + size]
            inside = (patch > DISPLAY_WINDOW_HU[0]).mean()
            score = float(patch.std()) * inside
            if score > best:
                best, corner = score, (y, x)
    return corner


def comparison_figure(panels: dict[str, np.ndarray], path: str | os.PathLike, title: str = "",
                      difference: tuple[str, str] | None = None, zoom: int | None = None,
                      pixel_aspect: float = 1.0) -> Path:
    """One row of full slices and one row of zoomed crops, same window for every panel.

    ``panels`` maps label -> 2-D HU slice (e.g. LDCT, CoreDiff, NDCT). ``difference`` adds
    a panel a - b in a +-100 HU window (what the denoiser removed). ``pixel_aspect`` is the
    row spacing over the column spacing, so that non-square pixels keep the anatomy's shape.
    The title always states the windows, so the figure can be read on its own.
    """
    labels = list(panels)
    images = [panels[k] for k in labels]
    diff = None
    if difference is not None:
        a, b = difference
        diff = (f"{a} − {b}", panels[a] - panels[b])
    n = len(images) + (diff is not None)
    h, w = images[0].shape
    zoom = min(zoom or max(min(h, w) // 4, 16), h, w)  # the box frames the crop: neither beyond the image
    y, x = busiest_region(images[-1], zoom)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), squeeze=False)
    lo, hi = DISPLAY_WINDOW_HU
    for col in range(n):
        if col < len(images):
            img, label, vmin, vmax, cmap = images[col], labels[col], lo, hi, "gray"
        else:
            label, img = diff  # type: ignore[misc]
            vmin, vmax, cmap = -100, 100, "gray"
        axes[0, col].imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, aspect=pixel_aspect)
        # pixel (x, y) covers x - 0.5 .. x + 0.5: the box frames exactly the zoomed pixels
        axes[0, col].add_patch(plt.Rectangle((x - 0.5, y - 0.5), zoom, zoom, fill=False, ec="yellow", lw=1,
                                             clip_on=False))
        axes[0, col].set_title(textwrap.fill(label, 26), fontsize=10)  # long labels would overlap
        axes[1, col].imshow(img[y:y + zoom, x:x + zoom], cmap=cmap, vmin=vmin, vmax=vmax, aspect=pixel_aspect)
        for ax in axes[:, col]:
            ax.set_xticks([]), ax.set_yticks([])
    windows = f"window [{lo:.0f}, {hi:.0f}] HU" + (", difference [-100, 100] HU" if diff is not None else "")
    fig.suptitle(f"{title} · {windows}" if title else windows, fontsize=11)
    fig.tight_layout()
    out = Path(path)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out

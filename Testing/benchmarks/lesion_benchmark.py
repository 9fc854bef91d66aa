#!/usr/bin/env python
"""Low-contrast lesions: what each method keeps of them (contrast and CNR, per size and dose).

    python Testing/benchmarks/lesion_benchmark.py --out docs/benchmarks/lesions

PSNR and SSIM average over the whole image; a radiologist's question is narrower: is the small,
faint lesion still there after denoising? Spheres of 4, 6 and 10 mm diameter at -20 and +20 HU
are put into the soft tissue of the held-out test phantoms (seeds 9000-9002, ``data/test-6slices``,
never used in training), centred between the two inner slices 2 and 3, each at least 6 mm inside
a uniform organ. They go in through the scanner: every lesion slice is forward-projected and
reconstructed with the simulation's own fan-beam geometry and FBP, and the result is added to
the noise-free, NDCT and LDCT images alike. That is exact for the noise-free image (the
reconstruction is linear) and close for the noisy ones: a +-20 HU sphere of at most 1 cm changes
a ray's photon count by under 0.5 %, so the lesion leaves the scan's noise as it was.

Every method denoises each LDCT volume twice, with and without the lesions. Per lesion, on the
scored slices 2 and 3 (its cross-section there, radius r):

- **contrast kept**: the mean, over the lesion's core (radius r/2), of the method's output with
  the lesions minus its output without them, over the same for the noise-free image. The noise
  and anatomy cancel; what is left is what the method made of the lesion: 1 = kept whole,
  below 1 = washed out, above 1 = exaggerated. (The LDCT's is 1 by construction.)
- **NPW d'**: the detectability index of a non-prewhitening matched-filter observer (the
  task-based measure of AAPM TG-233): the lesion's noise-free image as template, applied to the
  method's lesion response (signal) and to its own error field at 400 places in uniform soft
  tissue (noise). It counts how the noise is correlated, which pixel SD cannot.
- **CNR**: that lesion signal (the core's mean difference, in HU) over the SD of the method's
  output without the lesions in a ring r+2 .. r+5 mm around it: how far the lesion stands out
  of the background it sits in. (The paired signal keeps the ratio free of the bias a noisy
  core mean would give a 4 mm lesion's handful of pixels.) Pixel SD does not see how noise is
  correlated: a denoiser's smoother, blotchier residual hides small lesions more per HU of SD,
  so read CNR across methods together with the figure.

Methods: the LDCT, BM3D (the quality tables' tuned sigma), RED-CNN (the same-budget baseline)
and CoreDiff (the shipped ``-w32`` model of the dose, one step and T = 10). Prints a markdown
table, writes it, the per-lesion JSON and a figure (one 6 mm lesion per dose in a soft-tissue
window) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from CoreDiffLib.atomic import atomic_path, write_text_atomic  # noqa: E402
from CoreDiffLib.baselines import bm3d_denoise, load_redcnn, redcnn_denoise  # noqa: E402
from CoreDiffLib.inference import denoise_volume  # noqa: E402
from CoreDiffLib.io import read_volume  # noqa: E402
from CoreDiffLib.pairs import dose_tag  # noqa: E402
from CoreDiffLib.simulation.projector import MU_WATER_PER_MM, FanBeamGeometry, fbp, forward_project  # noqa: E402

CASES = ("test9000_abdomen", "test9001_thorax", "test9002_head")
DIAMETERS_MM = (4.0, 6.0, 10.0)
CONTRAST_HU = 20.0
SCORED = (2, 3)          # the inner slices the spheres are centred between
CENTRE_SLICE = 2.5
MARGIN_MM = 6.0          # uniform soft tissue this far around every lesion
RING_MM = (2.0, 5.0)     # the CNR's background ring, beyond the lesion's edge


def disk(shape: tuple[int, int], cy: float, cx: float, radius_px: float, supersample: int = 4) -> np.ndarray:
    """Area fraction of each pixel inside a circle (partial volume at the edge)."""
    out = np.zeros(shape, np.float32)
    if radius_px <= 0:
        return out
    y0, y1 = max(int(cy - radius_px) - 1, 0), min(int(cy + radius_px) + 2, shape[0])
    x0, x1 = max(int(cx - radius_px) - 1, 0), min(int(cx + radius_px) + 2, shape[1])
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    yy = np.arange(y0, y1)[:, None, None, None] + sub[None, None, :, None]
    xx = np.arange(x0, x1)[None, :, None, None] + sub[None, None, None, :]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius_px ** 2
    out[y0:y1, x0:x1] = inside.mean(axis=(2, 3))
    return out


class UniformSoftTissue:
    """Where the scored slices are uniform soft tissue (-50..150 HU in both, local SD of the
    noise-free image under 15 HU), and which of its pixels lie a given reach inside it."""

    def __init__(self, truth: np.ndarray):
        both = truth[list(SCORED)]
        self.soft = np.all((both > -50) & (both < 150), axis=0)
        mean = ndimage.uniform_filter(both[0], 15)
        self.uniform = np.sqrt(np.maximum(ndimage.uniform_filter(both[0] ** 2, 15) - mean ** 2, 0)) < 15

    def inside(self, reach_px: float) -> np.ndarray:
        yy, xx = np.mgrid[-int(reach_px) - 1:int(reach_px) + 2, -int(reach_px) - 1:int(reach_px) + 2]
        return ndimage.binary_erosion(self.soft, structure=yy ** 2 + xx ** 2 <= reach_px ** 2) & self.uniform


def place_lesions(truth: np.ndarray, pixel_mm: float, count: int, seed: int) -> list[dict]:
    """Lesion centres in uniform soft tissue of the scored slices, apart from each other."""
    rng = np.random.default_rng(seed)
    tissue = UniformSoftTissue(truth)
    lesions: list[dict] = []
    for i in range(count):
        diameter = DIAMETERS_MM[i % len(DIAMETERS_MM)]
        room = tissue.inside((diameter / 2 + MARGIN_MM) / pixel_mm)
        for other in lesions:  # keep every pair's margins apart
            gap_px = (diameter / 2 + other["diameter_mm"] / 2 + 2 * MARGIN_MM) / pixel_mm
            room &= (np.arange(room.shape[0])[:, None] - other["y"]) ** 2 + \
                    (np.arange(room.shape[1])[None, :] - other["x"]) ** 2 > gap_px ** 2
        ys, xs = np.nonzero(room)
        if len(ys) == 0:
            break
        k = rng.integers(len(ys))
        lesions.append({"y": int(ys[k]), "x": int(xs[k]), "diameter_mm": diameter,
                        "contrast_hu": CONTRAST_HU * (1 if i % 2 else -1)})
    return lesions


def section_radius_mm(lesion: dict, k: int, slice_mm: float) -> float:
    """The sphere's cross-section radius in slice k (0 where it does not reach)."""
    r, dz = lesion["diameter_mm"] / 2, (k - CENTRE_SLICE) * slice_mm
    return float(np.sqrt(r * r - dz * dz)) if abs(dz) < r else 0.0


def lesion_images(lesions: list[dict], shape: tuple[int, int, int], pixel_mm: float, slice_mm: float,
                  geometry: FanBeamGeometry) -> np.ndarray:
    """The scanner's noise-free image of the lesions alone (HU above their background)."""
    out = np.zeros(shape, np.float32)
    for k in range(shape[0]):
        hu = np.zeros(shape[1:], np.float32)
        for les in lesions:
            radius_px = section_radius_mm(les, k, slice_mm) / pixel_mm
            hu += les["contrast_hu"] * disk(shape[1:], les["y"], les["x"], radius_px)
        if np.any(hu):
            sino = forward_project(hu * (MU_WATER_PER_MM / 1000.0), geometry, pixel_mm)  # linear, signed
            out[k] = fbp(sino, geometry, shape[1], pixel_mm, window="hann") * (1000.0 / MU_WATER_PER_MM)
    return out


def ring(shape: tuple[int, int], lesion: dict, r_px: float, pixel_mm: float) -> np.ndarray:
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    d2 = (yy - lesion["y"]) ** 2 + (xx - lesion["x"]) ** 2
    return (d2 >= (r_px + RING_MM[0] / pixel_mm) ** 2) & (d2 <= (r_px + RING_MM[1] / pixel_mm) ** 2)


def score(with_l: np.ndarray, without: np.ndarray, truth_lesion: np.ndarray, lesion: dict,
          pixel_mm: float, slice_mm: float) -> tuple[float, float]:
    """(contrast kept, CNR) of one lesion, averaged over the scored slices."""
    kept, cnr = [], []
    for k in SCORED:
        r_px = section_radius_mm(lesion, k, slice_mm) / pixel_mm
        core = disk(with_l.shape[1:], lesion["y"], lesion["x"], r_px / 2) > 0.5
        back = ring(with_l.shape[1:], lesion, r_px, pixel_mm)
        signal = float((with_l[k] - without[k])[core].mean())  # paired: the noise cancels
        kept.append(signal / float(truth_lesion[k][core].mean()))
        cnr.append(abs(signal) / float(without[k][back].std()))
    return float(np.mean(kept)), float(np.mean(cnr))


def background_positions(truth: np.ndarray, pixel_mm: float, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of uniform soft tissue (as lesions are placed in) far enough inside it for the
    largest lesion's observer template: where the NPW observer samples each method's error."""
    ys, xs = np.nonzero(UniformSoftTissue(truth).inside((max(DIAMETERS_MM) / 2 + RING_MM[1]) / pixel_mm))
    pick = np.random.default_rng(seed).choice(len(ys), size=min(count, len(ys)), replace=False)
    return ys[pick], xs[pick]


def npw_detectability(with_l: np.ndarray, without: np.ndarray, truth: np.ndarray, truth_lesion: np.ndarray,
                      lesion: dict, background: tuple[np.ndarray, np.ndarray], pixel_mm: float,
                      slice_mm: float) -> float:
    """d' of a non-prewhitening matched-filter observer (the CT task-based measure of AAPM TG-233),
    averaged over the scored slices.

    Template: the lesion's noise-free image. Signal: the template applied to the method's lesion
    response (output with minus without). Noise: the spread of the template applied to the
    method's own error (output without lesions minus the noise-free image) at ``background``
    positions in uniform soft tissue. Unlike pixel SD this sees how the noise is correlated: a
    blotchy, low-frequency residual looks like a lesion and counts more than fine grain."""
    from scipy.signal import fftconvolve
    d = []
    for k in SCORED:
        h = int(np.ceil((section_radius_mm(lesion, k, slice_mm) + RING_MM[1]) / pixel_mm))
        box = np.s_[lesion["y"] - h:lesion["y"] + h + 1, lesion["x"] - h:lesion["x"] + h + 1]
        template = truth_lesion[k][box]
        signal = float((template * (with_l[k] - without[k])[box]).sum())
        responses = fftconvolve(without[k] - truth[k], template[::-1, ::-1], mode="same")[background]
        d.append(signal / float(responses.std()))
    return float(np.mean(d))


def methods(dose: float, steps: list[int], redcnn: str | None, bm3d_sigma: dict[float, float],
            corediff: str = "corediff-{tag}-w32") -> dict:
    """label -> run(volume, slices=None): the method's output for the volume, or for its slices
    [start, stop) only (CoreDiff still sees their neighbours in the volume as context; its runs
    also take ``neighbours=False``, each slice its own context).
    ``corediff``: the CoreDiff model per dose, a name or a weights file ({tag}: 25, 10, 5)."""
    def part(v: np.ndarray, s: tuple[int, int] | None) -> np.ndarray:
        return v if s is None else v[s[0]:s[1]]

    tag = dose_tag(dose)
    found = {"LDCT": lambda v, s=None: part(v, s)}
    if dose in bm3d_sigma:
        found[f"BM3D (σ = {bm3d_sigma[dose]:g} HU)"] = lambda v, s=None: bm3d_denoise(part(v, s), bm3d_sigma[dose])
    if redcnn:
        path = REPO / redcnn.format(tag=tag)
        net = load_redcnn(path)
        found[f"RED-CNN ({path.name})"] = lambda v, s=None: redcnn_denoise(net, part(v, s))
    for n in steps:
        name = corediff.format(tag=tag)
        found[f"CoreDiff {Path(name).name.removesuffix('.safetensors')}, {'1 step' if n == 1 else f'T = {n}'}"] = \
            lambda v, s=None, neighbours=True, name=name, n=n: denoise_volume(
                v, model=name, device="cpu", steps=n, slices=s, neighbours=neighbours)
    return found


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose the doses and the methods scored (:func:`methods_for`), shared by
    the benchmarks that score them."""
    p.add_argument("--doses", type=float, nargs="+", default=[0.25, 0.1, 0.05])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 10], help="CoreDiff sampling steps to score")
    p.add_argument("--redcnn", default="Testing/benchmarks/models/redcnn32-gpu2-{tag}.pt",
                   help="RED-CNN weights per dose ({tag}: 25, 10, 5); '' for none")
    p.add_argument("--bm3d", nargs="*", default=["0.25=50", "0.1=100", "0.05=140"], metavar="DOSE=SIGMA",
                   help="BM3D's sigma (HU) per dose, as tuned on training slices for the quality tables; "
                        "none to leave BM3D out")
    p.add_argument("--corediff", default="corediff-{tag}-w32",
                   help="the CoreDiff model per dose, a name or a weights file ({tag}: 25, 10, 5)")


def methods_for(args: argparse.Namespace, dose: float) -> dict:
    """:func:`methods` as :func:`add_method_arguments`' options choose them."""
    bm3d_sigma = {float(d): float(v) for d, v in (item.split("=") for item in args.bm3d)}
    return methods(dose, args.steps, args.redcnn, bm3d_sigma, args.corediff)


def figure(path: Path, crops: dict[str, dict[str, np.ndarray]], title: str, mark_px: float) -> None:
    """Rows of crops centred on the lesion; the first column's lesion is ringed (mark_px)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = list(crops), list(next(iter(crops.values())))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.1 * len(cols), 2.3 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            ax.imshow(crops[row][col], cmap="gray", vmin=-60, vmax=140, interpolation="nearest")
            if j == 0:
                centre = (crops[row][col].shape[1] - 1) / 2, (crops[row][col].shape[0] - 1) / 2
                ax.add_patch(plt.Circle(centre, mark_px, fill=False, color="tab:orange", lw=0.8, ls="--"))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=7)
            if j == 0:
                ax.set_ylabel(row, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def summary(records: list[dict]) -> str:
    """Two markdown tables per diameter — contrast kept (mean [range]); CNR and NPW d' (means) —
    and every CoreDiff row paired lesion by lesion with the RED-CNN row of its dose."""
    rows: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        rows.setdefault((r["method"], r["dose"]), []).append(r)
    ordered = sorted(rows.items(), key=lambda item: -item[0][1])
    n = len(rows[("NDCT (full dose)", 1.0)])
    head = "| dose | method | " + " | ".join(f"{d:g} mm" for d in DIAMETERS_MM) + " |"
    rule = "|---|---|" + "---|" * len(DIAMETERS_MM)
    lines = [f"Low-contrast lesions (±{CONTRAST_HU:g} HU spheres) in the held-out test phantoms (seeds 9000–9002), "
             f"{n} lesions, scored on slices {SCORED[0]} and {SCORED[1]}, per diameter.", "",
             "Contrast kept (1 = whole): mean [range]", "", head, rule]
    for (label, dose), got in ordered:
        cells = []
        for d in DIAMETERS_MM:
            kept = [r["kept"] for r in got if r["diameter_mm"] == d]
            cells.append(f"{np.mean(kept):.2f} [{min(kept):.2f}, {max(kept):.2f}]" if kept else "–")
        lines.append(f"| {100 * dose:g} % | {label} | " + " | ".join(cells) + " |")
    lines += ["", "Detectability: CNR (pixel SD) / d' of the NPW observer (correlated noise counted): means", "",
              head, rule]
    for (label, dose), got in ordered:
        cells = []
        for d in DIAMETERS_MM:
            sized = [r for r in got if r["diameter_mm"] == d]
            cells.append(f"{np.mean([r['cnr'] for r in sized]):.1f} / {np.mean([r['npw_d'] for r in sized]):.1f}"
                         if sized else "–")
        lines.append(f"| {100 * dose:g} % | {label} | " + " | ".join(cells) + " |")
    lines += ["", "Paired with RED-CNN, lesion by lesion (all sizes): mean difference, and on how many "
              "lesions CoreDiff is ahead", "", "| dose | CoreDiff row | contrast kept | CNR | NPW d' |",
              "|---|---|---|---|---|"]
    for (label, dose), got in rows.items():
        red = [other for (name, d), other in rows.items() if d == dose and name.startswith("RED-CNN")]
        if not label.startswith("CoreDiff") or not red:
            continue
        theirs = {(r["case"], r["y"], r["x"]): r for r in red[0]}
        pairs = [(r, theirs[(r["case"], r["y"], r["x"])]) for r in got]
        cells = []
        for key, digits in (("kept", 3), ("cnr", 2), ("npw_d", 2)):
            diff = np.array([a[key] - b[key] for a, b in pairs])
            cells.append(f"{diff.mean():+.{digits}f} ({int((diff > 0).sum())}/{len(diff)})")
        lines.append(f"| {100 * dose:g} % | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(folder: str, stem: str, table: str, records) -> Path:
    """The markdown table and the JSON records of a run, as STEM.md and STEM.json in folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{stem}.md", table + "\n")
    write_text_atomic(out / f"{stem}.json", json.dumps(records, indent=1) + "\n")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data/test-6slices"))
    add_method_arguments(p)
    p.add_argument("--per-case", type=int, default=12, help="lesions tried per phantom")
    p.add_argument("--seed", type=int, default=20261204)
    p.add_argument("--out", default=None)
    p.add_argument("--from-json", default=None, metavar="FILE", help="only summarise a run's lesions.json again")
    a = p.parse_args()
    if a.from_json:
        print(summary(json.loads(Path(a.from_json).read_text())))
        return 0
    data, geometry, t0 = Path(a.data), FanBeamGeometry(), time.time()
    crops: dict[float, dict[str, np.ndarray]] = {}
    records = []
    for c, case in enumerate(CASES):
        truth = read_volume(data / f"{case}_noisefree.nrrd")
        pixel_mm, slice_mm = float(truth.spacing[0]), float(truth.spacing[2])
        lesions = place_lesions(truth.array, pixel_mm, a.per_case, a.seed + c)
        added = lesion_images(lesions, truth.shape, pixel_mm, slice_mm, geometry)
        background = background_positions(truth.array, pixel_mm, 400, a.seed + 100 + c)
        print(f"{case}: {len(lesions)} lesions ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        ndct = read_volume(data / f"{case}_ndct.nrrd").array
        for les in lesions:
            kept, cnr = score(ndct + added, ndct, added, les, pixel_mm, slice_mm)
            dprime = npw_detectability(ndct + added, ndct, truth.array, added, les, background, pixel_mm, slice_mm)
            records.append({"case": case, "dose": 1.0, "method": "NDCT (full dose)", **les, "kept": kept, "cnr": cnr,
                            "npw_d": dprime})
        for dose in a.doses:
            ldct = read_volume(data / f"{case}_ldct{dose_tag(dose)}.nrrd").array
            for label, run in methods_for(a, dose).items():
                with_l, without = run(ldct + added), run(ldct)
                for les in lesions:
                    kept, cnr = score(with_l, without, added, les, pixel_mm, slice_mm)
                    dprime = npw_detectability(with_l, without, truth.array, added, les, background, pixel_mm,
                                               slice_mm)
                    records.append({"case": case, "dose": dose, "method": label, **les, "kept": kept, "cnr": cnr,
                                    "npw_d": dprime})
                show = next((les for les in lesions if les["diameter_mm"] == 6.0), None)
                if c == 0 and show is not None:  # the figure: the abdomen's first 6 mm lesion
                    shown = (show, pixel_mm)
                    box = np.s_[SCORED[0], show["y"] - 28:show["y"] + 29, show["x"] - 28:show["x"] + 29]
                    crops.setdefault(dose, {"noise-free": (truth.array + added)[box], "NDCT": (ndct + added)[box]})
                    column = label.split(" (")[0] if label.startswith(("RED-CNN", "BM3D")) else label
                    crops[dose][column.replace(f"corediff-{dose_tag(dose)}-w32, ", "")] = with_l[box]
            print(f"  {case} at {dose:g}: done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    table = summary(records)
    print(table)
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    if a.out:
        out = write_results(a.out, "lesions", table, records)
        if crops:
            figure(out / "lesion.png", {f"{100 * dose:g} % dose": c for dose, c in crops.items()},
                   f"A 6 mm, {shown[0]['contrast_hu']:+g} HU lesion (ringed) in the abdomen phantom, "
                   f"slice {SCORED[0]} (W 200 / L 40 HU)", mark_px=6.0 / shown[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

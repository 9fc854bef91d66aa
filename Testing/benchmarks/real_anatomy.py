#!/usr/bin/env python
"""Real anatomy: the shipped models on clinical chest CT, its dose lowered by noise insertion.

    python Testing/benchmarks/real_anatomy.py --out docs/benchmarks/real_anatomy

Every model here was trained on simulated phantoms; the question a user asks first is whether
that carries over to a patient. The two clinical chest CT scans that pyradiomics ships as test
cases (``lung1``, ``lung2``: 512 x 512, 0.57 / 0.63 mm pixels, 5 mm slices, in the source
distribution ``pyradiomics==3.0.1`` on the package index; fetched with pip, checked by sha256)
are treated the way the AAPM/Mayo low-dose data were made from routine-dose scans:

- each scan is the object: its slices are forward-projected with the simulation's fan-beam
  geometry at their own pixel size;
- the **reference** is the noiseless reconstruction of those projections (the simulation's FBP):
  the scan's anatomy *and its own routine-dose noise*, as the Mayo NDCT is a real scan with
  its noise;
- the **LDCT** at dose d adds Poisson + electronic noise to the same projections, at the dose
  d_ins with 1/d_ins = 1/d - 1/d_scan, so that the scan's own noise plus the inserted noise is
  the noise of the simulation at dose d. d_scan, the scan's dose on the simulation's scale, is
  measured: the noise index (``dose_estimate.measure``) of the reference, and of the reference
  plus a full-dose simulation, give the scan's noise variance and the simulation's;
- the doses are nested (binomial thinning), as in the training data.

Scored: the inner slice of each of ``--blocks`` triples of adjacent slices per scan (its
neighbours are CoreDiff's context), PSNR / SSIM / RMSE on the paper's window against the
reference, for the LDCT, BM3D (the quality tables' tuned sigma), RED-CNN (the same-budget
baseline) and CoreDiff (the shipped ``-w32`` model of the dose, one step and T = 10, with its
neighbours as context and with the slice standing in for them, which ``corediff denoise --context
auto`` does from 4 mm of spacing on), with paired differences. Also
what ``--model auto`` makes of each LDCT. Writes real_anatomy.md, real_anatomy.json and one
figure per dose to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesion_benchmark import REPO, add_method_arguments, methods_for, write_results  # noqa: E402

from CoreDiffLib.atomic import atomic_path  # noqa: E402
from CoreDiffLib.dose_estimate import choose_model_or_default, measure  # noqa: E402
from CoreDiffLib.figures import comparison_figure  # noqa: E402
from CoreDiffLib.io import read_volume  # noqa: E402
from CoreDiffLib.metrics import paired_difference, slice_metrics  # noqa: E402
from CoreDiffLib.pairs import dose_tag  # noqa: E402
from CoreDiffLib.simulation.noise import add_projection_noise, nested_dose_noise  # noqa: E402
from CoreDiffLib.simulation.projector import FanBeamGeometry, fbp, forward_project, hu_to_mu, mu_to_hu  # noqa: E402

SOURCE = "pyradiomics==3.0.1"
ARCHIVE = "pyradiomics-3.0.1.tar.gz"
ARCHIVE_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
CASES = ("lung1", "lung2")
OWN_SLICE = ", own slice as context"


def fetch_scans(cache: Path) -> dict[str, Path]:
    """The scans' NRRD files, extracted from the pyradiomics source archive (downloaded once)."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / ARCHIVE
    if not archive.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", SOURCE, "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", "--dest", str(cache)], check=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise SystemExit(f"{archive}: sha256 {digest}, expected {ARCHIVE_SHA256}; delete it to fetch it again")
    found = {}
    with tarfile.open(archive) as tar:
        for case in CASES:
            path = cache / f"{case}_image.nrrd"
            if not path.exists():
                member = tar.extractfile(f"pyradiomics-3.0.1/data/{case}_image.nrrd")
                with atomic_path(path) as tmp:
                    Path(tmp).write_bytes(member.read())
            found[case] = path
    return found


def reconstruct(sinograms: np.ndarray, geometry: FanBeamGeometry, size: int, pixel_mm: float) -> np.ndarray:
    return mu_to_hu(fbp(sinograms, geometry, size, pixel_mm))


def noise_inserted(scan: np.ndarray, pixel_mm: float, doses: list[float], geometry: FanBeamGeometry,
                   seed: int) -> tuple[np.ndarray, dict[float, np.ndarray], float, dict[float, float]]:
    """(reference, {dose: LDCT}, the scan's own dose, {dose: inserted dose}) for (B, N, N) HU slices."""
    size = scan.shape[-1]
    rng = np.random.default_rng(seed)
    sino = forward_project(hu_to_mu(scan), geometry, pixel_mm)
    reference = reconstruct(sino, geometry, size, pixel_mm)
    full = reconstruct(np.stack([add_projection_noise(s, 1.0, rng=rng) for s in sino]), geometry, size, pixel_mm)
    spacing = (pixel_mm, pixel_mm)
    own = measure(reference, spacing, max_slices=len(scan)).noise_index_hu
    both = measure(full, spacing, max_slices=len(scan)).noise_index_hu
    scan_dose = (both ** 2 - own ** 2) / own ** 2  # simulation's noise variance at full dose / the scan's
    inserted = {}
    for d in doses:
        if 1.0 / d - 1.0 / scan_dose <= 0:
            raise SystemExit(f"the scan is already as noisy as {100 * d:g} % dose (it looks like "
                             f"{100 * scan_dose:.0f} %): no noise can be inserted")
        inserted[d] = 1.0 / (1.0 / d - 1.0 / scan_dose)
    noisy = [nested_dose_noise(s, list(inserted.values()), rng=rng, include_full=False) for s in sino]
    ldct = {d: reconstruct(np.stack([n[inserted[d]] for n in noisy]), geometry, size, pixel_mm) for d in doses}
    return reference, ldct, scan_dose, inserted


def paired_line(label: str, rows: list[dict], a: str, b: str) -> str:
    """mean a - b per metric, its 95 % interval, and on how many slices a was the better."""
    cells = []
    for key, unit, fmt in (("psnr", " dB", "{:+.2f}"), ("ssim", "", "{:+.5f}"), ("rmse", " HU", "{:+.2f}")):
        x = np.array([r["scores"][a][key] for r in rows])
        y = np.array([r["scores"][b][key] for r in rows])
        d = paired_difference(x, y)
        better = int((x < y).sum()) if key == "rmse" else d.a_better
        cells.append(f"{fmt.format(d.mean)}{unit} [{fmt.format(d.low)}, {fmt.format(d.high)}], {better}/{d.n}")
    return f"| {label} | " + " | ".join(cells) + " |"


def summary(result: dict) -> str:
    lines = [f"Clinical chest CT ({', '.join(result['cases'])}; {SOURCE}), noise inserted to each dose; "
             f"{len(result['slices']) // len(result['doses'])} scored slices per dose; against the reference "
             "(the scan with its own noise), window [-1000, 1000] HU.", ""]
    for case, info in result["scans"].items():
        lines.append(f"- {case}: {info['slices']} slices of {info['pixel_mm']:.3f} mm pixels, {info['slice_mm']:g} mm "
                     f"apart; the scan's own noise is that of the simulation at {100 * info['scan_dose']:.0f} % dose; "
                     "inserted: " + ", ".join(f"{100 * float(d):g} % -> {100 * v:.1f} %"
                                            for d, v in info["inserted"].items()))
    for dose in result["doses"]:
        rows = [r for r in result["slices"] if r["dose"] == dose]
        labels = list(rows[0]["scores"])
        lines += ["", f"### {100 * dose:g} % dose", "", "| method | PSNR (dB) | SSIM | RMSE (HU) |",
                  "|---|---|---|---|"]
        best = {k: (max if k != "rmse" else min)(np.mean([r["scores"][m][k] for r in rows]) for m in labels)
                for k in ("psnr", "ssim", "rmse")}
        for m in labels:
            cells = []
            for k, fmt in (("psnr", "{:.2f}"), ("ssim", "{:.4f}"), ("rmse", "{:.2f}")):
                v = float(np.mean([r["scores"][m][k] for r in rows]))
                cells.append(f"**{fmt.format(v)}**" if fmt.format(v) == fmt.format(best[k]) else fmt.format(v))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        corediff = [m for m in labels if m.startswith("CoreDiff") and not m.endswith(OWN_SLICE)]
        others = [m for m in labels if m.startswith(("RED-CNN", "BM3D"))]
        lines += ["", "| paired (95 % interval, slices better) | PSNR | SSIM | RMSE |", "|---|---|---|---|"]
        for c in corediff:
            steps = c.split(", ")[-1]
            for o in others:
                lines.append(paired_line(f"CoreDiff {steps} − {o.split(' (')[0]}", rows, c, o))
            if c + OWN_SLICE in labels:
                lines.append(paired_line(f"CoreDiff {steps}: neighbours − own slice", rows, c, c + OWN_SLICE))
        for case, auto in result["auto"][str(dose)].items():
            if auto.get("problem"):  # not measurable: the default model, as denoise runs it
                lines.append(f"\n`--model auto` on {case}'s LDCT: {auto['problem']} -> {auto['model']}")
                continue
            lines.append(f"\n`--model auto` on {case}'s LDCT: looks like {100 * auto['dose']:.0f} % (noise index "
                         f"{auto['noise_index_hu']:.1f} HU, WED {auto['wed_mm']:.0f} mm) -> {auto['model']}")
    return "\n".join(lines)


def figure_panel(label: str) -> str | None:
    """A method's panel title in the figure, or None for a method left out of it (ten steps)."""
    if not label.startswith("CoreDiff"):
        return label.split(" (")[0]
    steps = label.split(", ", 1)[1]
    return None if steps.startswith("T =") else f"CoreDiff {steps}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(REPO / "data" / "real_anatomy"), help="where the scans are fetched to")
    add_method_arguments(p)
    p.add_argument("--blocks", type=int, default=8, help="triples of adjacent slices scored per scan")
    p.add_argument("--seed", type=int, default=20261205)
    p.add_argument("--out", default=None)
    p.add_argument("--from-json", default=None, metavar="FILE", help="only summarise a run's real_anatomy.json again")
    a = p.parse_args()
    if a.from_json:
        print(summary(json.loads(Path(a.from_json).read_text())))
        return 0
    geometry, t0 = FanBeamGeometry(), time.time()
    result: dict = {"cases": list(CASES), "doses": a.doses, "scans": {}, "auto": {str(d): {} for d in a.doses},
                    "slices": []}
    shown: dict[float, dict[str, np.ndarray]] = {}
    for c, (case, path) in enumerate(fetch_scans(Path(a.cache)).items()):
        volume = read_volume(path)
        n = volume.shape[0]
        pixel_mm = float(volume.spacing[0])
        centres = np.unique(np.linspace(2, n - 3, a.blocks).round().astype(int))
        picked = np.concatenate([[k - 1, k, k + 1] for k in centres])
        reference, ldct, scan_dose, inserted = noise_inserted(volume.array[picked], pixel_mm, a.doses, geometry,
                                                              a.seed + c)
        result["scans"][case] = {"slices": int(n), "pixel_mm": pixel_mm, "slice_mm": float(volume.spacing[2]),
                                 "scored": centres.tolist(), "scan_dose": scan_dose,
                                 "inserted": {str(d): v for d, v in inserted.items()}}
        print(f"{case}: scan like {100 * scan_dose:.0f} %, LDCT simulated ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        for dose in a.doses:
            choice = choose_model_or_default(ldct[dose], (pixel_mm, pixel_mm))  # as denoise's --model auto
            scan = choice.scan
            result["auto"][str(dose)][case] = {"model": choice.model, "dose": choice.dose, "problem": choice.problem,
                                               "noise_index_hu": scan.noise_index_hu if scan else None,
                                               "wed_mm": scan.wed_mm if scan else None}
            found = methods_for(a, dose)
            for label in [k for k in found if k.startswith("CoreDiff")]:  # 5 mm apart: are the neighbours any use?
                found[label + OWN_SLICE] = lambda v, s, run=found[label]: run(v, s, neighbours=False)
            rows = [{"case": case, "slice": int(k), "dose": dose, "scores": {}} for k in centres]
            result["slices"] += rows
            for label, run in found.items():
                for b, row in enumerate(rows):
                    out = run(ldct[dose][3 * b:3 * b + 3], (1, 2))[0]
                    m = slice_metrics(out, reference[3 * b + 1])
                    row["scores"][label] = {"psnr": m.psnr, "ssim": m.ssim, "rmse": m.rmse_hu}
                    panel = figure_panel(label)
                    if c == len(CASES) - 1 and b == len(centres) // 2 and panel:  # the figure: lung2's middle block
                        shown.setdefault(dose, {"reference (the scan)": reference[3 * b + 1]})[panel] = out
            print(f"  {case} at {dose:g}: done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    table = summary(result)
    print(table)
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    if a.out:
        out = write_results(a.out, "real_anatomy", table, result)
        for dose, panels in shown.items():
            last = list(panels)[-1]
            comparison_figure(panels, out / f"real_anatomy_{dose_tag(dose)}.png",
                              title=f"{CASES[-1]}, slice {result['scans'][CASES[-1]]['scored'][len(centres) // 2]}, "
                                    f"{100 * dose:g} % dose by noise insertion",  # the figure adds its windows
                              difference=("LDCT", last))
    return 0


if __name__ == "__main__":
    sys.exit(main())

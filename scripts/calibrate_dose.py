#!/usr/bin/env python
"""Fit the ``--model auto`` calibration on the training phantoms and record it in the manifest.

    python scripts/calibrate_dose.py data/train --models 0.25=corediff-25-w32 0.1=corediff-10-w32 \
        0.05=corediff-5-w32 [--check data/val-6slices data/test-6slices] [--dry-run]

DATA holds ``*_ndct.nrrd`` (dose 1) and ``*_ldct<percent>.nrrd`` volumes (what ``corediff
simulate`` writes, as scripts/train_shipped.sh makes them). Each is measured as
``CoreDiffLib.dose_estimate.measure`` does (noise index, water-equivalent diameter) and
log(noise) = a + b WED + c log(dose) is fitted by least squares. ``--check`` folders are
measured with the fitted calibration and each scan's estimated dose and chosen model printed.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from CoreDiffLib.atomic import write_text_atomic  # noqa: E402
from CoreDiffLib.dose_estimate import DoseCalibration, measure, nearest_model  # noqa: E402
from CoreDiffLib.io import read_volume  # noqa: E402
from CoreDiffLib.models import MANIFEST, load_manifest, shipped_models  # noqa: E402
from CoreDiffLib.pairs import dose_from_tag  # noqa: E402

_ROLE = re.compile(r"_(ndct|ldct([\dp]+))\.nrrd$")


def scans(folder: Path):
    """(file, dose, ScanNoise) for every NDCT/LDCT volume in the folder."""
    for path in sorted(folder.glob("*.nrrd")):
        m = _ROLE.search(path.name)
        if not m:
            continue
        volume = read_volume(path)
        dose = 1.0 if m.group(1) == "ndct" else dose_from_tag(m.group(2))
        yield path, dose, measure(volume.array, volume.spacing[:2])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--models", nargs="+", required=True, metavar="DOSE=NAME")
    p.add_argument("--check", nargs="*", type=Path, default=[])
    p.add_argument("--dry-run", action="store_true", help="print, do not write the manifest")
    args = p.parse_args()
    try:
        models = {float(d): name for d, name in (item.split("=", 1) for item in args.models)}
    except ValueError:
        p.error(f"--models {' '.join(args.models)}: give DOSE=NAME pairs, e.g. 0.25=corediff-25-w32")
    unknown = set(models.values()) - set(shipped_models())
    if unknown:
        p.error(f"not shipped: {', '.join(sorted(unknown))}")
    for folder in (args.data, *args.check):
        if not folder.is_dir():
            p.error(f"{folder} is not a folder: give one that corediff simulate wrote")

    measured = list(scans(args.data))
    doses = {d for _, d, _ in measured}
    if len(measured) < 3 or len(doses) < 2:  # three coefficients; the dose's needs two doses
        p.error(f"{args.data} holds {len(measured)} volumes at {len(doses)} dose(s) (*_ndct.nrrd, "
                "*_ldct<percent>.nrrd): the fit needs three or more at two doses or more, as corediff "
                "simulate writes them")
    calibration = DoseCalibration.fit([s for _, _, s in measured], [d for _, d, _ in measured])
    print(f"log(noise index) = {calibration.a:.4f} + {calibration.b:.6f} WED + {calibration.c:.4f} log(dose)")
    errors = []
    for folder in [args.data, *args.check]:
        rows = measured if folder == args.data else list(scans(folder))
        for path, dose, scan in rows:
            est = calibration.dose(scan)
            errors.append(abs(math.log(est / dose)))
            chosen = nearest_model(est, models) if dose < 1 else "-"
            right = "" if dose == 1 or chosen == models.get(dose) else "   <- not the model of its dose"
            print(f"{folder.name:14s} {path.name:32s} dose {dose:4.2f}  noise index {scan.noise_index_hu:6.2f} HU  "
                  f"WED {scan.wed_mm:5.1f} mm  estimated {est:5.3f}  -> {chosen}{right}")
    worst = math.exp(max(errors))
    print(f"worst estimate off by a factor {worst:.2f} (the models' doses are 2-2.5x apart)")
    if args.dry_run:
        return 0
    manifest = load_manifest()
    manifest["auto"] = {
        "models": {f"{d:g}": name for d, name in sorted(models.items(), reverse=True)},
        "calibration": {"a": calibration.a, "b": calibration.b, "c": calibration.c},
        "recipe": (f"scripts/calibrate_dose.py on {len(measured)} training volumes ({args.data}: NDCT and "
                   "LDCT at each dose of every phantom); noise index = mode of the 6 mm local SD over soft "
                   "tissue, WED over > -500 HU, 8 slices each; worst estimate over the training, validation "
                   f"and test phantoms off by a factor {worst:.2f}"),
    }
    import json
    write_text_atomic(MANIFEST, json.dumps(manifest, indent=2) + "\n")
    print(f"wrote the calibration into {MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

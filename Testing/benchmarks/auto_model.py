"""What ``--model auto`` chooses on held-out phantoms, and what each choice scores.

    python Testing/benchmarks/auto_model.py [--data data/test-6slices] [--steps 1] [--out DIR]
    python Testing/benchmarks/auto_model.py --data data/test-6slices-unseen --simulate 0.5 0.15 0.03

``--simulate DOSES`` first simulates the three held-out test phantoms (seeds 9000-9002, 6 slices
of 512²) at doses no model was trained for into DATA, unless it holds them already.

For every phantom and dose of DATA (``*_ndct.nrrd`` + ``*_ldct<percent>.nrrd``, as ``corediff
simulate`` writes them): the noise index, water-equivalent diameter and estimated dose, the
model ``--model auto`` picks, and the PSNR / SSIM against the NDCT of each shipped dose model
(the ``auto`` models of the manifest), so the cost of the default or of a wrong choice is seen.
Writes README.md and results.json to --out.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from CoreDiffLib.dose_estimate import choose_model, nearest_model, shipped_choice  # noqa: E402
from CoreDiffLib.inference import Denoiser, denoise_volume  # noqa: E402
from CoreDiffLib.io import Volume, read_volume, write_volume  # noqa: E402
from CoreDiffLib.metrics import mean_metrics, volume_metrics  # noqa: E402
from CoreDiffLib.models import load_manifest  # noqa: E402
from CoreDiffLib.pairs import dose_from_tag  # noqa: E402


def simulate_unseen(folder: Path, doses: list[float]) -> None:
    """The test phantoms (seeds 9000-9002) at ``doses``, written as corediff simulate names them."""
    from CoreDiffLib.simulation import simulate_pair
    from CoreDiffLib.pairs import dose_tag
    folder.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(("abdomen", "thorax", "head")):
        name = f"test{9000 + i}_{kind}"
        ndct_path = folder / f"{name}_ndct.nrrd"
        ldct_paths = [folder / f"{name}_ldct{dose_tag(d)}.nrrd" for d in doses]
        if ndct_path.exists():
            missing = [p.name for p in ldct_paths if not p.exists()]
            if missing:  # the doses of a case are drawn together: one more would redraw them all
                raise SystemExit(f"{folder} holds {ndct_path.name} but not {', '.join(missing)} (a run stopped "
                                 "halfway, or other --simulate doses): move the folder away to simulate it again")
            continue
        ndct, ldcts, spacing = simulate_pair(kind, 6, 512, sorted(doses, reverse=True), seed=9000 + i)
        for dose, ldct in ldcts.items():  # the NDCT last: it marks the case complete
            write_volume(Volume(ldct, spacing, pixel_type="int16"), folder / f"{name}_ldct{dose_tag(dose)}.nrrd")
        write_volume(Volume(ndct, spacing, pixel_type="int16"), ndct_path)
        print(f"simulated {name} at {', '.join(f'{d:g}' for d in doses)}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/test-6slices"))
    p.add_argument("--steps", type=int, default=1, help="sampling steps (1: the CPU default)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/auto_model"))
    p.add_argument("--simulate", type=float, nargs="*", default=None, metavar="DOSE")
    args = p.parse_args()
    if args.simulate:
        simulate_unseen(args.data, args.simulate)
    _, models = shipped_choice()
    default = load_manifest()["default"]
    denoisers = {name: Denoiser.load(name, "cpu", args.steps) for name in models.values()}
    rows = []
    if not any(args.data.glob("*_ndct.nrrd")):  # it wrote empty tables over the committed ones
        raise SystemExit(f"{args.data} holds no *_ndct.nrrd scans: simulate them (--simulate DOSE ...) or give --data")
    for ndct_path in sorted(args.data.glob("*_ndct.nrrd")):
        reference = read_volume(ndct_path).array
        ldct_paths = {dose_from_tag(re.search(r"_ldct([\dp]+)\.nrrd$", path.name).group(1)): path
                      for path in ndct_path.parent.glob(ndct_path.name.replace("_ndct", "_ldct*"))}
        for dose, ldct_path in sorted(ldct_paths.items(), reverse=True):
            ldct = read_volume(ldct_path)
            chosen, scan, estimate = choose_model(ldct.array, ldct.spacing[:2])
            row = {"case": ndct_path.name[:-len("_ndct.nrrd")], "dose": dose,
                   "noise_index_hu": scan.noise_index_hu, "wed_mm": scan.wed_mm, "estimated_dose": estimate,
                   "chosen": chosen, "ldct": mean_metrics(volume_metrics(ldct.array, reference)).__dict__,
                   "models": {}}
            for name, den in denoisers.items():
                m = mean_metrics(volume_metrics(denoise_volume(ldct.array, denoiser=den), reference))
                row["models"][name] = m.__dict__
            rows.append(row)
            print(json.dumps(row), flush=True)

    names = list(denoisers)
    lines = [f"# `--model auto` on {args.data.name} ({args.steps} sampling step{'s' if args.steps > 1 else ''}, CPU)",
             "", "Made by `python Testing/benchmarks/auto_model.py --data "
             f"{args.data} --steps {args.steps}`. PSNR (dB) against the NDCT, mean over the slices; **bold**: "
             "the model `--model auto` chose.", "",
             "| phantom | dose | noise index (HU) | WED (mm) | estimated dose | LDCT | "
             + " | ".join(f"`{n}`" for n in names) + " | auto − default |",
             "|---|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for row in rows:
        cells = []
        for n in names:
            value = f"{row['models'][n]['psnr']:.2f}"
            cells.append(f"**{value}**" if n == row["chosen"] else value)
        gain = row["models"][row["chosen"]]["psnr"] - row["models"][default]["psnr"]
        lines.append(f"| {row['case']} | {row['dose']:g} | {row['noise_index_hu']:.1f} | {row['wed_mm']:.0f} | "
                     f"{row['estimated_dose']:.3f} | {row['ldct']['psnr']:.2f} | " + " | ".join(cells)
                     + f" | {gain:+.2f} |")
    best = sum(row["models"][row["chosen"]]["psnr"] >= max(m["psnr"] for m in row["models"].values()) - 1e-9
               for row in rows)
    matched = sum(row["chosen"] == nearest_model(row["dose"], models) for row in rows)
    lines += ["", f"The chosen model is the one trained at the dose nearest the scan's (in log) for {matched} of "
              f"{len(rows)} scans, and the best-scoring of the {len(names)} for {best} of {len(rows)}."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results_{args.data.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{args.data.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

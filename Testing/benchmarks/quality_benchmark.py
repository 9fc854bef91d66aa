#!/usr/bin/env python
"""Quality benchmark: CoreDiff vs LDCT, BM3D and RED-CNN on held-out simulated phantoms.

    python Testing/benchmarks/quality_benchmark.py --dose 0.25 --out docs/benchmarks

Held-out phantoms use seeds 9000+ (never used in training) and are cached under ``data/test``
(``data/test-6slices`` etc. for other slice counts); ``--split validation`` scores on a second
held-out set (seeds 8000+, ``data/val``) for choices made by measurement, e.g. which weights to
ship, so that the test table never picks what it then reports.

Scored slices lie *inside* their volume (``--margin``, default 1): a scan has hundreds of
slices and CoreDiff reads each one's neighbours as context, so a thin test volume whose scored
slices include its first and last (one neighbour there; the slice stands in for the other) would
test the network mostly where a scan barely has slices. The volume's two end slices get a
table of their own. Rows: the LDCT input, BM3D (sigma tuned on training slices), RED-CNN (if a
trained file is given), CoreDiff with T=1 (one network evaluation) and T=10, and the CTX / EMM
ablations (if their weights are given). Metrics as the paper: PSNR / SSIM / RMSE (HU) on the
[-1000, 1000] HU window, per slice then averaged. Prints a markdown table, writes it and a
figure (the same slice from each method with a zoomed region) to --out. The figure shows the
methods only — LDCT, BM3D, the first --redcnn, the --model / --also rows, NDCT, noise-free — so
it stays readable; ablations and further RED-CNN weights are in the tables.

Every row is scored twice: against the NDCT (the paper's protocol; the NDCT carries
full-dose noise of its own) and against the noise-free reconstruction of the same phantom
(what a perfect denoiser would return; only a simulation has it). Two oracle rows show the
ceiling of the NDCT protocol: the noise-free image itself, and the best estimate of the NDCT
a method could make if it knew the noise-free image (truth + k·(LDCT − truth), k fitted):
with nested dose noise k ≈ dose, and no method can gain more than ≈ 10·log10(1/dose) dB
over the LDCT when scored against NDCT.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from CoreDiffLib.atomic import atomic_path, write_text_atomic  # noqa: E402
from CoreDiffLib.figures import comparison_figure  # noqa: E402
from CoreDiffLib.inference import denoise_volume  # noqa: E402
from CoreDiffLib.io import Volume, read_volume, write_volume  # noqa: E402
from CoreDiffLib.metrics import mean_metrics, paired_difference, psnr, volume_metrics  # noqa: E402
from CoreDiffLib.models import sha256_of  # noqa: E402


#: Held-out LDCT is simulated for all of these at once (nested photon thinning), so every
#: dose pairs with the same NDCT realisation; simulating one dose at a time would redraw the
#: NDCT noise and silently un-pair the files already cached.
HELD_OUT_DOSES = (0.25, 0.1, 0.05)

#: held-out splits: (name prefix, first phantom seed, default cache folder); the shipped training
#: data use other phantom seeds (`corediff simulate --seed 1`: 100003 + case)
SPLITS = {"test": ("test", 9000, REPO / "data" / "test"), "validation": ("val", 8000, REPO / "data" / "val")}


def default_cache(split: str, volume_slices: int) -> Path:
    """data/test for the original 4-slice volumes, data/test-6slices etc. for other sizes."""
    folder = SPLITS[split][2]
    return folder if volume_slices == 4 else folder.with_name(f"{folder.name}-{volume_slices}slices")


def held_out(dose: float, cache: Path, kinds=("abdomen", "thorax", "head"), slices: int = 4,
             size: int = 512, split: str = "test", slice_mm: float = 1.0,
             other_doses: bool = False) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, ndct, ldct, noise-free) for each held-out case, simulated once and cached as NRRD.

    ``slice_mm``: the slice spacing (the shipped models were trained on 1 mm); each spacing is
    a held-out set of its own, in its own ``cache``. The doses of a set are drawn together (the
    low-dose photons a subset of the normal dose's), so a dose outside :data:`HELD_OUT_DOSES`
    draws other noise for all of them, the NDCT's included: it is simulated only into a folder of
    its own (``other_doses``, ``--test-dir``). A first run at 15 % in the default folder made the
    set every later table was scored on, silently unlike the committed ones."""
    from CoreDiffLib.simulation import noise_free_reconstruction, simulate_pair
    from CoreDiffLib.pairs import dose_tag
    cache.mkdir(parents=True, exist_ok=True)
    manifest = cache / "manifest.json"
    if manifest.exists() and not isinstance(json.loads(manifest.read_text()).get("cases"), dict):
        # a `corediff simulate` output: its manifest lists its own cases (other seeds), which this would overwrite
        raise SystemExit(f"{cache} holds a `corediff simulate` output (its manifest.json lists its own cases, of "
                         "other seeds than this benchmark's held-out phantoms): give the benchmark a folder of its "
                         "own with --test-dir")
    doses = sorted(set(HELD_OUT_DOSES) | {dose}, reverse=True)
    cases = []
    prefix, first_seed, _ = SPLITS[split]
    for i, kind in enumerate(kinds):
        seed = first_seed + i
        name = f"{prefix}{seed}_{kind}"
        nd_path = cache / f"{name}_ndct.nrrd"
        ld_paths = {d: cache / f"{name}_ldct{dose_tag(d)}.nrrd" for d in doses}
        missing = [p.name for p in ld_paths.values() if not p.exists()]
        if nd_path.exists() and missing:
            # re-simulating would redraw the NDCT noise under every table already scored on it
            raise SystemExit(f"{cache} holds {nd_path.name} but not {', '.join(missing)}: its doses were "
                             f"simulated together ({', '.join(f'{d:g}' for d in HELD_OUT_DOSES)}); pick "
                             "one of those, or move the folder away to simulate a new set")
        if not nd_path.exists():
            if dose not in HELD_OUT_DOSES and not other_doses:
                standard = ", ".join(f"{d:g}" for d in HELD_OUT_DOSES)
                raise SystemExit(f"dose {dose:g} is not one of the held-out set's ({standard}), which are drawn "
                                 "together: simulated with them it redraws the whole set, the NDCT's noise too: "
                                 "give it a --test-dir of its own")
            nd, lds, spacing = simulate_pair(kind, slices, size, list(doses), seed=seed, slice_mm=slice_mm)
            write_volume(Volume(nd, spacing, pixel_type="int16"), nd_path)
            for d, path in ld_paths.items():
                write_volume(Volume(lds[d], spacing, pixel_type="int16"), path)
            record_simulated_case(cache, name, kind=kind, seed=seed, slices=slices, size=size, doses=doses,
                                  slice_mm=slice_mm)
        nd = read_volume(nd_path)
        if abs(nd.spacing[2] - slice_mm) > 1e-6:
            raise SystemExit(f"{cache} holds {nd.spacing[2]:g} mm slices, not {slice_mm:g} mm: give another "
                             "--test-dir (each slice spacing is a held-out set of its own)")
        if nd.array.shape[0] != slices:
            raise SystemExit(f"{cache} holds {nd.array.shape[0]}-slice volumes, not {slices}: give another "
                             "--test-dir (each slice count is a held-out set of its own)")
        truth_path = cache / f"{name}_noisefree.nrrd"  # phantom only: independent of the noise draw
        if not truth_path.exists():
            truth = noise_free_reconstruction(kind, slices, size, seed=seed, slice_mm=slice_mm)
            write_volume(Volume(truth, nd.spacing, pixel_type="float32"), truth_path)
        cases.append((name, nd.array, read_volume(ld_paths[dose]).array, read_volume(truth_path).array))
    return cases


def record_simulated_case(cache: Path, name: str, **recipe) -> None:
    """Add a freshly simulated case to ``cache/manifest.json``, with the software that made it.

    A seed reproduces a held-out set to the bit only with the same NumPy / SciPy / astra / torch
    builds (re-simulated on another machine the sets differed by ~0.03 dB of LDCT PSNR), so
    tables scored on two caches compare only if their manifests name the same versions.
    """
    from CoreDiffLib.simulation.dataset import software_versions
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    manifest["cases"][name] = dict(recipe, doses=[float(d) for d in recipe.get("doses", ())],
                                   software=software_versions())
    write_text_atomic(path, json.dumps(manifest, indent=1))


def held_out_fingerprint(cases) -> str:
    """16 hex digits of the sha256 of every case's LDCT and NDCT voxels: two tables with the same
    fingerprint were scored on bit-identical data, whichever machine simulated it."""
    return hashlib.sha256(b"".join(c[2].tobytes() + c[1].tobytes() for c in cases)).hexdigest()[:16]


def held_out_provenance(cache: Path, names: list[str]) -> str:
    """One line for a table: which software simulated the cached cases, or that nobody recorded it."""
    path = cache / "manifest.json"
    cases = json.loads(path.read_text()).get("cases", {}) if path.exists() else {}
    builds = {json.dumps(cases[n]["software"], sort_keys=True) for n in names if n in cases}
    if len(builds) != 1 or any(n not in cases for n in names):
        return (f"Held-out set {cache.name}: simulated before its manifest recorded the software "
                "(figures compare only with tables scored on the same files).")
    sw = json.loads(builds.pop())
    return (f"Held-out set {cache.name} simulated with "
            + ", ".join(f"{k} {v}" for k, v in sw.items() if v) + " (a seed reproduces it to the bit only "
            "with the same builds).")


def noise_share(e_in: np.ndarray, e_out: np.ndarray) -> float:
    """Least-squares slope of an output's error on the input's error: the share of input noise kept."""
    return float((e_in * e_out).sum() / (e_in * e_in).sum())


def soft_tissue_mask(truth: np.ndarray) -> np.ndarray:
    """Soft tissue (−300…300 HU) of the noise-free image, eroded 3 pixels in-plane (no edges)."""
    from scipy import ndimage
    soft = (truth > -300) & (truth < 300)
    return ndimage.binary_erosion(soft, structure=np.ones((1, 3, 3)), iterations=3)


def noise_decomposition(out: np.ndarray, ldct: np.ndarray, truth: np.ndarray,
                        mask: np.ndarray | None = None) -> tuple[float, float]:
    """(k, rest): the error against the noise-free image in soft tissue, split in two.

    k is the fraction of the LDCT's noise the method passes through (least-squares slope of
    out − truth on LDCT − truth; 1 for the input, ≈ dose for the NDCT) and ``rest`` the RMS
    (HU) of what is left: blur, bias and the method's own artefacts. A method that scores
    lower may have less ``rest`` and simply keep more noise. ``mask``: the
    :func:`soft_tissue_mask` of ``truth``, when several methods are split against it.
    """
    mask = soft_tissue_mask(truth) if mask is None else mask
    e_in, e_out = (ldct - truth)[mask], (out - truth)[mask]
    k = noise_share(e_in, e_out)
    return k, float(np.sqrt(np.mean((e_out - k * e_in) ** 2)))


def ceiling_oracles(ldct: np.ndarray, ndct: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Images no method can beat when scored against NDCT (they use the noise-free truth).

    The NDCT's own noise is part of the LDCT's (nested thinning), so the best estimate of the
    NDCT keeps a fraction k of the LDCT noise: truth + k·(LDCT − truth), k fitted by least
    squares over all slices (≈ dose).
    """
    e_ld = ldct - truth
    k = noise_share(e_ld, ndct - truth)
    return {"Oracle: the noise-free image": truth,
            f"Oracle: noise-free + {k:.3f}·(LDCT − noise-free)": truth + k * e_ld}


def paired_lines(per_slice: dict[str, list[float]], reference: str, case_slices: list[int],
                 metric: str = "PSNR", unit: str = " (dB)", digits: int = 2) -> tuple[list[str], dict[str, dict]]:
    """Markdown rows comparing every method with ``reference`` slice by slice (one metric vs NDCT).

    Mean differences of a few tenths of a dB (or a few 1e-4 of SSIM) are what separates the
    learned methods here; the paired interval and the per-case means say whether such a gap is
    consistent or chance.
    """
    ref = per_slice[reference]
    bounds = np.cumsum([0] + list(case_slices))
    f = f"{{:+.{digits}f}}"
    lines = [f"| Method | Δ{metric} vs {reference}{unit} | 95 % interval | slices better than the reference "
             f"| Δ per case{unit} |", "|---|---|---|---|---|"]
    stats = {}
    for label, scores in per_slice.items():
        if label == reference:
            continue
        d = paired_difference(scores, ref)
        per_case = [float(np.mean(np.subtract(scores, ref)[lo:hi])) for lo, hi in zip(bounds[:-1], bounds[1:])]
        stats[label] = {f"delta_{metric.lower()}": d.mean, "ci": [d.low, d.high], "better": d.a_better,
                        "n": d.n, "per_case": per_case}
        lines.append(f"| {label} | {f.format(d.mean)} | [{f.format(d.low)}, {f.format(d.high)}] | {d.a_better}/{d.n} "
                     f"| {', '.join(f.format(x) for x in per_case)} |")
    return lines, stats


def weights_sha(model: str) -> str:
    from CoreDiffLib.models import resolve_model
    return sha256_of(resolve_model(model)[0])


def row_cache(folder: str | None, label: str, identity: str, dose: float, slices: int) -> Path | None:
    if not folder:
        return None
    key = hashlib.sha256(f"{label}|{identity}|{dose}|{slices}".encode()).hexdigest()[:16]
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"row_{key}.npz"


def training_slices(train_dir: Path, dose: float, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    from CoreDiffLib.pairs import find_pairs
    from CoreDiffLib.pairs import dose_tag
    nd_path, ld_path = find_pairs(train_dir, dose_tag(dose))[0]
    nd, ld = read_volume(nd_path).array, read_volume(ld_path).array
    idx = np.linspace(0, nd.shape[0] - 1, n).astype(int)
    return ld[idx], nd[idx]


def end_slice_lines(results: dict[str, list[np.ndarray]], cases, reference: str,
                    by_label: dict[str, dict]) -> list[str]:
    """Markdown for each volume's first and last slice, where CoreDiff has one neighbour only.

    A scan has two such slices in hundreds; they are scored apart so that the main table
    reflects the inside of a scan and this one what to expect at its ends.
    """
    ends = [0, -1]
    ndct_end = np.concatenate([c[1][ends] for c in cases])
    psnr_end: dict[str, list[float]] = {}
    lines = ["", f"The volumes' first and last slices ({len(ndct_end)}; one neighbour each, CoreDiff "
             "stands the slice itself in for the missing one; not in the tables above), against the NDCT:", "",
             "| Method | PSNR (dB) | SSIM | RMSE (HU) |", "|---|---|---|---|"]
    for label, vols in results.items():
        per_slice = volume_metrics(np.concatenate([v[ends] for v in vols]), ndct_end)
        psnr_end[label] = [s.psnr for s in per_slice]
        m = mean_metrics(per_slice)
        lines.append(f"| {label} | {m.psnr:.2f} | {m.ssim:.4f} | {m.rmse_hu:.1f} |")
        if label in by_label:
            by_label[label]["end_slices"] = {"psnr": m.psnr, "ssim": m.ssim, "rmse_hu": m.rmse_hu}
    paired, stats = paired_lines(psnr_end, reference, [len(ends)] * len(cases))
    for label, st in stats.items():
        by_label[label]["end_slices"]["paired_vs_reference"] = dict(st, reference=reference)
    return lines + ["", f"Paired with {reference} on those slices:", ""] + paired


def check_row_labels(a) -> None:
    """Refuse a malformed LABEL=MODEL and two rows of one label (the later replaced the earlier's
    results, and took its place in the figure)."""
    for flag, specs in (("--also", a.also), ("--ablation", a.ablation)):
        for spec in specs:
            if "=" not in spec:
                raise SystemExit(f"{flag} {spec}: give LABEL=MODEL, e.g. {flag} 'CoreDiff 25 %=corediff-25'")
    labels = ["LDCT"] + [spec.split("=", 1)[0] if "=" in spec else "RED-CNN" for spec in a.redcnn]
    if not a.baselines_only:
        for label in [a.model_label] + [spec.split("=", 1)[0] for spec in a.also]:
            labels += [f"{label} T=1", f"{label} T=10"]
        labels += [f"CoreDiff {spec.split('=', 1)[0]}" for spec in a.ablation]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise SystemExit(f"two rows would be named {', '.join(twice)}: give each --redcnn / --also / --ablation "
                         "its own LABEL=")
    # the BM3D row's label holds the sigma tuned later: any "BM3D..." is taken on trust until then
    bm3d = not a.no_bm3d and (a.reference or "").startswith("BM3D")
    if a.reference is not None and a.reference not in labels and not bm3d:
        raise SystemExit(f"--reference {a.reference!r} is not a row; rows: {', '.join(labels)}"
                         + ("" if a.no_bm3d else ", BM3D (σ=... HU)"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dose", type=float, default=0.25)
    p.add_argument("--model", default="default", help="CoreDiff model (name or file)")
    p.add_argument("--model-label", default="CoreDiff", help="row label of --model")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=MODEL",
                   help="another CoreDiff model scored at T=1 and T=10, e.g. 'CoreDiff w64 (GPU)=corediff-25-w64'")
    p.add_argument("--cache", default=None,
                   help="keep each row's output here and reuse it when the same row (same weights) is asked again")
    p.add_argument("--ablation", action="append", default=[], metavar="LABEL=FILE",
                   help="extra CoreDiff models, e.g. 'w/o CTX=runs/noctx.safetensors'")
    p.add_argument("--redcnn", action="append", default=[], metavar="[LABEL=]FILE",
                   help="RED-CNN weights (.pt state dict), row label 'RED-CNN' unless given; repeatable")
    p.add_argument("--train-dir", default=str(REPO / "data" / "train"))
    p.add_argument("--split", choices=tuple(SPLITS), default="test",
                   help="held-out set: test (seeds 9000+, the reported tables) or validation (seeds 8000+)")
    p.add_argument("--test-dir", default=None,
                   help="cache of the held-out set (default data/test or data/val, with -Nslices for other sizes)")
    p.add_argument("--slices", type=int, default=4, help="scored slices per held-out case")
    p.add_argument("--margin", type=int, default=1,
                   help="unscored neighbour slices simulated on each side of the scored ones, as inside a "
                        "scan (0: the tables before 2026-11-30, whose volumes began and ended at scored slices)")
    p.add_argument("--no-bm3d", action="store_true")
    p.add_argument("--bm3d-sigma", type=float, default=None, help="skip tuning: BM3D sigma in HU")
    p.add_argument("--bm3d-grid", default="20,35,50,70,100,140", help="BM3D sigmas (HU) tried on training slices")
    p.add_argument("--baselines-only", action="store_true", help="skip the CoreDiff rows (e.g. to fill the cache)")
    p.add_argument("--reference", default=None,
                   help="row label every method is compared with slice by slice (default: the --model T=10 row)")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pct = f"{a.dose * 100:g}"

    if a.margin < 0 or a.slices < 1:
        raise SystemExit("--slices must be >= 1 and --margin >= 0")
    check_row_labels(a)  # before minutes of BM3D and RED-CNN
    volume_slices = a.slices + 2 * a.margin
    cache = Path(a.test_dir or default_cache(a.split, volume_slices))
    cases = held_out(a.dose, cache, slices=volume_slices, split=a.split, other_doses=a.test_dir is not None)
    scored = slice(a.margin, a.margin + a.slices)
    ndct = np.concatenate([c[1][scored] for c in cases])
    # every method denoises whole volumes (CoreDiff reads the margin slices as context); the
    # tables score the inner slices
    results: dict[str, list[np.ndarray]] = {"LDCT": [c[2] for c in cases]}
    data_key = held_out_fingerprint(cases)
    seconds: dict[str, float] = {}
    in_figure = ["LDCT"]  # row labels the figure shows, in order

    def run(label, fn, identity: str = "", show: bool = False):
        """One row: denoise every held-out case, or reuse the cached output of the same row.

        ``show`` puts the row in the figure as well as in the tables."""
        if show:
            in_figure.append(label)
        cached = row_cache(a.cache, label, identity + data_key, a.dose, a.slices)
        if cached and cached.exists():
            d = np.load(cached)
            results[label] = [d[f"case{i}"] for i in range(len(cases))]
            seconds[label] = float(d["seconds"])
            print(f"{label}: reused {cached.name}", flush=True)
            return
        t0 = time.perf_counter()
        results[label] = [fn(c[2]) for c in cases]
        seconds[label] = (time.perf_counter() - t0) / sum(c[2].shape[0] for c in cases)
        print(f"{label}: {seconds[label]:.2f} s/slice", flush=True)
        if cached:  # atomic: an interrupted run must not leave a torn cache for the next one
            with atomic_path(cached) as tmp:
                np.savez(tmp, seconds=seconds[label], **{f"case{i}": v for i, v in enumerate(results[label])})

    if not a.no_bm3d:
        from CoreDiffLib.baselines import bm3d_denoise, tune_bm3d_sigma
        if a.bm3d_sigma:  # tuned by an earlier run of this script (its log says so)
            sigma = a.bm3d_sigma
        else:
            ld_train, nd_train = training_slices(Path(a.train_dir), a.dose)
            grid = [float(x) for x in a.bm3d_grid.split(",")]
            sigma, scores = tune_bm3d_sigma(ld_train, nd_train, grid, psnr)
            if sigma == max(grid):
                print(f"warning: the best BM3D sigma is the grid's largest ({sigma} HU): extend --bm3d-grid",
                      flush=True)
            print(f"BM3D sigma tuned on training slices: {sigma} HU ({scores})", flush=True)
        run(f"BM3D (σ={sigma:g} HU)", lambda v: bm3d_denoise(v, sigma), f"sigma={sigma:g}", show=True)
    for i, spec in enumerate(a.redcnn):
        from CoreDiffLib.baselines import load_redcnn, redcnn_denoise
        label, path = spec.split("=", 1) if "=" in spec else ("RED-CNN", spec)
        net = load_redcnn(path)  # its filters read from the weights
        run(label, lambda v, net=net: redcnn_denoise(net, v), sha256_of(path), show=i == 0)
    corediff_rows = [] if a.baselines_only else [(a.model_label, a.model)] + [spec.split("=", 1) for spec in a.also]
    for label, model in corediff_rows:
        sha = weights_sha(model)
        run(f"{label} T=1", lambda v, m=model: denoise_volume(v, m, "cpu", steps=1), sha, show=True)
        run(f"{label} T=10", lambda v, m=model: denoise_volume(v, m, "cpu"), sha, show=True)
    for spec in ([] if a.baselines_only else a.ablation):
        label, path = spec.split("=", 1)
        run(f"CoreDiff {label}", lambda v, path=path: denoise_volume(v, path, "cpu"), weights_sha(path))

    truth = np.concatenate([c[3][scored] for c in cases])
    stacked = {label: np.concatenate([v[scored] for v in vols]) for label, vols in results.items()}
    oracles = ceiling_oracles(stacked["LDCT"], ndct, truth)
    rows = []
    psnr_per_slice: dict[str, list[float]] = {}
    ssim_per_slice: dict[str, list[float]] = {}
    for label, out_vol in list(stacked.items()) + list(oracles.items()):
        per_slice = volume_metrics(out_vol, ndct)
        if label in stacked:
            psnr_per_slice[label] = [s.psnr for s in per_slice]
            ssim_per_slice[label] = [s.ssim for s in per_slice]
        m = mean_metrics(per_slice)
        t = None if out_vol is truth else mean_metrics(volume_metrics(out_vol, truth))
        rows.append({"method": label, "psnr": m.psnr, "ssim": m.ssim, "rmse_hu": m.rmse_hu,
                     "psnr_noisefree": t.psnr if t else None, "ssim_noisefree": t.ssim if t else None,
                     "rmse_hu_noisefree": t.rmse_hu if t else None,
                     "oracle": label in oracles, "s_per_slice": seconds.get(label)})
    split_name = "validation phantoms" if a.split == "validation" else "phantoms"
    inside = (f" inside {volume_slices}-slice volumes, so each has both neighbours as in a scan (the "
              "volumes' end slices are scored apart, below)" if a.margin else "")
    size = f"{ndct.shape[-2]}²" if ndct.shape[-2] == ndct.shape[-1] else f"{ndct.shape[-2]}×{ndct.shape[-1]}"
    lines = [f"Held-out {split_name} ({len(cases)} cases × {a.slices} slices{inside}, {size}, {pct} % dose); "
             "metrics on [-1000, 1000] HU, mean over slices; against the NDCT (the paper's protocol) "
             "and against the noise-free reconstruction of the same phantom.", "",
             held_out_provenance(cache, [c[0] for c in cases]) + f" Data fingerprint {data_key} (sha256 of "
             "its LDCT and NDCT voxels): tables with the same fingerprint were scored on identical data.", "",
             "| Method | PSNR (dB) | SSIM | RMSE (HU) | PSNR vs noise-free | SSIM vs noise-free "
             "| RMSE vs noise-free | CPU s/slice |", "|---|---|---|---|---|---|---|---|"]

    def cell(v, fmt):
        return "–" if v is None else fmt.format(v)

    for i, r in enumerate(rows):
        if r["oracle"] and not rows[i - 1]["oracle"]:
            lines.append("| *ceiling (uses the noise-free image; not a method)* | | | | | | | |")
        lines.append(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['rmse_hu']:.1f} "
                     f"| {cell(r['psnr_noisefree'], '{:.2f}')} | {cell(r['ssim_noisefree'], '{:.4f}')} "
                     f"| {cell(r['rmse_hu_noisefree'], '{:.1f}')} | {cell(r['s_per_slice'], '{:.2f}')} |")
    lines += ["", "Error against the noise-free image in soft tissue (−300…300 HU, eroded), split into the "
              "fraction k of the LDCT noise a method passes through and the RMS of the rest (blur, bias, "
              "artefacts):", "", "| Method | noise kept k | rest (HU) |", "|---|---|---|"]
    by_label = {r["method"]: r for r in rows}
    soft = soft_tissue_mask(truth)
    for label, out_vol in [("NDCT", ndct)] + list(stacked.items()):
        k_kept, rest = noise_decomposition(out_vol, stacked["LDCT"], truth, soft)
        lines.append(f"| {label} | {k_kept:.3f} | {rest:.2f} |")
        if label in by_label:
            by_label[label].update(noise_kept_k=k_kept, noise_rest_hu=rest)
    reference = a.reference or (f"{a.model_label} T=10" if not a.baselines_only else "LDCT")
    if reference not in psnr_per_slice:
        raise SystemExit(f"--reference {reference!r} is not a row; rows: {', '.join(psnr_per_slice)}")
    paired, paired_stats = paired_lines(psnr_per_slice, reference, [a.slices] * len(cases))
    lines += ["", f"Paired with {reference} on the same {len(ndct)} slices (PSNR vs NDCT; Student-t interval "
              "over slices, optimistic since slices of one phantom are correlated; per case: "
              f"{', '.join(c[0] for c in cases)}):", ""] + paired
    paired_ssim, ssim_stats = paired_lines(ssim_per_slice, reference, [a.slices] * len(cases),
                                           metric="SSIM", unit="", digits=5)
    lines += ["", "The same for SSIM vs NDCT:", ""] + paired_ssim
    for label, st in paired_stats.items():
        by_label[label]["paired_vs_reference"] = dict(st, reference=reference)
        by_label[label]["paired_ssim_vs_reference"] = dict(ssim_stats[label], reference=reference)
    if a.margin:
        lines += end_slice_lines(results, cases, reference, by_label)
    table = "\n".join(lines)
    print(table)
    write_text_atomic(out / f"quality_{pct}.md", table + "\n")
    write_text_atomic(out / f"quality_{pct}.json", json.dumps(rows, indent=1))
    k = a.margin + a.slices // 2
    panels = {label: results[label][0][k] for label in in_figure}
    panels["NDCT"] = cases[0][1][k]
    panels["Noise-free"] = cases[0][3][k]
    comparison_figure(panels, out / f"quality_{pct}.png", title=f"{cases[0][0]}, slice {k}, {pct} % dose")
    print(f"wrote {out}/quality_{pct}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

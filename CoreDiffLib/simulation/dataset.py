"""Paired NDCT / LDCT volumes from simulated scans of seeded phantoms.

Recipe per slice: phantom HU -> mu -> noiseless fan-beam sinogram (once) -> full-dose
counts (Poisson at I0) -> nested binomial thinning for every requested dose -> electronic
noise -> log -> FBP with the same filter for every dose.  NDCT = the full-dose
reconstruction (it carries full-dose quantum noise, like a real routine-dose scan);
LDCT = the reconstruction at ``dose``; they differ only by the extra dose noise.

Files: ``<case>_ndct.nrrd`` and ``<case>_ldct<pct>.nrrd`` (int16 HU, spacing in mm,
e.g. ``case000_abdomen_ldct25.nrrd``) plus ``manifest.json`` with the recipe.
"""
from __future__ import annotations

import json
import numbers
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from .. import CoreDiffError
from ..atomic import atomic_path, deferred_interrupts, partial_folder, write_text_atomic
from ..io import check_output_dimensions, write_image_file
from ..pairs import dose_from_tag, dose_tag
from .noise import DEFAULT_ELECTRONIC_SIGMA, DEFAULT_I0, _check_dose, check_noise_settings, nested_dose_noise
from .phantom import DEFAULT_FOV_MM, KINDS, make_phantom, phantom_radius_mm
from .projector import FanBeamGeometry, check_fits, fbp, forward_project, hu_to_mu, import_astra, mu_to_hu

MIN_SIZE = 64
DEFAULT_KINDS = ("abdomen", "thorax", "head")


def software_versions() -> dict:
    """Versions of what draws the noise and does the projections.

    A seed reproduces a dataset to the bit only with the same builds: NumPy does not promise
    the same ``Generator`` streams across versions, and astra / torch sum in their own order.
    Held-out sets re-simulated on another machine came out slightly different (about 0.03 dB
    of LDCT PSNR), so the manifest records what made them.
    """
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "astra-toolbox", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _doses(dose) -> List[float]:
    if isinstance(dose, (list, tuple, np.ndarray)):
        if len(dose) == 0:
            raise ValueError("dose list is empty; give at least one dose fraction in (0, 1]")
        ds = [_check_dose(d) for d in dose]
    else:
        ds = [_check_dose(dose)]
    ds = sorted(set(ds), reverse=True)
    tags: dict = {}
    for d in ds:  # the file names carry the dose: two doses may not share one, nor lose it
        tag = dose_tag(d)
        if abs(dose_from_tag(tag) - d) > 1e-3 * d:
            raise ValueError(f"dose {d!r} is too small or too finely given to name its files "
                             f"({tag!r}): give at most four decimals of a per cent, e.g. 0.0005")
        if tag in tags:
            raise ValueError(f"doses {tags[tag]!r} and {d!r} would both be written as ldct{tag}: "
                             "give doses that differ in the first four decimals of a per cent")
        tags[tag] = d
    return ds


SIMULATION_FILE = re.compile(r"^case\d+_[a-z]+_(ndct|ldct[0-9p]+)\.(nrrd|nii\.gz|nii|mha)$")


GENERATOR = "CoreDiffLib.simulation"  # the manifest's mark: what it lists, a simulation wrote


def earlier_simulation(out_dir: str | os.PathLike) -> List[str]:
    """Names of the files an earlier simulation wrote in ``out_dir``, sorted: its manifest and the
    case files the manifest lists that are still there. Only these may be replaced: a file is
    recognised by the manifest that lists it, never by its name alone (a user's own
    ``case007_liver_ndct.nii.gz`` or ``manifest.json`` looks the same)."""
    manifest = Path(out_dir) / "manifest.json"
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))
        if listed.get("generator") != GENERATOR:
            return []
        names = {str(name) for case in listed["cases"] for name in case["files"].values()}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return []  # no manifest, or not one a simulation wrote
    names = {n for n in names if SIMULATION_FILE.match(n) and (manifest.parent / n).is_file()}
    return sorted(names | {"manifest.json"})


def _unlisted_lookalikes(out_dir: Path, earlier: List[str]) -> List[str]:
    """Files in ``out_dir`` named as a simulation names its files that no simulation's manifest
    there lists: a new simulation could overwrite them, or pair with them, and must not."""
    if not out_dir.is_dir():
        return []
    return sorted(f.name for f in out_dir.iterdir() if f.name not in earlier
                  and (f.name == "manifest.json" or SIMULATION_FILE.match(f.name)))


def _check_room(out_dir: Path, count: int, n_slices: int, size: int, n_doses: int) -> None:
    """Refuse, before any work, a simulation this machine could not hold or store."""
    case_bytes = n_slices * size * size * 4 * (n_doses + 3)  # phantom, NDCT, each LDCT, work space
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = None
    if memory and case_bytes > memory:
        raise ValueError(f"one case of {n_slices} x {size} x {size} voxels needs about {case_bytes / 2**30:.0f} GiB "
                         f"of memory, more than this machine has ({memory / 2**30:.0f} GiB): give fewer slices "
                         "or a smaller size, and more cases")
    disk_bytes = count * n_slices * size * size * 2 * (n_doses + 1) * 0.6  # int16, compressed ~0.6
    free = shutil.disk_usage(out_dir).free
    if disk_bytes > free:
        raise ValueError(f"{count} cases of {n_slices} x {size} x {size} voxels at {n_doses + 1} doses need about "
                         f"{_amount(disk_bytes)}, more than the {_amount(free)} free in {out_dir}")


def _amount(nbytes: float) -> str:
    """Bytes as people read them: '3.2 GiB', '35 MiB' (a small run on a full disk read '0.0 GiB')."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{max(nbytes / 2**20, 0.1):.1f} MiB"


def _validate(size, n_slices, kinds, geometry):
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}") from None
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels (got {size}); the phantom "
                         f"anatomy is not representable on smaller images")
    if int(n_slices) < 1:
        raise ValueError(f"slices must be >= 1, got {n_slices}")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds is empty: give at least one of {', '.join(KINDS)}")
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown phantom kind {k!r}; choose from {', '.join(KINDS)}")
        fov_half = DEFAULT_FOV_MM[k] / 2.0
        check_fits(geometry, min(fov_half, phantom_radius_mm(k, size)), f"{k} phantom")
    return size, int(n_slices), kinds


class _Recon:
    """Project / add noise / reconstruct a stack of HU slices for several doses."""

    def __init__(self, geometry, pixel_mm, size, doses, I0, electronic_sigma, window, rng):
        self.g, self.px, self.size = geometry, pixel_mm, size
        self.doses, self.I0, self.sig, self.window, self.rng = doses, I0, electronic_sigma, window, rng
        self.keys = sorted(set(doses) | {1.0}, reverse=True)
        self.threads = 1  # the machine is shared; astra's CPU projector is single-threaded too

    def run(self, hu_slices: np.ndarray, tick: Optional[Callable[[int], None]] = None):
        """hu (B,N,N) -> dict dose(incl. 1.0) -> HU (B,N,N) float32.

        Slices are projected one by one, then reconstructed in blocks (all doses of up to
        ~32 sinograms per FBP call) so the back-projection matrix is shared.
        """
        B = hu_slices.shape[0]
        nk = len(self.keys)
        out = {d: np.empty(hu_slices.shape, dtype=np.float32) for d in self.keys}
        block = max(1, 32 // nk)
        for s0 in range(0, B, block):
            idx = range(s0, min(B, s0 + block))
            sinos = []
            for n, i in enumerate(idx):
                sino = forward_project(hu_to_mu(hu_slices[i]), self.g, self.px)
                noisy = nested_dose_noise(sino, self.doses, self.I0, self.sig, self.rng)
                sinos.extend(noisy[d] for d in self.keys)
                if tick and n < len(idx) - 1:  # projected (most of a slice's time); the block's
                    tick(1)                    # last slice counts once the block is reconstructed
            rec = fbp(np.stack(sinos), self.g, self.size, self.px, window=self.window,
                      threads=self.threads)
            for j, i in enumerate(idx):
                for k, d in enumerate(self.keys):
                    out[d][i] = mu_to_hu(rec[j * nk + k])
            if tick:
                tick(1)
        return out


def simulate_pair(kind: str = "abdomen", n_slices: int = 3, size: int = 512,
                  dose: Union[float, Sequence[float]] = 0.25, seed: int = 0,
                  geometry: Optional[FanBeamGeometry] = None, I0: float = DEFAULT_I0,
                  electronic_sigma: float = DEFAULT_ELECTRONIC_SIGMA, window: str = "hann",
                  slice_mm: float = 1.0, return_phantom: bool = False):
    """In-memory paired simulation.

    Returns ``(ndct_hu, ldct_hu, spacing)`` where ldct_hu is an array for a single dose or a
    dict dose -> array for a list; arrays are float32 (n_slices, size, size); with
    ``return_phantom`` a 4th element, the phantom (ground-truth object) in HU.
    """
    geometry = geometry or FanBeamGeometry()
    doses = _doses(dose)
    size, n_slices, _ = _validate(size, n_slices, (kind,), geometry)
    check_noise_settings(I0, electronic_sigma, window)  # a NaN sigma would pass as no electronic noise
    hu, spacing = make_phantom(kind, n_slices, size, slice_mm=slice_mm, seed=seed)
    rng = np.random.default_rng([int(seed), 7919])
    rec = _Recon(geometry, spacing[0], size, doses, I0, electronic_sigma, window, rng).run(hu)
    ldct = rec[doses[0]] if not isinstance(dose, (list, tuple, np.ndarray)) else {d: rec[d] for d in doses}
    res = (rec[1.0], ldct, spacing)
    return res + (hu,) if return_phantom else res


def noise_free_reconstruction(kind: str = "abdomen", n_slices: int = 3, size: int = 512, seed: int = 0,
                              geometry: Optional[FanBeamGeometry] = None, window: str = "hann",
                              slice_mm: float = 1.0) -> np.ndarray:
    """What :func:`simulate_pair` with the same arguments would reconstruct at infinite dose.

    The same phantom, geometry and filter, but no photon or electronic noise: the image a
    denoiser should ideally return.  The NDCT carries full-dose noise of its own, so scoring
    against NDCT alone caps every method's gain (see ``Testing/benchmarks``); this is the
    noise-free reference a simulation can offer and a real scan cannot.
    """
    geometry = geometry or FanBeamGeometry()
    size, n_slices, _ = _validate(size, n_slices, (kind,), geometry)
    hu, spacing = make_phantom(kind, n_slices, size, slice_mm=slice_mm, seed=seed)
    sinos = np.stack([forward_project(hu_to_mu(s), geometry, spacing[0]) for s in hu])
    return mu_to_hu(fbp(sinos, geometry, size, spacing[0], window=window)).astype(np.float32)


def _write(arr: np.ndarray, spacing, path: str) -> None:
    import SimpleITK as sitk

    a = np.clip(np.rint(arr), -32768, 32767).astype(np.int16)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(tuple(float(s) for s in spacing))
    with atomic_path(path) as tmp:
        write_image_file(img, tmp, Path(path))


def _workers(workers, count) -> int:
    if workers is None:
        env = os.environ.get("COREDIFF_SIM_WORKERS", "").strip()
        try:
            workers = int(env) if env else 1
        except ValueError:
            raise ValueError(f"COREDIFF_SIM_WORKERS must be an integer, got {env!r}") from None
    try:
        workers = int(workers)
    except (TypeError, ValueError):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}") from None
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return max(1, min(workers, count, os.cpu_count() or 1))


def _simulate_case(job: dict, tick: Optional[Callable[[int], None]] = None):
    """One case: phantom -> scans at every dose -> files.  Top-level so it pickles."""
    out_dir, kind, fmt = job["out_dir"], job["kind"], job["fmt"]
    name = f"case{job['index']:03d}_{kind}"
    hu, spacing = make_phantom(kind, job["n_slices"], job["size"], slice_mm=job["slice_mm"],
                               seed=job["case_seed"])
    rng = np.random.default_rng([job["case_seed"], 7919])
    rec = _Recon(job["geometry"], spacing[0], job["size"], job["doses"], job["I0"],
                 job["electronic_sigma"], job["window"], rng).run(hu, tick)
    files = {"ndct": f"{name}_ndct.{fmt}"}
    paths = [os.path.join(out_dir, files["ndct"])]
    _write(rec[1.0], spacing, paths[0])
    for d in job["doses"]:
        fn = f"{name}_ldct{dose_tag(d)}.{fmt}"
        _write(rec[d], spacing, os.path.join(out_dir, fn))
        paths.append(os.path.join(out_dir, fn))
        files[f"ldct{dose_tag(d)}"] = fn
    entry = {"case": name, "kind": kind, "seed": job["case_seed"], "files": files,
             "spacing_mm": list(spacing), "shape_zyx": list(hu.shape)}
    return entry, paths


def simulate_dataset(out_dir: str, dose: Union[float, Sequence[float]] = 0.25, count: int = 4,
                     n_slices: int = 16, size: int = 512, seed: int = 0,
                     kinds: Sequence[str] = DEFAULT_KINDS, fmt: str = "nrrd",
                     progress: Union[bool, Callable[[int, int], None]] = True,
                     geometry: Optional[FanBeamGeometry] = None, I0: float = DEFAULT_I0,
                     electronic_sigma: float = DEFAULT_ELECTRONIC_SIGMA, window: str = "hann",
                     slice_mm: float = 1.0, workers: Optional[int] = None, replace: bool = False) -> List[str]:
    """Simulate ``count`` paired cases (kinds cycled) into ``out_dir``; return written paths.

    All or nothing: the files are written in a hidden folder inside ``out_dir`` and moved in
    when every case is done, so an error or Ctrl-C leaves ``out_dir`` as it was. A folder that
    already holds a simulation is refused unless ``replace``, which removes the earlier one's
    cases and manifest, once the new one is complete, so that no old case pairs with a new.

    The noise of each case is drawn from one stream seeded by (``seed``, case), slice after
    slice, through every dose: the same seed and doses give the same files, while another set
    of doses gives the same anatomy with other noise draws; simulate together the doses that
    should share an NDCT.

    ``progress``: True for a tqdm bar (per slice), False for none, or a callable
    ``progress(done_slices, total_slices)``.
    ``workers``: processes simulating cases in parallel (each single-threaded).  Default:
    the ``COREDIFF_SIM_WORKERS`` environment variable, else 1 (the machines are shared).
    Cost: ~4.4 CPU-seconds per 512^2 slice at one dose with the default geometry
    (astra projection ~3.0 s + two batched FBPs ~0.6 s each + phantom/noise/IO), so two
    workers on an idle 2-core machine make ~300 slices in ~11 minutes.
    """
    geometry = geometry or FanBeamGeometry()
    doses = _doses(dose)
    if 1.0 in doses:  # an "LDCT" equal to the NDCT: train refuses such pairs
        raise ValueError("dose 1 is the normal dose: its scan is the NDCT, written anyway; give low doses "
                         "below 1, e.g. 0.25")
    size, n_slices, kinds = _validate(size, n_slices, kinds, geometry)
    check_noise_settings(I0, electronic_sigma, window)
    if isinstance(slice_mm, bool) or not isinstance(slice_mm, numbers.Real) or not 0 < slice_mm < 1e3:
        raise ValueError(f"slice_mm must be a slice spacing in mm, > 0, got {slice_mm!r}")
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise ValueError(f"count must be an integer >= 1, got {count!r}") from None
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("nrrd", "nii.gz", "nii", "mha"):
        raise ValueError(f"unsupported format {fmt!r}; use nrrd, nii.gz, nii or mha")
    try:  # before any work: the writer refuses it only at the end
        check_output_dimensions(f"case000_{kinds[0]}_ndct.{fmt}", (n_slices, size, size))
    except CoreDiffError as exc:
        raise ValueError(str(exc)) from None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not str(out_dir).strip():  # an unset variable in a script: it would write into the working folder
        raise ValueError("the output folder (--out) is empty: give the folder to simulate into")
    out = Path(out_dir).expanduser()  # --out=~/sim: no shell expands a tilde after '='
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file: give a folder")
    earlier = earlier_simulation(out)
    lookalikes = _unlisted_lookalikes(out, earlier)
    if lookalikes:  # not ours to replace, even when told to replace an earlier simulation
        raise ValueError(f"{out} holds {', '.join(lookalikes[:3])}{', ...' if len(lookalikes) > 3 else ''}, "
                         "named as a simulation names its files but not written by one (no simulation's "
                         "manifest there lists them): they are left alone; simulate into another folder, or "
                         "move them")
    if earlier and not replace:
        files = f"{len(earlier)} file{'s' if len(earlier) > 1 else ''}: {', '.join(earlier[:3])}" \
            + (", ..." if len(earlier) > 3 else "")
        raise ValueError(f"{out} already holds a simulation ({files}): choose a new folder, or replace it "
                         "(--overwrite): two simulations mixed in one folder "
                         "would pair scans of different draws")
    import_astra()  # missing: said before a folder is made or a progress bar drawn
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    try:
        _check_room(out, count, n_slices, size, len(doses))
        with partial_folder(out / "simulation") as stage:
            try:
                written = _simulate_into(str(stage), doses, count, n_slices, size, int(seed), kinds, fmt, progress,
                                         geometry, I0, electronic_sigma, window, slice_mm, workers)
            except CoreDiffError as exc:  # a writer named the hidden staging folder, which is removed now
                raise CoreDiffError(str(exc).replace(f"{stage}{os.sep}", f"{out}{os.sep}")
                                    + f"; no file was written to {out}") from None
            # complete: only now does the folder change, in milliseconds that Ctrl-C waits for;
            # the new files first (the manifest last), then what is left of the earlier simulation
            final = [str(out / os.path.basename(path)) for path in written]
            with deferred_interrupts(f"the simulation in {out}"):
                if earlier_simulation(out) != earlier or _unlisted_lookalikes(out, earlier):
                    raise ValueError(f"another run wrote into {out} while this one simulated: kept its files "
                                     "and discarded this run's; simulate into a folder of its own")
                for path, target in zip(written, final):
                    os.replace(path, target)
                for name in set(earlier) - {os.path.basename(path) for path in written}:
                    (out / name).unlink()
        return final
    except BaseException:
        for folder in created:  # this run's own folders, unless another run has put files there
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _worker_processes(executor) -> list:
    """A process pool's worker processes, to terminate when a run stops (their cases are
    discarded anyway); ``shutdown`` forgets them (its ``_processes`` becomes None)."""
    return list((getattr(executor, "_processes", None) or {}).values())


def _simulate_into(out_dir, doses, count, n_slices, size, seed, kinds, fmt, progress, geometry, I0,
                   electronic_sigma, window, slice_mm, workers) -> List[str]:
    """The cases and manifest of :func:`simulate_dataset`, written into a fresh ``out_dir``."""
    total = count * n_slices
    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="slice", desc="simulate")
    done = [0]
    if callable(progress):  # shown from the start: a case takes minutes
        progress(0, total)

    def tick(k):
        done[0] += k
        if bar is not None:
            bar.update(k)
        elif callable(progress):
            progress(done[0], total)

    written: List[str] = []
    cases = []
    t0 = time.time()
    jobs = [dict(out_dir=out_dir, index=c, kind=kinds[c % len(kinds)],
                 case_seed=int(seed) * 100003 + c, n_slices=n_slices, size=size, doses=doses,
                 geometry=geometry, I0=I0, electronic_sigma=electronic_sigma, window=window,
                 slice_mm=slice_mm, fmt=fmt) for c in range(count)]
    workers = _workers(workers, count)
    try:
        if workers == 1:
            for job in jobs:
                entry, paths = _simulate_case(job, tick)
                cases.append(entry)
                written.extend(paths)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                futures = [ex.submit(_simulate_case, job) for job in jobs]
                try:
                    for fut in futures:  # in case order; progress advances per finished case
                        entry, paths = fut.result()
                        cases.append(entry)
                        written.extend(paths)
                        tick(n_slices)
                except BaseException:  # a failure, Ctrl-C or SIGTERM: the queued cases are not started,
                    running = _worker_processes(ex)  # the running ones are stopped (leaving the
                    ex.shutdown(wait=False, cancel_futures=True)  # with-block waited for them: minutes
                    for process in running:  # at 512 px); shutdown forgets them, so they are taken first
                        process.terminate()
                    raise
    finally:
        if bar is not None:
            bar.close()
    manifest = {
        "generator": GENERATOR,
        "software": software_versions(),
        "seed": int(seed), "count": count, "n_slices": n_slices, "size": size,
        "kinds": list(kinds), "doses": doses, "I0": I0, "electronic_sigma": electronic_sigma,
        "fbp_window": window, "slice_mm": slice_mm, "geometry": geometry.to_dict(),
        "ndct": "full-dose reconstruction (Poisson at I0), same filter as LDCT",
        "ldct": "binomial thinning of the full-dose counts to each dose + electronic noise",
        "dtype": "int16 HU", "cases": cases, "seconds": round(time.time() - t0, 2),
    }
    mpath = os.path.join(out_dir, "manifest.json")
    write_text_atomic(mpath, json.dumps(manifest, indent=2))
    written.append(mpath)
    return written

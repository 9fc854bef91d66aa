"""``corediff bench``: what each way of running CoreDiff costs, and whether it stays accurate.

Every variant (batch size x precision x memory format x back-end x CPU threads) runs the
exact sampler (:func:`CoreDiffLib.diffusion.sample`, one network evaluation per step) on the
same input slices. Reported per variant: seconds per slice (median of the timed repeats
after a warm-up pass), slices per second, peak memory (GPU: ``max_memory_allocated``; CPU:
peak RSS above the level before the pass, sampled every 5 ms), the speed-up against the
baseline row (eager fp32, contiguous, batch 1) measured *in the same run*, and the accuracy
against that baseline: mean |difference| in HU and the PSNR change against the normal-dose
reference (a simulated NDCT when :mod:`CoreDiffLib.simulation` is usable, else a synthetic
phantom). A variant that moves PSNR by more than 0.05 dB is marked "not allowed".

Timed repeats are interleaved across variants (round-robin), so a background load that comes
and goes hits every variant alike and the ratios stay meaningful on a busy machine.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import CoreDiffError
from .atomic import StopRequests, atomic_path, atomic_paths, check_output_file
from .diffusion import sample
from .inference import context_stack, pick_device
from .intensity import unit_to_hu
from .metrics import psnr
from .network import ClearNet, NetworkConfig, count_parameters
from .runtime import BACKENDS, PRECISIONS, RunSettings, build_net, check_applicable, physical_cores

MAX_DRIFT_DB = 0.05


# ----------------------------------------------------------------------------- inputs
SIMULATED = "simulated"  # how the kind of a simulated benchmark input begins


def _simulator_version() -> str:
    """A short hash of the simulation code: a bench input cached by other phantoms or another
    noise model (an I0 recalibrated) is simulated again, not shown as today's 25 % dose scan."""
    h = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "simulation").glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def bench_input(size: int, slices: int, seed: int = 0, log=print) -> tuple[np.ndarray, np.ndarray, str]:
    """(ldct_hu, ndct_hu, kind): a simulated pair when the simulator runs here, else synthetic.

    A simulated pair is cached under $COREDIFF_CACHE (default ~/.cache/corediff), named by the
    simulator's version: simulating 512x512 slices costs tens of seconds and every ``corediff
    bench`` run on the same size reuses it; one of an earlier simulator is deleted. A synthetic
    one is made in milliseconds and never cached: cached, it stood in for the simulation after
    the simulator had been installed.
    """
    from .runtime import onnx_cache_dir
    stem = f"bench_input_{size}_{slices}_{seed}"
    cache = onnx_cache_dir().parent / f"{stem}_{_simulator_version()}.npz"
    for stale in cache.parent.glob(f"{stem}*.npz"):  # an earlier simulator's (or unversioned) input
        if stale != cache and re.fullmatch(rf"{stem}(_[0-9a-f]{{10}})?\.npz", stale.name):
            with contextlib.suppress(OSError):
                stale.unlink()
    if cache.exists():
        try:
            d = np.load(cache)
            if str(d["kind"]).startswith(SIMULATED):
                return d["ldct"], d["ndct"], str(d["kind"])
        except Exception:
            pass
    ldct, ndct, kind = _make_bench_input(size, slices, seed, log)
    if not kind.startswith(SIMULATED):
        return ldct, ndct, kind
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache, output=False) as tmp:
            np.savez(tmp, ldct=ldct, ndct=ndct, kind=np.array(kind))
    except OSError:
        pass
    return ldct, ndct, kind


def _make_bench_input(size: int, slices: int, seed: int, log) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from .simulation import simulate_pair  # type: ignore[attr-defined]
    except Exception:
        try:
            from .simulation.dataset import simulate_pair  # type: ignore
        except Exception:
            simulate_pair = None
    if simulate_pair is not None:
        try:
            ndct, ldct, _ = simulate_pair("abdomen", n_slices=slices, size=size, dose=0.25, seed=seed)
            return np.asarray(ldct, np.float32), np.asarray(ndct, np.float32), f"{SIMULATED} 25% dose (abdomen)"
        except Exception as exc:  # simulator missing a dependency (astra) or failing
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # whole, not cut mid-word
            log(f"note: simulate_pair unavailable ({type(exc).__name__}: {first}); "
                "using a synthetic phantom with image-domain noise")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    ndct = np.full((slices, size, size), -1000.0, np.float32)
    body = (xx / 0.42) ** 2 + (yy / 0.33) ** 2 < 1
    for k in range(slices):
        sl = ndct[k]
        sl[body] = 40.0
        sl[(xx - 0.15) ** 2 + (yy + 0.05) ** 2 < (0.08 + 0.005 * k) ** 2] = 60.0   # organ
        sl[(xx + 0.1) ** 2 + (yy - 0.1) ** 2 < 0.04 ** 2] = 700.0                  # bone
        sl[(xx + 0.2) ** 2 + (yy + 0.1) ** 2 < 0.07 ** 2] = -80.0                  # fat
    ldct = ndct + rng.normal(0, 25.0, ndct.shape).astype(np.float32) * body
    return ldct.astype(np.float32), ndct, "synthetic phantom + image-domain noise (not realistic)"


# ----------------------------------------------------------------------------- memory
def _release_freed_memory() -> None:
    """Give memory freed by earlier work back to the system (glibc keeps it mapped for reuse)."""
    import gc
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


class PeakRSS:
    """Peak resident memory of this process above its level at start (a sampling thread)."""

    def __init__(self, interval: float = 0.005):
        import psutil
        self._proc = psutil.Process()
        self.interval = interval

    def __enter__(self):
        _release_freed_memory()  # else what an earlier pass freed is reused unseen, and the peak is order-dependent
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


# ----------------------------------------------------------------------------- variants
@dataclass
class Variant:
    model_name: str
    settings: RunSettings
    batch: int
    threads: int
    steps: int
    baseline: bool = False
    row: dict = field(default_factory=dict)
    times: list = field(default_factory=list)
    net: object = None
    output: np.ndarray | None = None

    def label(self) -> str:
        return self.settings.label()


def _load_model(spec: str, steps_T: int) -> tuple[str, ClearNet]:
    """'w16' / '16' -> random-init width 16; anything else: a shipped name or a weights file."""
    s = str(spec)
    if s.isdigit() or (s[:1] == "w" and s[1:].isdigit()):
        width = int(s.lstrip("w"))
        torch.manual_seed(0)
        net = ClearNet(NetworkConfig(width=width, steps=steps_T)).eval()
        with torch.no_grad():  # the output layer starts at zero, an identity map that no precision or
            # back-end can change: a residual of ~7 HU (a trained net's size) makes drift visible
            torch.nn.init.normal_(net.out.weight, std=0.4 / width ** 0.5)
        return f"w{width} untrained", net
    from .models import load_model
    return s, load_model(s, "cpu")


def _run_pass(v: Variant, stack: np.ndarray, device: torch.device) -> tuple[float, np.ndarray]:
    """Denoise all input slices in batches of v.batch; returns (seconds, HU output)."""
    torch.set_num_threads(v.threads)
    n = stack.shape[0]
    outs = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, v.batch):
            x = torch.from_numpy(stack[start:start + v.batch]).to(device, non_blocking=True)
            if not v.net.config.use_context:
                x = x[:, 1:2]
            outs.append(sample(v.net, x, v.steps, keep_steps=False).final[:, 0])
        sync()
        seconds = time.perf_counter() - t0
        out = torch.cat(outs).float().cpu().numpy()
    return seconds, unit_to_hu(out)


def run_benchmark(models: list[str], size: int = 512, device: str = "auto", batch_sizes=(1,),
                  precisions=("fp32",), channels_last=(False, True), backends=("eager",),
                  threads=(None,), repeats: int = 3, slices: int | None = None,
                  steps: int | None = None, trained_steps: int = 10, seed: int = 0,
                  log=print, should_stop=lambda: False) -> dict:
    """Run the grid; returns {"meta": ..., "rows": [...]} (rows as printed).

    ``should_stop()`` is asked between passes: once it is true the run ends early and returns what
    it has measured (``meta["stopped_early"]`` says how far it got), so a benchmark stopped by a
    time limit still leaves its finished rows.
    """
    dev = pick_device(device)
    cores = physical_cores()
    threads = [t or cores for t in threads] if dev.type == "cpu" else [torch.get_num_threads()]
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    n = int(slices or max(batch_sizes))
    if n % max(batch_sizes):
        n = max(batch_sizes) * -(-n // max(batch_sizes))
    loaded = [_load_model(spec, trained_steps) for spec in models]  # a wrong name refused before the input is made
    for name, model in loaded:
        if steps is not None and not 1 <= steps <= model.config.steps:
            raise CoreDiffError(f"--steps {steps}: {name} samples in at most its T = {model.config.steps} steps")
    ldct, ndct, kind = bench_input(size, n + 2, seed, log)
    stack = context_stack(ldct, 1, n + 1)       # real neighbours for every timed slice
    ndct = ndct[1:n + 1]
    ldct_c = ldct[1:n + 1]
    meta = {"device": str(dev), "device_name": _device_name(dev), "torch": torch.__version__,
            "python": platform.python_version(), "size": size, "slices": n, "repeats": repeats,
            "input": kind, "ldct_psnr": _mean_psnr(ldct_c, ndct), "physical_cores": cores,
            "load_average_start": _loadavg(), "max_drift_db": MAX_DRIFT_DB}
    log(f"device {meta['device_name']}; {n} slices of {size}x{size}; input: {kind}; "
        f"LDCT PSNR {meta['ldct_psnr']:.2f} dB; load average {meta['load_average_start']}")

    variants: list[Variant] = []
    skipped: list[dict] = []
    for name, model in loaded:
        T = model.config.steps
        run_steps = steps or T
        base = Variant(name, RunSettings("fp32", False, "eager"), 1, threads[0] if dev.type != "cpu" else cores,
                       run_steps, baseline=True)
        grid = [base]
        for b in batch_sizes:
            for p in precisions:
                for cl in channels_last:
                    for be in backends:
                        for th in threads:
                            s = RunSettings(p, cl, be)
                            if (s, b, th) == (base.settings, base.batch, base.threads):
                                continue
                            why = check_applicable(s, dev)
                            if why:
                                skipped.append({"model": name, "variant": s.label(), "batch": b,
                                                "threads": th, "note": why})
                                continue
                            grid.append(Variant(name, s, b, th, run_steps))
        for v in grid:
            try:
                torch.set_num_threads(v.threads)
                v.net = build_net(copy.deepcopy(model), dev, v.settings, threads=v.threads)
            except Exception as exc:
                skipped.append({"model": name, "variant": v.label(), "batch": v.batch,
                                "threads": v.threads, "note": f"failed to build: {exc}"[:200]})
                v.net = None
                if v.baseline:
                    raise
            v.row = {"model": name, "width": model.config.width, "params": count_parameters(model),
                     "T": T, "steps_run": run_steps, "variant": v.label(), "batch": v.batch,
                     "threads": v.threads, "baseline": v.baseline}
            variants.append(v)
    variants = [v for v in variants if v.net is not None]

    # warm-up pass: compiles/captures, gives the accuracy output and the memory peak
    for v in variants:
        if should_stop():
            v.row["error"] = "not run: the benchmark was stopped"
            v.net = None
            continue
        try:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            with PeakRSS() as rss:
                t_first, v.output = _run_pass(v, stack, dev)
            v.row["first_pass_s"] = t_first
            v.row["peak_mb"] = ((torch.cuda.max_memory_allocated() - before) / 2**20
                                if dev.type == "cuda" else rss.delta_mb)
            v.row["peak_kind"] = "GPU allocated" if dev.type == "cuda" else "host RSS delta"
        except Exception as exc:
            v.row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            v.net = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    live = [v for v in variants if v.net is not None]
    log(f"warm-up done ({len(live)} variants); timing {repeats} interleaved repeats")
    repeats_done = 0
    for r in range(repeats):
        if should_stop():
            break
        for v in live:
            try:
                v.times.append(_run_pass(v, stack, dev)[0])
            except Exception as exc:  # e.g. OOM in one repeat
                v.row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        repeats_done += 1
    if should_stop():
        warmed = sum(1 for v in variants if "first_pass_s" in v.row)
        meta["stopped_early"] = (f"stopped after {warmed} of {len(variants)} warm-up passes and "
                                 f"{repeats_done} of {repeats} timed repeats")
        log(f"benchmark stopped early: {meta['stopped_early']}")
    # rows
    baselines = {v.model_name: v for v in variants if v.baseline}
    for v in variants:
        row = v.row
        b = baselines.get(v.model_name)
        if v.times:
            row["s_per_slice"] = statistics.median(v.times) / n
            if v.steps != row["T"]:
                row["s_per_slice_at_T"] = row["s_per_slice"] * row["T"] / v.steps
            row["slices_per_s"] = 1.0 / row["s_per_slice"]
            row["repeats_s"] = [t / n for t in v.times]
            row["best_s_per_slice"] = min(v.times) / n
        if v.output is not None:
            row["psnr"] = _mean_psnr(v.output, ndct)
        if b is not None and b.output is not None and v.output is not None:
            row["mean_abs_diff_hu"] = float(np.mean(np.abs(v.output - b.output)))
            row["max_abs_diff_hu"] = float(np.max(np.abs(v.output - b.output)))
            row["psnr_drift_db"] = row["psnr"] - b.row["psnr"]
            row["allowed"] = bool(abs(row["psnr_drift_db"]) <= MAX_DRIFT_DB)
        if b is not None and b.times and v.times:
            row["speedup"] = b.row["s_per_slice"] / row["s_per_slice"]
            row["speedup_best"] = b.row["best_s_per_slice"] / row["best_s_per_slice"]
    meta["load_average_end"] = _loadavg()
    return {"meta": meta, "rows": [v.row for v in variants], "skipped": skipped}


def _mean_psnr(images: np.ndarray, refs: np.ndarray) -> float:
    return float(np.mean([psnr(a, b) for a, b in zip(images, refs)]))


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return f"CPU {platform.processor() or platform.machine()} ({physical_cores()} cores)"
    return str(dev)


# ----------------------------------------------------------------------------- reporting
COLUMNS = [("model", "model", "{}"), ("variant", "variant", "{}"), ("batch", "B", "{}"),
           ("threads", "thr", "{}"), ("s_per_slice", "s/slice", "{:.4f}"),
           ("s_per_slice_at_T", "s/slice@T", "{:.3f}"), ("slices_per_s", "slices/s", "{:.2f}"),
           ("speedup", "speed-up", "{:.2f}x"), ("speedup_best", "(best)", "{:.2f}x"), ("peak_mb", "peak MB", "{:.0f}"),
           ("mean_abs_diff_hu", "|dHU|", "{:.2g}"), ("psnr", "PSNR dB", "{:.2f}"),
           ("psnr_drift_db", "dPSNR", "{:+.3f}")]


def _cells(row: dict) -> list[str]:
    cells = []
    for key, _, fmt in COLUMNS:
        val = row.get(key)
        cells.append("" if val is None else fmt.format(val))
    if row.get("error"):
        verdict = "FAILED: " + row["error"][:60]
    elif row.get("baseline"):
        verdict = "baseline"
    elif "allowed" in row:
        verdict = "ok" if row["allowed"] else "not allowed (> 0.05 dB)"
    else:
        verdict = ""
    return cells + [verdict]


def format_table(result: dict, markdown: bool = False) -> str:
    head = [h for _, h, _ in COLUMNS] + ["accuracy"]
    rows = [_cells(r) for r in result["rows"]]
    m = result["meta"]
    lines = []
    title = (f"CoreDiff benchmark on {m['device_name']} (torch {m['torch']}), {m['slices']} slices of "
             f"{m['size']}x{m['size']}, {m['repeats']} repeats; input: {m['input']}, LDCT PSNR "
             f"{m['ldct_psnr']:.2f} dB; load average {m['load_average_start']} -> {m['load_average_end']}")
    if m.get("stopped_early"):
        title += f"; INCOMPLETE: {m['stopped_early']}"
    if markdown:
        def cell(text: str) -> str:  # a bare '|' (the |dHU| column) splits a Markdown cell in two
            return text.replace("|", "\\|")
        lines.append(f"**{title}**\n")
        lines.append("| " + " | ".join(map(cell, head)) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(map(cell, c)) + " |" for c in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines.append(title)
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    notes: dict = {}
    for s in result["skipped"]:
        notes.setdefault(s["note"], set()).add(s["variant"])
    for note, labels in notes.items():
        lines.append(f"{'- ' if markdown else ''}skipped {', '.join(sorted(labels))}: {note}")
    if any("s_per_slice_at_T" in r for r in result["rows"]):
        lines.append(f"{'- ' if markdown else ''}s/slice@T: measured with fewer sampling steps and "
                     "scaled linearly to the model's T (each step is one network evaluation); s/slice and "
                     "slices/s are at the steps run.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def _csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def _counts(text: str, flag: str) -> list[int]:
    """A comma list of whole numbers >= 1 (batch sizes, threads), refused with the flag's name."""
    try:
        values = _csv(text, int)
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise CoreDiffError(f"{flag} {text!r}: give whole numbers >= 1 separated by commas, e.g. 1,2,4")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    models = list(args.model or []) + [f"w{w}" for w in (args.width or [])]
    if not models:  # what denoise runs by default, not an untrained network
        from .models import default_model_name
        models = [default_model_name()]
    backends = _csv(args.compile)
    for flag, text, known in (("--precisions", args.precisions, PRECISIONS), ("--compile", args.compile, BACKENDS)):
        unknown = [v for v in _csv(text) if v not in known]
        if unknown or not _csv(text):
            raise CoreDiffError(f"{flag} {','.join(unknown) or repr(text)}: give a comma list of {', '.join(known)}")
    threads = _counts(args.threads, "--threads") if args.threads else [None]
    batch_sizes = _counts(args.batch_sizes, "--batch-sizes")
    for flag, value in (("--size", args.size), ("--repeats", args.repeats), ("--slices", args.slices),
                        ("--steps", args.steps)):
        if value is not None and value < 1:
            raise CoreDiffError(f"{flag} {value}: give a whole number >= 1")
    if args.json:  # checked now, not after minutes of timing
        args.json = check_output_file("--json", args.json, (".json",), args.model or ())  # ~ expanded
    if args.markdown:
        args.markdown = check_output_file("--markdown", args.markdown, (".md",), args.model or ())
    cl = {None: (False,), "both": (False, True), "only": (True,)}[args.channels_last]
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    # Ctrl-C / SIGTERM (`timeout`, a scheduler): the pass in hand ends and the rows measured are
    # written; a second signal ends the run at once
    with StopRequests(second_exits=True) as stop:
        result = run_benchmark(models, size=args.size, device=args.device,
                               batch_sizes=batch_sizes, precisions=_csv(args.precisions),
                               channels_last=cl, backends=backends, threads=threads, repeats=args.repeats,
                               slices=args.slices, steps=args.steps, log=log, should_stop=lambda: stop.requested)
    print(format_table(result))
    with atomic_paths(args.json, args.markdown) as (json_tmp, markdown_tmp):  # both files or neither
        if json_tmp:
            json_tmp.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        if markdown_tmp:
            markdown_tmp.write_text(format_table(result, markdown=True) + "\n", encoding="utf-8")
    for written in (args.json, args.markdown):
        if written:
            log(f"wrote {written}")
    if "stopped_early" in result["meta"]:
        log(f"stopped by {signal.Signals(stop.signum).name}: the rows above are what was measured before it came")
        return 128 + stop.signum
    if any(r.get("baseline") and r.get("error") for r in result["rows"]):
        raise CoreDiffError("the baseline variant failed; see the table")
    return 0


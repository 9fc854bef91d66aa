#!/usr/bin/env python
"""One-shot learning evaluation (issue #5): a model trained at one dose applied to other doses.

For every target dose (default 10 % and 5 %) it compares, on held-out simulated phantoms
(seeds 9000+, far from any training seed):

* the LDCT input itself,
* the base model without adaptation (its last sampling step, as CoreDiff ships),
* paired OSL   — step weights fitted on ONE slice of a separate reference phantom (seed
  8999) against that slice's own NDCT,
* unpaired OSL — the same, against the NDCT two slices further on (not aligned),
* the upper bound — a model trained at that dose (``corediff-10`` / ``corediff-5`` from the
  manifest, or ``--upper DOSE=FILE``), when one exists,

with PSNR / SSIM / RMSE(HU) on the [-1000, 1000] HU window (per slice, then averaged), and
the share of the PSNR gap between "no adaptation" and the upper bound that OSL recovers.

The sampler runs once per test volume and model; all the adaptations are blends of those
cached per-step outputs (exactly what ``denoise --adaptation`` computes).

    python Testing/benchmarks/oneshot_benchmark.py --model corediff-25 --out oneshot.md
    python Testing/benchmarks/oneshot_benchmark.py --model my25.safetensors --size 256 \\
        --count 2 --slices 4 --out oneshot.md
    # no shipped weights yet: small stand-in models trained here (25 % and a 5 % upper bound)
    python Testing/benchmarks/oneshot_benchmark.py --quick-train 2000 --quick-upper 0.05 --out oneshot.md

Prints a markdown table and writes it (with the settings and the learned step weights) to
``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from CoreDiffLib.atomic import write_text_atomic  # noqa: E402
from CoreDiffLib.inference import Denoiser, denoise_volume  # noqa: E402
from CoreDiffLib.intensity import unit_to_hu  # noqa: E402
from CoreDiffLib.metrics import mean_metrics, volume_metrics  # noqa: E402
from CoreDiffLib.models import load_model, shipped_models  # noqa: E402
from CoreDiffLib.adaptations import combine_steps  # noqa: E402
from CoreDiffLib.oneshot import adapt  # noqa: E402


class _StepCapture:
    """Passed to :class:`Denoiser` as its 'adaptation': keeps every batch's per-step outputs
    and returns the plain last step, so one sampling pass serves every method."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def combine(self, steps: torch.Tensor) -> torch.Tensor:
        self.batches.append(steps.detach().float().cpu())
        return steps[-1].clamp(0.0, 1.0)

    def take(self) -> torch.Tensor:
        """(T, S, H, W) for the volume just denoised."""
        out = torch.cat([b[:, :, 0] for b in self.batches], dim=1)
        self.batches = []
        return out


def per_step_outputs(model, volume_hu: np.ndarray, device: str) -> torch.Tensor:
    cap = _StepCapture()
    den = Denoiser.load(model, device, None, adaptation=cap)
    denoise_volume(volume_hu, denoiser=den, batch_size=1 if device == "cpu" else None)
    return cap.take()


def single_hu(steps: torch.Tensor, k: int) -> np.ndarray:
    """Step k alone, clamped as the sampler does (k = -1: CoreDiff's plain output)."""
    return unit_to_hu(steps[k].clamp(0.0, 1.0).numpy())


def blend_hu(steps: torch.Tensor, logits) -> np.ndarray:
    return unit_to_hu(combine_steps(steps, logits).clamp(0.0, 1.0).numpy())


def metrics_of(volumes: list[np.ndarray], refs: list[np.ndarray]):
    per_slice = []
    for v, r in zip(volumes, refs):
        per_slice += volume_metrics(v, r)
    return mean_metrics(per_slice)


def simulate(kind: str, n_slices: int, size: int, doses: list[float], seed: int):
    from CoreDiffLib.simulation import simulate_pair
    ndct, ldct, _spacing = simulate_pair(kind, n_slices=n_slices, size=size, dose=list(doses), seed=seed)
    return ndct, ldct


def quick_models(args, log) -> tuple[str, dict]:
    """Train small stand-in models when no shipped ones exist: one at --base-dose, and one per
    --quick-upper dose, on simulated phantoms with seeds 100+ (far from the test seeds).
    Files are kept in --workdir and reused (training resumes from its checkpoint)."""
    from CoreDiffLib.models import save_weights
    from CoreDiffLib.network import NetworkConfig
    from CoreDiffLib.training import TrainConfig, train

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    doses = [args.base_dose] + [d for d in args.quick_upper if d != args.base_dose]
    paths = {d: work / f"quick-{round(d * 100):d}-w{args.quick_width}-it{args.quick_train}.safetensors"
             for d in doses}
    if not all(p.exists() for p in paths.values()):
        log(f"simulating {args.quick_cases} training phantoms (seeds 100..) at doses {doses}")
        data = [simulate(args.kind, args.quick_slices, args.size, doses, 100 + i) for i in range(args.quick_cases)]
        for d, path in paths.items():
            if path.exists():
                continue
            log(f"training a quick width-{args.quick_width} model at {d * 100:g} % dose "
                f"({args.quick_train} iterations)")
            pairs = [(nd, ld[d]) for nd, ld in data]
            cfg = TrainConfig(iterations=args.quick_train, batch_size=4, patch_size=64, lr=args.quick_lr,
                              seed=args.seed, checkpoint_every=250, log_every=100,
                              ema_start=min(2000, args.quick_train // 5))
            ema, state = train(pairs, NetworkConfig(width=args.quick_width), cfg,
                               checkpoint=path.with_suffix(".ckpt"), log=log)
            save_weights(ema, path, {"iterations": state.iteration, "dose": d, "quick": True})
    base = str(paths[args.base_dose])
    return base, {d: str(p) for d, p in paths.items() if d != args.base_dose}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="corediff-25", help="base model (name or file), trained at --base-dose")
    ap.add_argument("--base-dose", type=float, default=0.25, help="the dose --model was trained at")
    ap.add_argument("--doses", type=float, nargs="+", default=[0.10, 0.05])
    ap.add_argument("--upper", nargs="*", default=[],
                    help="DOSE=MODEL upper bounds (default: corediff-<pct> from the manifest)")
    ap.add_argument("--kind", default="abdomen")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=4, help="scored slices per test volume")
    ap.add_argument("--margin", type=int, default=1,
                    help="unscored slices simulated on each side of the scored ones, so every scored slice "
                         "has both neighbours as inside a scan (0: the reports before 2026-11-30)")
    ap.add_argument("--count", type=int, default=2, help="held-out test phantoms (seeds 9000...)")
    ap.add_argument("--test-seed", type=int, default=9000)
    ap.add_argument("--ref-seed", type=int, default=8999, help="phantom the reference slice comes from")
    ap.add_argument("--ref-slices", type=int, default=5, help="slices of the reference volume")
    ap.add_argument("--ref-slice", type=int, default=1, help="reference slice index (unpaired NDCT: +2)")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--quick-train", type=int, default=0,
                    help="no shipped weights: train small stand-in models for this many iterations")
    ap.add_argument("--quick-upper", type=float, nargs="*", default=[],
                    help="with --quick-train: doses to train stand-in upper-bound models for")
    ap.add_argument("--quick-width", type=int, default=16)
    ap.add_argument("--quick-cases", type=int, default=4)
    ap.add_argument("--quick-slices", type=int, default=8)
    ap.add_argument("--quick-lr", type=float, default=5e-4)
    ap.add_argument("--workdir", default="oneshot_bench_work", help="where quick models are kept")
    args = ap.parse_args(argv)
    if args.margin < 0 or args.slices < 1:  # before any model is trained or phantom simulated
        ap.error("--slices must be >= 1 and --margin >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    manifest = shipped_models()
    uppers = {}
    if args.quick_train:
        args.model, quick_uppers = quick_models(args, log)
        uppers.update(quick_uppers)
    base = load_model(args.model, args.device)
    for d in args.doses:
        name = f"corediff-{round(d * 100):d}"
        if name in manifest and d not in uppers:
            uppers[d] = name
    for item in args.upper:
        d, _, m = item.partition("=")
        uppers[float(d)] = m
    log(f"base model {args.model} (T={base.config.steps}, width {base.config.width}); upper bounds: "
        + (", ".join(f"{d:g}: {m}" for d, m in uppers.items()) or "none"))

    log(f"simulating reference phantom (seed {args.ref_seed}) and {args.count} test phantoms "
        f"({args.kind}, {args.size}^2) at doses {args.doses}")
    ref_ndct, ref_ldct = simulate(args.kind, args.ref_slices, args.size, args.doses, args.ref_seed)
    tests = [simulate(args.kind, args.slices + 2 * args.margin, args.size, args.doses, args.test_seed + i)
             for i in range(args.count)]
    scored = slice(args.margin, args.margin + args.slices)
    refs = [nd[scored] for nd, _ in tests]

    def score(volumes: list[np.ndarray]):
        """Metrics on the scored slices of whole-volume outputs (the margins were context)."""
        return metrics_of([v[scored] for v in volumes], refs)

    rows, weights_text = [], []
    for d in args.doses:
        pct = f"{d * 100:g} %"
        ldcts = [ld[d] for _, ld in tests]
        rows.append((pct, "LDCT input", score(ldcts)))
        log(f"dose {pct}: sampling the base model on {sum(v.shape[0] for v in ldcts)} test slices "
            f"({args.slices} per volume scored)")
        steps = [per_step_outputs(base, v, args.device) for v in ldcts]
        T = steps[0].shape[0]
        none = score([single_hu(s, -1) for s in steps])
        rows.append((pct, f"no adaptation ({Path(str(args.model)).stem}, last step)", none))
        osl = {}
        for mode in ("paired", "unpaired"):
            t0 = time.perf_counter()
            a = adapt(base, ref_ldct[d], args.ref_slice, ref_ndct, mode=mode, name=f"bench-{mode}",
                      dose=pct, iterations=args.iterations, seed=args.seed)
            secs = time.perf_counter() - t0
            m = score([blend_hu(s, a.weights) for s in steps])
            osl[mode] = m
            rows.append((pct, f"{mode} OSL (1 slice, NDCT slice {a.ndct_slice})", m))
            weights_text.append(f"- {pct} {mode}: weights (step 1..{T}) = "
                                + ", ".join(f"{p:.3f}" for p in a.probabilities)
                                + f"; adaptation {secs:.1f} s")
            log(weights_text[-1][2:])
        uniform = score([blend_hu(s, [0.0] * T) for s in steps])
        rows.append((pct, "uniform blend of the T steps (OSL's starting point)", uniform))
        singles = [score([single_hu(s, k) for s in steps]) for k in range(T)]
        best_k = int(np.argmax([m.psnr for m in singles]))
        rows.append((pct, f"oracle: best single step ({best_k + 1} of {T}) chosen on the test set", singles[best_k]))
        if d in uppers:
            log(f"dose {pct}: upper bound {uppers[d]}")
            up_model = load_model(uppers[d], args.device)
            up = score([unit_to_hu(per_step_outputs(up_model, v, args.device)[-1].clamp(0, 1).numpy())
                        for v in ldcts])
            rows.append((pct, f"upper bound: model trained at {pct} ({uppers[d]})", up))
            gap = up.psnr - none.psnr
            for mode in ("paired", "unpaired"):
                if gap < 0.1:
                    weights_text.append(f"- {pct} {mode} OSL: gap share undefined: the upper bound "
                                        f"({up.psnr:.2f} dB) is not better than no adaptation ({none.psnr:.2f} dB); "
                                        f"OSL {osl[mode].psnr:.2f} dB")
                    continue
                share = (osl[mode].psnr - none.psnr) / gap
                weights_text.append(f"- {pct} {mode} OSL recovers {100 * share:.0f} % of the PSNR gap "
                                    f"({none.psnr:.2f} -> {osl[mode].psnr:.2f} dB; upper bound {up.psnr:.2f} dB)")
        else:
            weights_text.append(f"- {pct}: no model trained at this dose is available: no upper bound")

    header = ("| dose | method | PSNR (dB) | SSIM | RMSE (HU) |\n"
              "|---|---|---:|---:|---:|")
    table = header + "\n" + "\n".join(f"| {pct} | {name} | {m.psnr:.2f} | {m.ssim:.4f} | {m.rmse_hu:.1f} |"
                                      for pct, name, m in rows)
    settings = (f"base model `{args.model}` (trained at {args.base_dose * 100:g} % dose, T={base.config.steps}, "
                f"width {base.config.width}); {args.count} held-out {args.kind} phantoms (seeds "
                f"{args.test_seed}..{args.test_seed + args.count - 1}) x {args.slices} slices of {args.size}^2"
                f"{f' inside {args.slices + 2 * args.margin}-slice volumes' if args.margin else ''}; "
                f"reference slice {args.ref_slice} of phantom seed {args.ref_seed}; {args.iterations} iterations; "
                f"metrics on [-1000, 1000] HU vs the full-dose reconstruction; "
                f"{time.perf_counter() - t_start:.0f} s in all on {torch.get_num_threads()} CPU threads")
    report = f"{table}\n\n{settings}\n\n" + "\n".join(weights_text) + "\n"
    print(report)
    if args.out:
        out = Path(args.out)
        write_text_atomic(out, "# One-shot learning evaluation\n\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

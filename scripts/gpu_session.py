#!/usr/bin/env python
"""One short GPU session: train the paper-size CoreDiff model, score it, benchmark its speed.

    python scripts/pack_training_data.py                      # here: data/ -> .gpu/*.npz.xz
    python3 scripts/gpu_session.py --data .gpu --out $OUT     # there: about 8 minutes

Rented GPU time comes in slots of minutes, so every stage has a wall-time budget and writes
its results as soon as it has them; a stage that fails is reported and the next one runs.

1. train  CLEAR-Net width 64 (the paper's 4.8 M parameters, CTX + EMM, T = 10) on 256x256
          patches of the packed 25 % dose pairs, bf16 autocast, cosine learning rate decayed to
          zero over --train-minutes. Weights (EMA) come back as two fp32 safetensors shards
          (file-size limits of the transfer); ``--merge`` joins them here.
2. score  the held-out phantoms: PSNR / SSIM / RMSE at T = 10 and T = 1 for the new model, the
          shipped width-16 model and the LDCT input; and the drift from storing the weights
          in fp16 (what would halve the shipped file).
3. bench  ``corediff bench`` on the trained model: precisions x batch, eager and CUDA graphs,
          then torch.compile, each checked against eager fp32 (0.05 dB rule).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from CoreDiffLib.inference import denoise_volume  # noqa: E402
from CoreDiffLib.metrics import mean_metrics, volume_metrics  # noqa: E402
from CoreDiffLib.models import load_model, save_weights  # noqa: E402
from CoreDiffLib.network import ClearNet, NetworkConfig, count_parameters  # noqa: E402
from CoreDiffLib.training import TrainConfig, TrainingInterrupted, train, weights_at_stop  # noqa: E402
from pack_training_data import load_packed  # noqa: E402

SHARDS = ("part1", "part2")


def log_to(path: Path):
    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return log


def save_shards(weights: Path, out: Path, stem: str) -> list[Path]:
    """Split a weights file in two halves (by tensor), each a valid safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    sizes = np.cumsum([tensors[k].numel() for k in keys])
    cut = int(np.searchsorted(sizes, sizes[-1] / 2)) + 1
    paths = []
    for part, names in zip(SHARDS, (keys[:cut], keys[cut:])):
        p = out / f"{stem}.{part}.safetensors"
        save_file({k: tensors[k] for k in names}, str(p), metadata=meta)
        paths.append(p)
    return paths


def merge_shards(first: Path, output: Path) -> str:
    """Join the shards written by :func:`save_shards` into one weights file; returns its sha256.

    ``first`` is the ``*.part1.safetensors`` file; its partner is found beside it by name.
    """
    from safetensors import safe_open
    suffix = f".{SHARDS[0]}.safetensors"
    if not first.name.endswith(suffix):
        raise ValueError(f"--merge {first}: give the first shard, the file ending in {suffix}")
    tensors, meta = {}, None
    for part in SHARDS:
        p = first.with_name(first.name[:-len(suffix)] + f".{part}.safetensors")  # the name only, not the folders
        if not p.is_file():
            raise ValueError(f"--merge: {p} is missing; both shards must lie in one folder")
        with safe_open(str(p), framework="pt") as f:
            meta = meta or f.metadata()
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    config = NetworkConfig.from_dict(json.loads(meta["config"]))
    model = ClearNet(config)
    model.load_state_dict(tensors, strict=True)
    extra = {k: v for k, v in meta.items() if k not in ("format", "config")}
    return save_weights(model, output, extra)


def stage_train(a, out: Path, log) -> Path:
    cases = load_packed(Path(a.data) / "train.npz.xz")
    pairs = [(nd, ld) for _, nd, ld in cases]
    log(f"train: {len(cases)} volumes, {sum(nd.shape[0] for nd, _ in pairs)} slices, "
        f"shapes {[nd.shape for nd, _ in pairs]}")
    net_cfg = NetworkConfig(width=a.width, use_context=a.variant != "noctx", use_emm=a.variant != "noemm")
    log(f"CLEAR-Net width {a.width} ({a.variant}): {count_parameters(ClearNet(net_cfg)):,} parameters")
    cfg = TrainConfig(iterations=a.max_iterations, batch_size=a.batch_size, patch_size=a.patch_size,
                      lr=a.lr, lr_schedule="cosine", ema_decay=0.99, ema_every=5, ema_start=a.ema_start,
                      seed=0, checkpoint_every=10**9, log_every=100, precision="bf16",
                      time_limit_s=60.0 * a.train_minutes)
    t0 = time.time()
    ckpt = a.scratch / "train.ckpt"  # written only when stopped
    interrupted = None
    try:
        ema, state = train(pairs, net_cfg, cfg, checkpoint=ckpt, resume=False, device=a.device, log=log)
    except TrainingInterrupted as exc:  # SIGTERM at the machine's limit, Ctrl-C: keep what was trained
        interrupted = exc
        ema, state = weights_at_stop(ckpt, net_cfg)
        log(f"interrupted at iteration {state.iteration}: its weights are written all the same")
    seconds = time.time() - t0
    log(f"trained {state.iteration} iterations in {seconds:.0f} s ({state.iteration / seconds:.2f} it/s)")
    meta = {"iterations": state.iteration, "dose": 0.25, "train_seconds": round(seconds, 1),
            "device": device_name(a.device), "train_config": vars(cfg),
            "losses_every_100": state.losses}
    weights = a.scratch / f"{a.stem}.safetensors"
    save_weights(ema.cpu(), weights, meta)
    if not a.no_shards:
        for p in save_shards(weights, out, a.stem):
            log(f"wrote {p.name} ({p.stat().st_size / 1e6:.1f} MB)")
    (out / f"train_losses{a.suffix}.json").write_text(json.dumps({"iterations": state.iteration, "seconds": seconds,
                                                        "losses_every_100": state.losses}))
    if interrupted is not None:
        raise interrupted
    return weights


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def held_out(a) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """The packed held-out cases, and all their NDCT / LDCT slices stacked."""
    cases = load_packed(Path(a.data) / "test.npz.xz")[:a.test_cases or None]
    return cases, np.concatenate([nd for _, nd, _ in cases]), np.concatenate([ld for _, _, ld in cases])


def stage_score(a, weights: Path, out: Path, log) -> None:
    cases, ndct, ldct = held_out(a)
    rows = {"LDCT": mean_metrics(volume_metrics(ldct, ndct))}
    models = {f"{a.stem} (GPU)": load_model(weights, device=a.device)}
    if a.score_all:
        try:  # a comparison: its absence (left out of the carried tree) must not cost the new model's score
            models["CoreDiff w16 (shipped corediff-25)"] = load_model("corediff-25", device=a.device)
        except Exception as exc:
            log(f"score: shipped corediff-25 left out ({exc})")
        half = load_model(weights, device="cpu")
        half.load_state_dict({k: v.half().float() for k, v in half.state_dict().items()})
        models[f"{a.stem}, fp16-stored weights"] = half.to(a.device)
    for label, model in models.items():
        for steps in (10, 1):
            t0 = time.time()
            den = np.concatenate([denoise_volume(ld, model=model, device=a.device, steps=steps, precision="fp32")
                                  for _, _, ld in cases])
            rows[f"{label} T={steps}"] = mean_metrics(volume_metrics(den, ndct))
            log(f"{label} T={steps}: {rows[f'{label} T={steps}']} ({time.time() - t0:.1f} s)")
    table = {k: {"psnr": v.psnr, "ssim": v.ssim, "rmse_hu": v.rmse_hu} for k, v in rows.items()}
    (out / f"quality_gpu{a.suffix}.json").write_text(json.dumps(table, indent=2))
    for k, v in table.items():
        log(f"| {k} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['rmse_hu']:.1f} |")


def stage_bench(a, weights: Path, out: Path, log) -> None:
    # the benchmark's input: the held-out slices, put where `corediff bench` caches its input
    cache = a.scratch / "cache"  # this run's own: no earlier run's files
    cache.mkdir()
    _, ndct, ldct = held_out(a)
    n = ldct.shape[0] - 2  # the benchmark reads one extra slice on each side (context)
    np.savez(cache / f"bench_input_512_{n + 2}_0.npz", ldct=ldct, ndct=ndct,
             kind=np.array("simulated 25% dose, held-out phantoms"))
    env = dict(os.environ, COREDIFF_CACHE=str(cache), PYTHONPATH=str(REPO))
    bench = a.scratch / "bench"  # tarred into OUT: the transfer takes few files
    bench.mkdir()
    runs = [("eager", ["--batch-sizes", f"1,{n}", "--precisions", "fp32,tf32,bf16,fp16",
                       "--channels-last", "--compile", "eager"]),
            ("cudagraphs", ["--batch-sizes", f"1,{n}", "--precisions", "tf32,bf16,fp16",
                            "--channels-last", "only", "--compile", "cudagraphs"]),
            ("compiled", ["--batch-sizes", str(n), "--precisions", "bf16",
                          "--channels-last", "only", "--compile", "compile"])]
    deadline = time.time() + 60.0 * a.bench_minutes
    for name, extra in runs:
        left = deadline - time.time()
        if left < 20:
            log(f"bench {name}: skipped, {left:.0f} s left")
            continue
        cmd = [sys.executable, "-m", "CoreDiffLib.cli", "bench", "--model", str(weights), "--size", "512",
               "--device", a.device, "--slices", str(n), "--repeats", "3",
               "--json", str(bench / f"{name}.json"), "--markdown", str(bench / f"{name}.md"), *extra]
        t0 = time.time()
        rc, stdout, stderr, stopped = run_within(cmd, env, left)
        if stopped:
            log(f"bench {name}: stopped at the {left:.0f} s budget")
        (bench / f"{name}.log").write_text(stdout + "\n" + stderr)
        log(f"bench {name}: exit {rc} in {time.time() - t0:.0f} s\n{stdout[-3000:]}"
            f"{stderr[-1500:] if rc else ''}")
        with tarfile.open(out / "bench.tar.gz", "w:gz") as tar:
            tar.add(bench, arcname="bench")


def run_within(cmd: list[str], env: dict, seconds: float, grace: float = 20.0) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, stopped) of ``cmd`` given ``seconds``: at the budget it gets a
    SIGTERM, on which ``corediff bench`` ends the pass in hand and writes the rows it has, marked
    INCOMPLETE (subprocess.run's timeout sent SIGKILL, and every row measured was lost); a SIGKILL
    only if it has not ended ``grace`` seconds later."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=seconds)
        return proc.returncode, stdout, stderr, False
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        stdout, stderr = proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return proc.returncode, stdout, stderr, True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / ".gpu"))
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_session_out"))
    p.add_argument("--width", type=int, default=None, help="default 64 (8 with --dry-run)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (2 with --dry-run)")
    p.add_argument("--patch-size", type=int, default=None, help="default 256 (32 with --dry-run)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema-start", type=int, default=500)
    p.add_argument("--max-iterations", type=int, default=1_000_000)
    p.add_argument("--train-minutes", type=float, default=4.5)
    p.add_argument("--bench-minutes", type=float, default=2.0)
    p.add_argument("--variant", choices=("full", "noemm", "noctx"), default="full",
                   help="the full model or an ablation (without EMM / without context)")
    p.add_argument("--stages", default="train,score,bench", help="comma list of train,score,bench")
    p.add_argument("--weights", default=None, help="score/bench this weights file instead of training")
    p.add_argument("--score-all", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the shipped CPU model and fp16-stored weights")
    p.add_argument("--no-shards", action="store_true", help="do not return the trained weights")
    p.add_argument("--test-cases", type=int, default=None,
                   help="score on the first N held-out cases (0 = all; default all, 1 with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="rehearse every stage on the CPU with the budgets given (check the script before renting)")
    p.add_argument("--merge", nargs=2, metavar=("PART1", "OUTPUT"), help="join returned shards here")
    a = p.parse_args()
    for name, full, rehearsal in (("width", 64, 8), ("batch_size", 16, 2), ("patch_size", 256, 32),
                                  ("test_cases", 0, 1)):  # a rehearsal small unless told otherwise
        if getattr(a, name) is None:
            setattr(a, name, rehearsal if a.dry_run else full)
    if a.merge:
        try:
            print(f"wrote {a.merge[1]} sha256 {merge_shards(Path(a.merge[0]), Path(a.merge[1]))}")
        except ValueError as e:
            p.error(str(e))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.stem = (Path(a.weights).stem if a.weights and "train" not in a.stages.split(",")
              else f"corediff-25-w{a.width}" + ("" if a.variant == "full" else f"-{a.variant}"))
    a.suffix = "" if a.variant == "full" else f"-{a.variant}"
    log = log_to(out / f"session{a.suffix}.log")
    a.device = "cpu" if a.dry_run else "cuda"
    log(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    if a.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: nothing to do (--dry-run rehearses on the CPU)")
        return 2
    weights = Path(a.weights) if a.weights else None
    stages = a.stages.split(",")
    problem = check_session(a, stages, weights)
    if problem:  # before any work: device time is short
        log(f"refused: {problem}")
        return 2
    a.scratch = Path(tempfile.mkdtemp(prefix="corediff-session-"))  # checkpoint, weights, bench input: removed at exit
    try:
        return run_stages(a, stages, weights, out, log)
    finally:
        shutil.rmtree(a.scratch, ignore_errors=True)


def run_stages(a, stages: list[str], weights: Path | None, out: Path, log) -> int:
    """Train, score and bench in turn; what each writes for the user goes to OUT as it comes."""
    failed = []
    for name, stage in (("train", stage_train), ("score", stage_score), ("bench", stage_bench)):
        if name not in stages:
            continue
        t0 = time.time()
        try:
            if name == "train":
                weights = stage(a, out, log)
            else:
                stage(a, weights, out, log)
        except KeyboardInterrupt:  # SIGTERM / Ctrl-C: what was written stays in OUT
            log(f"stage {name}: interrupted after {time.time() - t0:.0f} s")
            return 130
        except Exception:
            failed.append(name)
            log(f"stage {name} failed:\n{traceback.format_exc()}")
        log(f"stage {name}: {time.time() - t0:.0f} s")
    return 1 if failed else 0


def check_session(a, stages: list[str], weights: Path | None) -> str | None:
    """What would make the session fail after its device time began, or None."""
    unknown = sorted(set(stages) - {"train", "score", "bench"})
    if unknown:
        return f"unknown stage(s) {', '.join(unknown)}: give a comma list of train, score, bench"
    if "train" not in stages and (weights is None or not weights.is_file()):
        return "score/bench without train need an existing --weights file"
    needs = ([Path(a.data) / "train.npz.xz"] if "train" in stages else []) + \
        ([Path(a.data) / "test.npz.xz"] if {"score", "bench"} & set(stages) else [])
    missing = [str(p) for p in needs if not p.is_file()]
    if missing:
        return f"missing {', '.join(missing)}: pack them with scripts/pack_training_data.py and carry them"
    if "train" in stages and a.train_minutes <= 0 or "bench" in stages and a.bench_minutes <= 0:
        return "--train-minutes and --bench-minutes must be > 0 (0 would mean no limit)"
    return None


if __name__ == "__main__":
    raise SystemExit(main())

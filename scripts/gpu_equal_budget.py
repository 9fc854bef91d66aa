#!/usr/bin/env python
"""Fine-tune CoreDiff and RED-CNN side by side on one GPU for the same wall time, at each dose.

    python scripts/pack_training_data.py --dose-tag 25 10 5 --test "" --out .gpu   # here
    python3 scripts/gpu_equal_budget.py --data .gpu --out $OUT --minutes 6 \\
        --job corediff-25:corediff:25:.gpu/init/corediff-25.safetensors:5e-4 \\
        --job redcnn-25:redcnn:25:.gpu/init/redcnn-25.pt:2.5e-4 ...                  # there

Why: on equal CPU budgets RED-CNN stays a few tenths of a dB ahead of the width-16 CoreDiff,
and three 28-minute CPU rounds at 25 % did not move the gap. A GPU slot gives each model
many times the pixels of a CPU round, which tests whether much more training changes the
ranking. Every job is its own process and all run at once, so each model gets the same wall
time on the same GPU (the iterations each reached are reported); each starts from its latest
CPU-trained weights and uses its own CPU recipe's learning rate, cosine-decayed to 0 by the
time limit, bf16 autocast, and the same larger batch of larger patches.

A job is NAME:MODEL:DOSE_TAG:INIT_WEIGHTS:PEAK_LR[:ANYWHERE_SHARE] with MODEL ``corediff`` (CLEAR-Net, the
architecture is read from the init weights) or ``redcnn`` (RED-CNN, 32 filters, a .pt state
dict) and ANYWHERE_SHARE the share of patches drawn anywhere, open air included (default 0;
``corediff train --anywhere-share``). Each job comes back as one ``NAME.tar.gz`` (a transfer
takes few files, each under 16 MB): CoreDiff's final and EMA weights as safetensors, RED-CNN's as
.pt, the job's log and figures; beside them ``summary.json`` (iterations, patches, seconds, last
losses, GPU utilisation samples).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


@dataclass
class Job:
    name: str
    model: str      # "corediff" or "redcnn"
    dose_tag: str
    init: str
    lr: float
    anywhere_share: float = 0.0  # share of patches drawn anywhere, open air included

    @classmethod
    def parse(cls, spec: str) -> "Job":
        parts = spec.split(":")
        if len(parts) not in (5, 6) or parts[1] not in ("corediff", "redcnn"):
            raise ValueError(f"job {spec!r}: expected NAME:corediff|redcnn:DOSE_TAG:INIT:LR[:ANYWHERE_SHARE]")
        share = float(parts[5]) if len(parts) == 6 else 0.0
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"job {spec!r}: the anywhere share must be in [0, 1], not {share}")
        return cls(parts[0], parts[1], parts[2], parts[3], float(parts[4]), share)


#: what a job writes into the work folder, after its name
JOB_FILES = (".log", ".json", ".pt", "-raw.safetensors", "-ema.safetensors")


def job_files(work: Path, name: str) -> list[Path]:
    """The files job ``name`` wrote: its own names only (a glob of NAME[.-]* took job rc-25's files for
    job rc's as well, into its tarball or out of the folder as stale)."""
    return [work / f"{name}{ending}" for ending in JOB_FILES if (work / f"{name}{ending}").exists()]


def run_job(job: Job, a: argparse.Namespace, work: Path) -> dict:
    """Train one model in this process; write its weights and return its figures."""
    import torch
    from CoreDiffLib.baselines import train_redcnn
    from CoreDiffLib.models import load_model, save_weights
    from CoreDiffLib.network import ClearNet
    from CoreDiffLib.training import TrainConfig, TrainingInterrupted, train, weights_at_stop
    from pack_training_data import load_packed

    torch.set_num_threads(a.threads)
    log_path = work / f"{job.name}.log"

    def log(msg: str) -> None:
        with open(log_path, "a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")

    pairs = [(nd, ld) for _, nd, ld in load_packed(Path(a.data) / "train.npz.xz", job.dose_tag)]
    log(f"{job}: {len(pairs)} volumes, {sum(nd.shape[0] for nd, _ in pairs)} slices")
    seconds = 60.0 * a.minutes
    t0 = time.time()
    if job.model == "redcnn":
        init = torch.load(job.init, map_location="cpu", weights_only=True)
        stopped = []  # train_redcnn logs "RED-CNN stopped at iteration N: time limit ..."

        def keep(msg: str) -> None:
            log(msg)
            if "stopped at iteration" in msg:
                stopped.append(int(msg.split("iteration ")[1].split(":")[0]))

        model = train_redcnn(pairs, 10**9, a.batch_size, a.patch_size, lr=job.lr, seed=a.seed,
                             filters=32, log=keep, init_state=init, time_limit_s=seconds,
                             lr_schedule="cosine", device=a.device, precision=a.precision,
                             anywhere_share=job.anywhere_share)
        torch.save(model.state_dict(), work / f"{job.name}.pt")
        iterations, losses = stopped[-1], []
    else:
        start = load_model(job.init, verify=False)
        cfg = TrainConfig(iterations=10**9, batch_size=a.batch_size, patch_size=a.patch_size, lr=job.lr,
                          lr_schedule="cosine", ema_decay=0.995, ema_every=10, ema_start=500, seed=a.seed,
                          checkpoint_every=10**9, log_every=100, precision=a.precision,
                          time_limit_s=seconds, anywhere_share=job.anywhere_share)
        ckpt = work / "checkpoints" / f"{job.name}.ckpt"  # beside the job's files, not in its tarball
        try:
            ema, state = train(pairs, start.config, cfg, checkpoint=ckpt, resume=False, device=a.device,
                               log=log, init_state=start.state_dict())
        except TrainingInterrupted:  # SIGTERM at the machine's limit: the weights so far still travel back
            ema, state = weights_at_stop(ckpt, start.config)
            log(f"interrupted at iteration {state.iteration}: its weights are written all the same")
        raw = ClearNet(start.config)
        raw.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
        meta = {"iterations": state.iteration, "dose_tag": job.dose_tag, "init": Path(job.init).name,
                "train_config": asdict(cfg), "losses_every_100": state.losses,
                "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"}
        save_weights(raw, work / f"{job.name}-raw.safetensors", dict(meta, weights="raw"))
        save_weights(ema.cpu(), work / f"{job.name}-ema.safetensors", dict(meta, weights="ema"))
        iterations, losses = state.iteration, state.losses[-5:]
    took = time.time() - t0
    result = {**asdict(job), "iterations": iterations, "seconds": round(took, 1),
              "patches": iterations * a.batch_size, "patch_size": a.patch_size,
              "it_per_s": round(iterations / took, 2), "last_losses_every_100": losses}
    log(f"done: {result}")
    return result


def split_for_transfer(path: Path, part_bytes: int = 15 * 2**20) -> None:
    """A file over the transfer's 16 MB as numbered parts (a width-64 job's weights are ~30 MB):
    join them with ``cat NAME.part* > NAME``."""
    size = path.stat().st_size
    if size <= part_bytes:
        return
    with open(path, "rb") as f:
        for k in range(1, (size + part_bytes - 1) // part_bytes + 1):
            Path(f"{path}.part{k}").write_bytes(f.read(part_bytes))
    path.unlink()


def gpu_sample() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,power.draw",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi: {exc}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / ".gpu"))
    p.add_argument("--out", default=os.environ.get("OUT", "equal_budget_out"))
    p.add_argument("--job", action="append", default=[], help="NAME:MODEL:DOSE_TAG:INIT:LR (repeat)")
    p.add_argument("--minutes", type=float, default=6.0, help="wall-time budget of every job")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads per job")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--device", default="cuda", help="cpu rehearses the whole run (--minutes small)")
    p.add_argument("--work", default="/tmp/equal_budget", help="where the jobs write before the tarball")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # a child process: one job
    a = p.parse_args()
    out = Path(a.out)
    work = Path(a.work)  # outside OUT: only the per-job tarballs and the summary travel back
    if a.run_one:
        job = Job.parse(a.run_one)
        (work / f"{job.name}.json").write_text(json.dumps(run_job(job, a, work), indent=1))
        return 0
    try:
        jobs = [Job.parse(spec) for spec in a.job]
    except ValueError as exc:
        p.error(str(exc))
    if not jobs:
        p.error("give at least one --job")
    for job in jobs:
        if not Path(job.init).exists():
            p.error(f"job {job.name}: no init weights at {job.init}")
    if a.minutes <= 0:
        p.error("--minutes must be > 0 (0 would mean no time limit)")
    work.mkdir(parents=True, exist_ok=True)  # only once the jobs are known to be sound
    for job in jobs:  # an earlier run's files of the same name would travel back as this run's
        for stale in job_files(work, job.name):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    import torch
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (--device cpu rehearses the run)", flush=True)
        return 2
    child_args = sys.argv[1:]
    procs = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    for job, spec in zip(jobs, a.job):
        procs[job.name] = subprocess.Popen([sys.executable, __file__, *child_args, "--run-one", spec], env=env)
    samples, t0 = [], time.time()

    def stop_jobs(signum, frame):  # SIGTERM at the machine's limit: the jobs save, then the summary is written
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop_jobs)
    while any(proc.poll() is None for proc in procs.values()):
        time.sleep(5)
        if int(time.time() - t0) % 30 < 5:
            samples.append(f"{time.time() - t0:.0f} s: {gpu_sample()}")
            print(samples[-1], flush=True)
    summary = {"jobs": {}, "gpu_samples": samples, "wall_s": round(time.time() - t0, 1),
               "args": {k: v for k, v in vars(a).items() if k != "run_one"}}
    for name, proc in procs.items():
        result_file = work / f"{name}.json"
        summary["jobs"][name] = (json.loads(result_file.read_text()) if result_file.exists()
                                 else {"failed": f"exit {proc.returncode}"})
        print(name, summary["jobs"][name], flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for name in procs:  # one tarball per job: a transfer returns files of up to 16 MB each
        tarball = out / f"{name}.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            for path in job_files(work, name):
                tar.add(path, arcname=f"equal_budget/{path.name}")
        split_for_transfer(tarball)
    return 0 if all(proc.returncode == 0 for proc in procs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

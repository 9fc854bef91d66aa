"""`corediff train` under torchrun: two CPU processes (gloo) train one model with DDP.

Checks what data-parallel training must guarantee: every replica ends with bit-identical
weights (gradients averaged, same t each iteration, same initial weights) although each
rank draws different patches, the loss falls, and one weights file is written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_ct, write_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_data")
    for case in range(2):
        ndct = synthetic_ct(n_slices=4, size=48, seed=case, noise_hu=0.0)
        ldct = ndct + np.random.default_rng(10 + case).normal(0, 60, ndct.shape).astype(np.float32)
        write_image(d / f"case{case}_ndct.nrrd", ndct)
        write_image(d / f"case{case}_ldct.nrrd", ldct)
    return d


def test_torchrun_two_processes_identical_replicas(pair_folder, tmp_path):
    out = tmp_path / "ddp.safetensors"
    debug = tmp_path / "ranks"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COREDIFF_DDP_DEBUG_DIR=str(debug), OMP_NUM_THREADS="1",
               TMPDIR=str(tmp_path))  # torchrun leaves a torchelastic_* folder in the temporary folder
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "CoreDiffLib.cli", "train", str(pair_folder), "--out", str(out),
           "--iterations", "200", "--lr", "1e-3", "--batch-size", "2", "--patch-size", "32", "--width", "8",
           "--threads", "1", "--checkpoint-every", "1000", "--device", "cpu", "--progress", "lines"]
    proc = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    # identical replicas, although each rank saw its own data stream
    assert ranks[0]["model_sha256"] == ranks[1]["model_sha256"]
    assert ranks[0]["ema_sha256"] == ranks[1]["ema_sha256"]
    assert ranks[0]["ts"] == ranks[1]["ts"]                    # same t every iteration
    assert ranks[0]["losses"] != ranks[1]["losses"]            # different patches per rank
    for r in ranks:
        losses = np.asarray(r["losses"])
        assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20]), losses
    assert out.exists()                                        # rank 0 wrote the weights
    assert out.with_suffix(".ckpt").exists()
    print(f"DDP: {len(ranks[0]['losses'])} iterations/rank, loss {np.mean(ranks[0]['losses'][:20]):.3e} -> "
          f"{np.mean(ranks[0]['losses'][-20:]):.3e}, replicas identical (sha256 {ranks[0]['model_sha256'][:12]})")


def test_a_resumed_run_keeps_each_rank_on_its_own_patches(pair_folder, tmp_path):
    """The checkpoint holds rank 0's patch sampler (rank 0 writes it); every rank loaded it on
    resume and drew rank 0's patches from then on: the effective batch fell from ranks x batch to
    one batch without a word. Resumed as rank 0 and as rank 1 (one process each, as torchrun
    numbers them), the two draw different patches, and rank 0 still resumes where it was."""
    import shutil
    base = ["-m", "CoreDiffLib.cli", "train", str(pair_folder), "--batch-size", "2", "--patch-size", "32",
            "--width", "4", "--threads", "1", "--checkpoint-every", "1", "--device", "cpu", "--progress", "none"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    first = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "m.safetensors"), "--iterations", "2"],
                           env=env, capture_output=True, encoding="utf-8", timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    losses = {}
    for rank in (1, 0):
        run = tmp_path / f"rank{rank}"
        run.mkdir()
        shutil.copy(tmp_path / "m.ckpt", run / "m.ckpt")
        r = subprocess.run([sys.executable, *base, "--out", str(run / "m.safetensors"), "--iterations", "5"],
                           env=dict(env, RANK=str(rank), WORLD_SIZE="1", COREDIFF_DDP_DEBUG_DIR=str(run)),
                           capture_output=True, encoding="utf-8", timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        losses[rank] = json.loads((run / f"rank{rank}.json").read_text())["losses"]
    assert len(losses[0]) == len(losses[1]) == 3 and losses[0] != losses[1]
    # rank 0 goes on exactly where it was: as one uninterrupted run of 5 iterations
    whole = tmp_path / "whole"
    whole.mkdir()
    r = subprocess.run([sys.executable, *base, "--out", str(whole / "m.safetensors"), "--iterations", "5"],
                       env=dict(env, COREDIFF_DDP_DEBUG_DIR=str(whole)), capture_output=True, encoding="utf-8",
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((whole / "rank0.json").read_text())["losses"][2:] == losses[0]

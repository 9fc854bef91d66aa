#!/usr/bin/env python
"""Train the RED-CNN baseline on the same simulated pairs and patch sampler as CoreDiff.

    python scripts/train_redcnn.py data/train --dose-tag 25 --iterations 3000 --out runs/redcnn-25.pt
    python scripts/train_redcnn.py data/train --dose-tag 10 --init runs/redcnn-25.pt \
        --iterations 100000 --time-limit 28 --lr-schedule cosine --out runs/redcnn-10.pt

On the CPU by default, as the shipped baselines were trained; ``--device cuda`` (with
``--precision bf16`` as CoreDiff's GPU rounds) trains on a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from CoreDiffLib import CoreDiffError  # noqa: E402
from CoreDiffLib.atomic import atomic_path, check_output_file  # noqa: E402
from CoreDiffLib.baselines import train_redcnn  # noqa: E402
from CoreDiffLib.pairs import find_pairs, read_training_pairs  # noqa: E402
from CoreDiffLib.training import LEVEL_WINDOWS, LR_SCHEDULES, TRAIN_PRECISIONS, LossTerms  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--dose-tag", default=None)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--filters", type=int, default=None, help="width (default 32; with --init: the init's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0,
                   help="weight initialisation and patch sampling (train twice to see the spread)")
    p.add_argument("--init", default=None, metavar="PT",
                   help="start from these RED-CNN weights (fine-tuning to another dose)")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="MINUTES",
                   help="stop after this many minutes (0 = run all iterations)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="Adam's (peak) learning rate; 1e-4 trained the shipped baselines")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="cosine: decay to 0 by the last iteration or the time limit, if sooner")
    p.add_argument("--ssim-weight", type=float, default=0.0, metavar="W",
                   help="add W x (1 - SSIM) to the MSE, as `corediff train --ssim-weight` does")
    p.add_argument("--level-weight", type=float, default=0.0, metavar="W",
                   help="add W x the MSE of local levels, as `corediff train --level-weight` does")
    p.add_argument("--level-window", choices=LEVEL_WINDOWS, default="block8",
                   help="which local levels --level-weight compares, as `corediff train --level-window`")
    p.add_argument("--anywhere-share", type=float, default=0.0, metavar="S",
                   help="share of patches drawn anywhere, open air included, as `corediff train "
                        "--anywhere-share` does")
    p.add_argument("--device", default="cpu",
                   help="cpu (default: the recipe of the shipped baselines), cuda, mps or auto")
    p.add_argument("--precision", choices=TRAIN_PRECISIONS, default="fp32",
                   help="bf16: autocast, as CoreDiff's GPU training (the GPU rounds' baselines)")
    p.add_argument("--out", required=True, help="weights file (.pt), for the quality benchmark's RED-CNN rows")
    a = p.parse_args()
    if a.iterations < 1:
        p.error(f"--iterations {a.iterations}: give at least 1")
    if not 0 <= a.anywhere_share <= 1:
        p.error(f"--anywhere-share {a.anywhere_share} is not a share: give a number in [0, 1]")
    try:  # refused before the data are read: nothing is written
        terms = LossTerms(a.ssim_weight, a.level_weight, a.level_window)
        terms.check_patch_size(a.patch_size)
    except CoreDiffError as e:
        p.error(str(e))
    try:  # a PyTorch state dict, never on an input: RED-CNN is a benchmark baseline, not for `corediff denoise`
        check_output_file("--out", a.out, (".pt",), (a.init, a.data))
    except CoreDiffError as e:
        p.error(str(e))
    init = None
    if a.init:
        try:
            init = torch.load(a.init, map_location="cpu", weights_only=True)
            filters = int(init["enc.0.weight"].shape[0])
        except Exception as e:  # torch raises many kinds for a file that is not RED-CNN weights
            p.error(f"--init {a.init} is not RED-CNN weights saved by this script ({type(e).__name__})")
        if a.filters is not None and filters != a.filters:
            p.error(f"--init {a.init} has {filters} filters, --filters {a.filters}: leave --filters out")
        a.filters = filters  # the starting weights' own width
    a.filters = a.filters or 32
    try:
        from CoreDiffLib.inference import pick_device
        device = str(pick_device(a.device))
    except CoreDiffError as e:
        p.error(str(e))
    torch.set_num_threads(a.threads)
    try:
        # the axial planes of checked pairs, as `corediff train` reads them
        pairs = read_training_pairs(find_pairs(a.data, a.dose_tag), log=lambda m: print(m, flush=True))
    except CoreDiffError as e:
        p.error(str(e))
    try:
        model = train_redcnn(pairs, a.iterations, a.batch_size, a.patch_size, filters=a.filters, seed=a.seed,
                             log=lambda m: print(m, flush=True), init_state=init,
                             time_limit_s=a.time_limit * 60.0, lr=a.lr, lr_schedule=a.lr_schedule,
                             loss_terms=terms, anywhere_share=a.anywhere_share, device=device,
                             precision=a.precision)
    except CoreDiffError as e:  # refused before training: nothing is written
        p.error(str(e))
    with atomic_path(a.out) as tmp:  # an interrupted save never leaves a truncated file at --out
        torch.save(model.state_dict(), tmp)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

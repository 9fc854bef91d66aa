#!/usr/bin/env python
"""Train the RED-CNN baseline on the same simulated pairs and patch sampler as CoreDiff.

    python scripts/train_redcnn.py data/train --dose-tag 25 --iterations 3000 --out runs/redcnn-25.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from CoreDiffLib.baselines import train_redcnn  # noqa: E402
from CoreDiffLib.io import find_pairs, read_volume  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--dose-tag", default=None)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pairs = [(read_volume(n).array, read_volume(l).array) for n, l in find_pairs(a.data, a.dose_tag)]
    model = train_redcnn(pairs, a.iterations, a.batch_size, a.patch_size, filters=a.filters,
                         log=lambda m: print(m, flush=True))
    torch.save(model.state_dict(), a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

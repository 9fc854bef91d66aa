"""The mirrored end-slice experiment's training run (docs/benchmarks/quality_record.md, "Tried on the
CPU and not shipped"; its tables beside this file): `corediff train` with the
patch sampler's edge rule replaced -- a volume's first/last slice gets its one real neighbour on
both sides instead of itself. Run from the repository root at 944b919:

    OMP_NUM_THREADS=1 python docs/benchmarks/end_slices/ft_mirror.py train data/train --dose-tag 25 \
        --init-weights corediff-25 --out runs/mirror/cd25.safetensors --checkpoint runs/mirror/cd25.ckpt \
        --iterations 100000 --time-limit 20 --lr 1e-4 --lr-schedule cosine --batch-size 8 \
        --patch-size 64 --ema-start 200 --threads 1 --seed 5
"""
import sys
import numpy as np
sys.path.insert(0, ".")  # the repository root
import CoreDiffLib.training as tr

def _one(self):
    for _ in range(10):
        ndct, ldct = self.pairs[self.rng.integers(len(self.pairs))]
        s, h, w = ldct.shape
        i = int(self.rng.integers(s))
        lo = i - 1 if i > 0 else min(1, s - 1)
        hi = i + 1 if i < s - 1 else max(s - 2, 0)
        idx = [lo, i, hi]
        p = min(self.patch or min(h, w), h, w)
        y = int(self.rng.integers(h - p + 1)); x = int(self.rng.integers(w - p + 1))
        ctx = ldct[idx, y:y + p, x:x + p]; tgt = ndct[i:i + 1, y:y + p, x:x + p]
        if (tgt > self._air).mean() > 0.3:
            break
    k = int(self.rng.integers(4)); flip = bool(self.rng.integers(2))
    ctx, tgt = np.rot90(ctx, k, axes=(1, 2)), np.rot90(tgt, k, axes=(1, 2))
    if flip:
        ctx, tgt = ctx[:, :, ::-1], tgt[:, :, ::-1]
    return np.ascontiguousarray(ctx), np.ascontiguousarray(tgt)
tr.PairedSlices._one = _one
from CoreDiffLib.cli import main
sys.exit(main(sys.argv[1:]))

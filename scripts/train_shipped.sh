#!/usr/bin/env bash
# The recipe of the shipped CPU-trained models (run from the repo root; resumable: rerun to
# continue from the checkpoints, or raise --iterations to train longer).
#   data   : corediff simulate --dose 0.25 0.1 0.05 --out data/train --count 6 --slices 12 --size 512 --seed 1
#            (6 phantoms: abdomen/thorax/head x2, 72 slices of 512², fan-beam, Poisson + electronic noise)
#   model  : CLEAR-Net width 16 (313 k parameters), T = 10, CTX + EMM
#   train  : 64² patches, batch 8, Adam 2e-4 cosine-decayed to 0 over ITERS, EMA 0.995 every 10 its
#            from iteration 1000, 1 CPU thread (~85 min of one core for 13,000 iterations)
#   ablation: EXTRA=--no-context NAME=noctx-25 scripts/train_shipped.sh (same iterations and seed)
#   device : the CPU, also where a GPU is present (DEVICE=cuda trains there: not the shipped recipe,
#            whose figures are for one CPU thread; the GPU recipe is scripts/gpu_session.py)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ITERS="${ITERS:-13000}"
DOSE="${DOSE:-25}"
NAME="${NAME:-corediff-$DOSE}"
EXTRA="${EXTRA:-}"
DEVICE="${DEVICE:-cpu}"
mkdir -p runs
[ -d data/train ] || corediff simulate --dose 0.25 0.1 0.05 --out data/train --count 6 --slices 12 --size 512 --seed 1
exec corediff train data/train --dose-tag "$DOSE" --out "runs/$NAME.safetensors" --checkpoint "runs/$NAME.ckpt" \
  --width 16 --steps 10 --iterations "$ITERS" --batch-size 8 --patch-size 64 --ema-start 1000 \
  --keep-every 2000 --checkpoint-every 250 --threads 1 --seed 0 --lr-schedule cosine --device "$DEVICE" $EXTRA

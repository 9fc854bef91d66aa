#!/usr/bin/env python
"""Export a training checkpoint's EMA weights as a shipped model and record it in the manifest.

    python scripts/ship_model.py runs/corediff-25.ckpt --name corediff-25 --dose 0.25 \
        --description "..." --recipe "..." [--default] [--metrics metrics.json]
    python scripts/ship_model.py runs/corediff-25-w64.safetensors --name corediff-25-w64 ... --storage fp16

The input is a training checkpoint (.ckpt: its EMA weights are shipped, or with ``--weights raw``
the optimiser's own final weights, where a validation run found them better; keep the
checkpoint beside them so training can be resumed with ``corediff train ... --checkpoint``) or a weights
file (.safetensors, e.g. from ``scripts/gpu_session.py``). ``--storage fp16`` halves the file.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from CoreDiffLib.atomic import write_text_atomic  # noqa: E402
from CoreDiffLib.models import MANIFEST, WEIGHTS_DIR, load_manifest, save_weights  # noqa: E402
from CoreDiffLib.network import ClearNet, NetworkConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--name", required=True)
    p.add_argument("--dose", type=float, required=True)
    p.add_argument("--description", default="")
    p.add_argument("--recipe", default="")
    p.add_argument("--metrics", default=None, help="JSON file with validation metrics")
    p.add_argument("--default", action="store_true", help="make this the default model")
    p.add_argument("--storage", choices=("fp32", "fp16"), default="fp32", help="dtype stored in the file")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="from a .ckpt: the EMA average (default) or the final optimiser weights; "
                        "for a .safetensors file: which of the two it holds, recorded in the manifest (checked "
                        "against the file's own record where it has one)")
    p.add_argument("--export-only", metavar="FILE", default=None,
                   help="write the weights to FILE and leave the manifest alone (e.g. to score them first)")
    a = p.parse_args()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", a.name):  # a file name in weights/, nothing else
        p.error(f"--name {a.name!r}: letters, digits and . _ + - only (it names a file in {WEIGHTS_DIR})")
    try:  # read before anything is written: a bad file must not leave new weights beside an old manifest
        validation = json.loads(Path(a.metrics).read_text()) if a.metrics else None
    except (OSError, ValueError) as e:
        p.error(f"--metrics {a.metrics}: {type(e).__name__}: {e}")
    provenance = {}  # what the weights were trained from, carried over from a weights file
    if a.checkpoint.endswith(".safetensors"):
        from CoreDiffLib.models import load_model, read_weights_config
        model = load_model(a.checkpoint)
        config, meta = read_weights_config(a.checkpoint)
        held = meta.get("weights")  # written by this script and by gpu_equal_budget.py
        if held and held != a.weights:
            p.error(f"{a.checkpoint} holds the {held} weights, not the {a.weights} ones: a weights file "
                    "holds one set only (a training checkpoint .ckpt holds both)")
        provenance = {k: json.loads(meta[k]) for k in ("data", "widen") if k in meta}  # stored as JSON
        provenance.update({k: meta[k] for k in ("dose_tag", "init_weights", "init_weights_sha256") if k in meta})
        # the neighbour distance the model learned: --context auto gives neighbours up to it
        provenance.update({k: json.loads(meta[k]) for k in ("neighbour_mm", "patch_size_used") if k in meta})
        losses = json.loads(meta.get("losses_every_100", "[]"))
        ckpt = {"iteration": json.loads(meta.get("iterations", "0")), "losses": losses,
                "train_config": json.loads(meta.get("train_config", "{}"))}
    else:
        ckpt = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
        config = NetworkConfig.from_dict(ckpt["network_config"])
        model = ClearNet(config)
        model.load_state_dict(ckpt["ema" if a.weights == "ema" else "model"])
        # what `corediff train --out` records, from the checkpoint: its data (the farthest neighbours,
        # which --context auto reads), what it started from, and each leg of a resumed run
        for key in ("record", "origin"):
            provenance.update(json.loads(ckpt[key]) if key in ckpt else {})
        if "legs" in ckpt:
            provenance["legs"] = json.loads(ckpt["legs"])
    iterations = int(ckpt["iteration"])
    file = f"{a.name}.safetensors"
    sha = save_weights(model, Path(a.export_only) if a.export_only else WEIGHTS_DIR / file,
                       {"iterations": iterations, "dose": a.dose, "weights": a.weights,
                        "train_config": ckpt["train_config"], **provenance},
                       storage_dtype=torch.float16 if a.storage == "fp16" else torch.float32)
    if a.export_only:
        print(f"wrote {a.export_only} ({a.weights} weights, {iterations} iterations, sha256 {sha[:16]}…)")
        return 0
    manifest = load_manifest()
    manifest.setdefault("models", {})[a.name] = {
        "file": file, "sha256": sha, "dose": a.dose, "description": a.description,
        "architecture": config.to_dict(), "iterations": iterations, "storage": a.storage, "weights": a.weights,
        "train_config": ckpt["train_config"], "recipe": a.recipe,
        "final_training_loss": ckpt["losses"][-1] if ckpt["losses"] else None,
        "validation": validation,
    }
    if a.default or not manifest.get("default"):
        manifest["default"] = a.name
    write_text_atomic(MANIFEST, json.dumps(manifest, indent=2) + "\n")
    print(f"shipped {a.name}: {file} sha256 {sha[:16]}… ({iterations} iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

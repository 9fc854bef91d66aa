"""The shipped weights' manifest (``weights/manifest.json``): which models ship, which is the
default, their files' sha256, dose and recipe. Kept apart from :mod:`CoreDiffLib.models` so
that what only reads it (``corediff dose``, ``--model auto``'s choice) does not import torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import CoreDiffError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"
DEFAULT_MODEL = "default"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest() -> dict:
    """{"default": name, "models": {name: {...}}}; empty when nothing is shipped yet."""
    if not MANIFEST.exists():
        return {"default": None, "models": {}}
    return json.loads(MANIFEST.read_text())


def default_model_name() -> str:
    """The model a run without --model gets: the manifest's default, by name."""
    return load_manifest().get("default") or DEFAULT_MODEL


def shipped_models() -> dict[str, dict]:
    return load_manifest().get("models", {})


def resolve_model(name_or_path: str | os.PathLike | None) -> tuple[Path, dict]:
    """Map a shipped model name (or None = default) or a file path to (file, manifest entry)."""
    manifest = load_manifest()
    models = manifest.get("models", {})
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        name = manifest.get("default") or ""
        if not name:
            raise CoreDiffError("no trained model is shipped in this installation: pass --model FILE")
    if name in models:
        entry = models[name]
        return WEIGHTS_DIR / entry["file"], entry
    known = ", ".join(sorted(models)) or "none"
    path = Path(name).expanduser()
    if not name.strip() or path.is_dir():  # '' is '.', a folder: "not a readable safetensors file (os error)"
        raise CoreDiffError(f"model '{name_or_path}' is not a model name ({known}) or a .safetensors file")
    if path.exists():
        for entry in models.values():  # a shipped file given by its path is checked as by its name
            if path.resolve() == (WEIGHTS_DIR / entry["file"]).resolve():
                return path, entry
        return path, {}
    if name == "auto":  # the CLI's default, chosen per scan before a model is loaded
        raise CoreDiffError("model 'auto' is chosen per scan: dose_estimate.choose_model(volume, spacing_xy) names "
                            f"the shipped model for its dose (one of {known})")
    raise CoreDiffError(f"model '{name_or_path}' is neither a shipped model ({known}) nor an existing file")

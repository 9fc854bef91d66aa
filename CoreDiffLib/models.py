"""Model weights: safetensors files described by a manifest, verified by sha256 on load.

A weights file is self-describing (its safetensors metadata holds the architecture), and the
shipped ones are listed in ``weights/manifest.json`` with their dose, training recipe and
validation metrics. Names resolve to shipped files; anything else is treated as a path.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import CoreDiffError
from .atomic import atomic_path
# the manifest is read in .manifest (without PyTorch); its names stay importable from here
from .manifest import (DEFAULT_MODEL, MANIFEST, WEIGHTS_DIR, default_model_name,  # noqa: F401
                       load_manifest, resolve_model, sha256_of, shipped_models)
from .network import ClearNet, NetworkConfig


def save_weights(model: ClearNet, path: str | os.PathLike, metadata: dict | None = None,
                 storage_dtype: torch.dtype = torch.float32) -> str:
    """Save weights + architecture as safetensors (atomically). Returns the file's sha256.

    ``storage_dtype=torch.float16`` halves the file (the paper-size model: 19 -> 10 MB); weights
    are cast back to float32 on load, and the measured output drift is ~1e-3 dB PSNR.
    """
    path = Path(path)
    meta = {"format": "corediff-clearnet-v1", "config": json.dumps(model.config.to_dict()),
            "storage_dtype": str(storage_dtype).replace("torch.", "")}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    state = {k: v.detach().cpu().to(storage_dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged run (or an fp16 cast past 65504): a file nothing can use
        raise CoreDiffError(f"not saving {path}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or "
                            f"infinite values{' in ' + str(storage_dtype) if storage_dtype != torch.float32 else ''}")
    data = _metadata_in_order(save(state, metadata=meta))
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as exc:  # a full disk: one line, and the temporary file goes
            from .io import full_disk_hint
            raise CoreDiffError(f"could not write {path} ({exc}){full_disk_hint(Path(path).parent)}") from None
        os.chmod(tmp, 0o644)  # the temporary file is 0600; shipped and shared weights must be readable by all
    return sha256_of(path)


def _metadata_in_order(data: bytes) -> bytes:
    """A safetensors file with its metadata keys sorted. The writer stores them in hash-map order,
    which changes from process to process: the same weights saved twice got two sha256s, and an
    adaptation, tied to its model's sha256, was refused on the model saved again."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # not expected (the same keys and values, reordered): keep the writer's
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size:]


def read_weights_config(path: str | os.PathLike) -> tuple[NetworkConfig, dict]:
    """Architecture and metadata stored in a weights file, without loading tensors."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CoreDiffError(f"model file {path} is not a readable safetensors file ({exc}); "
                            "re-download it or pick another model") from None
    if meta.get("format") != "corediff-clearnet-v1" or "config" not in meta:
        raise CoreDiffError(f"model file {path} is not a CoreDiff CLEAR-Net checkpoint "
                            "(no CoreDiff architecture metadata)")
    try:
        config = NetworkConfig.from_dict(json.loads(meta["config"]))
        if not (math.isfinite(config.hu_scale) and config.hu_scale >= 0) or config.steps < 1:
            raise ValueError(f"hu_scale {config.hu_scale} and steps {config.steps} must be finite, >= 0 and >= 1")
        ClearNet(config)  # a config that builds no network (wrong types, bad sizes) is refused here
    except Exception as exc:
        raise CoreDiffError(f"{path} has an unreadable network config ({type(exc).__name__}: {exc}); "
                            "re-download it or pick another model") from None
    return config, meta


def _trained_neighbour_mm(meta: dict) -> float | None:
    """How far apart the farthest neighbours a model learned were, in mm (``corediff train``
    records it since 2026-12-05; the shipped models' 1 mm phantoms predate that: None)."""
    try:
        value = float(meta["neighbour_mm"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def is_shipped(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds shipped weights (by their sha256, also copied elsewhere): the
    figures the docs measured are theirs, not a model of one's own."""
    return getattr(model, "weights_sha256", None) in {e.get("sha256") for e in shipped_models().values()}


def load_model(name_or_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               verify: bool = True) -> ClearNet:
    """Build CLEAR-Net from a shipped name or a weights file; checks sha256 for shipped models."""
    path, entry = resolve_model(name_or_path)
    if not path.exists():
        raise CoreDiffError(f"model file {path} is missing from the installation: reinstall CoreDiffLib")
    if verify and entry.get("sha256"):
        actual = sha256_of(path)
        if actual != entry["sha256"]:
            raise CoreDiffError(f"model file {path} is corrupt or was modified: sha256 {actual[:12]}… "
                                f"does not match the manifest ({entry['sha256'][:12]}…); reinstall it")
    config, meta = read_weights_config(path)
    model = ClearNet(config)
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CoreDiffError(f"model file {path} does not match the CLEAR-Net architecture it declares "
                            f"({first}); it is corrupt or from another model") from None
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:  # a diverged training run: it would write 0 HU everywhere
        raise CoreDiffError(f"model file {path} holds NaN or infinite weights ({', '.join(broken[:3])}): "
                            "it is damaged, or saved from a training run that diverged")
    model.weights_path = str(path.resolve())  # type: ignore[attr-defined]  # found again from any folder
    model.trained_neighbour_mm = _trained_neighbour_mm(meta)  # type: ignore[attr-defined]
    model.weights_sha256 = entry.get("sha256") or sha256_of(path)  # type: ignore[attr-defined]
    if device == "auto":
        from .inference import pick_device
        device = pick_device(device)
    return model.eval().to(device)

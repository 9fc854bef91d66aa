"""Whole-volume denoising: the one function the CLI, the Slicer module and scripts call.

Slices are denoised in batches, each with its two LDCT neighbours (edges replicated), so
memory is bounded by the batch size, not by the number of slices. A progress callback and a
cancel flag make it usable from a GUI; nothing is written here — callers own the output.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch

from . import CoreDiffError
from .diffusion import sample
from .intensity import hu_to_unit, unit_to_hu
from .io import PADDING_THRESHOLD_HU, validate_ct_array
from .models import load_model
from .network import ClearNet

ProgressFn = Callable[[int, int], None]
CancelFlag = Union[Callable[[], bool], threading.Event, None]


class Cancelled(CoreDiffError):
    """Raised when the caller's cancel flag was set; nothing was produced."""


def pick_device(device: str = "auto") -> torch.device:
    """'auto' prefers CUDA, then Apple MPS, then CPU; an explicit device must exist."""
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CoreDiffError("--device cuda was asked for but no CUDA GPU is visible to PyTorch: "
                                "use --device cpu, or install a CUDA build of torch")
        return torch.device("cuda" if device == "gpu" else device)
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CoreDiffError("--device mps was asked for but Apple MPS is not available")
        return torch.device("mps")
    if device == "cpu":
        return torch.device("cpu")
    raise CoreDiffError(f"unknown device '{device}': use auto, cpu, cuda or mps")


def default_batch_size(device: torch.device, height: int, width: int, width_channels: int) -> int:
    """A batch that fits comfortably: activations scale with pixels x channels."""
    if device.type == "cpu":
        return 2  # CPU throughput barely improves with larger batches; keep memory low
    per_slice_gb = height * width * width_channels * 4 * 40 / 1e9  # ~40 live feature maps
    try:
        free = torch.cuda.mem_get_info()[0] / 1e9 if device.type == "cuda" else 8.0
    except Exception:  # pragma: no cover - driver quirks
        free = 8.0
    return int(max(1, min(32, free * 0.5 // max(per_slice_gb, 1e-3))))


def _is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def context_stack(volume_hu: np.ndarray, start: int, stop: int) -> np.ndarray:
    """(B, 3, H, W) in [0, 1]: slices start..stop-1 with neighbours, edges replicated."""
    n = volume_hu.shape[0]
    idx = np.arange(start, stop)
    triples = np.stack([np.clip(idx - 1, 0, n - 1), idx, np.clip(idx + 1, 0, n - 1)], axis=1)
    return hu_to_unit(np.asarray(volume_hu[triples.ravel()], dtype=np.float32)).reshape(
        len(idx), 3, *volume_hu.shape[1:])


@dataclass
class Denoiser:
    """A loaded model on a device with its sampling settings."""

    model: ClearNet
    device: torch.device
    steps: int | None = None
    adaptation: object | None = None  # a oneshot.Adaptation: combines per-step outputs

    @classmethod
    def load(cls, model: str | ClearNet | None = "default", device: str = "auto",
             steps: int | None = None, adaptation=None) -> "Denoiser":
        dev = pick_device(device)
        net = model if isinstance(model, ClearNet) else load_model(model, dev)
        net = net.to(dev).eval()
        if steps is not None and not 1 <= steps <= net.config.steps:
            raise CoreDiffError(f"steps must be between 1 and {net.config.steps} (the model's T), got {steps}")
        if adaptation is not None and not hasattr(adaptation, "combine"):
            from .oneshot import load_adaptation
            adaptation = load_adaptation(adaptation, net)
        if adaptation is not None and steps not in (None, net.config.steps):
            raise CoreDiffError("a one-shot adaptation weighs all T steps: do not change --steps with it")
        return cls(net, dev, steps, adaptation)

    def denoise_batch(self, stack_unit: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) context stacks in [0, 1] -> (B, H, W) denoised in [0, 1]."""
        x = torch.from_numpy(stack_unit).to(self.device)
        if not self.model.config.use_context:
            x = x[:, 1:2]
        result = sample(self.model, x, self.steps, keep_steps=self.adaptation is not None)
        out = self.adaptation.combine(result.steps) if self.adaptation is not None else result.final
        return out[:, 0].float().cpu().numpy()


def denoise_volume(volume_hu: np.ndarray, model: str | ClearNet | None = "default",
                   device: str = "auto", batch_size: int | None = None, steps: int | None = None,
                   adaptation=None, progress: ProgressFn | None = None,
                   cancel: CancelFlag = None, denoiser: Denoiser | None = None) -> np.ndarray:
    """Denoise a (slices, rows, cols) CT volume in HU; returns a new float32 HU array.

    The input is never modified. Voxels at or below -1500 HU (outside-FOV padding such as
    -2000 or -3024) are fed to the network as air and restored unchanged in the output.
    ``progress(done, total)`` is called after each batch; when ``cancel`` (a callable or a
    ``threading.Event``) turns true, :class:`Cancelled` is raised between batches.
    """
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim == 2:
        volume_hu = volume_hu[None]
    validate_ct_array(volume_hu.astype(np.float32, copy=False), "input volume")
    den = denoiser or Denoiser.load(model, device, steps, adaptation)
    n, h, w = volume_hu.shape
    bs = batch_size or default_batch_size(den.device, h, w, den.model.config.width)
    out = np.empty((n, h, w), dtype=np.float32)
    done = 0
    if progress:
        progress(0, n)
    while done < n:
        if _is_cancelled(cancel):
            raise Cancelled("cancelled by the user; no output was produced")
        stop = min(done + bs, n)
        try:
            unit = den.denoise_batch(context_stack(volume_hu, done, stop))
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise CoreDiffError("the GPU ran out of memory even with one slice per batch: "
                                    "use --device cpu") from None
            torch.cuda.empty_cache()
            bs = max(1, bs // 2)
            if progress:
                progress(done, n)
            continue
        out[done:stop] = unit_to_hu(unit)
        done = stop
        if progress:
            progress(done, n)
    padding = volume_hu <= PADDING_THRESHOLD_HU
    if padding.any():
        out[padding] = volume_hu[padding]
    return out

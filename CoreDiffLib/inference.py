"""Whole-volume denoising: the one function the CLI, the Slicer module and scripts call.

Slices are denoised in batches, each with its two LDCT neighbours (edges replicated), so
memory is bounded by the batch size, not by the number of slices: the input may be any
array-like that gives slices by index (a numpy array, a ``np.memmap``, or a
:class:`~CoreDiffLib.streaming.VolumeSource` that reads slabs from a file), and the output can go to a
caller-provided array (``out=``, e.g. a memmap). :func:`denoise_file` streams file to file.
A progress callback and a cancel flag make it usable from a GUI.

Each device runs the network its fastest *safe* way (:func:`CoreDiffLib.runtime.auto_settings`,
measured with ``corediff bench``): on CPU ONNX Runtime (eager channels-last PyTorch when it
is not installed) with one thread per physical core; on CUDA channels-last with fp16 autocast
(:data:`CoreDiffLib.runtime.AUTO_PRECISION`). ``precision=`` / ``channels_last=`` / ``runtime=`` override it.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

import numpy as np
import torch

from . import CoreDiffError
from .diffusion import sample
from .intensity import HU_MAX, HU_MIN, PADDING_THRESHOLD_HU, hu_to_unit, unit_to_hu, validate_ct_array
from .models import DEFAULT_MODEL, is_shipped, load_model, sha256_of
from .network import ClearNet
from .orientation import AxialLayout, InPlaneView, axial_layout, axial_spacing, axial_view, in_plane_view  # noqa: F401 (also this module's API)
from .runtime import (NON_FINITE_OUTPUT, PRECISIONS, RunSettings, auto_settings, build_net, check_applicable,
                      physical_cores)
from .streaming import (SliceIndexable, StreamedOutput, VolumeSource, earlier_corediff, earlier_corediff_of_file,
                        detached_data_file, output_dtype)

if TYPE_CHECKING:
    from .adaptations import Adaptation

ProgressFn = Callable[[int, int], None]
LogFn = Callable[[str], None]
CancelFlag = Union[Callable[[], bool], threading.Event, None]
#: a one-shot adaptation: loaded, or its name / .json file
AdaptationSpec = Union["Adaptation", str, os.PathLike, None]


class Cancelled(CoreDiffError):
    """Raised when the caller's cancel flag was set; nothing was produced."""


#: ``steps="auto"``: what the CLI and the Slicer module use unless told a number.
AUTO_STEPS = "auto"


def auto_steps(trained_steps: int, device: torch.device, adaptation: bool = False) -> int:
    """The sampling steps ``steps="auto"`` picks: all T on a GPU, one on a CPU.

    Why: on the held-out phantoms (validation and test) one step of the shipped width-32 models
    is 0.03-0.06 dB below ten against the NDCT and -0.01 to +0.15 dB against the noise-free
    image, for a tenth of the CPU time, and beats ten steps of the width-16 models in PSNR on every
    slice; on a GPU ten steps cost about a second per 100 slices, so the paper's sampler runs
    there. A one-shot adaptation weighs all T steps, so it gets them.
    """
    return trained_steps if adaptation or device.type != "cpu" else 1


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
        if device.startswith("cuda:"):
            index = device.partition(":")[2]
            if not (index.isdigit() and int(index) < torch.cuda.device_count()):
                raise CoreDiffError(f"--device {device}: this machine's GPUs are cuda:0 to "
                                    f"cuda:{torch.cuda.device_count() - 1}")
            return torch.device(f"cuda:{int(index)}")
        return torch.device("cuda")
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
    if device.type == "cuda":  # bigger batches fill the GPU; the OOM fallback halves them
        per_slice_gb = height * width * width_channels * 4 * 40 / 1e9  # ~40 live feature maps
        try:
            free = torch.cuda.mem_get_info(device)[0] / 1e9
        except Exception:  # pragma: no cover - driver quirks
            free = 8.0
        return int(max(1, min(64, free * 0.5 // max(per_slice_gb, 1e-3))))
    return 4  # MPS: unified memory, no free-memory query


def _is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def context_stack(volume_hu: np.ndarray, start: int, stop: int, neighbours: bool = True) -> np.ndarray:
    """(B, 3, H, W) in [0, 1]: slices start..stop-1 with neighbours, edges replicated; with
    ``neighbours`` False each slice stands in for its own (as at a volume's ends)."""
    n = volume_hu.shape[0]
    gap = 1 if neighbours else 0
    lo, hi = max(start - gap, 0), min(stop + gap, n)
    slab = np.asarray(volume_hu[lo:hi], dtype=np.float32)  # one contiguous read (file slabs, memmaps)
    idx = np.arange(start, stop)
    triples = np.stack([np.clip(idx - gap, 0, n - 1), idx, np.clip(idx + gap, 0, n - 1)], axis=1) - lo
    return hu_to_unit(slab[triples.ravel()]).reshape(len(idx), 3, *slab.shape[1:])


def _settings_for(device: torch.device, width: int, precision: str | None, channels_last: bool | None,
                  runtime: str | None) -> RunSettings:
    auto = auto_settings(device, width)
    precision = (precision or "auto").lower()
    if precision != "auto" and precision not in PRECISIONS:
        raise CoreDiffError(f"unknown precision '{precision}': use auto, fp32, tf32, bf16 or fp16")
    runtime = (runtime or "auto").lower()
    settings = RunSettings(
        auto.precision if precision == "auto" else precision,
        auto.channels_last if channels_last is None else bool(channels_last),
        auto.backend if runtime == "auto" else runtime)
    if settings.backend == "onnx" and channels_last and runtime == "auto":  # asked for channels-last: torch
        settings = RunSettings(settings.precision, True, "eager")
    if settings.backend == "onnx" and settings.channels_last:
        settings = RunSettings(settings.precision, False, "onnx")
    if settings.backend == "onnx" and settings.precision != "fp32":  # asked for a precision: torch
        settings = RunSettings(settings.precision, True if channels_last is None else bool(channels_last),
                               "eager")
    why = check_applicable(settings, device)
    if why:
        raise CoreDiffError(f"cannot run {settings.label()} on {device}: {why}")
    return settings


#: torch's CPU threads as this process started (OMP_NUM_THREADS or the cores), before any change
_TORCH_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's CPU thread count for one batch, restored after: a Denoiser built for one thread
    must not leave the whole process (Slicer's included) on one."""
    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads and threads != before:
            torch.set_num_threads(before)


@dataclass
class Denoiser:
    """A loaded model on a device with its sampling and execution settings.

    ``settings`` is how the network is run (precision, memory format, back-end); by default
    the fastest safe one for the device. ``net`` is the sampler-ready callable built from it.
    """

    model: ClearNet
    device: torch.device
    steps: int | None = None
    adaptation: object | None = None  # an adaptations.Adaptation: combines per-step outputs
    settings: RunSettings | None = None
    threads: int | None = None
    net: object | None = field(default=None, repr=False)
    model_choice: str | None = None  # why this model, when chosen for the scan (--model auto)

    def __post_init__(self):
        if self.settings is None:
            self.settings = _settings_for(self.device, self.model.config.width, None, None, None)
        if self.device.type == "cpu":
            # one thread per physical core: SMT siblings only contend for the same FMA units; from
            # the process's own limit (OMP_NUM_THREADS), not what another Denoiser left set
            self.threads = self.threads or min(_TORCH_THREADS, physical_cores())
        if self.net is None:
            try:
                self.net = build_net(self.model, self.device, self.settings, self.threads)
            except CoreDiffError:
                raise
            except Exception as exc:  # e.g. an ONNX export problem: fall back to eager PyTorch
                if self.settings.backend == "eager":
                    raise
                fallback = RunSettings(self.settings.precision if self.settings.backend != "onnx" else "fp32",
                                       self.device.type != "mps", "eager")
                warnings.warn(f"{self.settings.label()} unavailable ({exc}); using {fallback.label()}")
                self.settings = fallback
                self.net = build_net(self.model, self.device, fallback, self.threads)

    @classmethod
    def load(cls, model: str | ClearNet | None = None, device: str = "auto",
             steps: int | str | None = None, adaptation: AdaptationSpec = None, precision: str | None = "auto",
             channels_last: bool | None = None, runtime: str | None = "auto",
             threads: int | None = None) -> "Denoiser":
        """``steps`` None = the model's T, or ``"auto"`` (:func:`auto_steps`), or a number;
        ``precision`` auto|fp32|tf32|bf16|fp16, ``channels_last`` None = device default,
        ``runtime`` auto|eager|compile|cudagraphs|onnx, ``threads`` CPU threads (None = cores).
        ``model`` None: the default model, or an adaptation's own base model; a name is taken as given."""
        dev = pick_device(device)
        if model is None:
            from .adaptations import Adaptation, adaptation_base_model, missing_base_message
            model = adaptation_base_model(adaptation) if adaptation is not None else None  # its own base model
            if model is None and isinstance(adaptation, (str, os.PathLike, Adaptation)):
                raise CoreDiffError(missing_base_message(adaptation))  # the default is not where it belongs
            model = model or DEFAULT_MODEL  # none, or an in-memory stand-in with its own combine()
        # the caller's network is theirs: .to() and .eval() work in place, so move and switch a copy
        net = copy.deepcopy(model) if isinstance(model, ClearNet) else load_model(model, dev)
        net = net.to(dev).eval()
        if adaptation is not None and not hasattr(adaptation, "combine"):
            from .adaptations import load_adaptation
            adaptation = load_adaptation(adaptation, net)
        if steps == AUTO_STEPS:
            steps = auto_steps(net.config.steps, dev, adaptation is not None)
        if steps is not None and (not _whole_number(steps) or not 1 <= steps <= net.config.steps):
            raise CoreDiffError(f"steps must be 'auto' or between 1 and {net.config.steps} (the model's T), "
                                f"got {steps!r}")
        if adaptation is not None and steps not in (None, net.config.steps):
            raise CoreDiffError("a one-shot adaptation weighs all T steps: do not change --steps with it")
        settings = _settings_for(dev, net.config.width, precision, channels_last, runtime)
        return cls(net, dev, steps, adaptation, settings, threads)

    def provenance(self) -> dict[str, str]:
        """What makes this Denoiser's outputs, for their headers: the number of steps depends on
        the device with ``--steps auto``, so a file read later must say what ran."""
        from . import __version__
        path = getattr(self.model, "weights_path", None)
        T = self.model.config.steps
        meta = {"corediff_version": __version__,
                "corediff_model": Path(path).stem if path else "in-memory network",
                "corediff_model_sha256": str(getattr(self.model, "weights_sha256", "") or ""),
                "corediff_steps": f"{self.steps or T} of {T}",
                "corediff_device": self.device.type, "corediff_runtime": self.settings.label()}
        if self.adaptation is not None:  # the file a run used, by its name (the name inside may be another's)
            source = getattr(self.adaptation, "source", None)
            meta["corediff_adaptation"] = Path(source).stem if source else str(getattr(self.adaptation, "name", ""))
            if source:
                meta["corediff_adaptation_sha256"] = sha256_of(source)
        if self.model_choice:
            meta["corediff_model_choice"] = self.model_choice
        return meta

    def denoise_batch(self, stack_unit: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) context stacks in [0, 1] -> (B, H, W) denoised in [0, 1]."""
        with torch.inference_mode(), _torch_threads(self.threads if self.device.type == "cpu" else None):
            x = torch.from_numpy(np.ascontiguousarray(stack_unit, dtype=np.float32)).to(self.device)
            if not self.model.config.use_context:
                x = x[:, 1:2]
            result = sample(self.net, x, self.steps, keep_steps=self.adaptation is not None)
            out = self.adaptation.combine(result.steps) if self.adaptation is not None else result.final
            return out[:, 0].float().cpu().numpy()


def _validate_streamed(volume, name: str = "input volume", chunk: int = 32,
                       slices: tuple[int, int] | None = None) -> tuple[float, float]:
    """:func:`validate_ct_array` without a full-volume float copy: min/max/finite by slabs
    (of ``slices`` [start, stop) only, when given: a preview need not read the whole file).
    Returns the (min, max) it read."""
    if volume.ndim != 3 or min(volume.shape) < 1 or volume.shape[1] < 16 or volume.shape[2] < 16:
        validate_ct_array(np.zeros(volume.shape, np.float32) if volume.ndim != 3 else
                          np.zeros((1,) + tuple(volume.shape[1:]), np.float32), name)
    start, stop = slices or (0, volume.shape[0])
    lo, hi, bad = np.inf, -np.inf, 0
    for k in range(start, stop, chunk):
        slab = np.asarray(volume[k:min(k + chunk, stop)])
        if np.issubdtype(slab.dtype, np.floating):
            finite = np.isfinite(slab)
            if not finite.all():
                bad += int((~finite).sum())
                continue
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if bad:
        raise CoreDiffError(f"{name} contains {bad} NaN/inf voxels: fix or mask them before denoising")
    probe = np.full((1, 16, 16), lo, np.float32)
    probe[0, 0, 0] = hi
    validate_ct_array(probe, name)
    return lo, hi


def check_slice_range(slices: tuple[int | None, int | None] | None, n: int) -> tuple[int, int]:
    """[start, stop) of the slices to denoise in a volume of n (None = that end; counted from 0, not from the end).

    Refuses an empty or out-of-range request with the volume's actual range, before any work.
    """
    start, stop = slices if slices is not None else (None, None)
    start = 0 if start is None else start
    stop = n if stop is None else stop
    if 0 <= start and stop <= n and start >= stop:
        raise CoreDiffError(f"slices {start}:{stop} hold no slice: A:B means slices A to B-1, with A < B "
                            f"(this volume has 0 to {n - 1})")
    if not 0 <= start < stop <= n:
        raise CoreDiffError(f"slices {start}:{stop} are not within this volume's 0:{n} "
                            f"(give K for one slice, 0 to {n - 1}, or A:B for slices A to B-1)")
    return start, stop


#: how running out of memory reads: CUDA, PyTorch's CPU allocator, ONNX Runtime's arena, C++
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "failed to allocate memory", "bad_alloc")


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)) or (
        any(text in str(exc).lower() for text in _OOM_MESSAGES))


def _whole_number(value) -> bool:
    """An int (numpy's too), not a bool or a float: 2.0 slices would fail later, in slicing."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_batch_size(batch_size: int | None) -> None:
    """Refuse a batch size that is not a whole number of slices >= 1 (None: chosen from memory)."""
    if batch_size is not None and (not _whole_number(batch_size) or batch_size < 1):
        raise CoreDiffError(f"batch size must be a whole number of slices >= 1, not {batch_size} "
                            "(leave it out to have it chosen from the device's memory)")


def denoise_volume(volume_hu: SliceIndexable, model: str | ClearNet | None = None,
                   device: str = "auto", batch_size: int | None = None, steps: int | str | None = None,
                   adaptation: AdaptationSpec = None, progress: ProgressFn | None = None,
                   cancel: CancelFlag = None, denoiser: Denoiser | None = None,
                   out: np.ndarray | None = None, log: LogFn | None = None,
                   precision: str | None = "auto", channels_last: bool | None = None,
                   slices: tuple[int | None, int | None] | None = None, neighbours: bool = True,
                   direction=None) -> np.ndarray:
    """Denoise a (slices, rows, cols) CT volume in HU; returns a float32 HU array.

    The input is never modified; it may be a numpy array, a memmap or a :class:`VolumeSource`
    (anything indexable by slice ranges with ``shape``/``ndim``). ``slices`` (start, stop)
    denoises only those slices, with their true neighbours from the volume as context, so the
    result equals the same slices of a whole-volume run; ``neighbours`` False gives each slice
    itself as its neighbours instead (thick slices, see :data:`THICK_SLICE_MM`). ``out`` (the
    result's shape, a float type or an integer type that holds the HU; not the input's memory)
    receives the result slab by slab and is returned; otherwise a new array is allocated. Voxels
    at or below -1500 HU (outside-FOV padding such as -2000 or -3024) are fed to the network as
    air, and voxels above 3072 HU (metal on an extended HU scale) as 3072; both are restored
    unchanged in the output. ``direction`` (the volume's ITK
    direction, axial slices): planes stored with reversed or swapped in-plane axes are denoised
    in the LPS layout the models learned from, so that one scan gives the same HU however its
    file stores it (None: the array is taken as it is).
    ``progress(done, total)`` is called after each batch; when ``cancel`` (a callable or a
    ``threading.Event``) turns true, :class:`Cancelled` is raised between batches. Out of
    memory (GPU or CPU), the batch size halves and the run goes on; ``log(message)`` is told.
    """
    if isinstance(volume_hu, np.ndarray) or not hasattr(volume_hu, "shape"):
        volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim == 2:
        volume_hu = volume_hu[None]
    check_batch_size(batch_size)
    first, last = check_slice_range(slices, volume_hu.shape[0])
    value_range = _validate_streamed(volume_hu, slices=(max(first - 1, 0), min(last + 1, volume_hu.shape[0])))
    if out is not None:
        _check_out(out, volume_hu, value_range)
    den = denoiser or Denoiser.load(model, device, steps, adaptation, precision, channels_last)
    view = in_plane_view(direction) if direction is not None else None
    return _denoise_range(volume_hu, den, first, last, batch_size, progress, cancel, out, log, neighbours, view)


def _check_out(out: np.ndarray, volume_hu, value_range: tuple[float, float]) -> None:
    """Refuse an ``out`` that would change the result: the input's own memory (each batch reads
    its neighbours from the volume, which would already be denoised) or an integer type too
    narrow for the result's HU (clipped without a word)."""
    if isinstance(volume_hu, np.ndarray) and np.may_share_memory(out, volume_hu):
        raise CoreDiffError("out= is (part of) the input array: the slices next to each batch would be read back "
                            "denoised as its context; give a separate array")
    if np.issubdtype(out.dtype, np.integer):
        info = np.iinfo(out.dtype)
        low, high = min(value_range[0], HU_MIN), max(value_range[1], HU_MAX)  # restored voxels, then the network's
        if low < info.min or high > info.max:
            raise CoreDiffError(f"out= is {out.dtype}, which cannot hold the result ({low:.0f} .. {high:.0f} HU): "
                                "use int16, int32 or a float type")


def _denoise_range(volume_hu, den: Denoiser, first: int, last: int, batch_size: int | None,
                   progress: ProgressFn | None, cancel: CancelFlag, out: np.ndarray | None,
                   log: LogFn | None, neighbours: bool = True, view: InPlaneView | None = None) -> np.ndarray:
    """:func:`denoise_volume`'s batch loop over slices [first, last) of a volume already checked
    and validated (``denoise_file`` has done both before loading the model: no second read).
    ``view``: each batch is turned to the LPS in-plane layout the models learned from, and back."""
    turn = view is not None and not view.identity
    _, h, w = volume_hu.shape
    n = last - first
    bs = batch_size or default_batch_size(den.device, h, w, den.model.config.width)
    if out is None:
        out = np.empty((n, h, w), dtype=np.float32)
    elif tuple(out.shape) != (n, h, w):
        raise ValueError(f"out has shape {out.shape}, expected {(n, h, w)}")
    integer_out = np.issubdtype(out.dtype, np.integer)
    done = 0  # slices of the result written so far; volume slice first + done is next
    if progress:
        progress(0, n)
    while done < n:
        if _is_cancelled(cancel):
            raise Cancelled("cancelled by the user; no output was produced")
        stop = min(done + bs, n)
        try:
            stack = context_stack(volume_hu, first + done, first + stop, neighbours)
            unit = den.denoise_batch(np.ascontiguousarray(view.to_lps(stack)) if turn else stack)
            if turn:
                unit = view.from_lps(unit)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            on_gpu = den.device.type != "cpu"
            if bs == 1:
                raise CoreDiffError(f"the {'GPU' if on_gpu else 'computer'} ran out of memory even with one "
                                    f"slice per batch ({h} x {w}): "
                                    + ("use --device cpu" if on_gpu else "close other programs, or denoise "
                                       "on a machine with more memory")) from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            bs = max(1, bs // 2)
            if log:
                log(f"out of {'GPU ' if on_gpu else ''}memory: continuing with batch size {bs}")
            continue
        if not np.isfinite(unit).all():  # a broken model or an overflow: never written as 0 HU
            raise CoreDiffError(NON_FINITE_OUTPUT)
        hu = unit_to_hu(unit)
        src = np.asarray(volume_hu[first + done:first + stop])
        # what the network cannot represent comes back as it was: padding outside the field of
        # view, and metal or contrast beyond the 3072 HU the network saw it clipped to
        kept = (src <= PADDING_THRESHOLD_HU) | (src > HU_MAX)
        if kept.any():
            hu[kept] = src[kept]
        if integer_out:
            info = np.iinfo(out.dtype)
            hu = np.clip(np.rint(hu), info.min, info.max)
        out[done:stop] = hu
        done = stop
        if progress:
            progress(done, n)
    return out


#: Slice spacing from which ``denoise_file`` says that the neighbour context helps less.
WIDE_SLICE_MM = 2.0
#: Slice spacing from which ``denoise_file`` (``context="auto"``) gives each slice itself as its
#: neighbours. The models learned their context from 1 mm neighbours; on two clinical chest CTs
#: with 5 mm slices the neighbours cost 0.85-1.05 dB (means over 16 slices), on phantoms at 5 mm they are
#: level, at 3 mm still worth +0.3 dB (docs/benchmarks/real_anatomy, docs/benchmarks/spacing).
THICK_SLICE_MM = 4.0
#: ``denoise_file``'s context choices: by the slice spacing, the neighbours, or the slice itself
CONTEXTS = ("auto", "neighbours", "own")
#: The pixel sizes the shipped models learned from: their phantoms' 250-400 mm fields of view on
#: 512² grids. The noise's grain is counted in pixels, so coarser pixels show another texture.
TRAINED_PIXEL_MM = (0.49, 0.78)
#: Pixels from this size get a caveat with a shipped model: on simulated 25 % scans its gain over
#: the input was 0.1-1.2 dB lower at 1 mm than at the trained size, 1.3-2.2 dB lower at 1.5 mm, and
#: at 2-3 mm it made two of three phantoms worse than the input (docs/benchmarks/pixel_size).
COARSE_PIXEL_MM = 1.2


def pixel_size_caveat(spacing_xy, model) -> str | None:
    """Why a shipped ``model`` may do less on pixels of ``spacing_xy`` (mm), or None; a model of
    one's own learned from pixels this library does not know."""
    if not is_shipped(model):
        return None
    coarsest = max(float(v) for v in spacing_xy)
    if coarsest < COARSE_PIXEL_MM:
        return None
    low, high = TRAINED_PIXEL_MM
    return (f"pixels of {coarsest:.2g} mm, coarser than the {low:g}-{high:g} mm the shipped models learned from: "
            "they remove less of the noise, and from about 2 mm can add error (simulated 25 % scans, gain over the "
            "input: abdomen +4.7 dB at 0.74 mm, +3.4 at 1.5 mm, +1.4 at 3 mm; thorax +2.5, +0.2, -3.1 dB; "
            "docs/benchmarks/pixel_size): compare the result with the input, or reconstruct on a finer grid")


def uses_neighbours(slice_mm: float, context: str = "auto", trained_neighbour_mm: float | None = None) -> bool:
    """Whether slices ``slice_mm`` apart get their neighbours as context (one of :data:`CONTEXTS`).

    "auto" gives them below :data:`THICK_SLICE_MM`, the rule measured for models that learned
    their neighbours 1 mm away, and also up to 1.25 x the farthest neighbours a model records it
    learned (``trained_neighbour_mm``): one fine-tuned on 5 mm scans learned 5 mm neighbours."""
    if context != "auto":
        return context == "neighbours"
    return slice_mm < THICK_SLICE_MM or (trained_neighbour_mm is not None and slice_mm <= 1.25 * trained_neighbour_mm)


def sub_volume_origin(info: dict, index_axis: int, start: int) -> tuple[float, float, float]:
    """Physical origin of the sub-volume that starts at index ``start`` along ITK ``index_axis``.

    Keeps every voxel of a slice range where it was in the scanner's frame (LPS, mm), so a
    preview or a slab lines up with its source in any viewer.
    """
    d = np.asarray(info["direction"], dtype=np.float64).reshape(3, 3)
    shift = start * float(info["spacing"][index_axis]) * d[:, index_axis]
    return tuple(float(o) for o in np.asarray(info["origin"], dtype=np.float64) + shift)


def _file_identity(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """(device, inode, size, modification time) of a file, None for a folder or what cannot be
    read: the same tuple later means the same bytes were there throughout."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return None if os.path.isdir(path) else (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _input_identity(path: str | os.PathLike) -> tuple:
    """:func:`_file_identity` of an input file and, for a detached header (.mhd, .nhdr), of the
    data file it names: a streamed .mhd is read from its .raw, which can be replaced alone."""
    data = detached_data_file(path)
    return (_file_identity(path),) + ((_file_identity(data),) if data is not None else ())


def denoise_file(input_path: str | os.PathLike, output_path: str | os.PathLike, denoiser: Denoiser,
                 batch_size: int | None = None, progress: ProgressFn | None = None, cancel: CancelFlag = None,
                 log: LogFn | None = None, temp_dir: str | os.PathLike | None = None,
                 slices: tuple[int | None, int | None] | None = None,
                 series: str | None = None, context: str = "auto",
                 replace: bool = True) -> tuple[Path, tuple[int, int, int], bool]:
    """Denoise a volume file into ``output_path`` with memory bounded by the batch size.

    ``denoiser`` is a :class:`Denoiser` or a callable returning one, given the axial slices and
    their in-plane spacing (x, y) in mm (called once the input has been opened and validated,
    so input errors come first; ``--model auto`` measures the scan there).
    ``slices`` (start, stop), in axial slices as CoreDiff denoises them, writes only those
    (with their true neighbours as context) as a volume placed where they lie in the input:
    a one-slice preview, or the slab a study needs from a long series.
    ``series`` picks one series of a DICOM folder that holds several (:func:`io.read_volume`).
    ``context`` (one of :data:`CONTEXTS`): "auto" gives the network the adjacent slices as context
    below :data:`THICK_SLICE_MM` of slice spacing and each slice itself from there on.
    ``replace`` False keeps a file that appeared at ``output_path`` while the volume was denoised
    (:class:`atomic.OutputAppeared`; ``corediff denoise`` without ``--overwrite``).
    Returns (output path, shape of what was denoised, streamed). ``streamed`` is False when the
    input had to be read whole (DICOM folders and other non-streamable inputs); the output is
    still collected in a temporary raw file and written slab by slab when its format allows.
    Nothing is left behind on error/cancel.
    """
    from .dicom import check_series_input
    from .io import (check_grid_output, check_output_dimensions, check_output_path, nifti_shear_warning, read_volume,
                     slice_spacing_mm, write_volume)
    check_output_path(input_path, output_path)  # the CLI checks it too; a script calling this must not lose its input
    if context not in CONTEXTS:
        raise CoreDiffError(f"context must be one of {', '.join(CONTEXTS)}, not {context!r}")
    check_batch_size(batch_size)
    check_series_input(input_path, series)  # before a file is streamed, where read_volume would refuse it
    before = _input_identity(input_path)
    src = VolumeSource.open(input_path, temp_dir=temp_dir)

    def check_input_unchanged() -> None:
        """A streamed input is read slab by slab: a file put in its place meanwhile (a re-export,
        rsync, a save) would mix two scans in one output."""
        if src is not None and _input_identity(input_path) != before:
            raise CoreDiffError(f"{input_path} changed while it was being read (another program wrote it): "
                                "nothing was written; denoise it again once it is complete")
    try:
        if src is None:
            volume = read_volume(input_path, series, log)
            info = {"spacing": volume.spacing, "origin": volume.origin, "direction": volume.direction,
                    "pixel_type": volume.pixel_type, "source": volume.source, "dicom_tags": volume.dicom_tags,
                    "slice_positions": volume.slice_positions, "instance_numbers": volume.instance_numbers,
                    "earlier_corediff": earlier_corediff_of_file(input_path)}  # .nhdr, compressed .mhd...
            check_grid_output(volume.slice_positions, volume.direction, output_path, str(input_path))
            data, streamed = volume.array, False
        else:
            info, data, streamed = src.info, src, True
            shear = nifti_shear_warning(input_path)  # (read_volume says it of what it reads)
            if shear and log:
                log(shear)
        layout = axial_layout(info["direction"], data.shape)
        if layout is not None:  # stored sagittally / coronally: denoise its axial planes, in memory
            data, streamed = layout.to_axial(np.asarray(data[0:data.shape[0]])), False
        n = data.shape[0]
        first, last = check_slice_range(slices, n)
        check_output_dimensions(output_path, (last - first,) + tuple(data.shape[1:]))
        value_range = _validate_streamed(data, str(input_path), slices=(max(first - 1, 0), min(last + 1, n)))
        axial_axis = 2 - (layout.perm[0] if layout is not None else 0)  # ITK index axis of the axial slices
        spacing_xy = axial_spacing(info["spacing"], layout)[:2]
        slice_mm = slice_spacing_mm(info["spacing"], info["direction"], layout, info.get("slice_positions"))
        partial = (first, last) != (0, n)
        if partial:
            info = dict(info, origin=sub_volume_origin(info, axial_axis, first))
            if info.get("slice_positions") is not None:  # a DICOM series off a regular grid: its slices' own
                if layout is not None:
                    raise CoreDiffError(f"{input_path}: {layout.storage} slices off a regular grid: "
                                        "--slices cannot cut them axially; denoise the whole series")
                info["slice_positions"] = info["slice_positions"][first:last]
            if info.get("instance_numbers") is not None:  # the part's own numbers in the scan (stored slices:
                # cut along another axis they number no axial part; then counted from first_slice)
                info["instance_numbers"] = info["instance_numbers"][first:last] if layout is None else None
        den = denoiser if isinstance(denoiser, Denoiser) else denoiser(data, tuple(spacing_xy))
        trained_mm = getattr(den.model, "trained_neighbour_mm", None)
        neighbours = uses_neighbours(slice_mm, context, trained_mm)
        metadata = den.provenance()
        earlier = info.get("earlier_corediff") or earlier_corediff(info.get("dicom_tags") or {})
        if earlier:  # said, and recorded: the output is a second pass
            metadata["corediff_input_denoised_by"] = earlier
            if log:
                log(f"warning: {Path(input_path).name} was already denoised by CoreDiff ({earlier}): denoising it "
                    "again smooths it further; denoise the original scan")
        uses_context = den.model.config.use_context
        if uses_context:
            # one slice has no neighbours: it stands in for them
            metadata["corediff_context"] = "adjacent slices" if neighbours and n > 1 else "each slice itself"
        if partial:
            metadata["corediff_slices"] = f"{first}:{last} of {n}"
        if log:
            cfg = den.model.config
            which = f"slices {first}:{last} of {n}" if partial else f"{n} slice{'' if n == 1 else 's'}"
            log(f"{Path(input_path).name}: {which} of {data.shape[1]}x{data.shape[2]}, "
                f"model width {cfg.width}, {den.steps or cfg.steps} of T={cfg.steps} steps, device {den.device}, "
                f"{den.settings.label()}, {'streamed' if streamed else 'read whole'}")
            if layout is not None:
                log(f"its slices are not axial ({layout.storage} storage): denoising its axial planes, as the "
                    "models were trained, and writing them back in its own order")
            if uses_context and not neighbours and context == "auto":
                log(f"slice spacing {slice_mm:g} mm: each slice is its own context. "
                    + (f"This model learned its context from neighbours up to {trained_mm:g} mm away"
                       if trained_mm else "The models learned from 1 mm neighbours, and on clinical 5 mm "
                       "scans their neighbours cost 0.85-1.05 dB (docs/benchmarks/real_anatomy)")
                    + "; --context neighbours to use them anyway")
            elif uses_context and neighbours and slice_mm >= WIDE_SLICE_MM and (trained_mm or 1.0) < WIDE_SLICE_MM:
                log(f"slice spacing {slice_mm:g} mm: "
                    + (f"this model learned neighbours up to {trained_mm:g} mm away" if trained_mm
                       else "the models were trained on 1 mm slices")
                    + ", and neighbour "
                    "context helps less the further apart the slices are (held-out phantoms, 25 %: "
                    "+0.82 dB at 1 mm, +0.32 at 3 mm, +0.02 at 5 mm; docs/benchmarks/spacing)")
            caveat = pixel_size_caveat(spacing_xy, den.model)
            if caveat:
                log(f"warning: {caveat}")
            if den.settings.precision == "bf16" and den.device.type == "cpu":  # asked for: allowed, but said
                log("note: bf16 on a CPU without bf16 units (most) is slower than fp32: 5-25x for the width-16 "
                    "network on this project's test machine (Testing/benchmarks/results/cpu_bf16_w16_256.md); "
                    "fp32, the CPU default, is faster there and full precision")
        shape = (last - first,) + tuple(data.shape[1:])
        # an axial file's planes in the models' LPS layout (a reformat's are made so by its layout)
        view = in_plane_view(info["direction"]) if layout is None else None
        name = Path(output_path).name.lower()
        if layout is not None or not name.endswith(StreamedOutput.FORMATS):  # DICOM, .mhd, .nhdr
            result = _denoise_range(data, den, first, last, batch_size, progress, cancel, None, log, neighbours,
                                    view)
            check_input_unchanged()
            if layout is not None:
                result = np.ascontiguousarray(layout.from_axial(result))
            from .io import Volume
            vol = Volume(result, info["spacing"], info["origin"], info["direction"], info["pixel_type"],
                         dict(info.get("dicom_tags", {})), info.get("source", ""), info.get("slice_positions"),
                         info.get("instance_numbers"))
            return (write_volume(vol, output_path, metadata=metadata, first_slice=first, replace=replace), shape,
                    streamed)
        sink = StreamedOutput(output_path, shape, info, output_dtype(info["pixel_type"], value_range), metadata)
        try:
            _denoise_range(data, den, first, last, batch_size, progress, cancel, sink.array, log, neighbours, view)
            check_input_unchanged()
            path = sink.commit(replace)
        except BaseException:
            sink.close()
            raise
    finally:
        if src is not None:
            src.close()
    return path, shape, streamed

"""Execution back-ends for CLEAR-Net: how one network evaluation is run, not what it computes.

The sampler (:func:`CoreDiffLib.diffusion.sample`) only needs a callable with a ``config``
attribute and the signature ``net(x, t, x0_prev, xT) -> x0_hat``. This module builds such
callables from a :class:`~CoreDiffLib.network.ClearNet` for a :class:`RunSettings`:

* ``precision``  ``fp32`` (strict IEEE: TF32 off), ``tf32`` (CUDA TensorFloat-32 convs and
  matmuls), ``bf16`` / ``fp16`` (autocast; the residual add, the sampler arithmetic and the
  output stay fp32);
* ``channels_last`` NHWC activations (oneDNN on CPU and cuDNN tensor cores prefer them);
* ``backend``    ``eager``, ``compile`` (torch.compile / Inductor), ``cudagraphs`` (each
  network shape captured once as a CUDA graph and replayed), or ``onnx`` (the forward
  exported to ONNX and run by ONNX Runtime; CPU).

Every back-end computes the same function; ``corediff bench`` measures what each one costs
and how far its output drifts from eager fp32 (allowed: at most 0.05 dB PSNR).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import CoreDiffError
from .atomic import atomic_path
from .network import ClearNet

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
BACKENDS = ("eager", "compile", "cudagraphs", "onnx")

#: What ``precision="auto"`` means per device type. CPU: fp32 (this project's CPUs have no
#: bf16 units; bf16 there is slower *and* less accurate). CUDA: fp16 autocast, channels-last,
#: measured on one H200 with the trained paper-size model (docs/benchmarks/gpu_h200.md), 10
#: slices of 512x512, T=10: eager fp16/CL 0.022 s/slice vs eager fp32 0.099 (4.5x), output
#: within 0.018 HU mean |diff| and 0.000 dB PSNR of fp32; bf16 was no faster and drifted more
#: (0.24 HU, -0.011 dB). COREDIFF_PRECISION=fp32 restores strict fp32.
AUTO_PRECISION = {"cpu": "fp32", "cuda": "fp16", "mps": "fp32"}
#: Widths up to which ONNX Runtime is the CPU default: it beat eager PyTorch (contiguous and
#: channels-last) at every width measured, 512x512, 2 cores, same-run ratios vs eager fp32:
#: width 16 2.5-3.8x (channels-last 0.9-1.6x), 32 2.5x (1.3x), 64 1.4-1.9x (0.7-1.35x);
#: Testing/benchmarks/results/cpu_*.md. Wider networks are unmeasured: eager channels-last.
ONNX_MAX_WIDTH = 64

#: the refusal of a network whose output is not finite: written out, NaN would become 0 HU
NON_FINITE_OUTPUT = ("the model returned NaN or infinite values: its weights are damaged, or the precision "
                     "overflowed (try --precision fp32)")


@dataclass(frozen=True)
class RunSettings:
    precision: str = "fp32"
    channels_last: bool = True
    backend: str = "eager"

    def label(self) -> str:
        return f"{self.backend}/{self.precision}{'/CL' if self.channels_last else ''}"


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
    except Exception:
        return False
    return True


def auto_settings(device: torch.device, width: int) -> RunSettings:
    """The fastest settings known to be safe on this device type (see module notes).

    Environment overrides: COREDIFF_PRECISION (fp32|tf32|bf16|fp16, CUDA) and
    COREDIFF_RUNTIME (eager|compile|cudagraphs|onnx)."""
    env = os.environ.get("COREDIFF_PRECISION", "").strip().lower()
    precision = env if env in PRECISIONS else AUTO_PRECISION.get(device.type, "fp32")
    forced = os.environ.get("COREDIFF_RUNTIME", "").strip().lower()
    if device.type == "cpu":
        backend = "onnx" if width <= ONNX_MAX_WIDTH and onnx_available() else "eager"
        if forced in ("eager", "compile", "onnx"):
            backend = forced
        return RunSettings("fp32", channels_last=backend != "onnx", backend=backend)
    if device.type == "cuda":
        return RunSettings(precision, channels_last=True,
                           backend=forced if forced in ("eager", "compile", "cudagraphs") else "eager")
    return RunSettings("fp32", channels_last=False, backend="eager")


def check_applicable(settings: RunSettings, device: torch.device) -> str | None:
    """None when the combination can run on ``device``, else why not (a short note)."""
    if settings.precision not in PRECISIONS:
        return f"unknown precision {settings.precision}"
    if settings.backend not in BACKENDS:
        return f"unknown backend {settings.backend}"
    cuda = device.type == "cuda"
    if settings.precision == "tf32" and not cuda:
        return "TF32 exists only on CUDA (Ampere or newer)"
    if settings.precision == "fp16" and device.type == "cpu":
        return "fp16 autocast has no fast CPU kernels"
    if settings.backend == "cudagraphs" and not cuda:
        return "CUDA graphs need a CUDA device"
    if settings.backend == "onnx":
        if device.type != "cpu":
            return "the ONNX back-end is CPU-only here (onnxruntime CPU build)"
        if settings.precision != "fp32":
            return "the ONNX back-end runs fp32 only"
        if settings.channels_last:
            return "ONNX Runtime chooses its own memory layout"
        if not onnx_available():
            return ("onnx / onnxruntime are not installed (pip install 'onnx>=1.15' 'onnxruntime>=1.17', "
                    "as '.[export]' does)")
    if settings.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


# ----------------------------------------------------------------------------- precision
@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """Allow or forbid TF32 for cuDNN convolutions and CUDA matmuls, restoring on exit."""
    if not torch.cuda.is_available():
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 API
        old = (conv.fp32_precision, matmul.fp32_precision)
        value = "tf32" if enabled else "ieee"
        conv.fp32_precision, matmul.fp32_precision = value, value
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = old
    else:  # pragma: no cover - older torch
        old = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = enabled
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = old


def precision_context(precision: str, device: torch.device):
    """The context one forward pass runs in (TF32 switch and/or autocast)."""
    stack = contextlib.ExitStack()
    if device.type == "cuda":
        stack.enter_context(tf32_mode(precision == "tf32"))
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        # cache_enabled=False: required for CUDA-graph capture, harmless otherwise
        stack.enter_context(torch.autocast(device.type, dtype=dtype, cache_enabled=False))
    return stack


# ----------------------------------------------------------------------------- torch back-ends
class TorchNet:
    """Eager (optionally compiled) CLEAR-Net with a memory format and a precision."""

    def __init__(self, model: ClearNet, device: torch.device, settings: RunSettings):
        self.config = model.config
        self.device = device
        self.settings = settings
        fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model = model.to(device).eval().to(memory_format=fmt)
        self._fn = self.model
        if settings.backend == "compile":
            self._fn = torch.compile(self.model, dynamic=False)

    def _fmt(self, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None or not self.settings.channels_last:
            return x
        return x.contiguous(memory_format=torch.channels_last)

    def __call__(self, x, t, x0_prev=None, xT=None):
        with precision_context(self.settings.precision, self.device):
            y = self._fn(self._fmt(x), t, self._fmt(x0_prev), self._fmt(xT))
        return y.float().contiguous()


class CudaGraphNet(TorchNet):
    """Each (shape, EMM on/off) captured once as a CUDA graph; calls copy in and replay.

    Removes the per-kernel launch overhead, which dominates small batches on big GPUs.
    """

    def __init__(self, model: ClearNet, device: torch.device, settings: RunSettings):
        super().__init__(model, device, replace(settings, backend="eager"))
        self.settings = settings
        self._graphs: dict = {}

    def _capture(self, x, t, x0_prev, xT):
        static = {"x": x.clone(), "t": t.clone(), "p": None if x0_prev is None else x0_prev.clone(),
                  "xT": None if xT is None else xT.clone()}

        def run():
            return TorchNet.__call__(self, static["x"], static["t"], static["p"], static["xT"])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN autotuning and allocator, outside the graph
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # own pool per graph: outputs never alias across graphs
            out = run()
        return graph, static, out

    def __call__(self, x, t, x0_prev=None, xT=None):
        key = (tuple(x.shape), x0_prev is None, xT is None)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, t, x0_prev, xT)
        graph, static, out = self._graphs[key]
        static["x"].copy_(x)
        static["t"].copy_(t)
        if x0_prev is not None:
            static["p"].copy_(x0_prev)
        if xT is not None:
            static["xT"].copy_(xT)
        graph.replay()
        return out.clone()


# ----------------------------------------------------------------------------- ONNX Runtime
class _Forward(torch.nn.Module):
    """ClearNet.forward with EMM always on or always off (ONNX graphs have no None inputs)."""

    def __init__(self, model: ClearNet, emm: bool):
        super().__init__()
        self.model, self.emm = model, emm

    def forward(self, x, t, x0_prev, xT):
        if self.emm:
            return self.model(x, t, x0_prev, xT)
        return self.model(x, t)


def _model_key(model: ClearNet) -> str:
    """The cache name of a model's export: its config and weights, and the exporter (torch)."""
    h = hashlib.sha256(repr(model.config.to_dict()).encode() + torch.__version__.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


#: how many models' exports the cache keeps, the most recently used: a script that denoises with
#: each new state of a network in training exports a new pair (~9 MB at width 32) every time
ONNX_CACHE_MODELS = 16


def onnx_cache_dir() -> Path:
    base = os.environ.get("COREDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "corediff")
    return Path(base) / "onnx"


def export_onnx(model: ClearNet, folder: str | os.PathLike | None = None,
                check: bool = True) -> dict[bool, Path]:
    """Export the forward pass (EMM off and on) with dynamic batch / height / width.

    Files are cached by a hash of the weights, so each model is exported once (~5 s).
    With ``check``, ONNX Runtime must reproduce PyTorch on a fixed random input to 1e-4 (PyTorch's
    output is kept beside the export); a cached file that does not (damaged: a full disk, a copy
    cut short) is exported again, once.
    """
    import warnings

    cache = folder is None  # a folder of the caller's own is never pruned
    folder = Path(folder) if folder else onnx_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)  # a copy: the caller's network stays where and as it is
    model = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    key = _model_key(model)
    c = model.config.in_channels
    g = torch.Generator().manual_seed(0)  # the same check input every run: its expected output is kept
    x, t = torch.rand(1, c, 32, 32, generator=g), torch.tensor([3])
    p, xT = torch.rand(1, 1, 32, 32, generator=g), torch.rand(1, 1, 32, 32, generator=g)
    paths, exported = {}, set()
    for emm in (False, True):
        if emm and not model.config.use_emm:
            paths[emm] = paths[False]
            continue
        path = folder / f"clearnet-{key}-{'emm' if emm else 'plain'}.onnx"
        if path.exists():
            with contextlib.suppress(OSError):  # a read-only cache is still used, only never pruned
                os.utime(path)  # used now: the last to be pruned
        else:
            exported.add(path)
            axes = {"x": {0: "b", 2: "h", 3: "w"}, "p": {0: "b", 2: "h", 3: "w"},
                    "xT": {0: "b", 2: "h", 3: "w"}, "t": {0: "b"}, "y": {0: "b", 2: "h", 3: "w"}}
            # the TorchScript exporter; torch < 2.5 has no `dynamo` switch and uses it anyway
            legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            with warnings.catch_warnings(), torch.no_grad(), atomic_path(path, output=False) as tmp:
                warnings.simplefilter("ignore")
                torch.onnx.export(_Forward(model, emm), (x, t, p, xT), str(tmp),
                                  input_names=["x", "t", "p", "xT"], output_names=["y"],
                                  dynamic_axes=axes, opset_version=17, **legacy)
        paths[emm] = path
    if check:
        try:
            _check_export(model, paths, (x, t, p, xT))
        except CoreDiffError:
            raise
        except Exception:
            cached = set(paths.values()) - exported
            if not cached:  # just exported, and still wrong: nothing a second export would mend
                raise
            for path in cached:
                path.unlink(missing_ok=True)
                _expected_path(path).unlink(missing_ok=True)
            return export_onnx(model, None if cache else folder, check)
    if exported and cache:
        prune_onnx_cache(folder)
    return paths


def prune_onnx_cache(folder: Path, keep: int = ONNX_CACHE_MODELS) -> None:
    """Delete the exports of all but the ``keep`` models used last (a use renews a file's time)."""
    last_used: dict[str, float] = {}
    for path in folder.glob("clearnet-*-*.onnx"):
        with contextlib.suppress(OSError):  # another process pruning at the same time
            key = path.name.split("-")[1]
            last_used[key] = max(last_used.get(key, 0.0), path.stat().st_mtime)
    for key in sorted(last_used, key=last_used.get, reverse=True)[keep:]:
        for path in folder.glob(f"clearnet-{key}-*"):  # its exports and their expected outputs
            with contextlib.suppress(OSError):
                path.unlink()


def _expected_path(export: Path) -> Path:
    return export.with_name(export.name[:-len(".onnx")] + ".expected.npy")


def _expected_output(model: ClearNet, export: Path, emm: bool, inputs: tuple) -> torch.Tensor:
    """PyTorch's output on the check's fixed ``inputs``, kept beside the export: computing it
    again every run cost the first eager forward pass, 0.7 s on 2 cores (1-1.5 s under load), in
    runs that otherwise never run PyTorch's network. A cache that cannot be written computes it."""
    kept = _expected_path(export)
    with contextlib.suppress(OSError, ValueError):
        return torch.from_numpy(np.load(kept, allow_pickle=False))
    x, t, p, xT = inputs
    with torch.no_grad():
        want = model(x, t, p if emm else None, xT if emm else None)
    if not torch.isfinite(want).all():
        raise CoreDiffError(NON_FINITE_OUTPUT)
    with contextlib.suppress(OSError), atomic_path(kept, output=False) as tmp:
        np.save(tmp, want.numpy())
    return want


def _check_export(model: ClearNet, paths: dict[bool, Path], inputs: tuple) -> None:
    """ONNX Runtime on ``paths`` must give PyTorch's result on ``inputs`` to 1e-4."""
    x, t, p, xT = inputs
    net = OnnxNet(model, paths=paths)
    with torch.no_grad():
        for emm in (False, True):
            want = _expected_output(model, paths[emm], emm, inputs)
            got = net(x, t, p if emm else None, xT if emm else None)
            err = float((want - got).abs().max())
            if not err <= 1e-4:  # NaN compares False with everything; not a CoreDiffError: the
                # Denoiser falls back to eager PyTorch, with a warning, as for any ONNX failure
                raise RuntimeError(f"its result differs from PyTorch's by up to {err:.2e}")


class OnnxNet:
    """CLEAR-Net run by ONNX Runtime (CPU execution provider), fp32."""

    def __init__(self, model: ClearNet, threads: int | None = None, paths: dict | None = None):
        import onnxruntime as ort

        self.config = model.config
        self.device = torch.device("cpu")
        self.settings = RunSettings("fp32", False, "onnx")
        paths = paths or export_onnx(model)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # no busy-waiting between runs: spinning ORT threads starve PyTorch's (and others')
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._sessions = {}
        for emm, path in paths.items():
            self._sessions[emm] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x, t, x0_prev=None, xT=None):
        emm = x0_prev is not None and self.config.use_emm
        feed = {"x": np.ascontiguousarray(x.detach().cpu().float().numpy()),
                "t": t.detach().cpu().long().numpy()}
        sess = self._sessions[emm]
        names = {i.name for i in sess.get_inputs()}
        if "p" in names:
            feed["p"] = np.ascontiguousarray(x0_prev.detach().cpu().float().numpy())
        if "xT" in names:
            feed["xT"] = np.ascontiguousarray(xT.detach().cpu().float().numpy())
        y = sess.run(["y"], feed)[0]
        return torch.from_numpy(y)


def build_net(model: ClearNet, device: torch.device, settings: RunSettings, threads: int | None = None):
    """A sampler-ready callable for ``settings`` (raises CoreDiffError when inapplicable)."""
    why = check_applicable(settings, device)
    if why:
        raise CoreDiffError(f"{settings.label()} cannot run on {device}: {why}")
    if settings.backend == "onnx":
        return OnnxNet(model, threads)
    if settings.backend == "cudagraphs":
        return CudaGraphNet(model, device, settings)
    return TorchNet(model, device, settings)


def physical_cores() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except Exception:
        n = None
    return max(1, int(n or os.cpu_count() or 1))


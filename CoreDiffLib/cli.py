"""The ``corediff`` command line: denoise, compare, dose, simulate, train, oneshot, bench, models, devices.

Every user-facing failure is a :class:`CoreDiffError` printed as one line,
``corediff: error: <what is wrong and what to do>``, with exit code 2; nothing is written.
``--progress lines`` prints ``PROGRESS done total`` lines on stdout for GUIs (Slicer).
Every command's parser is here; the handlers of ``oneshot`` and ``bench`` live with their
method (:func:`CoreDiffLib.oneshot.cmd_oneshot`, :func:`CoreDiffLib.benchmark.cmd_bench`) and
are imported when they run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from . import CoreDiffError, __version__
from .atomic import atomic_paths, check_output_file, left_by_killed_runs, sole_writer
from .dose_estimate import AUTO_MODEL

if TYPE_CHECKING:  # imported when a command needs it: PyTorch takes seconds
    from .inference import Denoiser


# ----------------------------------------------------------------------------- progress
class Progress:
    """Reports (done, total) as a tqdm bar, as machine-readable lines, or not at all."""

    def __init__(self, mode: str, unit: str = "slice", desc: str = ""):
        self.mode, self.unit, self.desc, self._bar = mode, unit, desc, None
        self.started: float | None = None  # when the work began (its first report), for its rate
        self.last: float | None = None  # its latest report: what follows the last one is not the work's

    def __call__(self, done: int, total: int) -> None:
        self.last = time.perf_counter()
        if self.started is None:
            self.started = self.last
        if self.mode == "lines":
            print(f"PROGRESS {done} {total}", flush=True)
        elif self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit=self.unit, desc=self.desc, file=sys.stderr)
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class PhasedProgress:
    """One (done, total) count made of phases that run at different speeds (one-shot: T slow
    network evaluations, then hundreds of fast fitting iterations), shown as a bar per phase so
    that the first phase's rate does not set the next one's ETA; 'lines' mode reports the
    whole count, as before."""

    def __init__(self, mode: str, phases: Sequence[tuple[str, int, str]]):
        self.mode, self.sizes = mode, [n for _, n, _ in phases]  # phases: (description, count, unit)
        self.bars = [Progress(mode, unit=unit, desc=desc) for desc, _, unit in phases]
        self._whole = Progress(mode)

    def __call__(self, done: int, total: int) -> None:
        if self.mode != "bar":
            self._whole(done, total)
            return
        start = 0
        for k, (bar, size) in enumerate(zip(self.bars, self.sizes)):
            last = k == len(self.bars) - 1
            if done >= start + size and not last:  # this phase is over: shown complete, then closed
                bar(size, size)
                bar.close()
            elif done >= start:
                bar(min(done - start, size), size)
                return
            start += size

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def info(args: argparse.Namespace, message: str) -> None:
    """Human-readable status: 'INFO ...' on stdout in lines mode, stderr otherwise (also with
    ``--progress none``, which hides the progress only: the model chosen, a dose or geometry
    caveat must reach a script's log)."""
    if getattr(args, "progress", "bar") == "lines":  # one INFO line per line: GUIs parse them
        print("\n".join(f"INFO {line}" for line in message.splitlines()), flush=True)
    else:
        print(message, file=sys.stderr, flush=True)


def _add_series(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", default=None, metavar="N|UID",
                   help="a DICOM folder holding several series: the one to read, by its number in the list "
                        "printed when there is a choice, or its UID (default: the CT series with the most "
                        "slices, scanner images before derived ones, no localizer; two that tie are listed, "
                        "not guessed between)")


def note(message: str) -> None:
    """A note on stderr for commands without a progress mode (which input was read, ...)."""
    print(message, file=sys.stderr, flush=True)


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["bar", "lines", "none"], default="bar",
                   help="progress display: tqdm bar (default), 'PROGRESS done total' lines, or none "
                        "(messages and warnings still go to stderr)")


# ----------------------------------------------------------------------------- denoise
def cmd_denoise(args: argparse.Namespace) -> int:
    from .inference import denoise_file, pick_device
    from .io import check_output_path

    check_output_path(args.input, args.output)
    if not args.overwrite:
        _refuse_existing_output(Path(args.output).expanduser())
    pick_device(args.device)  # an unavailable device is refused now, not after the scan is read and measured
    for left in left_by_killed_runs(Path(args.output).expanduser()):  # can be the whole volume's size
        info(args, f"note: {left} was left by an earlier run into {Path(args.output).name} that was killed (out of "
                   "memory?): delete it")
    progress = Progress(args.progress, desc="denoising")
    t0 = time.perf_counter()
    try:  # streamed: memory bounded by the batch size, not by the number of slices
        out, shape, _ = denoise_file(
            args.input, args.output,
            lambda volume, spacing_xy: load_denoiser(args, volume, spacing_xy),
            batch_size=args.batch_size, progress=progress, log=lambda m: info(args, m), slices=args.slices,
            series=args.series, context=args.context, replace=args.overwrite)
    finally:
        progress.close()
    now = time.perf_counter()
    # the slices' own rate (no model loading, no scan measuring), and the output's writing after them
    started, finished = progress.started or t0, progress.last or now
    info(args, f"wrote {out} ({now - t0:.1f} s; denoising {(finished - started) / shape[0]:.2f} s/slice, "
               f"writing {now - finished:.1f} s)")
    return 0


def _refuse_existing_output(output: Path) -> None:
    """An existing output file is kept unless --overwrite: ``denoise ldct.nrrd ndct.nrrd``, a slip
    of the hand, must not replace the normal-dose scan. (A DICOM folder must be new or empty anyway.)"""
    from .io import is_file_path, output_data_file
    if not is_file_path(output):
        return
    for path in (output, output_data_file(output)):
        if path is not None and (path.exists() or path.is_symlink()):
            raise CoreDiffError(f"output {output} exists{'' if path == output else f' (its data file {path.name})'}: "
                                "choose a new name, or give --overwrite to replace it (replaced only once the "
                                "denoised volume is complete)")


def load_denoiser(args: argparse.Namespace, volume=None, spacing_xy=None) -> "Denoiser":
    """The ``denoise`` command's Denoiser for the (axial) ``volume``: with ``--model auto`` (the
    default) the model trained at the dose the scan looks like; says so, and when ``--steps auto``
    chose one step. An adaptation without ``--model`` runs on the model it was learned for."""
    from .inference import AUTO_STEPS, Denoiser
    model, choice = args.model, None
    if model is None and args.adaptation is not None:
        pass  # None: Denoiser.load takes the adaptation's own base model (an explicit name is kept)
    elif model in (None, AUTO_MODEL):
        if args.adaptation is not None:
            raise CoreDiffError("--model auto chooses a dose model; an adaptation brings its own: drop one of them")
        _check_steps_for_auto(args.steps)  # before the scan is measured, which takes seconds on a long series
        model, choice = choose_dose_model(args, volume, spacing_xy, explicit=model == AUTO_MODEL)
    den = Denoiser.load(model, args.device, args.steps, args.adaptation,
                        precision=args.precision, channels_last=args.channels_last)
    den.model_choice = choice  # why this model, recorded in the output's header (None: as asked)
    trained = den.model.config.steps
    if args.adaptation is not None and args.model is None:
        base = getattr(den.model, "weights_path", None)
        info(args, f"adaptation {args.adaptation} on the model it was learned for: {Path(base).name if base else '?'}")
    if args.steps == AUTO_STEPS and den.steps is not None and den.steps < trained:
        from .models import is_shipped
        shipped = is_shipped(den.model)
        info(args, f"one sampling step on the CPU (--steps auto): 1/{trained} of the network's work of all "
                   f"{trained}, and "
                   + ("0.03-0.06 dB below them for the -w32 models on held-out phantoms"
                      if shipped else "for a model of your own, measure what it costs")
                   + f"; --steps {trained} runs the paper's full sampler")
    return den


def _check_steps_for_auto(steps) -> None:
    """Refuse a --steps number that no model --model auto may choose can run (they share one T)."""
    from .dose_estimate import shipped_choice
    from .models import load_manifest
    if not isinstance(steps, int):
        return
    entries = load_manifest().get("models", {})
    most = max((int(entries.get(name, {}).get("architecture", {}).get("steps", 0))
                for name in shipped_choice()[1].values()), default=0)
    if most and not 1 <= steps <= most:
        raise CoreDiffError(f"steps must be 'auto' or between 1 and {most} (the models' T), got {steps}")


def choose_dose_model(args: argparse.Namespace, volume, spacing_xy, explicit: bool) -> tuple[str, str]:
    """(model, why) for this scan (CoreDiffLib.dose_estimate), said in the log. A scan that
    cannot be measured is an error when ``--model auto`` was asked for, else the default model."""
    from .dose_estimate import caveats, choose_model_or_default
    choice = choose_model_or_default(volume, spacing_xy)
    if choice.problem is not None:
        if explicit:
            raise CoreDiffError(f"--model auto: {choice.problem}: choose the model for its dose with --model")
        info(args, f"warning: {choice.problem}; using the default model {choice.model}")  # GUIs keep 'warning:' lines
        return choice.model, "auto: not measurable, the default model"
    model, scan, dose = choice.model, choice.scan, choice.dose
    info(args, f"model for this scan: {model} (noise index {scan.noise_index_hu:.1f} HU at a water-equivalent "
               f"diameter of {scan.wed_mm:.0f} mm, like {100 * dose:.0f} % of the simulated normal dose; "
               "--model NAME overrides)")
    for caveat in caveats(scan, dose):
        info(args, f"warning: {caveat}")
    return model, (f"auto: noise index {scan.noise_index_hu:.1f} HU, water-equivalent diameter "
                   f"{scan.wed_mm:.0f} mm, estimated dose {dose:.3f}")


def steps_argument(text: str) -> int | str:
    """``--steps``: 'auto' or a whole number (the range is checked against the model)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'auto' or a whole number of steps") from None


def dose_fraction(text: str) -> float:
    """``simulate --dose``: a fraction of the full dose (0.25) or a per cent (25%), as --dose-tag reads them."""
    value = text.strip()
    try:
        return float(value[:-1]) / 100.0 if value.endswith("%") else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a dose: give a fraction of the full dose (0.25) "
                                         "or a per cent (25%)") from None


def slices_argument(text: str) -> tuple[int | None, int | None]:
    """``--slices``: K (one slice) or A:B (slices A to B-1; either end may be left out), 0-based."""
    try:
        if ":" not in text:
            k = int(text)
            return k, k + 1
        a, b = text.split(":")
        return (int(a) if a.strip() else None), (int(b) if b.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not K or A:B (0-based axial slice numbers, "
                                         "B excluded, e.g. 40 or 40:60)") from None


#: inference.CONTEXTS (not imported here: PyTorch, seconds at every start; a test keeps them equal)
DENOISE_CONTEXTS = ("auto", "neighbours", "own")


def add_denoise_parser(sub) -> None:
    p = sub.add_parser("denoise", help="denoise a CT volume (file or DICOM folder)")
    p.add_argument("input", help="LDCT volume: .nrrd, .nhdr, .nii(.gz), .mha, .mhd or a DICOM folder")
    p.add_argument("output", help="output file (.nrrd, .nii.gz, .nii, .mha; .nhdr, .mhd with a data file beside) "
                                  "or a new DICOM folder")
    p.add_argument("--model", default=None,
                   help="auto (default): the shipped model for the dose the scan looks like (its noise for the "
                        "patient's size); or a shipped model name ('default': corediff-25-w32), or a "
                        ".safetensors file")
    p.add_argument("--adaptation", default=None, help="one-shot adaptation name or file")
    p.add_argument("--device", default="auto", help="auto (default: a GPU if there is one), cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per batch, >= 1 (default: chosen from the device's memory)")
    p.add_argument("--steps", type=steps_argument, default="auto",
                   help="sampling steps, 1 to the model's T (10), or auto (default): all T on a GPU, one on "
                        "a CPU, where a run is 7-10 times faster (one network evaluation per slice, not T) and "
                        "0.03-0.06 dB below T for the -w32 models")
    p.add_argument("--slices", type=slices_argument, default=None, metavar="K|A:B",
                   help="denoise only axial slice K, or slices A to B-1 (0-based), with their true neighbours "
                        "as context; the output holds just those, placed where they lie in the input")
    p.add_argument("--context", choices=DENOISE_CONTEXTS, default="auto",
                   help="what the network sees beside each slice: auto (default) its two neighbours when the "
                        "slices are less than 4 mm apart, the slice itself from 4 mm on (on clinical 5 mm "
                        "scans the neighbours cost 0.85-1.05 dB), or up to 1.25x the neighbour distance a "
                        "model records it learned; neighbours or own to choose")
    _add_series(p)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16", "fp16"],
                   help="network precision (auto: the fastest one known safe on the device)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last activations (default: per device)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (default: refuse, and keep it); the new volume "
                        "replaces it only once complete")
    _add_progress(p)
    p.set_defaults(func=cmd_denoise)


# ----------------------------------------------------------------------------- train
#: what a training checkpoint may be called (torch.save files; the default is OUT.ckpt)
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def cmd_train(args: argparse.Namespace) -> int:
    from .inference import pick_device
    from .pairs import find_pairs, pairs_dose_tag, read_pair_list, read_training_pairs
    from .models import WEIGHTS_DIR, resolve_model, save_weights, shipped_models
    from .network import NetworkConfig
    from .training import TrainConfig, farthest_neighbour_mm, patch_size_used, train

    if args.widen and not args.init_weights:
        raise CoreDiffError("--widen widens the --init-weights model: give --init-weights too")
    for flag, value in (("--width", args.width), ("--steps", args.steps)):
        if value < 1:
            raise CoreDiffError(f"{flag} must be a whole number >= 1, got {value}")
    # an unavailable device is refused now, not after the data are read
    device = ("cuda" if _cuda() else "cpu") if args.device == "auto" else str(pick_device(args.device))
    # a shipped name is its file: that file is an input too
    init_file = str(resolve_model(args.init_weights)[0].resolve()) if args.init_weights else None
    check_output_file("--out", args.output, (".safetensors",), (init_file, args.data))
    checkpoint = args.checkpoint or str(Path(args.output).with_suffix(".ckpt"))
    check_output_file("--checkpoint", checkpoint, CHECKPOINT_SUFFIXES, (args.output, init_file, args.data))
    if Path(args.output).expanduser().exists() and not Path(checkpoint).expanduser().exists() and not args.overwrite:
        # not a run going on (its checkpoint would be there): another model, which hours later would be gone
        raise CoreDiffError(f"--out {args.output} exists and there is no checkpoint {checkpoint} to resume: choose "
                            "a new name, or give --overwrite to replace it when training ends")
    for flag, path in (("--out", args.output), ("--checkpoint", checkpoint)):
        if Path(path).expanduser().resolve().is_relative_to(WEIGHTS_DIR):
            raise CoreDiffError(f"{flag} {path} lies in the installed models folder ({WEIGHTS_DIR}), whose files the "
                                "manifest checks: copy a shipped checkpoint out first (e.g. to runs/) and resume "
                                "from the copy, with an --out of your own")
    # every option checked before the starting weights and the data are read
    cfg = TrainConfig(iterations=args.iterations, batch_size=args.batch_size, patch_size=args.patch_size,
                      lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      ema_start=args.ema_start if args.ema_start is not None else min(2000, args.iterations // 5),
                      threads=args.threads, keep_every=args.keep_every, precision=args.precision,
                      time_limit_s=60.0 * args.time_limit, lr_schedule=args.lr_schedule,
                      t_sampling=args.t_sampling, anywhere_share=args.anywhere_share,
                      max_neighbour_gap=args.max_neighbour_gap, own_slice_share=args.own_slice_share,
                      ssim_weight=args.ssim_weight, level_weight=args.level_weight,
                      level_window=args.level_window, context_noise_weight=args.context_noise_weight,
                      context_noise_region=args.context_noise_region)
    # then the starting weights: a bad file or widening factor is refused before the data are read
    net_cfg = NetworkConfig(width=args.width, use_context=not args.no_context, use_emm=not args.no_emm,
                            steps=args.steps)
    init_state = None
    if args.init_weights:
        from .models import load_model
        init = load_model(args.init_weights)
        init_sha256 = getattr(init, "weights_sha256", "")  # before widening makes a new network
        if args.widen:
            from .network import widened
            init = widened(init, args.widen, seed=args.seed)
        net_cfg, init_state = init.config, init.state_dict()
        info(args, f"starting from {args.init_weights}{f' widened {args.widen}x' if args.widen else ''} "
                   f"(its architecture: width {net_cfg.width}, "
                   f"CTX {net_cfg.use_context}, EMM {net_cfg.use_emm}, T={net_cfg.steps})")
    cfg.loss_terms.check_network(net_cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank runs this; rank 0 writes
    with sole_writer((args.output, checkpoint), "corediff train") if rank0 else contextlib.nullcontext():
        if Path(args.output).expanduser().exists():  # a resumed run writes its --out again: said, not refused
            info(args, f"note: {args.output} exists and is replaced when training ends")
        listed = Path(args.data).is_file()
        pairs = read_pair_list(args.data) if listed else find_pairs(args.data, args.dose_tag)
        used_tag = None if listed else pairs_dose_tag(args.data, pairs)  # recorded: '10', not what was typed
        info(args, f"{len(pairs)} NDCT/LDCT pairs")
        slice_mm: list[float] = []
        volumes = read_training_pairs(pairs, log=lambda m: info(args, m), slice_mm=slice_mm)
        patch = patch_size_used(volumes, cfg.patch_size)
        if patch != cfg.patch_size:
            info(args, f"patches of {patch}x{patch} pixels"
                 + (f" (--patch-size {cfg.patch_size}: the smallest slice and a multiple of 4 allow no more)"
                    if cfg.patch_size else ""))
        # what they were trained from, wherever the command was run
        started_from = ({"init_weights": args.init_weights if args.init_weights in shipped_models() else init_file,
                         "init_weights_sha256": init_sha256, "widen": args.widen}
                        if args.init_weights else {})
        record = {"patch_size_used": patch,
                  "data": [[str(Path(a).resolve()), str(Path(b).resolve())] for a, b in pairs],
                  "dose_tag": used_tag,
                  # the farthest neighbours it learned: --context auto gives neighbours to slices that far
                  # apart (uses_neighbours)
                  "neighbour_mm": farthest_neighbour_mm(volumes, slice_mm, cfg.max_neighbour_gap)}
        progress = Progress(args.progress, unit="it", desc="train")
        try:
            ema, state = train(volumes, net_cfg, cfg, checkpoint=checkpoint, device=device,
                               log=lambda m: info(args, m), init_state=init_state,
                               inherit=("ema_start",) if args.ema_start is None else (), origin=started_from,
                               consume_pairs=True,  # the HU copies are not needed again: half the memory
                               progress=progress if rank0 else None, record=record)
        finally:
            progress.close()
        if state.origin is None:  # resumed from a checkpoint that predates this record
            if args.init_weights:
                info(args, "note: resumed run: --init-weights was not used; what its first leg started from "
                           "is not recorded in its checkpoint")
            started_from = {"init_weights": "unknown (resumed from a checkpoint that does not record it)"}
        elif state.origin != started_from:
            info(args, "note: resumed run: its weights descend from what its first leg started from "
                       f"({state.origin.get('init_weights') or 'a fresh network'}), recorded as such"
                       + (f"; --init-weights {args.init_weights} was not used" if args.init_weights else ""))
            started_from = state.origin
        if rank0:
            sha = save_weights(ema, args.output, {"iterations": state.iteration, "train_config": vars(cfg),
                                                  "legs": state.legs,  # a resumed run's every command
                                                  **record, **started_from})
            info(args, f"wrote {args.output} (sha256 {sha[:12]}…, {state.iteration} iterations)")
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train CLEAR-Net on paired NDCT/LDCT volumes")
    p.add_argument("data", help="folder of NDCT/LDCT pairs matched by name, or a 'ndct,ldct' list file")
    p.add_argument("--out", dest="output", required=True, help="output weights (.safetensors)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that no checkpoint of this run goes on from (by default it is "
                        "kept and the run refused; a resumed run writes its own --out again)")
    p.add_argument("--dose-tag", default=None, help="LDCT dose tag to use when several exist (e.g. 25)")
    p.add_argument("--iterations", type=int, default=20000,
                   help="iterations to train, a total over a run's resumed legs (default 20000)")
    p.add_argument("--batch-size", type=int, default=8, help="patches per iteration (default 8)")
    p.add_argument("--patch-size", type=int, default=64,
                   help="training patch size in pixels (default 64; 0 = square crops as large as the smallest "
                        "slice)")
    p.add_argument("--width", type=int, default=64, help="network width (default 64, the paper's)")
    p.add_argument("--steps", type=int, default=10, help="T, sampling steps (default 10, the paper's)")
    p.add_argument("--no-context", action="store_true", help="ablation: no adjacent slices")
    p.add_argument("--no-emm", action="store_true", help="ablation: no error-modulated module")
    p.add_argument("--init-weights", default=None, metavar="MODEL",
                   help="start from these weights (shipped name or file; its architecture wins over "
                        "--width/--no-context/--no-emm/--steps): fine-tune on your own data")
    p.add_argument("--widen", type=int, default=0, metavar="K",
                   help="start from the --init-weights model made K times wider, computing the same "
                        "function (e.g. a trained width-16 model as the start of a width-32 one)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam's learning rate (default 2e-4, the paper's)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant (default), or cosine: decay to 0 by the last iteration (or by --time-limit, "
                        "if sooner)")
    p.add_argument("--t-sampling", choices=("uniform", "late"), default="uniform",
                   help="how often each time index is trained: uniform (default, the paper's) or late "
                        "(p(t) ∝ t+1, more updates on the LDCT-like states)")
    p.add_argument("--ssim-weight", type=float, default=0.0, metavar="W",
                   help="add W x (1 - SSIM on the metric window) to the paper's MSE loss (default 0: "
                        "MSE only); about 3e-5 gives the two terms gradients of equal size for a trained model")
    p.add_argument("--level-weight", type=float, default=0.0, metavar="W",
                   help="add W x the MSE of local levels (--level-window) to the paper's MSE loss (default 0): "
                        "the same optimum, more weight on local-level errors of a fraction of a HU")
    p.add_argument("--level-window", choices=("block8", "ssim"), default="block8",
                   help="the local levels --level-weight compares: 8x8 block means (default) or SSIM's "
                        "own Gaussian local means (sigma 1.5 px)")
    p.add_argument("--context-noise-weight", type=float, default=0.0, metavar="W",
                   help="add W x the mean square of the output's response to the adjacent slices' low-dose "
                        "noise (default 0): each neighbour's noise is mirrored (2 NDCT - LDCT) and the two "
                        "outputs compared; costs a third network pass per iteration")
    p.add_argument("--context-noise-region", choices=("everywhere", "air"), default="everywhere",
                   help="where --context-noise-weight counts: every pixel (default) or only the NDCT's air "
                        "(< -900 HU), where the neighbours carry no anatomy")
    p.add_argument("--anywhere-share", type=float, default=0.0, metavar="S",
                   help="share of training patches drawn anywhere on the slice, open air included "
                        "(default 0: patches that are almost all air are re-drawn)")
    p.add_argument("--max-neighbour-gap", type=int, default=1, metavar="N",
                   help="take each patch's two neighbours 1..N slices away (drawn per patch), so that a "
                        "model trained on thin slices learns neighbours as far apart as thick-slice "
                        "series have them (default 1: the adjacent slices)")
    p.add_argument("--own-slice-share", type=float, default=0.0, metavar="S",
                   help="share of training patches whose context is the slice itself, as `denoise` runs "
                        "series of 4 mm slices or thicker (default 0: always the real neighbours)")
    p.add_argument("--seed", type=int, default=0,
                   help="weight initialisation and patch draws: the same seed, data and options train the same "
                        "weights on one machine (default 0)")
    p.add_argument("--checkpoint", default=None,
                   help="resumable checkpoint: the same command goes on from it (default: OUT with .ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints (default 500)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all)")
    p.add_argument("--ema-start", type=int, default=None,
                   help="iteration where the EMA starts averaging (default: min(2000, iterations/5), or the "
                        "resumed checkpoint's)")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep a snapshot checkpoint every N iterations (default 0: none)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (default), or bf16 autocast (for GPUs: about 2-3x faster training there)")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="MINUTES",
                   help="stop after this much training time (checkpoint and weights are still written); like "
                        "--iterations, a total over a run's resumed legs: raise it to go on (default 0: no limit)")
    p.add_argument("--device", default="auto", help="auto (default: a GPU if there is one), cpu, cuda, cuda:N or mps")
    _add_progress(p)
    p.set_defaults(func=cmd_train)


# ----------------------------------------------------------------------------- compare
def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def cmd_compare(args: argparse.Namespace) -> int:
    import csv

    from .figures import FIGURE_SUFFIXES
    from .io import axial_volume, on_grid_of, read_volume
    from .metrics import blank_in_window, mean_metrics, volume_metrics

    # the outputs are checked before anything is read: neither may land on an input
    inputs = (args.denoised, args.ldct, args.reference)
    if args.csv:
        if not args.reference:
            raise CoreDiffError("--csv writes the metrics, which need --reference (the normal-dose volume)")
        args.csv = check_output_file("--csv", args.csv, (".csv",), inputs, replace=args.overwrite)  # ~ expanded
    if args.figure:
        args.figure = check_output_file("--figure", args.figure, FIGURE_SUFFIXES, inputs, replace=args.overwrite)
    elif args.slice is not None:
        raise CoreDiffError("--slice picks the figure's slice: give --figure FILE too")
    elif not args.reference:
        raise CoreDiffError("nothing to do: give --reference (the normal-dose volume) for metrics, "
                            "--figure FILE for a side-by-side figure, or both")
    # scored and shown in axial planes, as denoise works on them, however each file is stored
    denoised = axial_volume(read_volume(args.denoised, log=note))
    ldct = axial_volume(read_volume(args.ldct, log=note)) if args.ldct else None
    ref = axial_volume(read_volume(args.reference, log=note)) if args.reference else None
    first = 0  # the scan's number of the denoised volume's first slice (> 0 for a --slices output)
    unnumbered, numbered = [], False  # a larger volume in the other slice order cannot number a part's slices

    def same_voxels(other, flag: str):
        """``other``'s voxels where the denoised volume's are (a --slices output keeps its place)."""
        nonlocal first, numbered
        if other is None:
            return None
        found = on_grid_of(other, denoised)
        if found is None:
            if other.shape == denoised.shape:
                raise CoreDiffError(
                    f"{flag} volume lies on another grid than the denoised volume (spacing {_mm(other.spacing)} vs "
                    f"{_mm(denoised.spacing)} mm, origin {_mm(other.origin)} vs {_mm(denoised.origin)}, or its "
                    "orientation): compare volumes of the same scan, or resample one onto the other first")
            raise CoreDiffError(f"{flag} volume {other.shape} and denoised volume {denoised.shape} differ "
                                "in shape: compare volumes of the same scan (or slices that denoise --slices "
                                "took from it, which keep their place)")
        array, start = found
        if start is not None:  # numbered as the largest volume numbers its slices (the scan)
            first, numbered = max(first, start), True
        elif other.shape[0] > denoised.shape[0]:
            unnumbered.append(flag)
        return other.with_array(array)

    ldct, ref = same_voxels(ldct, "--ldct"), same_voxels(ref, "--reference")
    if unnumbered and not numbered:
        info(args, f"the {' and '.join(unnumbered)} volume stores its slices the other way round: rows and --slice "
                   f"count {Path(args.denoised).name}'s own slices from 0 (give --ldct, the scan it was "
                   "denoised from, to number them as the scan does)")
    shown = args.slice if args.slice is not None else first + denoised.shape[0] // 2  # the figure's slice
    if args.figure and not 0 <= shown - first < denoised.shape[0]:  # refused before the CSV is written
        raise CoreDiffError(f"--slice {shown} is out of range {first}..{first + denoised.shape[0] - 1}")
    rows, lines = [], []  # the per-slice table: its CSV rows and printed lines
    if ref is not None:
        series = [("denoised", denoised)] + ([("ldct", ldct)] if ldct is not None else [])
        blank = [blank_in_window(r) for r in ref.array]
        if all(blank):
            raise CoreDiffError("the reference holds nothing above -1000 HU (padding or air only): no slice to score")
        table = {name: volume_metrics(v.array, ref.array) for name, v in series}
        lines.append(f"{'slice':>5} " + " ".join(f"{n + ' PSNR dB':>16} {n + ' SSIM':>14} {n + ' RMSE HU':>16}"
                                                 for n, _ in series))
        for k in range(denoised.shape[0]):
            row = {"slice": first + k}
            for name, _ in series:
                m = table[name][k]
                row.update({f"{name}_psnr": m.psnr, f"{name}_ssim": m.ssim, f"{name}_rmse_hu": m.rmse_hu}
                           if not blank[k] else {f"{name}_psnr": "", f"{name}_ssim": "", f"{name}_rmse_hu": ""})
            rows.append(row)
            lines.append(f"{first + k:>5} " + (" ".join(f"{row[f'{n}_psnr']:>16.2f} {row[f'{n}_ssim']:>14.4f} "
                                                        f"{row[f'{n}_rmse_hu']:>16.1f}" for n, _ in series)
                                               if not blank[k] else "  (the reference is blank here: not scored)"))
        lines.append("mean  " + " ".join(
            f"{m.psnr:>16.2f} {m.ssim:>14.4f} {m.rmse_hu:>16.1f}"
            for m in (mean_metrics([x for x, b in zip(table[n], blank) if not b]) for n, _ in series)))
        if any(blank):
            info(args, f"{sum(blank)} slice{'s' if sum(blank) > 1 else ''} left out of the means: the reference "
                       "holds nothing above -1000 HU there")
    else:
        info(args, "no --reference: metrics need a normal-dose volume; writing the figure only")
    with atomic_paths(args.csv, args.figure, replace=args.overwrite) as (csv_tmp, figure_tmp):  # both or neither
        if csv_tmp:
            with open(csv_tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        if figure_tmp:
            _compare_figure(figure_tmp, denoised, ldct, ref, shown, first)
    for written in (args.csv, args.figure):
        if written:
            info(args, f"wrote {written}")
    if lines:  # last, once every file is written: a reader that leaves early (| head) loses none
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:  # the reader left; the files are written: end quietly, as a shell's
            _drop_stdout()  # SIGPIPE would
            return 141
    return 0


def _compare_figure(path, denoised, ldct, ref, shown: int, first: int) -> None:
    """compare's side-by-side figure of slice ``shown`` (the scan's number; ``first``: the
    denoised volume's first slice), every panel on the denoised volume's grid."""
    from .figures import comparison_figure
    from .orientation import radiological_slice
    k = shown - first
    panels = {}
    if ldct is not None:
        panels["LDCT"] = ldct.array[k]
    panels["CoreDiff"] = denoised.array[k]
    if ref is not None:
        panels["NDCT (reference)"] = ref.array[k]
    swapped = False
    for name, image in panels.items():  # every panel lies on the denoised volume's grid
        panels[name], swapped = radiological_slice(image, denoised.direction)
    row_mm, column_mm = float(denoised.spacing[1]), float(denoised.spacing[0])
    diff = ("LDCT", "CoreDiff") if ldct is not None else None
    comparison_figure(panels, path, title=f"slice {shown}", difference=diff,
                      pixel_aspect=column_mm / row_mm if swapped else row_mm / column_mm)


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="PSNR/SSIM/RMSE per slice and a side-by-side figure",
                       description="PSNR (dB), SSIM and RMSE (HU) per slice, all three on images clipped to "
                                   "[-1000, 1000] HU as in the CoreDiff paper, and a side-by-side figure.")
    p.add_argument("denoised", help="denoised volume")
    p.add_argument("--ldct", help="the low-dose input volume")
    p.add_argument("--reference", help="normal-dose reference volume (needed for metrics)")
    p.add_argument("--csv", help="write per-slice metrics to this CSV")
    p.add_argument("--figure", help="write a side-by-side figure here (.png, or .pdf, .svg, .jpg, .tif)")
    p.add_argument("--slice", type=int, default=None, help="slice for the figure (default: middle)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --csv or --figure file (by default an existing one is kept and "
                        "the run refused)")
    p.set_defaults(func=cmd_compare, progress="bar")


# ----------------------------------------------------------------------------- simulate
def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulation import simulate_dataset

    doses = args.dose
    for d in doses:
        if not 0 < d < 1:
            raise CoreDiffError(f"--dose {d} is out of range: give a fraction of the full dose in (0, 1), "
                                "e.g. 0.25 for quarter dose (the full dose is the NDCT, written anyway)")
    if args.seed < 0:
        raise CoreDiffError(f"--seed {args.seed}: give an integer >= 0")
    progress = Progress(args.progress, desc="simulate")
    try:  # all or nothing: the files move into --out only when every case is done
        paths = simulate_dataset(args.out, doses if len(doses) > 1 else doses[0], args.count, args.slices,
                                 size=args.size, seed=args.seed, kinds=args.kinds, fmt=args.format,
                                 progress=progress, replace=args.overwrite)
    except ValueError as exc:
        raise CoreDiffError(str(exc)) from None
    finally:
        progress.close()
    volumes = sum(1 for p in paths if not p.endswith(".json"))
    out = Path(paths[-1]).parent
    info(args, f"wrote {volumes} volumes and their manifest to {out}")
    leftovers = [p.name for p in left_by_killed_runs(out / "simulation")]  # its staging folders' name
    if leftovers:  # a run killed (SIGKILL, out of memory) before it could remove its staging folder
        info(args, f"note: {out} also holds {', '.join(leftovers)}, left by a simulation that was killed: "
                   "delete it")
    return 0


#: simulation.phantom.KINDS, the default order (not imported here: scipy.ndimage at every start; a
#: test keeps them equal)
SIMULATION_KINDS = ("abdomen", "thorax", "head")


def add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulate paired NDCT/LDCT volumes from phantoms",
                       description="Simulate paired normal-dose / low-dose CT volumes: seeded anthropomorphic "
                                   "phantoms (abdomen, thorax, head) scanned in a fan-beam geometry like a clinical "
                                   "scanner's, with Poisson and electronic noise at each dose and filtered "
                                   "back-projection. Needs astra-toolbox (pip install '.[simulation]').")
    p.add_argument("--dose", type=dose_fraction, nargs="+", action="extend", required=True,
                   help="low-dose fraction(s) of the full dose, in (0, 1), e.g. 0.25 0.1 (or 25%% 10%%); several "
                        "share one NDCT per case")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=int, default=1, help="number of phantom volumes (cases; default 1)")
    p.add_argument("--slices", type=int, default=16, help="slices per volume, 1 mm apart (default 16)")
    p.add_argument("--size", type=int, default=512, help="in-plane size in pixels, at least 64 (default 512)")
    p.add_argument("--kinds", nargs="+", choices=SIMULATION_KINDS, default=list(SIMULATION_KINDS),
                   help="phantom kinds, cycled over the cases: case 0 the first, case 1 the second... (default: "
                        "abdomen thorax head)")
    p.add_argument("--format", default="nrrd", choices=("nrrd", "nii.gz", "nii", "mha"),
                   help="file format (default nrrd)")
    p.add_argument("--seed", type=int, default=0,
                   help="anatomy and noise: the same seed, doses and settings give the same files; another "
                        "--size or --slices draws other details of the patient (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a simulation already in --out: its cases and manifest are removed once the new "
                        "one is complete (default: refuse, and keep it)")
    _add_progress(p)
    p.set_defaults(func=cmd_simulate)


# ----------------------------------------------------------------------------- models / devices
def cmd_models(args: argparse.Namespace) -> int:
    """``corediff models``: the shipped models and the saved adaptations (files only: no PyTorch)."""
    from .adaptations import list_adaptations
    from .manifest import WEIGHTS_DIR, load_manifest
    manifest = load_manifest()
    rows = [{"name": name, "path": str(WEIGHTS_DIR / e["file"]), "kind": "model",
             "description": e.get("description", ""), "dose": e.get("dose"),
             "default": name == manifest.get("default")}
            for name, e in manifest.get("models", {}).items()]
    rows += list_adaptations()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            star = "*" if r.get("default") else " "
            print(f"{star} {r['name']:<24} {r['kind']:<10} {r.get('description', '')}")
        if any(r.get("default") for r in rows):
            print("(* = the model run where --model auto, the default, cannot measure a scan's dose; it picks "
                  "the model of the dose each scan looks like)")
    return 0


def cmd_dose(args: argparse.Namespace) -> int:
    """``corediff dose IN``: what ``--model auto`` measures on a scan and the model it would run."""
    from .dose_estimate import caveats, choose_model_or_default
    from .io import read_volume
    from .orientation import axial_view
    from .streaming import earlier_corediff, earlier_corediff_of_file
    volume = read_volume(args.input, args.series, note)
    choice = choose_model_or_default(*axial_view(volume))
    # a CoreDiff output has little noise left: it reads as a dose far above the one it was scanned at
    denoised = earlier_corediff_of_file(args.input) or earlier_corediff(volume.dicom_tags)
    if denoised:
        note(f"note: {args.input} was denoised by CoreDiff ({denoised}): what follows measures the denoised "
             "scan, not the dose it was scanned at; measure the original scan")
    if choice.problem is not None:  # what denoise then does (unless --model auto is given explicitly)
        why = (f"{choice.problem}, so its dose cannot be estimated: denoise runs the default model {choice.model} "
               "(and refuses the scan when --model auto is given explicitly)")
        if args.json:
            print(json.dumps({"input": str(args.input), "estimated_dose": None, "model": choice.model,
                              "caveat": why}, indent=1))
        else:
            print(f"note: {why}")
        return 0
    model, scan, dose = choice.model, choice.scan, choice.dose
    row = {"input": str(args.input), "noise_index_hu": round(scan.noise_index_hu, 2),
           "water_equivalent_diameter_mm": round(scan.wed_mm, 1), "slices_measured": scan.slices,
           "slices_cut_off": scan.cut_slices, "estimated_dose": round(dose, 4), "model": model,
           "caveat": "; ".join(caveats(scan, dose)) or None,
           "denoised_by_corediff": denoised}
    if args.json:
        print(json.dumps(row, indent=1))
    else:
        print(f"noise index {scan.noise_index_hu:.1f} HU (mode of the 6 mm local SD over soft tissue, "
              f"{scan.slices} slices)\nwater-equivalent diameter {scan.wed_mm:.0f} mm (median over those slices)\n"
              f"looks like {100 * dose:.1f} % of the simulated normal dose\n--model auto runs {model}")
        for caveat in caveats(scan, dose):
            print(f"note: {caveat}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import torch
    threads = torch.get_num_threads()
    rows = [{"name": "cpu", "label": f"CPU ({threads} thread{'' if threads == 1 else 's'})", "memory_gb": None}]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        prop = torch.cuda.get_device_properties(i)
        gb = prop.total_memory / 2**30
        rows.append({"name": f"cuda:{i}", "label": f"{prop.name} ({gb:.0f} GiB)", "memory_gb": round(gb, 1)})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        rows.append({"name": "mps", "label": "Apple GPU (MPS)", "memory_gb": None})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<8} {r['label']}")
    return 0


def add_info_parsers(sub) -> None:
    p = sub.add_parser("models", help="list shipped models and saved one-shot adaptations")
    p.add_argument("--json", action="store_true", help="one JSON list, for scripts (the Slicer module reads it)")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("devices", help="list compute devices PyTorch can use")
    p.add_argument("--json", action="store_true", help="one JSON list, for scripts (the Slicer module reads it)")
    p.set_defaults(func=cmd_devices)
    p = sub.add_parser("dose", help="the dose a scan looks like (noise for its size) and the model --model auto "
                                    "runs on it")
    p.add_argument("input", help="CT volume (file or DICOM folder)")
    _add_series(p)
    p.add_argument("--json", action="store_true", help="the estimate as one JSON object, for scripts")
    p.set_defaults(func=cmd_dose)


# ----------------------------------------------------------------------------- oneshot, bench
def _handler(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A sub-command whose code lives in its own module (one-shot learning, the benchmark), imported
    when that command runs: both load PyTorch, and `corediff --help`, compare, simulate and dose
    start without it."""
    def run(args: argparse.Namespace) -> int:
        import importlib
        return getattr(importlib.import_module(f".{module}", __package__), name)(args)
    return run


def add_oneshot_parser(sub) -> None:
    p = sub.add_parser("oneshot", help="adapt a model to a new dose level from one reference slice",
                       description="Learn T step weights (one-shot learning) that adapt a trained model to a "
                                   "new dose level or scanner from ONE reference LDCT slice and a normal-dose "
                                   "slice: paired (--ndct, the same scan) or unpaired (--ndct-unpaired).")
    p.add_argument("--model", default=AUTO_MODEL,
                   help="base model: auto (default; the shipped model of the dose nearest the one --ldct looks "
                        "like), a shipped model name, or a .safetensors file")
    p.add_argument("--ldct", required=True, help="LDCT volume at the new dose (file or DICOM folder)")
    p.add_argument("--slice", type=int, required=True, help="reference slice index (0-based) in --ldct")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ndct", help="paired: the aligned normal-dose volume of the same scan")
    g.add_argument("--ndct-unpaired", help="unpaired: a normal-dose volume, not aligned")
    p.add_argument("--ndct-slice", type=int, default=None,
                   help="unpaired: slice of --ndct-unpaired to use (default: --slice + 2, clamped)")
    p.add_argument("--name", required=True, help="adaptation name (saved as NAME.json in the user folder)")
    p.add_argument("--dose", default=None, help="dose label stored with the adaptation, e.g. 10%%")
    p.add_argument("--out", default=None, help="write the adaptation to this .json instead")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adaptation")
    p.add_argument("--seed", type=int, default=0,
                   help="the fit's patch draws: the same seed and inputs give the same weights (default 0)")
    p.add_argument("--iterations", type=int, default=600, help="optimisation steps (default 600)")
    p.add_argument("--patch-size", type=int, default=96, help="patch size for the fit (default 96)")
    p.add_argument("--ssim-weight", type=float, default=0.0,
                   help="paired: add w*(1-SSIM) to the MSE, which is on the [0, 1] scale (~1e-4 for a good "
                        "denoiser): w of 1e-4 to 1e-3 balances the two, 0.05 and more lets SSIM decide alone")
    p.add_argument("--device", default="auto", help="auto (default: a GPU if there is one), cpu, cuda, cuda:N or mps")
    _add_progress(p)
    p.set_defaults(func=_handler("oneshot", "cmd_oneshot"))


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure speed, memory and accuracy of the ways to run a model")
    p.add_argument("--model", action="append",
                   help="shipped model name or .safetensors file (repeatable; default: the default model, "
                        "unless --width is given)")
    p.add_argument("--width", type=int, action="append",
                   help="benchmark an untrained network of this width (repeatable; 64 = the paper)")
    p.add_argument("--size", type=int, default=512, help="slice size in pixels (default 512)")
    p.add_argument("--device", default="auto", help="auto (default: a GPU if there is one), cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,2,4 (default 1)")
    p.add_argument("--precisions", default="fp32", help="comma list of fp32,tf32,bf16,fp16 (default fp32)")
    p.add_argument("--channels-last", nargs="?", const="both", default=None, choices=["both", "only"],
                   help="also run channels-last variants ('--channels-last only': only those)")
    p.add_argument("--compile", default="eager",
                   help="comma list of back-ends: eager,compile,cudagraphs,onnx (default eager)")
    p.add_argument("--threads", default=None, help="CPU threads to try, comma list (default: physical cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up (their median; default 3)")
    p.add_argument("--slices", type=int, default=None, help="slices per pass (default: largest batch)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps actually run (default T); fewer steps time fewer network "
                        "evaluations and the table also scales s/slice to T")
    p.add_argument("--json", default=None, help="write all rows as JSON")
    p.add_argument("--markdown", default=None, help="write the table as Markdown")
    p.set_defaults(func=_handler("benchmark", "cmd_bench"), progress="none")


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """Every sub-command's parser; each command's code is imported when it runs."""
    parser = argparse.ArgumentParser(prog="corediff", description="CoreDiff low-dose CT denoising: "
                                     "denoise scans, compare results, simulate, train and adapt models.")
    parser.add_argument("--version", action="version", version=f"corediff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    adders: list[Callable] = [add_denoise_parser, add_train_parser, add_compare_parser, add_simulate_parser,
                              add_info_parsers, add_oneshot_parser, add_bench_parser]
    for add in adders:
        add(sub)
    return parser


class _Terminated(SystemExit):
    """SIGTERM (Slicer's Cancel, `timeout`, a scheduler), unwinding like Ctrl-C so that temporary
    files are removed, and said like it: a log must tell a stopped run from a finished one."""


def _terminate(signum, frame):
    raise _Terminated(128 + signum)


def _drop_stdout() -> None:
    """After stdout's reader has left: point stdout at /dev/null, so that Python's flush at exit
    raises no second BrokenPipeError."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A library warning (e.g. a faster back-end unavailable) as one line, not Python's source dump."""
    return f"corediff: warning: {message}\n"


def _not_utf8(given: list[str]) -> str | None:
    """The first argument that is not valid UTF-8 (a file name from another system's encoding,
    which Python keeps as surrogates): SimpleITK aborts on it, the file system calls raise."""
    for text in given:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(text).decode("utf-8", "backslashreplace")  # its bytes: M\xfcller.nrrd
    return None


def main(argv: list[str] | None = None) -> int:
    bad = _not_utf8(sys.argv[1:] if argv is None else list(argv))
    if bad is not None:
        print(f"corediff: error: {bad} is not valid UTF-8 (a name in another system's encoding?): rename the file "
              "or folder to a UTF-8 name", file=sys.stderr, flush=True)
        return 2
    sigterm = signal.signal(signal.SIGTERM, _terminate)
    python_format, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        try:
            args = build_parser().parse_args(argv)
        except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing was started
            print("corediff: error: interrupted; no output was written", file=sys.stderr, flush=True)
            return 130
        return _run(args)
    finally:  # a notebook or a test calling main() keeps its own SIGTERM handling and warning format
        signal.signal(signal.SIGTERM, sigterm)
        warnings.formatwarning = python_format


def _run(args: argparse.Namespace) -> int:
    """The subcommand, with every user-facing failure as one line and exit code 2."""
    from . import atomic
    atomic.published.clear()
    try:
        return int(args.func(args) or 0)
    except CoreDiffError as exc:
        print(f"corediff: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except _Terminated as exc:
        print(f"corediff: error: stopped by SIGTERM; {_written()}", file=sys.stderr, flush=True)
        return int(exc.code)
    except KeyboardInterrupt as exc:  # a training run says where it saved its checkpoint
        print(f"corediff: error: {str(exc) or 'interrupted; ' + _written()}", file=sys.stderr, flush=True)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))  # 130 for Ctrl-C; a training run's SIGTERM: 143
    except BrokenPipeError:  # stdout's reader left (| head): what was said to be written is complete
        _drop_stdout()
        print("corediff: error: stdout was closed (its reader left); the outputs reported as written are "
              "complete, the others were not written", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # a full disk, a permission changed mid-run...: outputs are written atomically
        name = str(getattr(exc, "filename", None) or "")
        # a hidden temporary file means nothing to the user: the folder the output was written in does
        where = (f" (writing in {Path(name).parent})" if ".partial-" in Path(name).name or ".corediff-" in name
                 else f" ({name})" if name else "")
        print(f"corediff: error: {exc.strerror or exc}{where}; {_written()}", file=sys.stderr, flush=True)
        return 2


def _written() -> str:
    """What an interrupted or failed command left: nothing, or the outputs it had completed (a
    signal just after an output was put in place must not call a complete output unwritten)."""
    from .atomic import published
    # a file written inside another output's temporary file or folder is no output of its own
    done = [p for p in dict.fromkeys(published) if ".partial-" not in p and os.path.lexists(p)]
    if not done:
        return "no output was written"
    return (f"{', '.join(done)} {'was' if len(done) == 1 else 'were'} written (complete); "
            "what would have come after was not done")

if __name__ == "__main__":
    sys.exit(main())

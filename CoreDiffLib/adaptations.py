"""Saved one-shot adaptations: an :class:`Adaptation` (T logits that blend a frozen model's
sampler states, tied to that model's sha256 and T), its JSON file, where such files are kept
(``$COREDIFF_HOME/adaptations``), and how names resolve and list.

Apart from the fitting (:mod:`CoreDiffLib.oneshot`) because reading and listing them needs no
PyTorch: ``corediff models`` and the Slicer module's model list run without importing it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import CoreDiffError
from .atomic import OutputAppeared, atomic_path, write_text_atomic

if TYPE_CHECKING:
    import torch

_FORMAT_PREFIX = "corediff-oneshot-v"
FORMAT = "corediff-oneshot-v2"  # v2 (2026-12-05): weights over the sampler's states, not its x0 estimates
_OLD_FORMATS = {"corediff-oneshot-v1": "it weighs the per-step x0 estimates, which this version no longer blends"}
MODES = ("paired", "unpaired")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # fullmatch: '$' would let a final newline by


# ----------------------------------------------------------------------------- storage
def adaptations_dir() -> Path:
    """``$COREDIFF_HOME/adaptations`` (default ``~/.corediff/adaptations``); not created here."""
    home = os.environ.get("COREDIFF_HOME") or "~/.corediff"
    return Path(home).expanduser() / "adaptations"


def validate_name(name: str) -> str:
    """An adaptation name is a plain file stem: letters, digits, '.', '_', '+', '-'."""
    name = str(name)
    if not name or "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        raise CoreDiffError(f"adaptation name '{name}' must be a plain name without path separators "
                            "(use --out FILE to choose where the file goes)")
    if name in (".", "..") or not _NAME_RE.fullmatch(name):
        raise CoreDiffError(f"adaptation name '{name}' is not allowed: use 1-100 letters, digits, "
                            "'.', '_', '+' or '-', starting with a letter or digit")
    return name


def default_path(name: str) -> Path:
    return adaptations_dir() / f"{validate_name(name)}.json"


def resolve_adaptation(name_or_path: str | os.PathLike) -> Path:
    """A saved name in :func:`adaptations_dir` (checked first), else an existing file path."""
    text = str(name_or_path)
    looks_like_name = bool(_NAME_RE.fullmatch(text)) and "/" not in text and "\\" not in text
    if looks_like_name:
        candidate = adaptations_dir() / f"{text}.json"
        if candidate.is_file():
            return candidate
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if looks_like_name and text.lower().endswith(".json") and (adaptations_dir() / text).is_file():
        return adaptations_dir() / text  # a saved adaptation by its file's name (d10.json for d10)
    if looks_like_name and not text.lower().endswith(".json"):
        known = ", ".join(r["name"] for r in list_adaptations()) or "none saved yet"
        raise CoreDiffError(f"adaptation '{text}' is neither a file nor a saved adaptation in "
                            f"{adaptations_dir()} (known: {known}); run 'corediff oneshot' first")
    raise CoreDiffError(f"adaptation file {text} does not exist")


def model_identity(model: torch.nn.Module) -> str:
    """The sha256 an adaptation is tied to: the weights file's (set by ``load_model``), or,
    for a model built in memory, a hash of its parameters prefixed ``state:``."""
    sha = getattr(model, "weights_sha256", None)
    if sha:
        return str(sha)
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return "state:" + h.hexdigest()


# ----------------------------------------------------------------------------- the adaptation
def combine_steps(steps: torch.Tensor, logits: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """sum_k softmax(logits)_k * steps[k] for steps (T, ...) — differentiable, not clamped."""
    import torch
    w = torch.as_tensor(logits, dtype=steps.dtype, device=steps.device)
    if w.ndim != 1 or w.shape[0] != steps.shape[0]:
        raise ValueError(f"{w.shape[0] if w.ndim == 1 else w.shape} weights for {steps.shape[0]} steps")
    p = torch.softmax(w, dim=0)
    return torch.tensordot(p, steps, dims=1)


@dataclass
class Adaptation:
    """T logits that blend a frozen model's per-step sampler states for one dose level / scanner."""

    name: str
    base_sha256: str
    dose: str | None
    mode: str                     # 'paired' | 'unpaired'
    reference_slice: int
    ndct_slice: int
    steps: int                    # T of the base model
    weights: list[float]          # logits; softmax(weights) are the step weights
    info: dict = field(default_factory=dict)  # loss, iterations, seed, sources, timings...

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CoreDiffError(f"adaptation mode '{self.mode}' is not one of {', '.join(MODES)}")
        if self.steps < 1:  # a blend of no steps has no probabilities: the model list crashed on one
            raise CoreDiffError(f"adaptation '{self.name}' weighs T={self.steps} steps: it is corrupt")
        if len(self.weights) != self.steps:
            raise CoreDiffError(f"adaptation '{self.name}' has {len(self.weights)} weights for T={self.steps}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.weights):
            raise CoreDiffError(f"adaptation '{self.name}' has weights that are not numbers: it is corrupt")
        self.weights = [float(v) for v in self.weights]
        # the blend runs in float32: a logit past ~1e38 (or a spread past ~80) makes its softmax NaN or
        # all-but-one zero, and the output 0 HU; trained ones stay within a few units
        if not all(math.isfinite(v) and abs(v) < 1e4 for v in self.weights):
            raise CoreDiffError(f"adaptation '{self.name}' has non-finite or absurd weights: it is corrupt")

    @property
    def probabilities(self) -> list[float]:
        """softmax(weights): the blend of steps (sums to 1); index 0 = first sampling step."""
        w = np.asarray(self.weights, dtype=np.float64)
        e = np.exp(w - w.max())
        return (e / e.sum()).tolist()

    def combine(self, steps: torch.Tensor) -> torch.Tensor:
        """(T, B, 1, H, W) per-step sampler states -> (B, 1, H, W) blend clamped to [0, 1]."""
        if steps.shape[0] != self.steps:
            raise CoreDiffError(f"adaptation '{self.name}' weighs {self.steps} steps but the sampler "
                                f"produced {steps.shape[0]}: run all of the model's T steps")
        return combine_steps(steps.float(), self.weights).clamp(0.0, 1.0)  # fp32 even for bf16 steps

    def to_dict(self) -> dict:
        d = {"format": FORMAT, **asdict(self)}
        d["probabilities"] = [round(p, 6) for p in self.probabilities]  # informational
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "adaptation") -> "Adaptation":
        fmt = d.get("format") if isinstance(d, dict) else None
        if isinstance(fmt, str) and fmt in _OLD_FORMATS:
            raise CoreDiffError(f"{source} was made by an earlier CoreDiff ({fmt}: {_OLD_FORMATS[fmt]}): run "
                                "'corediff oneshot' again to refit it (the same --name replaces it)")
        if isinstance(fmt, str) and fmt.startswith(_FORMAT_PREFIX) and fmt != FORMAT:
            raise CoreDiffError(f"{source} was made by a newer CoreDiff ({fmt}; this one reads {FORMAT}): "
                                "update CoreDiff to use it")
        if fmt != FORMAT:
            raise CoreDiffError(f"{source} is not a CoreDiff one-shot adaptation (format {FORMAT} expected)")
        try:
            whole = {k: d[k] for k in ("reference_slice", "ndct_slice", "steps")}
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in whole.values()):
                raise TypeError(f"whole numbers expected: {whole}")
            if not isinstance(d["weights"], list) or not isinstance(d["name"], str):
                raise TypeError("weights must be a list and name a string")
            dose = d.get("dose")
            adaptation = cls(name=d["name"], base_sha256=str(d["base_sha256"]),
                             dose=None if dose is None else str(dose), mode=str(d["mode"]), **whole,
                             weights=list(d["weights"]), info=dict(d.get("info") or {}))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CoreDiffError(f"{source} is an incomplete or corrupt adaptation ({exc!r})") from None
        except CoreDiffError as exc:  # named by its file: the name inside may be another file's
            raise CoreDiffError(f"{source}: {exc}") from None
        shown = d.get("probabilities")  # written for people to read; a hand edit there changes nothing
        if shown is not None and not (isinstance(shown, list) and len(shown) == adaptation.steps and all(
                isinstance(v, (int, float)) and abs(v - p) < 1e-3 for v, p in zip(shown, adaptation.probabilities))):
            raise CoreDiffError(f"{source}: its 'probabilities' disagree with its 'weights' (edited by hand?); "
                                "the weights are what a run uses: delete the probabilities line, or refit")
        return adaptation

    def save(self, path: str | os.PathLike | None = None, overwrite: bool = True,
             replace_outdated: bool = False) -> Path:
        """Write JSON atomically (temp file + rename) to ``path`` or the user directory.

        ``overwrite`` False: refuse if the file exists by the time it is written (another run
        may have saved one of that name meanwhile), checked and written in one step (a hard link);
        with ``replace_outdated`` a file that is still an outdated one (:func:`is_outdated`) then
        is replaced, and a usable one saved meanwhile kept.
        """
        out = Path(path).expanduser() if path is not None else default_path(self.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if overwrite:
            return write_text_atomic(out, text)
        try:
            with atomic_path(out, replace=False) as tmp:  # checked and written in one step
                tmp.write_text(text, encoding="utf-8")
        except OutputAppeared:
            if not (replace_outdated and is_outdated(out)):
                raise CoreDiffError(f"{out} was saved by another run meanwhile; kept it. Run again with "
                                    "another --name/--out, or --overwrite") from None
            write_text_atomic(out, text)
        return out

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Adaptation":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))  # as written, whatever the locale
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON
            raise CoreDiffError(f"cannot read adaptation {path}: {type(exc).__name__}: {exc}"[:300]) from None
        return cls.from_dict(d, str(path))


def is_outdated(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an adaptation in a format an earlier CoreDiff wrote: unusable now, and
    replaced by a new fit of the same name without --overwrite (there is nothing to keep)."""
    try:
        fmt = json.loads(Path(path).read_text(encoding="utf-8")).get("format")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return False
    return isinstance(fmt, str) and fmt in _OLD_FORMATS


def _read_adaptation(name_or_path) -> tuple[Adaptation, str]:
    if isinstance(name_or_path, Adaptation):
        return name_or_path, f"adaptation '{name_or_path.name}'"
    path = resolve_adaptation(name_or_path)
    adaptation = Adaptation.read(path)
    adaptation.source = path  # what a run used, for its provenance: the name inside may be another's
    return adaptation, str(path)


def adaptation_base_model(name_or_path) -> str | None:
    """The model an adaptation was learned for: a shipped model's name, or the weights file it
    recorded if that file still has the recorded sha256; None when neither is found.

    Why: an adaptation only fits its own base model, and the default model can change between
    releases (it did on 2026-12-04), so "the default" is not where an old adaptation belongs.
    """
    from .manifest import sha256_of, shipped_models
    if not isinstance(name_or_path, (str, os.PathLike, Adaptation)):
        return None  # an in-memory stand-in with its own combine(): nothing recorded to look up
    adaptation, _ = _read_adaptation(name_or_path)
    for name, entry in shipped_models().items():
        if entry.get("sha256") == adaptation.base_sha256:
            return name
    recorded = adaptation.info.get("base_model")
    if isinstance(recorded, str) and recorded and Path(recorded).is_file() \
            and sha256_of(recorded) == adaptation.base_sha256:
        return str(recorded)
    return None


def _recorded_base(adaptation: Adaptation):
    """The base model an adaptation's fit recorded (as asked for, else its file), or None."""
    return adaptation.info.get("model") or adaptation.info.get("base_model")


def missing_base_message(name_or_path) -> str:
    """Why an adaptation's base model cannot be found, for :func:`adaptation_base_model`'s None."""
    adaptation, source = _read_adaptation(name_or_path)
    recorded = _recorded_base(adaptation)
    return (f"{source} was learned for {recorded or 'a model'} (sha256 {adaptation.base_sha256[:12]}…), which is "
            "not installed here or has changed since the fit: give that model with --model, or run "
            "'corediff oneshot' again")


def load_adaptation(name_or_path, model: torch.nn.Module) -> Adaptation:
    """Load a saved adaptation (name or file) and check it belongs to ``model``."""
    adaptation, source = _read_adaptation(name_or_path)
    sha = model_identity(model)
    if adaptation.base_sha256 != sha:
        base = _recorded_base(adaptation)
        given = getattr(model, "weights_path", None)
        same = base and given and Path(str(base)).stem == Path(str(given)).stem
        raise CoreDiffError(f"{source} was learned for another model ({f'{base}, ' if base else ''}sha256 "
                            f"{adaptation.base_sha256[:12]}…), not this one "
                            f"({f'{Path(str(given)).stem}, ' if given else ''}sha256 {sha[:12]}…)"
                            + (": that model has changed since the fit (an update?): run 'corediff oneshot' again"
                               if same else ": use it with its own model, or run 'corediff oneshot' for this model"))
    T = model.config.steps
    if adaptation.steps != T:
        raise CoreDiffError(f"{source} has {adaptation.steps} step weights but the model samples T={T} steps")
    return adaptation


def list_adaptations() -> list[dict]:
    """Saved adaptations, for ``corediff models`` and the Slicer module."""
    folder = adaptations_dir()
    rows = []
    if not folder.is_dir():
        return rows
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):  # a write cut short before its rename (atomic.partial_path)
            continue
        try:
            a = Adaptation.read(path)
        except CoreDiffError as exc:  # listed, so that its name taken by it is no mystery
            outdated = is_outdated(path)  # a new fit of its name replaces it without --overwrite
            newer = "newer CoreDiff" in str(exc)  # another installation's: not to be deleted from here
            if outdated:
                why = "outdated, cannot be used: adapt again with the same name"
            elif newer:
                why = f"cannot be used by this version ({exc})"
            else:
                why = f"damaged, cannot be used ({exc}): delete {path} or adapt again with --overwrite"
            rows.append({"name": path.stem, "path": str(path), "kind": "adaptation", "damaged": True,
                         "outdated": outdated, "newer": newer, "description": why})
            continue
        probs = a.probabilities
        best = int(np.argmax(probs))
        base = a.info.get("base_model")
        found = adaptation_base_model(a) is not None
        desc = (f"one-shot {a.mode} adaptation" + (f" for dose {a.dose}" if a.dose else "")
                + (f" of {Path(base).stem}" if isinstance(base, str) and base else "")
                + f", T={a.steps}, peak weight {probs[best]:.2f} on step {best + 1}"
                + ("" if found else "; its base model is missing or has changed since the fit: give it with "
                   "--model, or adapt again"))
        rows.append({"name": path.stem, "path": str(path), "kind": "adaptation", "description": desc,
                     "dose": a.dose, "base_sha256": a.base_sha256, "mode": a.mode,
                     "base_model": base if isinstance(base, str) else None, "base_found": found})
    return rows

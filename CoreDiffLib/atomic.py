"""Writing a file so that no reader ever sees half of it.

Every output CoreDiff writes (denoised volumes, weights, checkpoints, manifests, figures,
tables, caches) goes first to a hidden temporary sibling and is renamed over the target only
once it is complete (and flushed to the disk). ``os.replace`` within one folder is atomic, so a
crash, a cancel, a full disk or an exception in the writer leaves either the old file or none at
all, never a torn one, and a reader of a cache or a checkpoint cannot load garbage.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from . import CoreDiffError


def partial_path(target: str | os.PathLike) -> Path:
    """A unique hidden sibling of ``target`` that keeps its extension.

    The extension is kept because SimpleITK, matplotlib and NumPy choose the format by it
    (``.nii.gz`` counts as one); process id and a random token keep concurrent writers of
    the same target apart.
    """
    target = Path(target)
    suffix = "".join(target.suffixes[-2:]) if target.name.lower().endswith(".gz") else target.suffix
    return target.with_name(f"{partial_prefix(target)}{secrets.token_hex(3)}{suffix}")


def partial_prefix(target: str | os.PathLike) -> str:
    """The hidden name this process's partial files and folders of ``target`` begin with; the
    process id in it tells a killed run's leftovers from a live run's (:func:`left_by_killed_runs`)."""
    return f".{Path(target).name}.partial-{os.getpid()}-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine); True where that cannot be told."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process there: keep every file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process (alive); else no way to tell: keep its file
        return True
    return True


def left_by_killed_runs(target: str | os.PathLike) -> list[Path]:
    """``target``'s hidden partial files and folders (:func:`partial_path`, :func:`partial_folder`,
    a streamed output's raw data) whose process is gone: a run killed outright (SIGKILL, the
    out-of-memory killer) removes nothing, and a streamed volume's raw data is its whole size."""
    target = Path(target)
    prefix = f".{target.name}.partial-"
    found = []
    for path in target.parent.glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            found.append(path)
    return sorted(found)


def check_output_file(flag: str, path: str | os.PathLike, suffixes: Sequence[str],
                      inputs: Iterable[str | os.PathLike | None] = (), replace: bool = True) -> Path:
    """Refuse an output file before any work is done, with a message naming ``flag``.

    The type must be what is written there (``suffixes``), so that a table or weights cannot
    land on a volume named by mistake; it must not be one of the command's ``inputs`` (they
    are never overwritten); its folder must exist, or the finished work could not be saved;
    and with ``replace`` False it must not exist yet (the command's ``--overwrite`` allows it).
    """
    out = Path(path).expanduser()
    if not out.name.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise CoreDiffError(f"{flag} {path}: give a file name ending in {' or '.join(suffixes)}")
    resolved = out.resolve()
    for given in inputs:
        if given is not None and Path(given).expanduser().resolve() == resolved:
            raise CoreDiffError(f"{flag} {path} is also an input: write it elsewhere (inputs are never overwritten)")
    if resolved.is_dir():
        raise CoreDiffError(f"{flag} {path} is a folder: give a file name")
    if not replace and os.path.lexists(out):
        raise CoreDiffError(f"{flag} {path} exists: choose a new name, or give --overwrite to replace it")
    check_output_place(resolved, f"{flag} {path}")
    return out


def check_output_place(resolved: Path, label: str) -> None:
    """Refuse an output whose folder is missing, a file or read-only, or whose name would be too
    long once made a partial file's: the finished work could not be saved there."""
    if len(resolved.name.encode("utf-8")) > 200:  # the partial file's name adds about 30 bytes to it
        raise CoreDiffError(f"{label}: the file name is too long: keep it under 200 bytes")
    if not resolved.parent.exists():
        raise CoreDiffError(f"{label}: output folder {resolved.parent} does not exist: create it first")
    if not resolved.parent.is_dir():
        raise CoreDiffError(f"{label}: {resolved.parent} is a file, not a folder")
    if not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise CoreDiffError(f"{label}: output folder {resolved.parent} is not writable: "
                            "choose a folder you can write to")


#: the outputs :func:`publish` put in place in this process, in order: a command interrupted or
#: failing after one of them says it is complete, not that nothing was written
published: list[str] = []


class OutputAppeared(CoreDiffError):
    """A file appeared at an output's path while the run worked, and was kept (:func:`publish`)."""


def _placed(target: str | os.PathLike, output: bool) -> None:
    if output:
        published.append(str(target))


def _fsync(path: str | os.PathLike) -> None:
    """fsync ``path``; a file system that has no fsync (some FUSE and network mounts say EINVAL
    or ENOTSUP) is let be, but a failed write-back (EIO, ENOSPC) is the run's failure."""
    if os.name == "nt":  # no fsync through a read-only handle there; NTFS journals the rename
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF):
            raise
    finally:
        os.close(fd)


def flush_to_disk(done: Path) -> None:
    """Make the finished file (or a folder's files) durable before it is renamed into place. The
    rename can reach the disk before the data does: after a power cut or a crash of the machine,
    the output's name would hold an empty or torn file, the very thing the rename is there to
    prevent (a checkpoint that cannot be resumed from, a series with blank slices)."""
    if done.is_dir():
        for part in done.iterdir():
            if part.is_file():
                _fsync(part)
        _flush_folder(done)
    else:
        _fsync(done)


def _flush_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (its entry); best effort: some file systems refuse it."""
    with contextlib.suppress(OSError):
        _fsync(folder)


def publish(done: Path, target: str | os.PathLike, replace: bool = True, output: bool = True) -> None:
    """Put the finished file ``done`` at ``target``, flushed to the disk first (:func:`flush_to_disk`).
    With ``replace`` False a file that appeared at ``target`` while the run worked (another program,
    a second run with the same output) is kept and :class:`OutputAppeared` raised: checked and
    placed in one step (a hard link), with no moment between the two for it to appear in. ``done``
    is left for the caller to remove. ``output`` False: a cache of the library's own, not recorded
    in :data:`published`."""
    flush_to_disk(done)
    _place(done, target, replace, output)
    _flush_folder(Path(target).parent)


def _place(done: Path, target: str | os.PathLike, replace: bool, output: bool) -> None:
    if replace:
        os.replace(done, target)
        _placed(target, output)
        return
    try:
        os.link(done, target)
        _placed(target, output)
        return
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links (FAT, some network drives): checked, then moved
        if not os.path.lexists(target):
            os.replace(done, target)
            _placed(target, output)
            return
    raise OutputAppeared(f"{target} appeared while this run worked (another program or run wrote it): kept it, "
                         "and discarded this run's result")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` while several files are put in place as one
    output (a header and its data file): two runs replacing the same .mhd could otherwise pair
    one's header with the other's data. Where no lock can be had (Windows, some network
    mounts) the files are placed without one, as before."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (releases the lock)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, replace: bool = True, output: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``target`` if the block succeeds.

    If the block raises (or is interrupted), the temporary file is deleted and ``target`` is
    left exactly as it was. The writer creates the file itself, so it gets the usual
    permissions (the umask), not a private temp file's. ``replace`` False: a file that appeared
    at ``target`` meanwhile is kept (:func:`publish`); ``output`` False: a cache (see there).
    """
    tmp = partial_path(target)
    try:
        yield tmp
        publish(tmp, target, replace, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike | None, replace: bool = True) -> Iterator[list[Path | None]]:
    """:func:`atomic_path` for several outputs that are all written or none: a temporary path per
    target (None for a None target), every one put into place only when the block succeeds. If
    placing one fails (a file appeared there with ``replace`` False, a folder in the way, a
    signal), those already placed are taken back: a new one removed, a replaced one's former
    file put back (kept aside as a hard link until all are placed)."""
    temporaries = [partial_path(t) if t else None for t in targets]
    asides: dict[Path, Path] = {}  # target -> its former file, while the others are placed
    placed: list[Path] = []
    try:
        yield temporaries
        for tmp, target in zip(temporaries, targets):
            if tmp is None:
                continue
            target = Path(target)
            if replace and os.path.lexists(target):
                aside = partial_path(target)
                with contextlib.suppress(OSError):  # no hard links here: replaced without a way back
                    os.link(target, aside, follow_symlinks=False)
                    asides[target] = aside
            publish(tmp, target, replace)
            placed.append(target)
    except BaseException:
        for target in reversed(placed):
            with contextlib.suppress(OSError):
                if target in asides:
                    os.replace(asides.pop(target), target)
                else:
                    target.unlink()
            with contextlib.suppress(ValueError):
                published.remove(str(target))
        raise
    finally:
        for leftover in [*temporaries, *asides.values()]:
            if leftover is not None:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()


@contextlib.contextmanager
def partial_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new hidden folder beside ``target``, removed with whatever is left in it on exit.

    For outputs that are several files (a DICOM series, a .mhd header and its data): the
    caller writes them here and moves them into place itself, in an order that is safe.
    """
    target = Path(target)
    folder = Path(tempfile.mkdtemp(prefix=partial_prefix(target), dir=target.parent))
    # mkdtemp makes it private (0700): a DICOM series renamed into place from it would stay
    # unreadable to other users and PACS senders; give it what a new folder gets (the umask's)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class StopRequests:
    """While active, ``signals`` ask the work to stop at a point where it is safe to (``requested``
    turns true) instead of stopping it wherever it is; with ``second_stops`` a second one stops it
    at once (KeyboardInterrupt, or with ``second_exits`` SystemExit with the shell's code for the
    signal, 128 + its number: nothing more is written). Only in the main thread, where Python
    handles signals; a signal the process ignores (Ctrl-C in a job started in the background)
    stays ignored."""

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM), second_stops: bool = True,
                 second_exits: bool = False):
        self.requested = False
        self.signum: int | None = None  # the first signal that asked
        self._signals, self._second_stops, self._second_exits = tuple(signals), second_stops, second_exits
        self._previous: dict[int, object] = {}

    def _ask(self, signum, frame) -> None:
        if self.requested and self._second_stops:
            if self._second_exits:
                raise SystemExit(128 + signum)
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._ask)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


@contextlib.contextmanager
def deferred_interrupts(written: str = "the output") -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM (a cancel from Slicer, a scheduler) until the block ends,
    then deliver the first to its own handler: for the few renames that put a finished multi-file
    output in place, which a signal halfway would leave mixed.

    A held Ctrl-C with Python's own handler becomes a KeyboardInterrupt that says ``written`` is in
    place (the CLI said "no output was written" of a complete output)."""
    with StopRequests((signal.SIGINT, signal.SIGTERM), second_stops=False) as stop:
        yield
    if stop.requested:
        if stop.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            raise KeyboardInterrupt(f"interrupted once {written} was in place: it is complete; "
                                    "what would have come after it was not done")
        signal.raise_signal(stop.signum)


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically (UTF-8); returns the target as a Path."""
    target = Path(target)
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


@contextlib.contextmanager
def sole_writer(targets: Iterable[str | os.PathLike], command: str) -> Iterator[None]:
    """Refuse a second run that would write the same ``targets`` while this one runs.

    Two training runs with one --out or checkpoint overwrote each other's files. The lock is an
    OS lock (``flock``) on a small file in the temporary folder named after each target's full
    path: it goes with the process however it ends, SIGKILL included, so it never goes stale, and
    a run that ends normally removes its file. Where locks are unavailable (Windows, an unwritable
    temporary folder) the run goes on unlocked.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with contextlib.ExitStack() as held:
        for target in targets:
            full = str(Path(target).expanduser().resolve())
            lock = Path(tempfile.gettempdir()) / f"corediff-lock-{hashlib.sha1(full.encode()).hexdigest()[:16]}"
            while True:
                try:
                    f = open(lock, "a+", encoding="utf-8")
                except OSError:
                    f = None
                    break
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    f.close()
                    raise CoreDiffError(f"another {command} is writing {target} now ({holder}): wait for it to "
                                        "end, or give this one another --out and --checkpoint") from None
                try:  # the file locked is still the one at that name (a run ending removes its own)
                    if os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino:
                        break
                except FileNotFoundError:
                    pass
                f.close()
            if f is None:
                continue
            held.callback(f.close)
            held.callback(_remove_quietly, lock)  # runs first: removed while still locked
            f.truncate(0)
            f.write(f"process {os.getpid()}")
            f.flush()
        yield


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass

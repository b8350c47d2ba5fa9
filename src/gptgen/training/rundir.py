"""The run directory of a training run: who may write it, and what an earlier run left in it.

claim_run_dir() is called by fit() (rank 0) and may be called earlier by a command that writes into the run
directory before training starts (the CLI's trained tokenizer). It

- refuses a path that is a file, or whose parent cannot be created;
- takes an exclusive lock on RUN_LOCK inside the directory (fcntl.flock, so the kernel releases it when the
  process ends, even by kill -9); a second run on the same directory gets one sentence naming the pid of
  the run that holds it;
- refuses a directory that holds an earlier run (any of last/, best/, metrics.jsonl) unless resume=True
  (continue it from last/) or overwrite=True (remove that run's last/, best/, metrics.jsonl, curves.png and
  start again). Nothing else in the directory is touched, and last/ or best/ holding files gptgen did not
  write are refused even with overwrite, and so are a metrics.jsonl or curves.png not recorded as gptgen's
  in the directory's .gptgen-written.json (gptgen.written);
- refuses the filesystem root and the home directory itself.

Claims are re-entrant within a process: a claim on a directory this process already holds checks nothing
again and releases the lock only when the outermost claim is released.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import checkpoint, written
from ..errors import TrainingError

RUN_LOCK = ".gptgen-run.lock"
RUN_MARKERS = ("last", "best", "metrics.jsonl")  # what makes a directory hold an earlier run
RUN_FILES = ("metrics.jsonl", "curves.png")  # files of a run that overwrite removes (besides last/, best/)

_held: dict[Path, list] = {}  # resolved run directory -> [open lock file, claim count]


class RunDirClaim:
    """The lock on one run directory; release() (or leaving a `with` block) gives it up."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        entry = _held.get(self.directory)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[self.directory]
            entry[0].close()  # closing the descriptor drops the flock

    def __enter__(self) -> "RunDirClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a Trainer dropped without finishing must not keep the directory locked
        try:
            self.release()
        except Exception:
            pass


def holds_run(directory: str | os.PathLike) -> bool:
    """True when the directory holds (part of) an earlier run: last/, best/ or metrics.jsonl (or last/ moved
    aside by a kill during a checkpoint write). Changes nothing: another run may be writing there."""
    directory = Path(directory)
    return (any((directory / name).exists() for name in RUN_MARKERS)
            or any(directory.glob(".last.old-*/x")))


def _prepare_dir(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise TrainingError(f"The output directory {directory} is a file; choose a directory for the run.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parent = directory.parent
        while not parent.exists() and parent.parent != parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise TrainingError(f"Cannot create the output directory {directory}: {parent} is a file.") from None
        raise TrainingError(f"Cannot create the output directory {directory} ({exc.strerror or exc}).") from None


def _in_use(directory: Path, handle) -> TrainingError:
    handle.seek(0)
    holder = handle.read().strip()
    handle.close()
    who = f"pid {holder}" if holder.isdigit() else "another process"
    return TrainingError(f"{directory} is in use by another training run ({who}); wait for it to end or choose "
                         "another output directory.")


def _check_not_in_use(directory: Path) -> None:
    """TrainingError naming the holder when another process holds the directory's lock (nothing kept)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return

    if Path(os.path.abspath(directory)).resolve() in _held:
        return
    try:
        handle = open(directory / RUN_LOCK, "r", encoding="utf-8")
    except OSError:
        return  # no lock file: no run has ever locked it
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _in_use(directory, handle) from None
    handle.close()


def _lock(directory: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        fcntl = None
    path = directory / RUN_LOCK
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise TrainingError(f"Cannot write in the output directory {directory} ({exc.strerror or exc}).") from None
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _in_use(directory, handle) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _remove_run(directory: Path) -> None:
    """Remove what an earlier run wrote (overwrite=True); refuse last/ or best/ holding foreign files."""
    for name in ("last", "best"):
        sub = directory / name
        if sub.is_symlink() or sub.is_file():
            raise TrainingError(f"{sub} is not a directory gptgen wrote, so overwrite does not remove it; move it "
                                "away or choose another output directory.")
        if sub.is_dir() and any(sub.iterdir()) and not checkpoint.is_model_dir(sub):
            raise TrainingError(f"{sub} holds files gptgen did not write, so overwrite does not remove it; move "
                                "them away or choose another output directory.")
    _check_run_files(directory)
    for name in ("last", "best"):
        if (directory / name).is_dir():
            shutil.rmtree(directory / name)
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)


def _run_file_is_ours(directory: Path, name: str) -> bool:
    """A run file is gptgen's when its record says so; a run directory written before the record existed
    counts its run files as gptgen's when last/ or best/ is a gptgen checkpoint."""
    if written.wrote(directory, name):
        return True
    if (directory / written.RECORD).exists():
        return False
    return any(checkpoint.is_model_dir(directory / sub) for sub in ("last", "best") if (directory / sub).is_dir())


def _check_run_files(directory: Path) -> None:
    """Refuse a run directory holding a metrics.jsonl or curves.png that gptgen did not write (a run would
    append to or replace it)."""
    for name in RUN_FILES:
        path = directory / name
        if (path.exists() or path.is_symlink()) and not _run_file_is_ours(directory, name):
            raise TrainingError(f"{path} is not a file gptgen wrote, so a run does not write over it; move it away "
                                "or choose another output directory.")


def check_run_dir(directory: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                  _locked: bool = False) -> None:
    """Raise TrainingError when a run may not start in directory (no lock kept, nothing changed): another
    run holds it, or it holds an earlier run and neither resume nor overwrite was asked for."""
    directory = Path(directory)
    written.check_not_root_or_home(directory, "The output directory", error=TrainingError)
    if directory.exists() and not directory.is_dir():
        raise TrainingError(f"The output directory {directory} is a file; choose a directory for the run.")
    if resume and overwrite:
        raise TrainingError("resume=True (--resume) continues a run and overwrite=True (--overwrite) replaces "
                            "it; pass only one of them.")
    if not directory.is_dir():
        return
    if not _locked:
        _check_not_in_use(directory)
    _check_run_files(directory)
    if overwrite or not holds_run(directory):
        return
    if not resume:
        raise TrainingError(f"{directory} already holds a training run; pass resume=True (--resume) to continue "
                            "it, overwrite=True (--overwrite) to replace it, or choose another output directory.")
    if not (directory / "last").is_dir() and not any(directory.glob(".last.old-*/x")):
        raise TrainingError(f"{directory} holds an earlier run but no checkpoint (last/) to resume from; pass "
                            "overwrite=True (--overwrite) instead of resume=True (--resume) to start it again.")


def claim_run_dir(directory: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> RunDirClaim:
    """Lock directory for this run after checking what it holds (see the module docstring)."""
    directory = Path(os.path.abspath(os.fspath(directory)))
    key = directory.resolve() if directory.exists() else directory
    if key in _held:
        _held[key][1] += 1
        return RunDirClaim(key)
    _prepare_dir(directory)
    key = directory.resolve()
    handle = _lock(directory)
    try:
        checkpoint.recover_dir(directory / "last")  # a kill between a checkpoint's two renames (we hold the lock)
        check_run_dir(directory, resume, overwrite, _locked=True)
        if overwrite:
            _remove_run(directory)
        written.record(directory, RUN_FILES, hashed=False)  # what this run writes and may later replace
    except BaseException:
        handle.close()
        raise
    _held[key] = [handle, 1]
    return RunDirClaim(key)

"""Files on shared storage: one atomic, symlink-safe way to write, one code-free way to read.

Run directories live on a volume that other people (and other jobs) can write to, so a file there
may be a planted symlink, a pickle with a payload, or the half of a file that a full disk cut.

Writing. `atomic_write` creates a temporary file *beside* the target with a random name and
``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted ``x.tmp`` symlink is never opened), writes, fsyncs,
renames it over the target (``rename`` replaces a symlink at the target itself, never what it
points to) and fsyncs the directory. `open_append` opens append-only logs and journals with
``O_NOFOLLOW``. A full disk (ENOSPC, EDQUOT) becomes `DiskFullError`, naming the file, and the
temporary file is removed, so a rerun after freeing space starts clean (also when the writer, like
``torch.save``, turns the write's ENOSPC into a RuntimeError of its own: the first OSError of a
write is remembered and reported instead). `fsync_tree` makes files another library wrote (a
DeepSpeed checkpoint) as durable as ours before they are renamed final.

The run directory's own folders (`RUN_DIR_FOLDERS`) are refused by name when they are symlinks
(`check_run_dir`, `own_dir`): a planted ``checkpoints -> /elsewhere`` would otherwise have snapshots
written, and stale ones deleted, through it.

Reading. `load_torch` is ``torch.load(weights_only=True)``: tensors, containers and primitive
types only, so nothing in the file can run code; a refused file raises `UnsafeFileError` naming
it and the reason (the pickle global it asked for).
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

import torch

from sagan_dist.errors import Reported

Payload = Union[bytes, str, Callable[[IO[bytes]], None]]
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError, Reported):
    """No space (or quota) left while writing a file; the message names the file."""


class UnsafeFileError(RuntimeError, Reported):
    """A file that would run code if loaded, or that is not what it should be; it was not loaded."""


# The folders a run writes under its run directory; a symlink at any of them is refused.
RUN_DIR_FOLDERS = ("checkpoints", "samples", "attention", "tracking", "fidelity-cache", "data")


def disk_full(e: OSError, path: Path) -> OSError:
    """``e`` as a DiskFullError naming ``path`` if it is ENOSPC/EDQUOT, else ``e`` itself."""
    if e.errno in DISK_FULL:
        return DiskFullError(e.errno, f"disk full (or quota exceeded) while writing {path}: "
                                      f"{os.strerror(e.errno)}; free space on that volume and run again")
    return e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (and ``root``), never following a symlink."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue  # a link is not ours to sync
                raise
            try:
                os.fsync(fd)
            except OSError as e:
                raise disk_full(e, path) from e
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


class _Recorder:
    """A file object that remembers the first OSError of a write, for writers that replace it
    with their own error (torch.save reports ENOSPC as ``inline_container.cc: unexpected pos``)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, payload: Payload, mode: int = 0o644) -> Path:
    """Write ``payload`` (bytes, text, or a function given the open binary file) to ``path`` atomically.

    Readers see the old file or the new one, never a part; a symlink at ``path`` is replaced, not
    followed. The parent directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp: random name, O_CREAT | O_EXCL (so never an existing file or symlink), mode 0600.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(payload):
                recorder = _Recorder(f)
                payload(recorder)  # type: ignore[arg-type]
            else:
                f.write(payload.encode() if isinstance(payload, str) else payload)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_full(e, path) from e
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if recorder is not None and recorder.error is not None:
            raise disk_full(recorder.error, path) from e
        raise
    return path


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through `atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def open_append(path: str | os.PathLike, binary: bool = True) -> IO:
    """Open a log or journal for appending; a symlink there raises UnsafeFileError (O_NOFOLLOW)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link; refusing to write through it "
                                  "(remove it: the run directory should hold only what the run wrote)") from None
        raise
    return os.fdopen(fd, "ab" if binary else "a")


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise UnsafeFileError(f"{path} is a symbolic link; refusing to write or delete through it (remove "
                              "it: the run directory should hold only what the run wrote)")


def check_run_dir(run_dir: Path) -> None:
    """Refuse, by name, any of the run directory's own folders that is a symlink (the run directory
    itself may be one: the user chose it)."""
    for name in RUN_DIR_FOLDERS:
        _refuse_link(Path(run_dir) / name)


def own_dir(path: Path) -> Path:
    """``path`` as a real directory of the run (created if missing); a symlink there is refused."""
    _refuse_link(path)
    path.mkdir(parents=True, exist_ok=True)
    _refuse_link(path)  # planted between the check and mkdir: mkdir(exist_ok) accepts a link to a folder
    return path


def make_fresh_dir(path: Path) -> None:
    """An empty directory at ``path``: whatever is there (a directory, a file, a symlink) is removed
    first without following links."""
    remove(path)
    path.mkdir(parents=True)


def remove(path: Path) -> None:
    """Delete a file, symlink or directory tree at ``path``; never follows a symlink."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def load_torch(path: str | os.PathLike, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)``: a file that needs code to load is refused, named, not run."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line),
                      reason[0] if reason else "")
        raise UnsafeFileError(f"{path} was refused: it is not plain weights and would run code if "
                              f"loaded ({detail[:300]})") from None


"""Files of a shard set, written so that a crash, a kill or a planted symlink never corrupts one.

* Tar shards: written to ``.{name}.{pid}.partial`` beside the final name, created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never through a planted symlink) and ``flock``-ed while
  written, then renamed. The kernel drops the lock when its writer dies, however it dies: that is
  how a rerun tells a stale temporary (removed) from one an orphaned writer still writes (kept),
  without trusting pids, which get reused. The pid in the name keeps two writers of one shard
  apart. fsio.atomic_write's random temporary names would not let a rerun find a dead writer's.
* JSON and .tsv files: fsio.atomic_write.
* ``{split}-index.json`` is written last: its presence means the set is complete.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import webdataset as wds

from sagan_dist import fsio

PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial$")
# fsio.atomic_write's temporaries of our JSON / .tsv files, left by a writer killed mid-write
ATOMIC_TMP = re.compile(r"^\.(classes\.json|[\w-]+-index\.json|[\w-]+-skipped\.tsv|\d{6}\.json|plan\.json)"
                        r"\.\w+\.tmp$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_pattern(split: str, count: int) -> str:
    """Brace notation for shards 0 .. count-1, as `data.shards` takes it."""
    return f"{split}-{{{0:06d}..{count - 1:06d}}}.tar"


def _partial_path(path: Path) -> Path:
    # The pid keeps two writers of the same shard (a rerun next to an orphaned worker) apart.
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[io.BufferedWriter]:
    """A locked temporary beside ``path``, renamed over it once complete (see the docstring)."""
    tmp = _partial_path(path)
    f = os.fdopen(_create_exclusive(tmp), "wb")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # held until this process closes it or dies
        yield f
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, path)  # under the lock: a sweeper never removes a complete temporary
        fsio.fsync_dir(path.parent)
    except OSError as e:
        raise fsio.disk_full(e, path) from e  # ENOSPC -> "disk full ... <shard>", others unchanged
    finally:
        with contextlib.suppress(OSError):  # flushed above; after a failed write, the first error counts
            f.close()
        tmp.unlink(missing_ok=True)


def _create_exclusive(tmp: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(tmp, flags, 0o644)
    except FileExistsError:
        # Our own pid is in the name: whatever is there is a dead writer's file whose pid we got
        # again, or something planted. Unlinking removes the name, never follows a link.
        tmp.unlink()
        return os.open(tmp, flags, 0o644)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (fsio): readers see the old or the new file."""
    fsio.atomic_write(path, json.dumps(obj, indent=1))


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Write samples (webdataset dicts) to the tar ``path`` atomically; returns (samples, bytes)."""
    count = 0
    with _atomic_file(path) as f:
        # A fixed mtime makes a rewritten shard byte-identical to the first one.
        writer = wds.TarWriter(f, mtime=0)
        try:
            for sample in samples:
                writer.write(sample)
                count += 1
        except BaseException:
            # Close the tar stream now (its own write fails again on a full disk): left to the
            # garbage collector, it prints an "Exception ignored" traceback after the error message.
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
    return count, path.stat().st_size


def remove_stale_partials(folder: Path) -> int:
    """Delete temporaries left by killed writers: ones whose lock nobody holds any more."""
    removed = 0
    for entry in folder.iterdir() if folder.is_dir() else ():
        if (PARTIAL.match(entry.name) and _unlocked(entry)) or ATOMIC_TMP.match(entry.name):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _unlocked(path: Path) -> bool:
    """True if no process holds ``path``'s lock (a symlink there is not ours: True as well)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        return e.errno == errno.ELOOP
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False  # a live writer
    finally:
        os.close(fd)


def write_metadata(out: Path, split: str, classes: Sequence[str], shards: Sequence[dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """classes.json and {split}-index.json (written last: its presence means the set is complete)."""
    write_json(out / "classes.json", {name: i for i, name in enumerate(classes)})
    index = {"split": split, "pattern": shard_pattern(split, len(shards)),
             "total": sum(s["samples"] for s in shards), "num_classes": len(classes),
             **(extra or {}), "shards": list(shards)}
    write_json(out / f"{split}-index.json", index)
    return index


def read_index(out: Path, split: str) -> dict[str, Any] | None:
    """The index of a complete shard set in ``out``, or None if it is missing or incomplete."""
    try:
        index = json.loads((out / f"{split}-index.json").read_text())
    except (OSError, ValueError):
        return None
    if all((out / s["name"]).is_file() for s in index["shards"]):
        return index
    return None

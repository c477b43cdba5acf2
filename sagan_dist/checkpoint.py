"""Snapshots: atomic save, rotation, find-the-newest-valid, load.

A snapshot is a directory ``<run_dir>/checkpoints/step-00001000/`` holding ``state.pt`` (step
counters, EMA generator, config, tracking run id, RNG) and one entry per engine (``G``, ``D``) in
whatever form that engine saves (a ``.pt`` file for DDP, a DeepSpeed checkpoint directory). It is
written under ``step-00001000.tmp`` and renamed when complete, so a crash never leaves a partial
snapshot under a final name; a snapshot that is truncated or corrupt anyway fails to load and the
previous one is used. ``best`` is a snapshot like the others, written when an evaluation finds
a better FID, and never rotated away.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from sagan_dist import dist
from sagan_dist.config import ConfigError

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete snapshots, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, state: dict[str, Any], engines: dict[str, Any], keep: int,
         is_main: bool, name: str | None = None) -> Path:
    """Collective: every rank calls it. Returns the snapshot's final path.

    ``name`` defaults to ``step-<step>``; ``best`` names the best-FID snapshot.
    """
    root = checkpoints_dir(run_dir)
    name = name or f"step-{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash mid-save
        tmp.mkdir(parents=True)
    dist.barrier()
    for name, engine in engines.items():
        engine.save(tmp / name)
    dist.barrier()
    if is_main:
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # "best" again, or a preemption snapshot at a step that has one
            old = root / f"{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        rotate(run_dir, keep)
    dist.barrier()
    return final


def rotate(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_state(snapshot: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = snapshot / STATE_FILE if snapshot.is_dir() else snapshot
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(run_dir: Path, restore: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]] | None:
    """Newest snapshot that ``restore`` accepts; corrupt ones are logged and skipped."""
    for snapshot in reversed(list_checkpoints(run_dir)):
        try:
            return snapshot, restore(snapshot)
        except ConfigError:
            raise  # a readable snapshot of another model: falling back would hide the mistake
        except Exception as e:  # noqa: BLE001 - any unreadable snapshot means "try the previous"
            log.warning("checkpoint %s is truncated or corrupt (%s: %s); falling back to the "
                        "previous one", snapshot, type(e).__name__, str(e).splitlines()[0][:200])
    return None


def resolve_snapshot(path: str | Path) -> Path:
    """A snapshot directory, its state.pt, or a run directory (then its newest valid snapshot)."""
    p = Path(path)
    if p.is_file():
        return p.parent if p.name == STATE_FILE else p
    if (p / STATE_FILE).is_file():
        return p
    if p.is_dir():
        found = load_latest(p, load_state)
        if found is None:
            raise CheckpointError(f"no valid checkpoint under {p} (looked in {checkpoints_dir(p)})")
        return found[0]
    raise CheckpointError(f"checkpoint {p} does not exist")

"""Snapshots: atomic save, rotation, find-the-newest-valid, load.

A snapshot is a directory ``<run_dir>/checkpoints/step-00001000/`` holding ``state.pt`` (step
counters, EMA generator, config, tracking run id, RNG) and one entry per engine (``G``, ``D``) in
whatever form that engine saves (a ``.pt`` file for DDP, a DeepSpeed checkpoint directory). It is
written under ``step-00001000.tmp`` and renamed when complete, so a crash never leaves a partial
snapshot under a final name; a snapshot that is truncated or corrupt anyway fails to load and the
previous one is used, and if none loads, resume stops with a message naming each (never a silent
start from scratch). Everything is written through sagan_dist.fsio (temp beside the target, fsync,
rename) and read weights-only. ``best`` is a snapshot like the others, written when an evaluation
finds a better FID, and never rotated away; rotation never removes the snapshot it just wrote.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from sagan_dist import dist, fsio
from sagan_dist.config import ConfigError, to_container
from sagan_dist.errors import Reported

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.pt"
# model.* keys that change how the nets run, not what they are: free to change on resume.
RUNTIME_MODEL_KEYS = ("checkpoint_from", "checkpoint_blocks", "sync_bn", "channels_last")


class CheckpointError(RuntimeError, Reported):
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


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove what an interrupted save left behind (``*.tmp`` and ``*.old`` entries); rank 0, at start.

    A leftover temporary after a crash or a full disk would otherwise hold space the next save
    needs. Symlinks are removed as links, never followed.
    """
    root = checkpoints_dir(run_dir)
    stale = [p for p in root.glob("*") if p.name.endswith((".tmp", ".old"))] if root.is_dir() else []
    for p in stale:
        log.warning("removing %s, left by an interrupted snapshot", p)
        fsio.remove(p)
    return stale


def save(run_dir: Path, step: int, state: dict[str, Any], engines: dict[str, Any], keep: int,
         is_main: bool, name: str | None = None) -> Path:
    """Collective: every rank calls it. Returns the snapshot's final path.

    ``name`` defaults to ``step-<step>``; ``best`` names the best-FID snapshot.
    """
    root = checkpoints_dir(run_dir)
    name = name or f"step-{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if is_main:
        fsio.make_fresh_dir(tmp)  # leftovers of a crash mid-save (or a planted link) go first
    dist.barrier()
    for engine_name, engine in engines.items():
        engine.save(tmp / engine_name)
    dist.barrier()
    if is_main:
        fsio.save_torch(state, tmp / STATE_FILE)
        fsio.fsync_dir(tmp)
        if final.exists() or final.is_symlink():  # "best" again, or a preemption snapshot at a step that has one
            old = root / f"{name}.old"
            fsio.remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            fsio.remove(old)
        else:
            os.replace(tmp, final)
        fsio.fsync_dir(root)
        rotate(run_dir, keep, protect=final)
    dist.barrier()
    return final


def rotate(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the ``keep`` newest snapshots by step, and ``protect`` (the one just written) always."""
    snapshots = [p for p in list_checkpoints(run_dir) if p != protect]
    kept = keep - 1 if protect is not None and STEP_DIR.match(protect.name) else keep
    for old in snapshots[:len(snapshots) - max(kept, 0)]:
        fsio.remove(old)


def load_state(snapshot: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = snapshot / STATE_FILE if snapshot.is_dir() else snapshot
    return fsio.load_torch(path, map_location=map_location)


def load_latest(run_dir: Path, restore: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]] | None:
    """Newest snapshot that ``restore`` accepts; None only when there is no snapshot at all.

    A snapshot that fails to load is logged and the previous one tried (each attempt overwrites
    all of G, D, their optimizers, the EMA and the counters, so nothing of a rejected one stays).
    If snapshots exist and none loads, this raises, naming each and why: starting over silently
    would throw away the run, and rotation would then delete the new low-step snapshots.
    """
    snapshots = list_checkpoints(run_dir)
    failures = []
    for snapshot in reversed(snapshots):
        try:
            return snapshot, restore(snapshot)
        except ConfigError:
            raise  # a readable snapshot of another model: falling back would hide the mistake
        except Exception as e:  # noqa: BLE001 - any unreadable snapshot means "try the previous"
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            failures.append(f"  {snapshot}: {reason}")
            log.warning("snapshot %s cannot be loaded (%s); trying the previous one", snapshot, reason)
    if snapshots:
        raise CheckpointError(
            f"none of the {len(snapshots)} snapshot(s) in {checkpoints_dir(run_dir)} can be loaded:\n"
            + "\n".join(failures) + "\nNothing was changed. To start this run over instead, set "
            "train.resume=never (the unreadable snapshots are then moved aside, not deleted), or name a "
            "good snapshot with train.resume=PATH.")
    return None


def set_aside(run_dir: Path) -> Path | None:
    """Move existing snapshots out of the way of a run that starts over (train.resume=never), so a
    later resume=auto cannot pick up the old run's higher step numbers. Returns where they went."""
    root = checkpoints_dir(run_dir)
    if not list_checkpoints(run_dir):
        return None
    target = root.with_name(f"checkpoints-set-aside-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(root, target)
    log.warning("train.resume=never: the earlier snapshots were moved to %s", target)
    return target


def check_compatible(saved: dict[str, Any], cfg: DictConfig, snapshot: Path) -> None:
    """The saved run's architecture must match; other differences are reported and allowed."""
    current = to_container(cfg)
    if saved.get("engine", "ddp") != cfg.engine:
        raise ConfigError(f"config key 'engine' is {cfg.engine!r} but the snapshot {snapshot} "
                          f"was written by {saved.get('engine')!r}; resume with the same engine")
    for section in ("model", "data"):
        for key, value in saved.get(section, {}).items():
            now = current[section].get(key)
            if now == value:
                continue
            full = f"{section}.{key}"
            if section == "model" and key not in RUNTIME_MODEL_KEYS or full == "data.num_classes":
                raise ConfigError(f"config key {full!r} is {now!r} but the snapshot {snapshot} "
                                  f"was trained with {value!r}; resume needs the same value")
            log.warning("config key %s changed since %s: %r -> %r", full, snapshot, value, now)


def load_generator(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, DictConfig, dict[str, Any], Path]:
    """The EMA generator of a snapshot (or of a run directory's newest valid one), in eval mode,
    with the snapshot's config (validated for one process), its state and its path: the one loader
    of `sample`, `attention` and `evaluate`."""
    from sagan_dist.config import from_container
    from sagan_dist.models.sagan import build_models

    snapshot = resolve_snapshot(path)
    state = load_state(snapshot)
    cfg = from_container(state["config"], world_size=1)
    g, _ = build_models(cfg)
    g.load_state_dict(state["G_ema"])
    return g.to(device).eval(), cfg, state, snapshot


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

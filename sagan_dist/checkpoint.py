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

One timeline: a snapshot is never written from non-finite weights, and one with non-finite
weights is skipped on resume; resuming from an earlier snapshot sets the later ones aside. Rank 0
chooses the snapshot and every rank loads that one (`load_chosen`). A config read from a snapshot
is data (`stored_config`): it never supplies a command or a path to write.
"""
from __future__ import annotations

import contextlib
import copy
import errno
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
# An engine's save that fails with less free space than this on its volume failed for a full disk.
FULL_BELOW_BYTES = 1 << 20
# What a stored data.shards that would start a process becomes: a path that cannot exist (under a
# file), so any reader fails naming it, and a command never runs.
SHARDS_NOT_STORED = "/dev/null/data.shards-of-the-snapshot-is-a-command-pass-data.shards-now"


class CheckpointError(RuntimeError, Reported):
    """No usable checkpoint where one was asked for."""


class NonFiniteWeightsError(CheckpointError):
    """A snapshot was due, but the weights hold inf/nan: it is not written."""


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
    fsio.check_run_dir(run_dir)  # a planted checkpoints -> elsewhere: nothing deleted through it
    stale = [p for p in root.glob("*") if p.name.endswith((".tmp", ".old"))] if root.is_dir() else []
    for p in stale:
        log.warning("removing %s, left by an interrupted snapshot", p)
        fsio.remove(p)
    return stale


def save(run_dir: Path, step: int, state: dict[str, Any], engines: dict[str, Any], keep: int,
         is_main: bool, name: str | None = None) -> Path:
    """Collective: every rank calls it. Returns the snapshot's final path.

    ``name`` defaults to ``step-<step>``; ``best`` names the best-FID snapshot. Refused (nothing
    written) when any weight of the engines' nets or any tensor of ``state`` is not finite.
    """
    root = checkpoints_dir(run_dir)
    name = name or f"step-{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    _refuse_non_finite(step, {**{n: e.raw for n, e in engines.items()}, "EMA generator": state.get("G_ema", {})},
                       root)
    if is_main:
        fsio.own_dir(root)
        fsio.make_fresh_dir(tmp)  # leftovers of a crash mid-save (or a planted link) go first
    dist.barrier()
    try:
        for engine_name, engine in engines.items():
            _engine_save(engine, tmp / engine_name)
        # Whatever engine wrote them (DeepSpeed's shards too), this rank's files are on disk before the
        # snapshot is renamed final: fsync from the writer's own node is what counts on NFS.
        fsio.fsync_tree(tmp)
        dist.barrier()
        if is_main:
            fsio.save_torch(state, tmp / STATE_FILE)
            fsio.fsync_dir(tmp)
    except fsio.DiskFullError:
        if not dist.is_distributed():  # with peers still writing into it, the next start's clean_stale does it
            fsio.remove(tmp)  # its space is what the next save needs
        raise
    if is_main:
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


def _engine_save(engine: Any, path: Path) -> None:
    """``engine.save``, with a full volume reported as such: torch.save inside an engine turns the
    write's ENOSPC into ``inline_container.cc: unexpected pos``, so the volume is asked instead."""
    try:
        engine.save(path)
    except OSError as e:
        raise fsio.disk_full(e, path) from e
    except RuntimeError as e:
        if _volume_full(path.parent):
            raise fsio.disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path) from e
        raise


def _volume_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES


def _finite_flags(nets: dict[str, Any]) -> torch.Tensor:
    """One device flag per net: 1.0 if any floating-point weight, buffer or tensor is not finite."""
    flags = []
    for net in nets.values():
        tensors = (list(net.parameters()) + list(net.buffers()) if isinstance(net, torch.nn.Module)
                   else [t for t in _tensors(net)])
        tensors = [t.detach() for t in tensors if t.is_floating_point()]
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any() if tensors else torch.tensor(False)
        flags.append(bad)
    device = next((f.device for f in flags if f.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([f.to(device) for f in flags]).float()


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def non_finite(nets: dict[str, Any], agree: bool = True) -> list[str]:
    """The names of ``nets`` (modules or state dicts) holding a non-finite tensor. Computed on the
    device and read once; with ``agree``, combined over ranks first (one collective), so every rank
    gets the same answer."""
    flags = _finite_flags(nets)
    if agree and dist.is_distributed():
        import torch.distributed as tdist

        if tdist.get_backend() == "nccl" and flags.device.type != "cuda":
            flags = flags.cuda()
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
    return [name for name, bad in zip(nets, flags.tolist()) if bad]


def _refuse_non_finite(step: int, nets: dict[str, Any], root: Path) -> None:
    bad = non_finite(nets)
    if bad:
        kept = [p.name for p in list_checkpoints(root.parent)]
        raise NonFiniteWeightsError(
            f"the weights of {', '.join(bad)} are not finite (inf/nan) at step {step}: no snapshot written, "
            f"since every resume from it would fail (kept: {', '.join(kept) or 'none'}). Lower "
            "train.lr_d/lr_g, set train.grad_clip, or use train.precision=bf16 instead of fp16, and resume.")


def require_finite(snapshot: Path, nets: dict[str, Any]) -> None:
    """After a restore: refuse a snapshot whose weights are not finite (one written before this
    check existed), naming it, so resume=auto falls back to the one before. Local to this rank:
    it runs inside a restore, where a rank that failed earlier would never join a collective
    (load_chosen gathers every rank's verdict afterwards)."""
    bad = non_finite(nets, agree=False)
    if bad:
        raise CheckpointError(f"snapshot {snapshot} holds non-finite (inf/nan) weights of {', '.join(bad)}")


def rotate(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the ``keep`` newest snapshots by step, and ``protect`` (the one just written) always."""
    fsio.own_dir(checkpoints_dir(run_dir))
    snapshots = [p for p in list_checkpoints(run_dir) if p != protect]
    kept = keep - 1 if protect is not None and STEP_DIR.match(protect.name) else keep
    # max(..., 0): with fewer snapshots than `kept`, a negative slice end would delete from the front.
    for old in snapshots[:max(len(snapshots) - max(kept, 0), 0)]:
        fsio.remove(old)


def load_state(snapshot: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = snapshot / STATE_FILE if snapshot.is_dir() else snapshot
    return fsio.load_torch(path, map_location=map_location)


def load_latest(run_dir: Path, restore: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]] | None:
    """Newest snapshot that ``restore`` accepts; None only when there is no snapshot at all.

    Collective: rank 0 chooses (its listing of the run directory is the one used) and every rank
    loads that same snapshot; a rank that cannot fails the group, naming the rank and the file
    (ranks at different steps would train on silently). A snapshot that fails to load on rank 0
    is logged and the previous one tried (each attempt overwrites all of G, D, their optimizers,
    the EMA and the counters, so nothing of a rejected one stays). If snapshots exist and none
    loads, this raises, naming each and why: starting over silently would throw away the run, and
    rotation would then delete the new low-step snapshots.
    """
    snapshots = dist.broadcast_object(list_checkpoints(run_dir))
    failures = []
    for snapshot in reversed(snapshots):
        try:
            return snapshot, load_chosen(snapshot, restore)
        except ConfigError:
            raise  # a readable snapshot of another model: falling back would hide the mistake
        except RankLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable snapshot means "try the previous"
            reason = _reason(e)
            failures.append(f"  {snapshot}: {reason}")
            log.warning("snapshot %s cannot be loaded (%s); trying the previous one", snapshot, reason)
    if snapshots:
        raise CheckpointError(
            f"none of the {len(snapshots)} snapshot(s) in {checkpoints_dir(run_dir)} can be loaded:\n"
            + "\n".join(failures) + "\nNothing was changed. To start this run over instead, set "
            "train.resume=never (the unreadable snapshots are then moved aside, not deleted), or name a "
            "good snapshot with train.resume=PATH.")
    return None


class RankLoadError(CheckpointError):
    """Rank 0 loaded the snapshot it chose and another rank could not: the group stops."""


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def load_chosen(snapshot: Path, restore: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Collective: every rank restores rank 0's choice ``snapshot``. Raises on every rank alike: rank
    0's own error (a snapshot to fall back from), or RankLoadError naming the first other rank
    that failed and why (its files differ from rank 0's view: a stale NFS cache, a missing mount)."""
    _same_files(snapshot)
    outcome: tuple[str, str] | None = None
    state: dict[str, Any] = {}
    try:
        state = restore(snapshot)
    except Exception as e:  # noqa: BLE001 - gathered below, then raised on every rank
        if not dist.is_distributed():
            raise
        outcome = (type(e).__name__, _reason(e))
        error: Exception | None = e
    else:
        error = None
    outcomes = _all_gather(outcome)
    if outcomes[0] is not None:
        if error is not None and outcome == outcomes[0]:
            raise error
        kind, reason = outcomes[0]
        raise (ConfigError if kind == "ConfigError" else CheckpointError)(reason)
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if failed:
        rank, (_, reason) = failed[0]
        raise RankLoadError(f"rank {rank} cannot load snapshot {snapshot}, which rank 0 chose and loaded: {reason}")
    return state


def _same_files(snapshot: Path) -> None:
    """Every rank sees rank 0's files of ``snapshot`` with rank 0's sizes, or all ranks raise
    RankLoadError naming the first rank and file that differ."""
    if not dist.is_distributed():
        return
    listing = dist.broadcast_object(_listing(snapshot))
    mine = _listing(snapshot)
    problem = next((f"{snapshot / rel}: {'missing' if rel not in mine else f'{mine[rel]} bytes'} here, "
                    f"{size} bytes on rank 0" for rel, size in listing.items() if mine.get(rel) != size), None)
    problems = _all_gather(problem)
    failed = [(rank, p) for rank, p in enumerate(problems) if p is not None]
    if failed:
        rank, what = failed[0]
        raise RankLoadError(f"rank {rank} cannot load snapshot {snapshot}, which rank 0 chose: {what}")


def _listing(snapshot: Path) -> dict[str, int]:
    """Relative path -> size of the files under ``snapshot`` (links not followed)."""
    out = {}
    for folder, _, files in os.walk(snapshot):
        for name in files:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                out[str(path.relative_to(snapshot))] = path.lstat().st_size
    return out


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, over the CPU control group (never behind gradient traffic)."""
    if not dist.is_distributed():
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj, group=dist.control_group())
    return out


def set_aside(run_dir: Path) -> Path | None:
    """Move existing snapshots out of the way of a run that starts over (train.resume=never), so a
    later resume=auto cannot pick up the old run's higher step numbers. Returns where they went."""
    root = checkpoints_dir(run_dir)
    if not list_checkpoints(run_dir):
        return None
    fsio.own_dir(root)
    target = _aside_dir(run_dir)
    os.replace(root, target)
    log.warning("train.resume=never: the earlier snapshots were moved to %s", target)
    return target


def set_aside_later(run_dir: Path, step: int) -> Path | None:
    """After a resume from an earlier snapshot (train.resume=PATH): move this run's snapshots of
    later steps (the abandoned branch) aside, so a later resume=auto continues this timeline."""
    later = [p for p in list_checkpoints(run_dir) if int(STEP_DIR.match(p.name).group(1)) > step]
    if not later:
        return None
    fsio.own_dir(checkpoints_dir(run_dir))
    target = _aside_dir(run_dir)
    target.mkdir()
    for p in later:
        os.replace(p, target / p.name)
    fsio.fsync_dir(checkpoints_dir(run_dir))
    log.warning("resumed at step %d from an earlier snapshot: the later snapshots (%s) were moved to %s",
                step, ", ".join(p.name for p in later), target)
    return target


def _aside_dir(run_dir: Path) -> Path:
    """A new name beside checkpoints/ for snapshots set aside (never an existing entry)."""
    base = checkpoints_dir(run_dir).with_name(f"checkpoints-set-aside-{time.strftime('%Y%m%dT%H%M%S')}")
    target, n = base, 1
    while target.exists() or target.is_symlink():
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
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
    state["config"] = stored_config(state["config"], snapshot)
    cfg = from_container(state["config"], world_size=1)
    g, _ = build_models(cfg)
    g.load_state_dict(state["G_ema"])
    return g.to(device).eval(), cfg, state, snapshot


def stored_config(saved: dict[str, Any], snapshot: Path) -> dict[str, Any]:
    """A config read from a snapshot, as data: the keys that would choose where to write
    (``eval.cache_dir``, ``tracking.uri``) back at their defaults, and ``data.shards`` replaced by
    SHARDS_NOT_STORED when it holds anything but local paths (a ``pipe:`` command, or a URL webdataset opens through a
    shell). Commands and write paths come only from what the user passes now."""
    out = copy.deepcopy(saved)
    cleared = []
    for section, key in (("eval", "cache_dir"), ("tracking", "uri")):
        if out.get(section, {}).get(key):
            out[section][key] = ""
            cleared.append(f"{section}.{key}")
    shards = out.get("data", {}).get("shards")
    if shards and not _local_paths_only(str(shards)):
        out["data"]["shards"] = SHARDS_NOT_STORED
        cleared.append("data.shards")
    if cleared:
        log.info("not taken from %s's stored config (pass them now if needed): %s", snapshot, ", ".join(cleared))
    return out


def _local_paths_only(pattern: str) -> bool:
    """Whether every shard of ``pattern`` is a local path (or ``file:`` URL), so reading it starts no process."""
    from urllib.parse import urlparse

    import webdataset as wds

    try:
        urls = wds.shardlists.expand_urls(pattern)
    except Exception:  # noqa: BLE001 - a pattern it cannot expand is not one to trust
        return False
    return all(urlparse(u).scheme in ("", "file") for u in urls)


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

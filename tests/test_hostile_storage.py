"""A run directory on shared storage that others can write to, and an unlucky operator.

Planted pickles must never run, planted symlinks must never be written through, damaged
snapshots must stop a resume with a message (never a silent start from scratch), a full disk is
reported as a full disk, and impossible settings end with a message instead of a hang.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sagan_dist import checkpoint, fsio
from sagan_dist.config import ConfigError, load
from sagan_dist.dist import DistInfo
from sagan_dist.sample import save_grid, truncated_normal
from sagan_dist.train import Trainer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=2", "train.sample_every=100", "tracking.enabled=false", "train.samples_per_class=2"]


class Payload:
    """Unpickling this runs ``touch MARKER``: what an attacker plants on the shared volume."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(load(["demo"], TINY + [f"train.run_dir={run_dir}", *overrides]), INFO)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sagan_dist.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory with snapshots at steps 2 and 4, copied by each test that damages it."""
    run_dir = tmp_path_factory.mktemp("trained")
    _trainer(run_dir, "train.steps=4", "train.checkpoint_every=2").fit()
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@pytest.mark.parametrize("victim", ["state.pt", "G.pt", "D.pt"])
def test_a_planted_pickle_in_any_snapshot_file_never_runs_and_is_named(trained, tmp_path, victim):
    run_dir = _copy(trained, tmp_path / "run")
    marker = tmp_path / "PWNED"
    for snapshot in checkpoint.list_checkpoints(run_dir):
        torch.save({"model": Payload(marker)}, snapshot / victim)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        _trainer(run_dir, "train.steps=6")
    assert not marker.exists(), "unpickling a planted file ran its payload"
    message = str(raised.value)
    for snapshot in checkpoint.list_checkpoints(run_dir):
        assert str(snapshot) in message
    assert "would run code" in message and "train.resume=never" in message


def test_when_no_snapshot_loads_resume_stops_naming_each_and_the_way_out(trained, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    for snapshot in checkpoint.list_checkpoints(run_dir):
        state = snapshot / "state.pt"
        state.write_bytes(state.read_bytes()[:100])
    result = _cli("train", "demo", *TINY, f"train.run_dir={run_dir}", "train.steps=6")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "none of the 2 snapshot(s)" in result.stderr
    assert "step-00000002" in result.stderr and "step-00000004" in result.stderr
    assert "train.resume=never" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    # Starting over on purpose moves the unreadable snapshots aside instead of deleting them, so a
    # later resume=auto cannot pick up the old run's higher step numbers.
    fresh = _trainer(run_dir, "train.steps=1", "train.resume=never")
    assert fresh.step == 0 and not checkpoint.list_checkpoints(run_dir)
    aside = list(run_dir.glob("checkpoints-set-aside-*"))
    assert len(aside) == 1 and (aside[0] / "step-00000004").is_dir()
    fresh.fit()
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000001"]


def test_rotation_never_deletes_the_snapshot_it_just_wrote(tmp_path):
    root = checkpoint.checkpoints_dir(tmp_path)
    for step in (100, 200):
        (root / f"step-{step:08d}").mkdir(parents=True)
    (root / "step-00000003").mkdir()
    checkpoint.rotate(tmp_path, keep=2, protect=root / "step-00000003")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000200"]


def test_symlinks_planted_in_the_run_directory_are_never_written_through(trained, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious.txt"
    precious.write_text("keep me")
    # A temporary snapshot name pointing at a directory elsewhere: removed as a link at start.
    tmp_link = checkpoint.checkpoints_dir(run_dir) / "step-00000006.tmp"
    tmp_link.symlink_to(outside, target_is_directory=True)
    # A sample grid's final name pointing at a file elsewhere: replaced, not followed.
    grid = run_dir / "samples" / "step-00000006.png"
    grid.parent.mkdir(exist_ok=True)
    grid.symlink_to(precious)
    tr = _trainer(run_dir, "train.steps=6", "train.checkpoint_every=2", "train.sample_every=2")
    tr.fit()
    assert precious.read_text() == "keep me" and sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert not tmp_link.is_symlink() and not grid.is_symlink() and grid.stat().st_size > 0
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step-00000006"
    # An append-only log planted as a link is refused, with the file named.
    log_link = run_dir / "train.log"
    log_link.unlink(missing_ok=True)
    log_link.symlink_to(precious)
    result = _cli("train", "demo", *TINY, f"train.run_dir={run_dir}", "train.steps=7")
    assert result.returncode == 1 and f"{log_link} is a symbolic link" in result.stderr, result.stderr[-2000:]
    assert precious.read_text() == "keep me"


def test_save_grid_replaces_a_planted_png_link(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"x")
    link = tmp_path / "grid.png"
    link.symlink_to(target)
    save_grid(torch.zeros(4, 3, 8, 8), link, nrow=2)
    assert target.read_bytes() == b"x" and not link.is_symlink()


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 1 MiB tmpfs: the real ENOSPC of a full volume (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_reported_as_such_and_leaves_no_temporary(tiny_disk):
    with pytest.raises(fsio.DiskFullError) as raised:
        fsio.atomic_write(tiny_disk / "state.pt", os.urandom(2 * 2**20))
    assert raised.value.errno == errno.ENOSPC
    assert "disk full" in str(raised.value) and str(tiny_disk / "state.pt") in str(raised.value)
    assert list(tiny_disk.iterdir()) == []


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  lr_d: [1,\n  x: 2\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+:\d+: not valid YAML"):
        load([str(bad)])
    result = _cli("train", str(bad))
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_a_tiny_truncation_is_drawn_without_looping():
    z = truncated_normal((4096, 128), 1e-6, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert z.abs().max() <= 1e-6 and z.std() > 0


def test_a_batch_that_cannot_fit_is_refused_before_any_step(tmp_path):
    result = _cli("train", "demo", *TINY, f"train.run_dir={tmp_path}", "train.batch_size=1000000000000")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "'train.batch_size' = 1000000000000" in result.stderr and "GiB available" in result.stderr
    assert not checkpoint.list_checkpoints(tmp_path)


def test_torch_save_on_a_full_disk_is_reported_as_such_not_as_unexpected_pos(tiny_disk):
    """torch.save turns the write's ENOSPC into `inline_container.cc: unexpected pos`."""
    with pytest.raises(fsio.DiskFullError) as raised:
        fsio.save_torch({"x": torch.zeros(600_000)}, tiny_disk / "state.pt")
    assert raised.value.errno == errno.ENOSPC and str(tiny_disk / "state.pt") in str(raised.value)
    assert list(tiny_disk.iterdir()) == []


def test_the_digits_writer_on_a_full_disk_names_the_shard_and_leaves_no_partial(tiny_disk):
    from sagan_dist.data.sources import write_digits

    with pytest.raises(fsio.DiskFullError, match=f"disk full .* while writing {tiny_disk}/data/digits-0000"):
        write_digits(tiny_disk / "data", 32)
    assert not [p for p in (tiny_disk / "data").iterdir() if p.name.startswith(".")]


def test_training_on_a_full_disk_prints_the_disk_full_line_only(tiny_disk):
    result = _cli("train", "demo", *TINY, f"train.run_dir={tiny_disk / 'run'}", "train.steps=1")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: [Errno 28] disk full (or quota exceeded) while writing" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def deepspeed_trainer(tmp_path_factory) -> Trainer:
    """The demo's nets under DeepSpeed ZeRO 1: its snapshot (about 4 MiB) is written by DeepSpeed."""
    run_dir = tmp_path_factory.mktemp("ds")
    return Trainer(load(["demo"], ["engine=deepspeed", "deepspeed.zero_stage=1", "train.batch_size=8",
                                   "tracking.enabled=false", f"train.run_dir={run_dir}"]), INFO)


def _snapshot_state(tr: Trainer) -> dict:
    return {"step": 1, "G_ema": tr.ema.state_dict()}


def test_a_deepspeed_save_on_a_full_disk_is_reported_as_such_and_leaves_nothing(deepspeed_trainer, tiny_disk):
    tr = deepspeed_trainer
    with pytest.raises(fsio.DiskFullError, match=f"disk full .* while writing {tiny_disk}/checkpoints/step-00000001"):
        checkpoint.save(tiny_disk, 1, _snapshot_state(tr), {"G": tr.G, "D": tr.D}, keep=2, is_main=True)
    assert list(checkpoint.checkpoints_dir(tiny_disk).iterdir()) == []


def test_every_file_and_folder_of_a_deepspeed_snapshot_is_fsynced_before_it_is_final(deepspeed_trainer, tmp_path,
                                                                                    monkeypatch):
    tr, synced = deepspeed_trainer, set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    final = checkpoint.save(tmp_path, 1, _snapshot_state(tr), {"G": tr.G, "D": tr.D}, keep=2, is_main=True)
    tmp = f"{final}.tmp"
    written = {os.path.join(tmp, os.path.relpath(os.path.join(d, n), final))
               for d, dirs, files in os.walk(final) for n in [*dirs, *files]}
    assert any("zero_pp_rank_0" in p for p in written)
    # state.pt is fsynced under its atomic_write temporary name, then renamed.
    assert any(p.startswith(f"{tmp}/.state.pt.") for p in synced)
    written.discard(f"{tmp}/state.pt")
    assert written | {tmp} <= synced, sorted(written - synced)

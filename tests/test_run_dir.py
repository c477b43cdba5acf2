"""The run directory under accidents: nothing a user asked to keep is lost, nothing is written or
deleted through a planted link, a snapshot is one timeline, and one directory has one trainer.

Real trainers (in-process and as `sagan-dist train` processes), real files; the lock tests run
two trainer processes on one directory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sagan_dist import checkpoint, fsio, run_lock
from sagan_dist.config import load
from sagan_dist.dist import DistInfo
from sagan_dist.train import Trainer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=2", "train.sample_every=100", "tracking.enabled=false", "train.samples_per_class=2"]


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(load(["demo"], TINY + [f"train.run_dir={run_dir}", *overrides]), INFO)


def _steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.list_checkpoints(run_dir)]


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sagan_dist.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


# ---- 1. rotation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", range(1, 7))
def test_rotation_keeps_the_newest_keep_snapshots_for_any_keep(tmp_path, keep):
    """Every keep from 1 to more than the 4 snapshots written, checked after each save."""
    for n, step in enumerate((2, 4, 6, 8), start=1):
        checkpoint.save(tmp_path, step, {"step": step}, {}, keep, is_main=True)
        assert _steps(tmp_path) == [2, 4, 6, 8][max(n - keep, 0):n], f"keep={keep} after step {step}"


def test_training_with_keep_above_three_keeps_every_snapshot_asked_for(tmp_path):
    _trainer(tmp_path, "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=5").fit()
    assert _steps(tmp_path) == [2, 4, 6, 8]


# ---- 3. planted folder links -------------------------------------------------------------------
@pytest.mark.parametrize("folder", fsio.RUN_DIR_FOLDERS)
def test_a_run_folder_planted_as_a_symlink_is_refused_by_name_and_nothing_changes(tmp_path, folder):
    victim, run_dir = tmp_path / "victim", tmp_path / "r"
    victim.mkdir()
    run_dir.mkdir()
    (victim / "x.tmp").write_text("keep")
    (victim / "step-00000002").mkdir()
    (run_dir / folder).symlink_to(victim, target_is_directory=True)
    with pytest.raises(fsio.UnsafeFileError, match=f"{run_dir / folder} is a symbolic link"):
        _trainer(run_dir, "train.steps=2")
    assert sorted(p.name for p in victim.iterdir()) == ["step-00000002", "x.tmp"]


def test_the_train_command_refuses_a_planted_checkpoints_link_in_one_line(tmp_path):
    victim, run_dir = tmp_path / "victim", tmp_path / "r"
    victim.mkdir()
    run_dir.mkdir()
    (victim / "x.tmp").write_text("keep")
    (run_dir / "checkpoints").symlink_to(victim, target_is_directory=True)
    proc = _cli("train", "demo", *TINY, f"train.run_dir={run_dir}", "train.steps=2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert f"{run_dir / 'checkpoints'} is a symbolic link" in out and "Traceback" not in out
    assert [p.name for p in victim.iterdir()] == ["x.tmp"]


def test_snapshots_are_never_written_or_rotated_through_a_link_planted_mid_run(tmp_path):
    run_dir, victim = tmp_path / "r", tmp_path / "victim"
    trainer = _trainer(run_dir, "train.steps=2")
    victim.mkdir()
    (victim / "step-00000001").mkdir()
    checkpoint.checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
    checkpoint.checkpoints_dir(run_dir).rename(tmp_path / "moved")
    checkpoint.checkpoints_dir(run_dir).symlink_to(victim, target_is_directory=True)
    with pytest.raises(fsio.UnsafeFileError, match="is a symbolic link"):
        trainer.save()
    with pytest.raises(fsio.UnsafeFileError, match="is a symbolic link"):
        checkpoint.rotate(run_dir, keep=0)
    assert [p.name for p in victim.iterdir()] == ["step-00000001"]


@pytest.mark.parametrize("folder", ["samples", "attention"])
def test_sample_grids_and_attention_sheets_are_never_written_through_a_link_planted_mid_run(tmp_path, folder):
    run_dir, victim = tmp_path / "r", tmp_path / "victim"
    trainer = _trainer(run_dir, "train.steps=2", "train.attention_points=2")
    victim.mkdir()
    if folder == "attention":
        fsio.own_dir(run_dir / "samples")
    (run_dir / folder).symlink_to(victim, target_is_directory=True)
    with pytest.raises(fsio.UnsafeFileError, match=f"{run_dir / folder} is a symbolic link"):
        trainer.sample_grid()
    assert list(victim.iterdir()) == []


# ---- 5. one timeline ---------------------------------------------------------------------------
def test_resuming_from_an_earlier_snapshot_sets_the_later_ones_aside(tmp_path):
    _trainer(tmp_path, "train.steps=9", "train.checkpoint_every=3").fit()
    assert _steps(tmp_path) == [3, 6, 9]
    step3 = checkpoint.checkpoints_dir(tmp_path) / "step-00000003"
    branch = _trainer(tmp_path, "train.steps=7", "train.checkpoint_every=3", f"train.resume={step3}")
    assert branch.step == 3 and _steps(tmp_path) == [3]
    aside = list(tmp_path.glob("checkpoints-set-aside-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-00000006", "step-00000009"]
    branch.fit()
    assert _steps(tmp_path) == [3, 6, 7]
    assert _trainer(tmp_path, "train.steps=8").step == 7  # auto continues this timeline, not the old 9


def test_resuming_from_the_newest_snapshot_sets_nothing_aside(tmp_path):
    _trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2").fit()
    newest = checkpoint.list_checkpoints(tmp_path)[-1]
    assert _trainer(tmp_path, "train.steps=6", f"train.resume={newest}").step == 4
    assert _steps(tmp_path) == [2, 4] and not list(tmp_path.glob("checkpoints-set-aside-*"))


# ---- 8. non-finite weights ---------------------------------------------------------------------
@pytest.mark.parametrize("net", ["G", "D", "EMA generator"])
def test_no_snapshot_is_written_from_non_finite_weights(tmp_path, net):
    trainer = _trainer(tmp_path, "train.steps=2")
    module = {"G": trainer.G.raw, "D": trainer.D.raw, "EMA generator": trainer.ema.model}[net]
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(checkpoint.NonFiniteWeightsError, match=f"weights of {net} are not finite"):
        trainer.save()
    root = checkpoint.checkpoints_dir(tmp_path)
    assert not root.exists() or list(root.iterdir()) == []


def test_a_finite_snapshot_is_written(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=2")
    trainer.step = 1
    assert trainer.save().name == "step-00000001"


def _poison(snapshot: Path, value: float) -> None:
    state = torch.load(snapshot / "D.pt", weights_only=True)
    next(iter(state["model"].values())).view(-1)[0] = value
    torch.save(state, snapshot / "D.pt")


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_resume_skips_a_snapshot_with_non_finite_weights_naming_it(tmp_path, caplog, value):
    _trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2").fit()
    bad = checkpoint.list_checkpoints(tmp_path)[-1]
    _poison(bad, value)
    assert _trainer(tmp_path, "train.steps=6").step == 2
    assert f"snapshot {bad} holds non-finite (inf/nan) weights of D" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match=f"snapshot {bad} holds non-finite"):
        _trainer(tmp_path, "train.steps=6", f"train.resume={bad}")


# ---- 2. one trainer per run directory ----------------------------------------------------------
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return json.loads(path.read_text())
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_trainer_is_refused_naming_the_owner_and_takes_over_once_it_is_dead(tmp_path):
    run_dir = tmp_path / "run"
    first = _cli("train", "demo", *TINY, f"train.run_dir={run_dir}", "train.steps=100000",
                 "train.checkpoint_every=100000")
    try:
        owner = _wait_for(run_dir / run_lock.LOCK_NAME, first)
        assert owner["pid"] == first.pid
        second = _cli("train", "demo", *TINY, f"train.run_dir={run_dir}", "train.steps=2")
        out, _ = second.communicate(timeout=300)
        assert second.returncode == 1, out[-3000:]
        assert f"run directory {run_dir} is in use by another trainer: host {owner['host']} pid {first.pid}" in out
        assert "Traceback" not in out and not checkpoint.list_checkpoints(run_dir)
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: no chance to release it
        first.communicate(timeout=60)
    assert (run_dir / run_lock.LOCK_NAME).is_file()
    third = _cli("train", "demo", *TINY, f"train.run_dir={run_dir}", "train.steps=2")
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 0, out[-3000:]
    assert f"taking over the run lock {run_dir / run_lock.LOCK_NAME}" in out and f"process {first.pid}" in out
    assert _steps(run_dir) == [2] and not (run_dir / run_lock.LOCK_NAME).exists()  # released at the end


def _plant(run_dir: Path, **owner) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    me = run_lock.identity()
    record = {**me, "token": "t" * 32, "lease_s": 120.0, "heartbeat": time.time(), **owner}
    path = run_dir / run_lock.LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def test_a_live_owner_on_this_host_is_never_taken_over_however_old_its_heartbeat(tmp_path):
    parent = os.getppid()  # alive, and not us
    _plant(tmp_path, pid=parent, pid_start=run_lock._start_time(parent), heartbeat=0.0)
    with pytest.raises(run_lock.RunDirLocked, match=f"pid {parent}"):
        run_lock.RunLock(tmp_path).acquire()


def test_a_reused_pid_on_this_host_is_a_dead_owner(tmp_path):
    parent = os.getppid()
    _plant(tmp_path, pid=parent, pid_start="1")  # the pid now belongs to a process that started later
    run_lock.RunLock(tmp_path).acquire().release()


@pytest.mark.parametrize("age, taken", [(30.0, False), (59.0, False), (119.0, True), (121.0, True)])
def test_another_hosts_lock_is_taken_over_only_after_its_lease(tmp_path, age, taken):
    """The 120 s lease: a live heartbeat (under half a lease old) is refused; 119 s old is waited
    out (about 2 s here) and then taken; 121 s old is taken at once."""
    _plant(tmp_path, host="other-node", boot_id="b", pid=1, heartbeat=time.time() - age)
    if taken:
        lock = run_lock.RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["token"] == lock.record["token"]
        lock.release()
        assert not (tmp_path / run_lock.LOCK_NAME).exists()
    else:
        with pytest.raises(run_lock.RunDirLocked, match="host other-node pid 1"):
            run_lock.RunLock(tmp_path).acquire()


def test_a_lock_whose_heartbeat_stopped_is_waited_out_to_the_end_of_its_lease(tmp_path):
    """Half a lease old (two beats missed, lease 4 s): waited for, then taken; a fresher one is refused."""
    _plant(tmp_path, host="other-node", boot_id="b", pid=1, lease_s=4.0, heartbeat=time.time() - 1.0)
    with pytest.raises(run_lock.RunDirLocked, match="host other-node pid 1"):
        run_lock.RunLock(tmp_path).acquire()
    _plant(tmp_path, host="other-node", boot_id="b", pid=1, lease_s=4.0, heartbeat=time.time() - 2.5)
    started = time.monotonic()
    run_lock.RunLock(tmp_path).acquire().release()
    assert time.monotonic() - started >= 1.5  # it waited out the rest of the lease


def test_a_lock_planted_as_a_symlink_is_refused_by_name(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("x")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / run_lock.LOCK_NAME).symlink_to(target)
    with pytest.raises(fsio.UnsafeFileError, match="run.lock is a symbolic link"):
        run_lock.RunLock(run_dir).acquire()
    assert target.read_text() == "x"


def test_the_heartbeat_renews_the_lock_and_release_removes_only_its_own(tmp_path):
    lock = run_lock.RunLock(tmp_path, lease_s=0.4).acquire()
    first = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"]
    deadline = time.monotonic() + 30
    while json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"] == first:
        assert time.monotonic() < deadline, "the heartbeat never renewed the lock"
        time.sleep(0.05)
    lock._stop.set()
    lock._thread.join()
    _plant(tmp_path, token="someone-else")  # taken over while we were stalled
    lock.release()
    assert (tmp_path / run_lock.LOCK_NAME).is_file()


# ---- 4. a stored config is data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def one_snapshot(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stored") / "run"
    _trainer(run_dir, "train.steps=1").fit()
    return run_dir


def _planted(one_snapshot: Path, tmp_path: Path, shards: str) -> tuple[Path, Path]:
    """A copy of the run whose snapshot's config says: read shards through ``shards``, cache FID in victim/."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(one_snapshot), str(run_dir)], check=True)
    state_file = checkpoint.list_checkpoints(run_dir)[-1] / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    victim = tmp_path / "victim"
    state["config"]["data"].update(source="shards", shards=shards)
    state["config"]["eval"]["cache_dir"] = str(victim)
    state["config"]["tracking"]["uri"] = f"file://{victim}"
    torch.save(state, state_file)
    return run_dir, victim


@pytest.mark.parametrize("command", ["pipe:touch {marker}; cat {tar}", "http://localhost:1/x';touch {marker};'.tar"])
def test_a_command_in_a_snapshots_stored_config_never_runs(one_snapshot, tmp_path, command):
    from sagan_dist import cli
    from sagan_dist.evaluation.command import load_snapshot

    marker = tmp_path / "PWNED"
    tar = next((one_snapshot / "data").glob("*.tar"))
    run_dir, victim = _planted(one_snapshot, tmp_path, command.format(marker=marker, tar=tar))
    with pytest.raises(SystemExit, match="never taken from a stored config; name them: --data 'PATTERN'"):
        cli.main(["attention", str(run_dir), "--net", "D", "--data", "--out", str(tmp_path / "maps")])
    assert cli.main(["evaluate", str(run_dir), "eval.num_samples=8"]) == 2  # config error: pass data.shards
    _, cfg, _, _ = load_snapshot(run_dir, [f"data.shards={tar}"], torch.device("cpu"))
    assert (cfg.data.shards, cfg.eval.cache_dir, cfg.tracking.uri) == (str(tar), "", "")
    assert not marker.exists() and not victim.exists()


def test_local_shards_in_a_stored_config_are_still_read(one_snapshot, tmp_path):
    from sagan_dist import cli

    tar = next((one_snapshot / "data").glob("*.tar"))
    run_dir, victim = _planted(one_snapshot, tmp_path, str(tar))
    out = tmp_path / "maps"
    assert cli.main(["attention", str(run_dir), "--net", "D", "--data", "--out", str(out), "--n", "2"]) == 0
    assert (out / "maps.pt").is_file() and not victim.exists()


# ---- 6. rank 0 chooses the snapshot ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_a_rank_that_cannot_load_rank_0s_snapshot_fails_the_group_naming_rank_and_file(tmp_path, monkeypatch,
                                                                                       damage):
    """Two "nodes" of one process each; node 1 runs in its own mount namespace where the newest
    snapshot's D.pt is another file (a stale NFS view): truncated (another size) or zeroed (same
    size, unreadable). Rank 0 reads it fine, so every rank must stop, naming rank 1 and the file,
    instead of rank 1 quietly resuming from the snapshot before."""
    from launcher.local import Rendezvous, free_port

    run_dir = tmp_path / "run"
    _trainer(run_dir, "train.steps=4", "train.checkpoint_every=2").fit()
    target = checkpoint.list_checkpoints(run_dir)[-1] / "D.pt"
    stale = tmp_path / "stale-D.pt"
    data = target.read_bytes()
    stale.write_bytes(data[:100] if damage == "truncated" else bytes(len(data)))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    master = f"127.0.0.1:{free_port()}"
    procs = []
    for node in (0, 1):
        rdzv = Rendezvous(min_nodes=2, max_nodes=2, node_rank=node, master=master)
        cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv.torchrun_flags(), "--nproc-per-node=1",
               "-m", "sagan_dist.cli", "train", "demo", *TINY, f"train.run_dir={run_dir}", "train.steps=6",
               "train.collective_timeout_s=120"]
        if node == 1:
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(stale), str(target), *cmd]
        procs.append(_cli_raw(cmd, tmp_path / f"node{node}.log"))
    rcs = [p.wait(timeout=500) for p in procs]
    logs = "\n".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert rcs[0] != 0 and rcs[1] != 0, logs[-4000:]
    assert f"rank 1 cannot load snapshot {target.parent}, which rank 0 chose" in logs, logs[-4000:]
    if damage == "truncated":
        assert f"{target}: 100 bytes here, {len(data)} bytes on rank 0" in logs
    assert "resumed from" not in logs and _steps(run_dir) == [2, 4]


def _cli_raw(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=log.parent)

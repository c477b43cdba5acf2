"""Stopping a run as a cluster does: a signal to torchrun's whole process group (the kubelet's
SIGTERM, torchrun forwarding it, Ctrl-C's SIGINT), with DataLoader workers reading; then resume.

Real processes throughout: `sagan-launch local` (which becomes torchrun), two gloo trainers, two
loader workers each. What a stop must give: a snapshot of the step reached, exit 143, and a rerun
of the same command that continues from that snapshot.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sagan_dist import checkpoint

pytestmark = pytest.mark.slow
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=100000", "train.checkpoint_every=100000",
        "tracking.enabled=false", "train.samples_per_class=2"]
LAUNCH = [sys.executable, "-m", "launcher.cli", "local"]


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [*LAUNCH, "--nproc", "2", "demo", *TINY, f"train.run_dir={run_dir}", *extra]
    # Its own session, as a container's PID 1 is: killpg then reaches torchrun, the trainers and
    # their loader workers, exactly as the kubelet's and torchrun's signals do.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])


def _wait_for(proc: subprocess.Popen, text: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"{text!r} not seen within {timeout_s}s:\n{''.join(lines[-40:])}")


def _stop_with(sig: int, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "data.workers=2", "train.steps=100000")
    _wait_for(proc, "step 3/", 240)  # training, with both ranks' workers reading
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    text = out.decode(errors="replace")
    snapshots = checkpoint.list_checkpoints(run_dir)
    assert snapshots, f"no snapshot after the stop signal:\n{text[-4000:]}"
    assert proc.returncode != 0, "a stopped run must not look completed"
    assert "is killed by signal" not in text, text[-4000:]
    assert "stop requested: wrote the snapshot" in text, text[-4000:]
    step = int(snapshots[-1].name.split("-")[1])
    # The same command again (a restarted pod) continues from the snapshot to two more steps.
    rerun = subprocess.run([*LAUNCH, "--nproc", "2", "demo", *TINY, f"train.run_dir={run_dir}", "data.workers=2",
                            f"train.steps={step + 2}"], capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[1])
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert f"at step {step}" in rerun.stdout, rerun.stdout[-4000:]
    assert checkpoint.list_checkpoints(run_dir)[-1].name == f"step-{step + 2:08d}"


def test_sigterm_to_the_process_group_with_loader_workers_snapshots_and_resumes(tmp_path):
    _stop_with(signal.SIGTERM, tmp_path)


def test_sigint_to_the_process_group_snapshots_and_resumes(tmp_path):
    _stop_with(signal.SIGINT, tmp_path)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_one_process_exits_128_plus_the_signal_after_a_snapshot(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sagan_dist.cli", "train", "demo", *TINY, f"train.run_dir={run_dir}",
           "data.workers=2", "train.steps=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for(proc, "step 2/", 240)
    os.killpg(proc.pid, sig)
    proc.communicate(timeout=120)
    assert proc.returncode == code
    assert checkpoint.list_checkpoints(run_dir)

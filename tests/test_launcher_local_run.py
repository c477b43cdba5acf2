"""Real multi-process runs through `sagan-launch local`: training, preemption by SIGTERM, resume.

Two CPU processes (gloo) on the demo config. Slow: each run starts torch twice over.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LAUNCH = [sys.executable, "-m", "launcher.cli", "local", "--nproc", "2", "demo", "tracking.enabled=false"]


def launch(run_dir: Path, *overrides: str, **popen: object) -> subprocess.Popen:
    """Output goes to a file: a pipe nobody reads while we poll could fill and stall training."""
    cmd = [*LAUNCH, f"train.run_dir={run_dir}", *overrides]
    with open(run_dir.parent / "launcher.out", "a") as out:
        return subprocess.Popen(cmd, cwd=run_dir.parent, stdout=out, stderr=subprocess.STDOUT, **popen)


def output(run_dir: Path) -> str:
    return (run_dir.parent / "launcher.out").read_text()


def snapshots(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def wait_for_log(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and (match := re.search(pattern, log.read_text())):
            return match
        assert proc.poll() is None, f"launcher exited early:\n{output(log.parent)}"
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in {log} after {timeout} s")


@pytest.mark.timeout(300)
def test_two_process_run_trains_and_writes_the_final_snapshot(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "train.steps=2")
    assert proc.wait(timeout=240) == 0, output(run_dir)
    assert "on 2 process(es)" in (run_dir / "train.log").read_text()
    assert snapshots(run_dir) == ["step-00000002"]


@pytest.mark.timeout(400)
def test_sigterm_snapshots_within_30_s_and_the_next_run_resumes_there(tmp_path):
    run_dir = tmp_path / "run"
    quiet = ["train.log_every=1", "train.sample_every=100000", "train.checkpoint_every=100000"]
    proc = launch(run_dir, "train.steps=100000", *quiet, start_new_session=True)
    try:
        wait_for_log(run_dir / "train.log", r"step 3/100000", proc, timeout=180)
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or `kill -TERM -PGID` would
        # Within 30 s (TimeoutExpired otherwise), and not as success: under Kubernetes a zero exit
        # would mark a preempted pod's work as done instead of restarting it; 143, not torchrun's 1,
        # so that a Job's podFailurePolicy can tell a stop from a crash.
        assert proc.wait(timeout=30) == 143, output(run_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (snapshot,) = snapshots(run_dir)
    step = int(snapshot.removeprefix("step-"))
    assert step >= 3, output(run_dir)
    assert f"stop requested: wrote the snapshot of step {step}" in (run_dir / "train.log").read_text()
    assert stop_line(run_dir) == (f"sagan-launch: stopped by SIGTERM: wrote snapshot "
                                  f"{run_dir / 'checkpoints' / snapshot}; run the same command again to resume from it")

    again = launch(run_dir, f"train.steps={step + 1}", *quiet)
    assert again.wait(timeout=240) == 0, output(run_dir)
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / snapshot} at step {step}" in log
    assert f"training from step {step} to {step + 1}" in log
    assert snapshots(run_dir)[-1] == f"step-{step + 1:08d}"


def stop_line(run_dir: Path) -> str:
    """The launcher's one line about a stop; no traceback (torchrun's SignalException) around it."""
    text = output(run_dir)
    assert "Traceback" not in text and "SignalException" not in text, text[-4000:]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("sagan-launch:")]
    return line


TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8", "train.log_every=1",
        "train.sample_every=100000", "train.checkpoint_every=100000", "train.steps=100000"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, to_group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)])
def test_a_stop_exits_128_plus_the_signal_with_one_line_naming_the_snapshot(tmp_path, sig, to_group, code):
    """Ctrl-C reaches the whole group; a kubelet signals only the container's PID 1 (the launcher,
    which became torchrun), which passes it on to the trainers."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir, *TINY, "train.resume=never", start_new_session=True)
    try:
        wait_for_log(run_dir / "train.log", r"step 2/100000", proc, timeout=180)
        os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)
        assert proc.wait(timeout=60) == code, output(run_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (snapshot,) = snapshots(run_dir)
    assert stop_line(run_dir) == (f"sagan-launch: stopped by {sig.name}: wrote snapshot "
                                  f"{run_dir / 'checkpoints' / snapshot}; resume from it with train.resume=auto "
                                  "(this run has train.resume=never)")


def test_a_stop_before_any_snapshot_says_so(tmp_path):
    from launcher.torchrun import stop_report

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000004").mkdir(parents=True)
    old = set(snapshots_paths(run_dir))
    line = stop_report("SIGTERM", (run_dir, "auto"), old)
    assert line == (f"stopped by SIGTERM before this run wrote a snapshot (see {run_dir / 'train.log'}); "
                    "run the same command again to resume from the latest one there, if any")
    (run_dir / "checkpoints" / "step-00000006").mkdir()
    assert stop_report("SIGTERM", (run_dir, "auto"), old).endswith("step-00000006; run the same command again "
                                                                  "to resume from it")
    assert stop_report("SIGINT", None, set()).startswith("stopped by SIGINT; the trainers were asked")


def snapshots_paths(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))

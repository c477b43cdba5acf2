"""The batch stream's processes and deadlines: workers that outlive a SIGTERM to the process group
and die on close(), stalled pipe: commands ending in DataStallError, stop() during a stall.
Real worker processes, real pipe: commands (bash, sleep), a real signalled subprocess."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sagan_dist.data import DataStallError, StopRequested, build_loader
from test_data_loader import make_cfg, write_id_shards

REPO = Path(__file__).resolve().parent.parent


def _procs() -> list[tuple[int, int, str]]:
    """(pid, session id, command line) of every process we can see."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie is dead, only not reaped yet
            out.append((int(entry), int(fields[3]), cmdline))
    return out


def _wait_until_gone(match, seconds: float = 5.0) -> list[tuple[int, int, str]]:
    deadline = time.monotonic() + seconds
    while (left := [p for p in _procs() if match(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


READER = r"""
import json, signal, sys, time
from sagan_dist import config
from sagan_dist.data import build_loader
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append("TERM"))  # as the trainer does
cfg = config.load(overrides=["data.source=shards", f"data.shards={sys.argv[1]}", "data.workers=2",
                             "model.resolution=32", "train.batch_size=4"])
stream = build_loader(cfg, sys.argv[1], 0, 1, seed=0)
for _ in range(3):
    next(stream)
print("ready", flush=True)
sys.stdin.readline()  # the test signals everything now
for _ in range(30):
    images, labels = next(stream)
began = time.monotonic()
stream.close()
print(json.dumps({"close_s": time.monotonic() - began, "got": got}), flush=True)
"""


def test_workers_survive_sigterm_to_the_process_group_and_close_kills_them(tmp_path: Path) -> None:
    shards = write_id_shards(tmp_path, [12] * 4)
    proc = subprocess.Popen([sys.executable, "-c", READER, shards], cwd=REPO, start_new_session=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = [pid for pid, sid, _ in _procs() if sid == proc.pid and pid != proc.pid]
        assert len(workers) >= 2
        os.killpg(proc.pid, signal.SIGTERM)  # what torchrun and the kubelet do ...
        for pid in workers:  # ... and, hostile, each worker directly, with Ctrl-C too
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["got"] == ["TERM"]  # the reader got the signal and read 30 more batches
    assert report["close_s"] < 4.0
    assert not _wait_until_gone(lambda p: p[1] == proc.pid or p[0] in workers)


def _sleeper() -> str:
    """A sleep command line no other process has, to find its processes afterwards."""
    return f"sleep 1000.{random.randrange(10**6):06d}"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stalled_pipe_command_ends_in_a_data_stall_error_and_leaves_no_process(tmp_path: Path, workers: int) -> None:
    write_id_shards(tmp_path, [12, 12])
    sleep = _sleeper()
    # Half a shard, then the command hangs with its stdout open: the reader waits for ever.
    pattern = f"pipe:bash -c 'cat {tmp_path}/train-{{000000..000001}}.tar | head -c 5000; {sleep}'"
    cfg = make_cfg(pattern, batch=4, world=1, workers=workers, stall_timeout_s=2)
    stream = build_loader(cfg, pattern, 0, 1, seed=0)
    began = time.monotonic()
    with pytest.raises(DataStallError) as info:
        stream.next_batch()
    assert 2.0 <= time.monotonic() - began < 10.0
    message = str(info.value)
    assert pattern in message and "rank 0" in message and "2 s" in message and "data.stall_timeout_s" in message
    assert stream.wait_s >= 2.0
    stream.close()  # already closed by the error; closing again is harmless
    assert not _wait_until_gone(lambda p: sleep in p[2])


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_during_a_stall_raises_stop_requested_promptly(tmp_path: Path, workers: int) -> None:
    write_id_shards(tmp_path, [12, 12])
    sleep = _sleeper()
    pattern = f"pipe:{sleep}; cat {tmp_path}/train-{{000000..000001}}.tar"
    cfg = make_cfg(pattern, batch=4, world=1, workers=workers, stall_timeout_s=600)
    stream = build_loader(cfg, pattern, 0, 1, seed=0)
    began = time.monotonic()
    with pytest.raises(StopRequested):
        stream.next_batch(stop=lambda: time.monotonic() > began + 1.0)  # SIGTERM arrives 1 s in
    # "Promptly" against the 600 s stall timeout, with room for a loaded 2-core machine (worker
    # start-up there has taken seconds); the wait is counted, never more than the time that passed.
    elapsed = time.monotonic() - began
    assert 1.0 <= elapsed < 30
    assert 0 < stream.wait_s <= elapsed
    began = time.monotonic()
    stream.close()
    assert time.monotonic() - began < 30
    assert not _wait_until_gone(lambda p: sleep in p[2])


def test_batches_are_counted_as_waited_for_and_next_still_works(tmp_path: Path) -> None:
    shards = write_id_shards(tmp_path, [12, 12])
    stream = build_loader(make_cfg(shards, batch=4, world=1, workers=0), shards, 0, 1, seed=0)
    images, labels = stream.next_batch()
    images2, _ = next(stream)
    assert images.shape == images2.shape == (4, 3, 32, 32) and labels.shape == (4,)
    assert 0 < stream.wait_s < 30
    stream.close()
    with pytest.raises(RuntimeError, match="closed"):
        stream.next_batch()

"""Many nodes for real: `sagan-launch local` on two hosts (network namespaces joined by a switch,
tests/netns.py), with what goes wrong on real clusters: a host name that resolves to loopback, a
trainer killed on one node, a node leaving and coming back (elastic), a cut cable.

Every host gets the /etc/hosts of a stock Debian (its host name is 127.0.1.1) and no
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME: the launcher must find the interface itself. Both hosts
share this machine's file system, so one run directory serves both, as shared storage does.
Slow: each run starts torch (and DeepSpeed) in every process; logs go to files (an unread pipe
could stall a job) and are searched while the job runs.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from netns import DEBIAN_HOSTS, Host, NetnsUnavailable, network

from sagan_dist import checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=100000", "tracking.enabled=false", "train.samples_per_class=2"]
MASTER = "10.77.0.1:29500"
COLLECTIVE_MESSAGE = "a collective failed: a peer process or node is gone, or the network is partitioned"


@pytest.fixture
def net() -> Iterator[list[Host]]:
    try:
        with network(2, etc_hosts=DEBIAN_HOSTS) as made:
            yield made
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")


def environment() -> dict[str, str]:
    """This environment without any interface variable: nothing is set by hand."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    return {**env, "OMP_NUM_THREADS": "1"}


class Node:
    """`sagan-launch local` on one host, in its own session (as a container's PID 1), logging to a file."""

    def __init__(self, host: Host, log: Path, nnodes: str, rank: int | None, run_dir: Path, *extra: str) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "launcher.cli", "local", "--nproc", "1", "--nnodes", nnodes, "--master", MASTER,
               *(["--node-rank", str(rank)] if rank is not None else []), "demo", *TINY,
               f"train.run_dir={run_dir}", *extra]
        with open(log, "a") as out:  # not Host.popen: its env= adds to this environment, variables included
            self.proc = subprocess.Popen(host.command(cmd), env=environment(), stdout=out, stderr=subprocess.STDOUT,
                                         cwd=ROOT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.log.name}: still running after {timeout:.0f} s:\n{self.text()[-3000:]}")

    def trainer(self) -> psutil.Process:
        """The trainer torchrun started (``ip netns exec`` and the launcher exec into torchrun)."""
        for child in psutil.Process(self.proc.pid).children():
            if "sagan_dist.cli" in " ".join(child.cmdline()):
                return child
        raise AssertionError(f"no trainer under {self.proc.pid}:\n{self.text()[-2000:]}")


def wait_for(nodes: list[Node], pattern: str, timeout: float, count: int = 1) -> float:
    """Until ``pattern`` occurs ``count`` times in the nodes' logs together; returns the time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(pattern, "".join(n.text() for n in nodes))) >= count:
            return time.monotonic()
        if all(n.proc.poll() is not None for n in nodes):
            break
        time.sleep(0.2)
    logs = "\n".join(f"== {n.log.name}\n{n.text()[-3000:]}" for n in nodes)
    raise AssertionError(f"{pattern!r} not seen {count} time(s) within {timeout:.0f} s:\n{logs}")


def segments(text: str) -> list[tuple[int, int, int]]:
    """(first step, processes, micro-batch) of each "training from step ..." line, in order."""
    return [(int(a), int(n), int(m)) for a, n, m in
            re.findall(r"training from step (\d+) to \d+ on (\d+) process\(es\).* micro-batch (\d+)", text)]


def last_step(run_dir: Path) -> int:
    snapshots = checkpoint.list_checkpoints(run_dir)
    return int(snapshots[-1].name.split("-")[1]) if snapshots else 0


def check_progress(text: str, steps: int) -> None:
    """Rank 0's step lines: after every restart training goes on from the newest snapshot logged
    before it (never further back), and reaches ``steps``."""
    saved, done, resumed = 0, 0, []
    for line in text.splitlines():
        if m := re.search(r"snapshot \S*step-(\d+)", line):
            saved = int(m.group(1))
        elif m := re.search(r"training from step (\d+) ", line):
            assert int(m.group(1)) == saved, f"resumed at step {m.group(1)}, the newest snapshot was {saved}"
            resumed.append(saved)
            done = saved
        elif m := re.search(rf"\] INFO sagan_dist\.train: step (\d+)/{steps} ", line):
            assert int(m.group(1)) == done + 1, f"step {m.group(1)} after step {done}"
            done += 1
    assert done == steps and saved == steps, text[-3000:]


# ---- the host name is a loopback address ---------------------------------------------------------
def test_the_trainer_refuses_a_multi_node_start_that_would_advertise_a_loopback_address(net):
    h1, _ = net
    probe = h1.run([sys.executable, "-c", "import socket; print(socket.gethostbyname(socket.gethostname()))"])
    assert probe.stdout.strip() == "127.0.1.1", probe  # the Debian layout tests/netns.py gave the host
    # What torchrun exports to rank 1 of a 2-node run, without the launcher's interface variables.
    env = {**environment(), "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "10.77.0.1", "MASTER_PORT": "29500"}
    proc = subprocess.run(h1.command([sys.executable, "-m", "sagan_dist.cli", "train", "demo", *TINY,
                                      "train.run_dir=/nonexistent/x"]),
                          env=env, cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "resolves to 127.0.1.1, a loopback address" in out and "GLOO_SOCKET_IFNAME" in out, out[-2000:]
    assert "Traceback" not in out, out[-2000:]  # one message, not a stack


# ---- training on two hosts -----------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_deepspeed_zero2_trains_to_the_end_on_two_hosts_without_interface_variables(net, tmp_path):
    run_dir = tmp_path / "run"
    nodes = [Node(host, tmp_path / f"node{r}.log", "2", r, run_dir, "engine=deepspeed", "deepspeed.zero_stage=2",
                  "train.steps=3") for r, host in enumerate(net)]
    for node in nodes:
        assert node.wait(240) == 0, node.text()[-3000:]
    assert segments(nodes[0].text()) == [(0, 2, 4)]
    assert last_step(run_dir) == 3
    snapshot = checkpoint.list_checkpoints(run_dir)[-1]
    assert sorted(p.name for p in (snapshot / "G" / "deepspeed").glob("zero_pp_rank_*optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]  # one shard per host


@pytest.mark.timeout(400)
def test_a_partition_ends_every_rank_within_the_deadline_and_the_rerun_resumes_and_finishes(net, tmp_path):
    """Also the plain DDP case: the rerun trains to the end on two hosts, no interface variable set."""
    timeout_s, steps = 20, 30
    run_dir, h2 = tmp_path / "run", net[1]
    args = ("train.checkpoint_every=4", f"train.collective_timeout_s={timeout_s}", f"train.steps={steps}")
    nodes = [Node(host, tmp_path / f"node{r}.log", "2", r, run_dir, *args) for r, host in enumerate(net)]
    wait_for(nodes, r"step 9/", 240)
    h2.cut()
    cut = time.monotonic()
    codes = [node.wait(timeout_s + 90) for node in nodes]
    ended = time.monotonic() - cut
    print(f"partition: both launchers exited {ended:.1f} s after the cut (deadline {timeout_s} s)")
    assert all(code != 0 for code in codes), codes
    for node in nodes:  # every rank, on both sides of the cut, says what happened
        assert COLLECTIVE_MESSAGE in node.text() and f"train.collective_timeout_s = {timeout_s}" in node.text(), \
            node.text()[-3000:]
    # The deadline plus the trainers' and torchrun's exit (seen: ~5 s), with room for a loaded machine.
    assert ended < timeout_s + 60
    saved = last_step(run_dir)
    assert 8 <= saved < steps

    h2.restore()
    logs = [tmp_path / f"rerun{r}.log" for r in (0, 1)]
    nodes = [Node(host, logs[r], "2", r, run_dir, *args) for r, host in enumerate(net)]
    for node in nodes:
        assert node.wait(240) == 0, node.text()[-3000:]
    text = nodes[0].text()
    assert f"at step {saved}" in text and segments(text) == [(saved, 2, 4)], text[-3000:]
    assert last_step(run_dir) == steps


@pytest.mark.timeout(400)
def test_a_lost_node_heals_with_a_restart_that_resumes_from_the_last_snapshot(net, tmp_path):
    timeout_s, steps = 20, 30
    run_dir = tmp_path / "run"
    args = ("--max-restarts", "2", "train.checkpoint_every=4", f"train.collective_timeout_s={timeout_s}",
            f"train.steps={steps}")
    nodes = [Node(host, tmp_path / f"node{r}.log", "2", r, run_dir, *args) for r, host in enumerate(net)]
    wait_for(nodes, r"step 9/", 240)
    nodes[1].trainer().kill()  # SIGKILL: the trainer, not torchrun (an OOM kill, a segfault)
    killed = time.monotonic()
    failed = wait_for(nodes[:1], COLLECTIVE_MESSAGE, timeout_s + 30)
    resumed = wait_for(nodes, r"resumed from \S+ at step \d+", 240)
    print(f"node loss: node 0's rank failed {failed - killed:.1f} s after the kill, the group resumed after "
          f"{resumed - killed:.1f} s")
    assert failed - killed < timeout_s + 10  # a reset arrives at once; a silent peer within the deadline
    for node in nodes:
        assert node.wait(240) == 0, node.text()[-3000:]
    text = "".join(n.text() for n in nodes)
    saved = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert saved >= 8  # step 9 was logged before the kill: the snapshot of step 8 existed
    assert segments(text) == [(0, 2, 4), (saved, 2, 4)]
    check_progress(text, steps)  # from the newest snapshot before the restart, on to the end
    assert last_step(run_dir) == steps


@pytest.mark.timeout(400)
def test_elastic_two_one_two_nodes_keeps_the_global_batch_and_the_step_count(net, tmp_path):
    # Enough steps that node 0 alone (~0.16 s a step here) cannot finish before node 1 is back (~8 s).
    steps = 150
    run_dir, (h1, h2) = tmp_path / "run", net
    args = ("train.checkpoint_every=10", "train.collective_timeout_s=20", f"train.steps={steps}")
    first = Node(h1, tmp_path / "node0.log", "1:2", None, run_dir, *args)
    second = Node(h2, tmp_path / "node1.log", "1:2", None, run_dir, *args)
    wait_for([first, second], r"step 8/", 240)
    os.killpg(second.proc.pid, signal.SIGTERM)  # node 1 leaves: its launcher's process group is stopped
    left = time.monotonic()
    second.wait(120)
    alone = wait_for([first], r"on 1 process\(es\)", 240)
    wait_for([first], rf"step {last_step(run_dir) + 3}/", 120)  # node 0 trains alone for a while
    second = Node(h2, tmp_path / "node1.log", "1:2", None, run_dir, *args)  # node 1 comes back
    back = time.monotonic()
    rejoined = wait_for([first], r"on 2 process\(es\)", 240, count=2)
    print(f"elastic: node 0 trained alone {alone - left:.1f} s after node 1 left; the group of 2 trained again "
          f"{rejoined - back:.1f} s after node 1 was started again")
    assert first.wait(240) == 0, first.text()[-3000:]
    assert second.wait(60) == 0, second.text()[-3000:]
    text = first.text()  # node 0 is in every round, and its address sorts first: rank 0 throughout
    world = segments(text)
    assert [(n, m) for _, n, m in world] == [(2, 4), (1, 8), (2, 4)], world  # train.batch_size 8 throughout
    assert world[0][0] == 0 and 0 < world[1][0] < world[2][0] < steps, world
    check_progress(text, steps)
    assert last_step(run_dir) == steps

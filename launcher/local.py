"""Command lines for torchrun (``sagan-launch local``) and DeepSpeed (``sagan-launch deepspeed``).

Both are built as argument lists from the launcher's options, after the config has been
resolved once with the run's world size, so a bad key or a batch size that does not split
over the ranks fails here instead of in N processes. Launchers are started as
``python -m <module>`` with this interpreter, never as ``torchrun``/``deepspeed`` from PATH,
so they always belong to the environment sagan-dist is installed in.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from launcher import LauncherError

TRAIN = ["--module", "sagan_dist.cli", "train"]


@dataclass(frozen=True)
class Rendezvous:
    """Where the node's processes meet: standalone on this host, or node 0 of several."""

    nnodes: int = 1
    node_rank: int = 0
    master: str = ""  # ADDR:PORT of node 0; "" when nnodes == 1

    def torchrun_flags(self) -> list[str]:
        if self.nnodes == 1:
            # c10d rendezvous on localhost with a free port: several local runs never collide.
            return ["--standalone", "--nnodes=1"]
        addr, port = split_master(self.master)
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",
                f"--master-addr={addr}", f"--master-port={port}"]


def split_master(master: str) -> tuple[str, int]:
    addr, sep, port = master.rpartition(":")
    if not sep or not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise LauncherError(f"--master {master!r} must be ADDR:PORT of node 0, e.g. 10.0.0.1:29500")
    return addr, int(port)


def check_rendezvous(rdzv: Rendezvous) -> None:
    if rdzv.nnodes < 1:
        raise LauncherError("--nnodes must be >= 1")
    if rdzv.nnodes > 1 and not rdzv.master:
        raise LauncherError("--nnodes > 1 needs --master ADDR:PORT (node 0's address, the same on every node)")
    if not 0 <= rdzv.node_rank < rdzv.nnodes:
        raise LauncherError(f"--node-rank {rdzv.node_rank} must be in [0, {rdzv.nnodes})")


def torchrun_command(nproc: int, rdzv: Rendezvous, train_items: Sequence[str],
                     max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run ... --module sagan_dist.cli train CONFIG... key=value...``"""
    if nproc < 1:
        raise LauncherError("--nproc must be >= 1")
    check_rendezvous(rdzv)
    return [sys.executable, "-m", "torch.distributed.run", *rdzv.torchrun_flags(),
            f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", *TRAIN, *train_items]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hostfile_slots(hostfile: Path) -> list[tuple[str, int]]:
    """``host slots=N`` lines of an MPI-style hostfile (comments and blank lines skipped)."""
    if not hostfile.is_file():
        raise LauncherError(f"hostfile {str(hostfile)!r} not found; write one line per node: 'HOST slots=N'")
    hosts = []
    for number, line in enumerate(hostfile.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.partition(" slots=")
        if not slots.strip().isdigit():
            raise LauncherError(f"{hostfile}:{number}: {line!r} is not 'HOST slots=N'")
        hosts.append((host.strip(), int(slots)))
    if not hosts:
        raise LauncherError(f"hostfile {str(hostfile)!r} lists no hosts")
    return hosts


def deepspeed_world_size(hosts: list[tuple[str, int]], nproc: int, nnodes: int) -> int:
    """Ranks the DeepSpeed runner starts: the first ``nnodes`` hosts, ``nproc`` slots each at most."""
    used = hosts[:nnodes] if nnodes > 0 else hosts
    return sum(min(slots, nproc) if nproc > 0 else slots for _, slots in used)


def deepspeed_command(hostfile: Path, nproc: int, nnodes: int, master_addr: str, master_port: int,
                      train_items: Sequence[str], single_host: bool = False) -> list[str]:
    """``python -m deepspeed.launcher.runner ... --module sagan_dist.cli train ...``.

    ``--no_local_rank``: the trainer reads LOCAL_RANK from the environment, and its argument
    parser would reject the ``--local_rank=N`` the runner appends otherwise. With one host the
    runner starts the processes here, so its ssh probe of that host is skipped and the
    rendezvous is on 127.0.0.1.
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile)]
    if nproc > 0:
        cmd += ["--num_gpus", str(nproc)]
    if nnodes > 0:
        cmd += ["--num_nodes", str(nnodes)]
    if single_host:
        cmd += ["--no_ssh_check"]
        master_addr = master_addr or "127.0.0.1"
    if master_addr:
        cmd += ["--master_addr", master_addr]
    return [*cmd, "--master_port", str(master_port), "--no_local_rank", *TRAIN, *train_items]


def exec_command(cmd: list[str]) -> None:
    """Become the launcher: signals (Ctrl-C, a scheduler's SIGTERM) then reach torchrun directly,
    which forwards them to the trainer processes."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)

"""Command lines for torchrun (``sagan-launch local``) and DeepSpeed (``sagan-launch deepspeed``).

Both are built as argument lists from the launcher's options, after the config has been
resolved once with the run's world size, so a bad key or a batch size that does not split
over the ranks fails here instead of in N processes. Launchers are started as
``python -m <module>`` with this interpreter, never as ``torchrun``/``deepspeed`` from PATH,
so they always belong to the environment sagan-dist is installed in.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from launcher import LauncherError

TRAIN = ["--module", "sagan_dist.cli", "train"]
# Prefixes of the variables DeepSpeed 0.19.8's runner exports on the pdsh line: its EXPORT_ENVS and
# every accelerator's export_envs() (a test compares). Not imported: that would pick an accelerator
# and print its notice into --print-command's output.
PDSH_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL", "BKCL", "XPU", "XMLIR", "LD_LIBRARY", "PATH",
                        "NEUWARE_HOME", "CNCL", "ASCEND", "HCCL", "BCCL", "BIREN", "SUPA")


@dataclass(frozen=True)
class Rendezvous:
    """Where the node's processes meet: standalone on this host, node ``node_rank`` of a fixed
    number (static rendezvous on node 0), or one of MIN..MAX nodes (elastic, c10d)."""

    min_nodes: int = 1
    max_nodes: int = 1
    node_rank: int | None = None
    master: str = ""  # ADDR:PORT of node 0, or of the c10d store when elastic
    elastic: bool = False  # --nnodes MIN:MAX
    rdzv_id: str = ""  # elastic: the job's id, the same on every node
    local_addr: str = ""  # elastic: the address other nodes reach this one at ("" on loopback: torchrun's guess)
    store_host: bool = False  # elastic: this node holds the master's address, so it hosts the c10d store

    @property
    def multi_node(self) -> bool:
        return self.max_nodes > 1 or self.elastic

    def torchrun_flags(self) -> list[str]:
        if not self.multi_node:
            # c10d rendezvous on localhost with a free port: several local runs never collide.
            return ["--standalone", "--nnodes=1"]
        addr, port = split_master(self.master)
        if self.elastic:
            # c10d: the node whose address is the endpoint hosts the store; ranks are assigned at
            # each rendezvous, so nodes may leave and (re)join between MIN and MAX.
            # --local-addr and is_host are given because torchrun would guess them from the host name,
            # which /etc/hosts often maps to 127.0.x.1: no node would host the store, and the workers
            # would be pointed at a loopback address.
            return [f"--nnodes={self.min_nodes}:{self.max_nodes}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={_join_host_port(addr, port)}", f"--rdzv-id={self.rdzv_id}",
                    *([f"--local-addr={self.local_addr}"] if self.local_addr else []),
                    *(["--rdzv-conf=is_host=true"] if self.store_host else [])]
        return [f"--nnodes={self.max_nodes}", f"--node-rank={self.node_rank or 0}",
                f"--master-addr={addr}", f"--master-port={port}"]


# Elastic runs: each rendezvous round's rank-0 node publishes a fresh address and port for the
# trainers' store, instead of torchrun's one store shared by every round. With the shared one a node
# that joins a later round waits forever for an address nobody republishes, and a restarted trainer
# can read the previous round's keys (pytorch/pytorch#135712).
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def parse_nnodes(text: str) -> tuple[int, int, bool]:
    """``N`` or ``MIN:MAX`` -> (min, max, elastic)."""
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise LauncherError(f"--nnodes {text!r} must be N or MIN:MAX (e.g. 2, or 1:4 for elastic)")
    low, high = int(parts[0]), int(parts[-1])
    if low < 1 or high < low:
        raise LauncherError(f"--nnodes {text!r}: need 1 <= MIN <= MAX")
    return low, high, len(parts) == 2


def split_master(master: str) -> tuple[str, int]:
    addr, sep, port = master.rpartition(":")
    if not sep or not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise LauncherError(f"--master {master!r} must be ADDR:PORT of node 0, e.g. 10.0.0.1:29500")
    return addr.strip("[]"), int(port)  # [::1]:29500 -> ::1


def _join_host_port(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def check_rendezvous(rdzv: Rendezvous) -> None:
    if rdzv.multi_node and not rdzv.master:
        raise LauncherError("--nnodes > 1 needs --master ADDR:PORT (node 0's address, the same on every node)")
    if rdzv.elastic and rdzv.node_rank is not None:
        raise LauncherError("--node-rank does not apply to --nnodes MIN:MAX: the c10d rendezvous assigns ranks")
    if not rdzv.elastic and not 0 <= (rdzv.node_rank or 0) < rdzv.max_nodes:
        raise LauncherError(f"--node-rank {rdzv.node_rank} must be in [0, {rdzv.max_nodes})")


DEFAULT_GRACE_S = 90  # seconds trainers get to write a snapshot after a stop signal


def default_rdzv_id(run_dir: str) -> str:
    """Stable per run: every node derives the same id from the same train.run_dir, and a
    resubmission of the run meets under the same id."""
    return "sagan-" + hashlib.sha256(run_dir.encode()).hexdigest()[:12]


def torchrun_command(nproc: int, rdzv: Rendezvous, train_items: Sequence[str],
                     max_restarts: int = 0, grace_s: int = DEFAULT_GRACE_S) -> list[str]:
    """``python -m launcher.torchrun ... --module sagan_dist.cli train CONFIG... key=value...``

    launcher.torchrun is torchrun with a stop signal reported as a stop (exit 143/130, one line).
    ``grace_s`` is torchrun's --shutdown-timeout: after a stop signal it SIGKILLs the trainers
    that have not exited by then (its own default, 30 s, can be shorter than a snapshot write).
    """
    if nproc < 1:
        raise LauncherError("--nproc must be >= 1")
    if max_restarts < 0:
        raise LauncherError("--max-restarts must be >= 0")
    check_rendezvous(rdzv)
    return [sys.executable, "-m", "launcher.torchrun", *rdzv.torchrun_flags(),
            f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", f"--shutdown-timeout={grace_s}",
            *TRAIN, *train_items]


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

    How the train items travel depends on the path the runner takes. With one host it starts
    the processes itself with an argument list: items go as they are. With several it runs
    pdsh, which joins everything into one line for each host's remote shell: items are then
    quoted for that shell (`remote_quote`), so ``train.run_dir=/runs/a;id`` stays one argument
    and runs nothing.
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
    items = list(train_items) if single_host else [remote_quote(i) for i in train_items]
    return [*cmd, "--master_port", str(master_port), "--no_local_rank", *TRAIN, *items]


def remote_quote(item: str) -> str:
    """Quote ``item`` for the remote shell of DeepSpeed's pdsh path.

    DeepSpeed's PDSHRunner.parse_user_args wraps an item containing a space in double quotes
    (escaping only ``"``), so such items must not be single-quoted as well: for them, escape
    what stays special inside double quotes (backslash, ``$``, backquote). Items without a
    space are left alone by DeepSpeed and get ordinary POSIX single quotes.
    """
    if " " not in item:
        return shlex.quote(item)
    return re.sub(r"([\\$`])", r"\\\1", item)


def pdsh_exports(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables DeepSpeed's runner will export on the pdsh line, escaped for it.

    The runner writes ``export NAME=VALUE;`` for each variable with one of its prefixes (MLFLOW,
    PYTHON, the accelerator's NCCL, ...) and wraps a VALUE holding any special character in double
    quotes, escaping nothing: ``$(...)``, backquotes and ``"`` in a value would run on every host.
    Escaped here, they reach the remote environment as they are. Returns only the changed ones.
    """
    return {k: re.sub(r'([\\$`"])', r"\\\1", v) for k, v in environ.items()
            if k.startswith(PDSH_EXPORT_PREFIXES) and re.search(r'[\\$`"]', v)}


def exec_command(cmd: list[str], env: Mapping[str, str] | None = None) -> None:
    """Become the launcher: signals (Ctrl-C, a scheduler's SIGTERM) then reach torchrun directly,
    which forwards them to the trainer processes. ``env`` is added to this environment."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, **(env or {})})

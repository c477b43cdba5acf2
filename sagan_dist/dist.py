"""Process group: set up from the torchrun / Kubernetes environment, torn down on every exit path.

torchrun (and the Kubeflow operators, and our Indexed Job) export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; without them we run as a single process with no process group.

Every collective has a deadline, ``train.collective_timeout_s``: a peer that vanished without a
TCP reset, or a partitioned network, ends every rank with `CollectiveTimeout` instead of a stall.
A second, CPU-side gloo group carries the trainer's control messages (the stop agreement), so they
never queue behind gradient traffic nor make a GPU wait.
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from sagan_dist.errors import Reported


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class CollectiveTimeout(RuntimeError, Reported):
    """A collective did not complete within train.collective_timeout_s."""


class LoopbackAddressError(RuntimeError, Reported):
    """A multi-node run would advertise a loopback address to its peers."""


_control_group: Any = None


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout_s: float = 600.0) -> Iterator[DistInfo]:
    """Initialise (if launched distributed) and always destroy the process group on exit."""
    global _control_group
    world = env_world_size()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    started = False
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        check_advertised_address(backend)
        if backend == "nccl":
            nccl_errors_raise()
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        _control_group = dist.new_group(backend="gloo", timeout=timeout)
        started = True
    try:
        yield DistInfo(rank, world, local_rank, device)
    finally:
        if started and dist.is_initialized():
            _control_group = None
            dist.destroy_process_group()


def nccl_errors_raise() -> None:
    """Have NCCL's watchdog abort the communicator on a timeout or error, not the process.

    torch's default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3) SIGABRTs every rank once a collective
    outlives ``train.collective_timeout_s``, so `CollectiveTimeout` and its message never came on
    GPUs. With 2 ("abort the communicator only") the main thread's next collective or wait raises
    a DistBackendError, which `collective_failures` turns into the same one-line message as on
    gloo. A value the user exported is kept; a rank that still dies by SIGABRT (exit 134: the
    watchdog's own heartbeat monitor) is a failed worker to torchrun, restarted like a lost peer.
    """
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


# What gloo and NCCL say when a peer is gone or a collective ran out of time.
PEER_FAILURE_SIGNS = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                      "Connection refused", "NCCL communicator was aborted", "Watchdog caught collective",
                      "Broken pipe", "No route to host")


@contextlib.contextmanager
def collective_failures(timeout_s: float) -> Iterator[None]:
    """Turn a collective that failed because a peer vanished or timed out into CollectiveTimeout."""
    try:
        yield
    except RuntimeError as e:  # gloo raises plain RuntimeErrors, NCCL DistBackendError (a RuntimeError)
        text = str(e)
        if isinstance(e, CollectiveTimeout) or not (
                isinstance(e, dist.DistError) or any(sign in text for sign in PEER_FAILURE_SIGNS)):
            raise
        raise CollectiveTimeout(
            f"a collective failed: a peer process or node is gone, or the network is partitioned "
            f"(deadline train.collective_timeout_s = {timeout_s:g} s). Every rank exits so that the job's "
            f"restart policy can act; the run resumes from its last snapshot. Cause: "
            f"{text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__}") from e


def is_multi_node() -> bool:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return env_world_size() > local


def check_advertised_address(backend: str) -> None:
    """Refuse a multi-node run whose ranks would advertise a loopback address to each other.

    Without GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, gloo and NCCL advertise the address the
    host name resolves to, which is 127.0.1.1 in the usual Debian /etc/hosts: the peers then try
    to connect to themselves and the run never starts.
    """
    if not is_multi_node():
        return
    names = ["GLOO_SOCKET_IFNAME"] + (["NCCL_SOCKET_IFNAME"] if backend == "nccl" else [])
    if all(os.environ.get(n) for n in names):
        return
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return  # not resolvable: gloo picks an interface itself
    if ipaddress.ip_address(address).is_loopback:
        raise LoopbackAddressError(
            f"this is a multi-node run, but the host name {host!r} resolves to {address}, a loopback "
            f"address, which gloo/NCCL would advertise to the other nodes (they could never connect). "
            f"Start it with `sagan-launch local --nnodes ... --master ADDR:PORT` (it picks the interface "
            f"that reaches the master), or set {' and '.join(names)} to the interface of this host's "
            f"network, e.g. eth0")


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2; "max 100000" means no quota
        quota, period = open("/sys/fs/cgroup/cpu.max", encoding="ascii").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii").read())
        period_us = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii").read())
        if quota_us > 0:
            cpus = min(cpus, max(1, math.ceil(quota_us / period_us)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def configure_threads() -> int:
    """Intra-op threads: the usable CPUs shared by this node's processes, unless OMP_NUM_THREADS is set.

    More threads than usable CPUs made steps 10-15x slower (OpenMP threads spin against each
    other); torchrun's OMP_NUM_THREADS=1 default for several processes is respected as set.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, usable_cpus() // local)
    torch.set_num_threads(threads)
    return threads


def control_group() -> Any:
    """The CPU-side gloo group for control messages (None outside a process group)."""
    return _control_group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_max(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def replica_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers that must agree across replicas after an update: BatchNorm
    running statistics (each rank's batch moves them) and spectral-norm u/v (equal weights give
    equal u/v only where every rank runs the same kernels). ``num_batches_tracked`` counts
    forwards, which every rank runs equally often."""
    return [b for b in module.buffers() if b.is_floating_point()]


def broadcast_coalesced(tensors: list[torch.Tensor], src: int = 0) -> int:
    """Rank ``src``'s values of ``tensors`` on every rank: one collective per dtype (usually one).

    Returns the number of collectives launched, for the benchmarks' accounting.
    """
    if not tensors or not is_distributed():
        return 0
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=src)
            torch._foreach_copy_(group, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in group]), group)])
    return len(by_dtype)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; over the CPU control group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all ranks along dim 0."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, rank, step)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)

"""Process group: set up from the torchrun / Kubernetes environment, torn down on every exit path.

torchrun (and the Kubeflow operators, and our Indexed Job) export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; without them we run as a single process with no process group.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


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


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout_s: int = 1800) -> Iterator[DistInfo]:
    """Initialise (if launched distributed) and always destroy the process group on exit."""
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
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        started = True
    try:
        yield DistInfo(rank, world, local_rank, device)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


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


def batch_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers that depend on each rank's batch: BatchNorm running statistics.

    Spectral-norm u/v depend only on the (identical) weights, and ``num_batches_tracked`` counts
    forwards, which every rank runs equally often; neither can drift apart between ranks.
    """
    stats = []
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            stats += [m.running_mean, m.running_var]
    return stats


def broadcast_coalesced(tensors: list[torch.Tensor], src: int = 0) -> int:
    """Rank ``src``'s values of ``tensors`` (one dtype) on every rank, in one collective.

    Returns the number of collectives launched (0 or 1), for the benchmarks' accounting.
    """
    if not tensors or not is_distributed():
        return 0
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return 1


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all ranks along dim 0."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, rank, segment start step)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)

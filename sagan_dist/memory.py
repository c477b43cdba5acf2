"""Refuse a batch that cannot fit before any step runs (instead of growing memory for ever).

The test is a lower bound, so it never refuses a batch that fits: the largest single activation
of G and D (the D step sees real and fake images together, so twice the micro-batch) must fit
in the memory this process can still get. Measured with one eval-mode forward of one sample per
net (eval mode: BatchNorm statistics and spectral-norm vectors do not move, so resume stays exact).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from sagan_dist.config import ConfigError

GIB = 2**30


class BatchTooLargeError(ConfigError):
    """The configured batch cannot fit in this device's memory."""


def available_bytes(device: torch.device) -> int:
    """Memory this process can still allocate: free GPU memory, or MemAvailable capped by the cgroup."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = _meminfo_available()
    try:
        limit = open("/sys/fs/cgroup/memory.max", encoding="ascii").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current", encoding="ascii").read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _meminfo_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 2**62


def largest_activation_per_sample(g: nn.Module, d: nn.Module, z_dim: int, autocast: ContextManager | None = None,
                                  device: torch.device = torch.device("cpu")) -> int:
    """Bytes of the largest module output of G or D for one sample."""
    largest = 0

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        nonlocal largest
        if torch.is_tensor(out):
            largest = max(largest, out.numel() * out.element_size())

    modes = [(m, m.training) for m in (g, d)]
    handles = [m.register_forward_hook(hook) for net in (g, d) for m in net.modules()]
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad(), autocast or contextlib.nullcontext():
            y = torch.zeros(1, dtype=torch.long, device=device)
            d(g(torch.zeros(1, z_dim, device=device), y), y)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.train(training)
    return largest


def check_batch_fits(micro_batch: int, per_sample: int, device: torch.device, batch_size: int) -> None:
    """Raise BatchTooLargeError (naming train.batch_size) if the batch cannot possibly fit."""
    need = 2 * micro_batch * per_sample
    have = available_bytes(device)
    if need > have:
        raise BatchTooLargeError(
            f"config key 'train.batch_size' = {batch_size} gives each process a micro-batch of "
            f"{micro_batch}, which needs at least {need / GIB:.1f} GiB for the largest activation "
            f"alone; this {device.type} has {have / GIB:.1f} GiB available. Lower train.batch_size, "
            "or raise train.accumulation (the micro-batch is batch_size / (processes x accumulation))")

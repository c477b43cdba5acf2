"""DistributedDataParallel engine with torch.amp: autocast, a GradScaler for fp16, clipping.

Spectral-norm u/v and BatchNorm statistics are buffers; DDP broadcasts rank 0's buffers before
every forward, so they stay identical on all ranks.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sagan_dist.dist import is_distributed
from sagan_dist.engines.base import Engine, StepResult


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DDPEngine(Engine):
    def __init__(self, model: nn.Module, lr: float, betas: tuple[float, float], precision: str,
                 grad_clip: float, device: torch.device, is_main: bool, sync_bn: bool = False) -> None:
        self.device, self.precision, self.is_main, self.grad_clip = device, precision, is_main, grad_clip
        if sync_bn and is_distributed():
            if device.type != "cuda":
                raise ValueError("model.sync_bn=true needs CUDA devices (torch's SyncBatchNorm has "
                                 "no CPU kernel); set model.sync_bn=false on CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.raw = model.to(device)
        self.module = (DistributedDataParallel(self.raw, device_ids=[device] if device.type == "cuda" else None)
                       if is_distributed() else self.raw)
        # Betas as floats: torch 2.14's Adam rejects an int beta such as (0, 0.9).
        self.optimizer = torch.optim.Adam(self.raw.parameters(), lr=lr, betas=(float(betas[0]), float(betas[1])))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def accumulating(self, last: bool) -> ContextManager:
        if last or not isinstance(self.module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> StepResult:
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        applied = math.isfinite(norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        if is_distributed():
            # DDP hands out rank 0's buffers before each forward, but the step's last forward
            # leaves every rank with BatchNorm statistics of its own batch: re-sync, so that the
            # replicas and the EMA generator (which copies G's buffers) are the same on all ranks.
            for b in self.raw.buffers():
                torch.distributed.broadcast(b, src=0)
        return StepResult(applied, norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def save(self, path: Path) -> None:
        if self.is_main:  # DDP replicas are identical: rank 0 writes for all
            _atomic_torch_save(self.state_dict(), path.with_suffix(".pt"))

    def load(self, path: Path) -> None:
        state = torch.load(path.with_suffix(".pt"), map_location=self.device, weights_only=True)
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

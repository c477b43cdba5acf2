"""DistributedDataParallel engine with torch.amp: autocast, a GradScaler for fp16, clipping.

The step never reads the device. The gradient norm stays a tensor, and an update with
non-finite gradients is masked inside the optimizer: fused Adam takes a ``found_inf`` tensor and
leaves weights, moments and its step count untouched when it is 1 (the GradScaler path does the
same for fp16). The loop reads the results at logging steps.

Collectives. DDP all-reduces gradients in buckets during backward (``gradient_as_bucket_view``:
the gradients *are* the buckets, so nothing is copied in or out and the layout contract holds).
DDP's own buffer broadcast before every forward is off: the buffers that can differ between ranks
(BatchNorm statistics of each rank's batch; spectral-norm u/v, kept equal for ranks whose kernels
differ) are handed out from rank 0 once per update, in one coalesced collective.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sagan_dist import fsio
from sagan_dist.dist import broadcast_coalesced, is_distributed, replica_buffers
from sagan_dist.engines.base import Engine, StepResult, match_parameter_layout


def adam(params: list[nn.Parameter], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.Adam:
    """Fused Adam (CPU and CUDA): one kernel per step, and it takes the skip decision as a tensor.

    Betas as floats: torch 2.14's Adam rejects an int beta such as (0, 0.9).
    """
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, betas=(float(betas[0]), float(betas[1])), fused=fused or None)


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
        if is_distributed():
            # Zero gradients before DDP wraps the model: DDP turns existing gradients into views of
            # its buckets at construction, so every backward (the first included) accumulates into
            # the buckets in place, whatever strides a kernel gives its gradient (1x1 conv weight
            # gradients come out as [48, 24, 1, 1] with strides [24, 1, 24, 24]: no copy, no warning).
            for p in self.raw.parameters():
                p.grad = torch.zeros_like(p)
        self.module = (DistributedDataParallel(self.raw, device_ids=[device] if device.type == "cuda" else None,
                                               forward_sync_buffers=False, gradient_as_bucket_view=True)
                       if is_distributed() else self.raw)
        self.optimizer = adam(list(self.raw.parameters()), lr, betas, device)
        self.configured = {"lr": float(lr), "betas": (float(betas[0]), float(betas[1]))}
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._buffers = replica_buffers(self.raw)

    def accumulating(self, last: bool) -> ContextManager:
        if last or not isinstance(self.module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def zero_grad(self) -> None:
        # Zeros, not None: with gradient_as_bucket_view the gradients are DDP's bucket views, and
        # keeping them lets backward accumulate into the buckets in place.
        self.optimizer.zero_grad(set_to_none=not isinstance(self.module, DistributedDataParallel))

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> StepResult:
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.raw.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).float()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.raw.parameters(), self.grad_clip, norm)
        finite = torch.isfinite(norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # masks the update itself on inf/nan, on the device
            self.scaler.update()
        else:
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            self.optimizer.found_inf = None
        broadcast_coalesced(self._buffers)
        return StepResult(finite, norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def save(self, path: Path) -> None:
        if self.is_main:  # DDP replicas are identical: rank 0 writes for all
            fsio.save_torch(self.state_dict(), path.with_suffix(".pt"))

    def load(self, path: Path) -> dict[str, tuple[Any, Any]]:
        state = fsio.load_torch(path.with_suffix(".pt"), map_location=self.device)
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        match_parameter_layout(self.optimizer)  # the saving run may have had another memory format
        self.scaler.load_state_dict(state["scaler"])
        return self.apply_configured(self.optimizer.param_groups)


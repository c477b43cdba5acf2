"""The interface the training loop talks to: one network with its optimizer and precision policy.

The loop holds two engines, G and D, and only ever calls what is below; DDP and DeepSpeed each
implement it. Engines know nothing of GAN losses: the loop computes a loss and hands it over.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> int:
    """Give every per-parameter optimizer tensor (Adam's moments) its parameter's strides; returns how many moved.

    ``Optimizer.load_state_dict`` keeps the strides a moment was saved with, and ``model.channels_last``
    (auto: on for CUDA, off on CPU) may differ between the run that saved and the one that resumes.
    Fused Adam walks moments and parameter in storage order, so NHWC moments of an NCHW parameter
    update the wrong elements silently on CPU, and CUDA's fused kernel refuses them.
    """
    moved = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
                moved += 1
    return moved


@dataclass(frozen=True)
class StepResult:
    """What one update did, kept on the device: reading it on the host would stall a GPU's queue,
    so the loop accumulates these and reads them at logging steps only."""

    applied: torch.Tensor  # 0-dim bool: False = non-finite gradients, the update was skipped
    grad_norm: torch.Tensor  # 0-dim float32 (nan where the engine does not know it)


class Engine(ABC):
    module: nn.Module  # what to call in training (a DDP or DeepSpeed wrapper)
    raw: nn.Module  # the plain model inside (for EMA, sampling, and calls that must not sync)
    device: torch.device
    precision: str
    configured: dict[str, Any]  # the config's optimizer settings: {"lr": float, "betas": (float, float)}

    def autocast(self) -> ContextManager:
        """Mixed-precision context for forward passes (identity in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISION_DTYPES[self.precision])

    @abstractmethod
    def accumulating(self, last: bool) -> ContextManager:
        """Around one micro-batch's forward+backward; gradients are synchronised only if ``last``."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> StepResult:
        """Clip, check for non-finite gradients (skipping the update if any), and update."""

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def save(self, path: Path) -> None:
        """Collective: every rank calls it; writes this network's weights and optimizer state."""

    @abstractmethod
    def load(self, path: Path) -> dict[str, tuple[Any, Any]]:
        """Collective: restore what `save` wrote; raises if it is missing or unreadable. The
        configured learning rate and betas replace the snapshot's (see `apply_configured`)."""

    def apply_configured(self, param_groups: list[dict[str, Any]]) -> dict[str, tuple[Any, Any]]:
        """Put the configured ``lr`` and ``betas`` (``self.configured``) into a just-loaded
        optimizer's groups: a changed config must win over the snapshot, or lowering train.lr_d
        after a NaN storm would silently do nothing. Returns {name: (saved, configured)} of those
        that differed."""
        changed = {}
        for key, value in self.configured.items():
            saved = param_groups[0].get(key)
            if saved is not None and _floats(saved) != _floats(value):
                changed[key] = (saved, value)
            for group in param_groups:
                group[key] = value
        return changed

    def set_requires_grad(self, flag: bool) -> None:
        self.raw.requires_grad_(flag)


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),)

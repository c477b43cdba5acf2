"""Exponential moving average of G with a half-life that ramps up with the images seen.

As in stylegan2-ada: the half-life is ``ema_kimg`` thousand images, but never more than
``images_seen * ema_rampup``, so early in a run (or in a short one) the EMA follows G closely
instead of averaging in the random initialisation.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch_size: int, images_seen: int, ema_kimg: float, ema_rampup: float) -> float:
    half_life = ema_kimg * 1000
    if ema_rampup > 0:
        half_life = min(half_life, images_seen * ema_rampup)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


class EMA:
    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.model.float()

    @torch.no_grad()
    def follow(self, model: nn.Module, device: torch.device) -> None:
        """Move the copy to ``device`` with each tensor in the strides of ``model``'s (channels_last).

        The copy is taken before ``model.channels_last`` changes G's layout; with NCHW copies of NHWC
        parameters ``_foreach_lerp_`` falls back to a slow per-tensor path every step.
        """
        self.model.to(device)
        for mine, theirs in zip([*self.model.parameters(), *self.model.buffers()],
                                [*model.parameters(), *model.buffers()]):
            if mine.shape == theirs.shape and mine.stride() != theirs.stride():
                mine.data = torch.empty_like(theirs, dtype=mine.dtype, device=device).copy_(mine)

    @torch.no_grad()
    def update(self, model: nn.Module, beta: float) -> None:
        """``ema = beta * ema + (1 - beta) * model`` for parameters; buffers are copied."""
        # foreach: a handful of kernels for all tensors instead of two per tensor (GPU launch cost).
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach().float() for p in model.parameters()],
                             1.0 - beta)
        torch._foreach_copy_(list(self.model.buffers()), list(model.buffers()))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

"""Activation checkpointing of the blocks at high feature-map resolution, applied from outside.

Wrapping replaces a block's ``forward`` on the instance instead of nesting it in a wrapper module,
so state-dict keys (and checkpoints) are the same with checkpointing on or off.

The recomputation must not change state a second time: while it runs, BatchNorm layers update
their running statistics with momentum 0 (unchanged, bit for bit; turning tracking off instead
would save fewer tensors and fail checkpoint's recomputation check) and get their batch counter
back, and spectral norm reuses its u/v instead of advancing the power iteration.
Non-reentrant checkpointing also restores the RNG state, so dropout would replay identically.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sagan_dist.models.attention import SelfAttention
from sagan_dist.models.layers import DBlock, GBlock, SpectralNorm


@contextlib.contextmanager
def _recomputing(block: nn.Module) -> Iterator[None]:
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sns = [m for m in block.modules() if isinstance(m, SpectralNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    for m in sns:
        m.recomputing = True
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
        for m in sns:
            m.recomputing = False


def _checkpointed_forward(block: nn.Module, forward: Callable, *args: torch.Tensor) -> torch.Tensor:
    if not (block.training and torch.is_grad_enabled()):
        return forward(*args)
    contexts = lambda: (contextlib.nullcontext(), _recomputing(block))  # noqa: E731
    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)


def apply_activation_checkpointing(model: nn.Module, from_resolution: int,
                                   include_residual_blocks: bool = False) -> list[str]:
    """Checkpoint attention blocks (and optionally residual blocks) at maps >= ``from_resolution``.

    Returns the names of the wrapped blocks. ``from_resolution`` 0 leaves the model as it is.
    """
    if from_resolution <= 0:
        return []
    kinds: tuple[type, ...] = (SelfAttention,) + ((GBlock, DBlock) if include_residual_blocks else ())
    wrapped = []
    for name, block in model.named_modules():
        if isinstance(block, kinds) and block.resolution >= from_resolution:
            block.forward = functools.partial(_checkpointed_forward, block, block.forward)
            wrapped.append(name)
    return wrapped

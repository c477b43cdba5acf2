"""Activation checkpointing of the blocks at high feature-map resolution, applied from outside.

Wrapping replaces a block's ``forward`` on the instance instead of nesting it in a wrapper module,
so state-dict keys (and checkpoints) are the same with checkpointing on or off.

What is checkpointed: attention blocks, and with ``include_residual_blocks`` the residual blocks.
G's residual block is checkpointed in three pieces (cBN-ReLU-up-conv1 | cBN-ReLU-conv2 |
up-shortcut, see ``GBlock``): its input and conv1's output are kept, and backward recomputes one
piece at a time. Recomputing the whole block at once brought all of its activations back together
and set the step's memory peak at 256 px (x0.50 of no checkpointing, against x0.46 in pieces;
BENCHMARKS.md). D's blocks are checkpointed whole.

The recomputation must not change state a second time. In eager mode, while it runs, BatchNorm
layers update their running statistics with momentum 0 (unchanged, bit for bit; turning tracking
off instead would save fewer tensors and fail checkpoint's recomputation check) and get their
batch counter back, and spectral norm reuses its u/v instead of advancing the power iteration.
Non-reentrant checkpointing also restores the RNG state, so dropout would replay identically.
Under ``torch.compile`` the checkpointed regions are traced into the compiled graph (no graph
break), where the rules hold by construction: AOTAutograd applies the buffer updates (BatchNorm
statistics and batch counter, spectral-norm u/v) once, after the forward graph, and the backward
graph recomputes only values, never mutations. What the recomputation must not do is read u/v,
which by then hold the updated vectors: recomputing the power iteration from those is the likely
cause of the G gradients up to 10% off eager seen when the regions were first traced (torch 2.14,
inductor; the earlier code ran them eagerly instead). So spectral norm's matrix-vector products
(``mv``, ``dot``: vectors and a scalar) are saved under a selective-checkpoint policy and everything
else is recomputed. Compiled checkpointed steps agree with eager within the tolerance of
tests/test_acceleration.py (5e-3 of each gradient's scale, the same as without checkpointing).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from sagan_dist.models.attention import SelfAttention
from sagan_dist.models.layers import DBlock, GBlock, SpectralNorm


@contextlib.contextmanager
def _recomputing(*modules: nn.Module) -> Iterator[None]:
    norms = [m for root in modules for m in root.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sns = [m for root in modules for m in root.modules() if isinstance(m, SpectralNorm)]
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


# Spectral norm's matrix-vector products: saved, never recomputed, under torch.compile (see the
# module docstring). Their outputs are vectors (and sigma a scalar), so saving them costs nothing.
_SPECTRAL_NORM_OPS = frozenset({torch.ops.aten.mv.default, torch.ops.aten.dot.default})


def _save_spectral_norm_ops(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SPECTRAL_NORM_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_spectral_norm_contexts() -> tuple:
    return create_selective_checkpoint_contexts(_save_spectral_norm_ops)


def _checkpoint(owners: tuple[nn.Module, ...], fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)`` checkpointed; ``owners`` hold every stateful layer that ``fn`` runs."""
    if torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_save_spectral_norm_contexts)
    contexts = lambda: (contextlib.nullcontext(), _recomputing(*owners))  # noqa: E731
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def _checkpointed_forward(block: nn.Module, forward: Callable, *args: torch.Tensor) -> torch.Tensor:
    if not (block.training and torch.is_grad_enabled()):
        return forward(*args)
    return _checkpoint((block,), forward, *args)


def _checkpointed_gblock(block: GBlock, forward: Callable, x: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    if not (block.training and torch.is_grad_enabled()):
        return forward(x, y)
    h = _checkpoint((block.bn1, block.conv1), block.first, x, y)
    h = _checkpoint((block.bn2, block.conv2), block.second, h, y)
    return h + _checkpoint((block.shortcut,), block.skip, x)


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
            wrapper = _checkpointed_gblock if isinstance(block, GBlock) else _checkpointed_forward
            block.forward = functools.partial(wrapper, block, block.forward)
            wrapped.append(name)
    return wrapped

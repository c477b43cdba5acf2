"""Compute settings applied to G and D from outside the model code: channels_last, torch.compile,
and the CUDA backend switches (cuDNN autotuning, TF32).

The trainer calls, once at start:

* :func:`configure_backends` before building anything on the device;
* :func:`prepare_models` after the EMA copy of G is taken and activation checkpointing is
  applied, and before the engines wrap the models (DDP / DeepSpeed), so that DDP sees the
  compiled module and its buckets follow the compiled graph.

``model.channels_last`` and ``train.compile`` are ``null`` (auto), ``true`` or ``false``; auto is
on for CUDA and off on CPU, where neither measured a gain (see BENCHMARKS.md, "Compute levers").

Both levers leave the modules themselves in place: ``Module.compile()`` compiles the module's
call without wrapping it (no ``_orig_mod.`` prefix in state-dict keys, the same object for
``engine.raw``), and channels_last only changes the strides of the 4-d parameters.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

log = logging.getLogger("sagan_dist.acceleration")


def resolve_auto(flag: Optional[bool], device: torch.device) -> bool:
    """``None`` (auto) means on for CUDA, off elsewhere; otherwise the flag as given."""
    return device.type == "cuda" if flag is None else bool(flag)


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls/convolutions on CUDA; nothing on CPU.

    TF32 only affects fp32 tensors (bf16/fp16 autocast regions are unchanged); GAN training with
    spectral norm tolerates its 10-bit mantissa as BigGAN-style code bases do. cudnn.benchmark is
    safe here because the shapes of a run never change (fixed micro-batch and resolution).
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    enable_tf32()


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions, through the legacy API only (the global switches).

    Setting torch >= 2.9's per-backend ``fp32_precision`` instead leaves a mix of the two APIs, after
    which ``torch.get_float32_matmul_precision()`` and ``torch.backends.cuda.matmul.allow_tf32``
    raise: any library that reads them (torch-fidelity, DeepSpeed, Lightning) would crash.
    """
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC strides for every 4-d parameter and buffer (conv weights), in place.

    Activations follow: a convolution with a channels_last weight returns a channels_last output
    on cuDNN and oneDNN, so inputs need no conversion.
    """
    return model.to(memory_format=torch.channels_last)


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` in place, one specialised graph per call signature.

    ``dynamic=False``: D is called with 2 x micro-batch in its own step and 1 x micro-batch in
    G's step; static graphs for both beat one dynamic-shape graph and are what CUDA graphs need.
    """
    model.compile(dynamic=False)
    return model


def prepare_models(g: nn.Module, d: nn.Module, cfg, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Apply ``model.channels_last`` and ``train.compile`` (auto: on for CUDA) to G and D in place."""
    channels_last = resolve_auto(cfg.model.channels_last, device)
    compiled = resolve_auto(cfg.train.compile, device)
    for net in (g, d):
        if channels_last:
            to_channels_last(net)
        if compiled:
            compile_model(net)
    log.info("compute settings on %s: channels_last=%s, compile=%s", device, channels_last, compiled)
    return g, d

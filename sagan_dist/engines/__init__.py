"""Engines wrap G and D with their optimizers; `build_engines` picks the one ``engine`` names."""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from sagan_dist.dist import DistInfo
from sagan_dist.engines.base import Engine, StepResult


def build_engines(cfg: DictConfig, g: nn.Module, d: nn.Module, info: DistInfo) -> tuple[Engine, Engine]:
    t = cfg.train
    betas = (float(t.betas[0]), float(t.betas[1]))
    if cfg.engine == "deepspeed":
        from sagan_dist.engines.deepspeed import DeepSpeedEngine

        return (DeepSpeedEngine(g, t.lr_g, betas, cfg, info, name="G"),
                DeepSpeedEngine(d, t.lr_d, betas, cfg, info, name="D"))
    from sagan_dist.engines.ddp import DDPEngine

    common = dict(precision=t.precision, grad_clip=t.grad_clip, device=info.device, is_main=info.is_main)
    return (DDPEngine(g, t.lr_g, betas, sync_bn=cfg.model.sync_bn, **common),
            DDPEngine(d, t.lr_d, betas, **common))


__all__ = ["Engine", "StepResult", "build_engines"]

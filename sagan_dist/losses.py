"""GAN losses on discriminator logits: hinge (SAGAN's choice, the default) and non-saturating."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def g_hinge(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def d_nonsat(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_nonsat(fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake).mean()


LOSSES = {"hinge": (d_hinge, g_hinge), "nonsat": (d_nonsat, g_nonsat)}


def get_losses(name: str):
    """(d_loss(real_logits, fake_logits), g_loss(fake_logits)) for ``train.loss``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {' | '.join(LOSSES)}")
    return LOSSES[name]

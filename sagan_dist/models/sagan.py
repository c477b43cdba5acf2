"""Class-conditional SAGAN: Generator (cBN residual up-blocks) and projection Discriminator.

Channel widths follow BigGAN's tables (multiples of a base width ``ch``), which SAGAN's official
code shares. Attention placement by default: the paper's feat32 layer at 128 px (both nets, as in
the official TF code), the 64x64 map at 256/512 px, and half the output size at 32/64 px.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sagan_dist.config_base import DEFAULT_ATTENTION  # one table: the config checks bound by it too
from sagan_dist.models.attention import SelfAttention
from sagan_dist.models.layers import ConditionalBatchNorm2d, DBlock, GBlock, sn_conv, sn_embedding, sn_linear

# Channel multipliers of the feature maps 4x4, 8x8, ... up to the output resolution.
G_WIDTHS = {32: [4, 4, 4, 4], 64: [16, 16, 8, 4, 2], 128: [16, 16, 8, 4, 2, 1],
            256: [16, 16, 8, 8, 4, 2, 1], 512: [16, 16, 8, 8, 4, 2, 1, 1]}
# Multipliers of D's block outputs; every block halves the map except the last one.
D_WIDTHS = {32: [4, 4, 4, 4], 64: [1, 2, 4, 8, 16], 128: [1, 2, 4, 8, 16, 16],
            256: [1, 2, 4, 8, 8, 16, 16], 512: [1, 1, 2, 4, 8, 8, 16, 16]}


def default_attention(resolution: int) -> list[int]:
    return list(DEFAULT_ATTENTION[resolution])


class Generator(nn.Module):
    def __init__(self, resolution: int = 128, num_classes: int = 1000, z_dim: int = 128,
                 ch: int = 64, attention: Sequence[int] | None = None, pool: bool = False,
                 init: str = "ortho") -> None:
        super().__init__()
        widths = [ch * m for m in G_WIDTHS[resolution]]
        attention = default_attention(resolution) if attention is None else list(attention)
        self.resolution, self.num_classes, self.z_dim = resolution, num_classes, z_dim
        self.linear = sn_linear(z_dim, 4 * 4 * widths[0], init)
        self.blocks = nn.ModuleList()
        size = 4
        for cin, cout in zip(widths[:-1], widths[1:]):
            size *= 2
            self.blocks.append(GBlock(cin, cout, num_classes, size, init))
            if size in attention:
                self.blocks.append(SelfAttention(cout, pool, init, resolution=size))
        self.out_bn = nn.BatchNorm2d(widths[-1])
        self.out_conv = sn_conv(widths[-1], 3, 3, init)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).view(z.shape[0], -1, 4, 4)
        for block in self.blocks:
            h = block(h, y) if isinstance(block, GBlock) else block(h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class Discriminator(nn.Module):
    def __init__(self, resolution: int = 128, num_classes: int = 1000, ch: int = 64,
                 attention: Sequence[int] | None = None, pool: bool = False,
                 init: str = "ortho") -> None:
        super().__init__()
        widths = [ch * m for m in D_WIDTHS[resolution]]
        attention = default_attention(resolution) if attention is None else list(attention)
        self.resolution, self.num_classes = resolution, num_classes
        self.blocks = nn.ModuleList()
        cin, size = 3, resolution
        for i, cout in enumerate(widths):
            downsample = i < len(widths) - 1
            self.blocks.append(DBlock(cin, cout, size, init, downsample, preactivation=i > 0))
            size = size // 2 if downsample else size
            if size in attention and not any(
                isinstance(b, SelfAttention) and b.resolution == size for b in self.blocks
            ):
                self.blocks.append(SelfAttention(cout, pool, init, resolution=size))
            cin = cout
        self.linear = sn_linear(widths[-1], 1, init)
        self.embed = sn_embedding(num_classes, widths[-1], init)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        h = torch.sum(F.relu(h), dim=(2, 3))  # global sum pooling
        return self.linear(h).squeeze(1) + torch.sum(self.embed(y) * h, dim=1)  # projection


def attention_layers(model: nn.Module) -> dict[str, SelfAttention]:
    """Every SelfAttention in a model by its name (for logging gamma)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SelfAttention)}


def conditional_batchnorms(model: nn.Module) -> list[ConditionalBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, ConditionalBatchNorm2d)]


def build_models(cfg) -> tuple[Generator, Discriminator]:
    """G and D from the typed config (``cfg.model`` and ``cfg.data.num_classes``)."""
    m = cfg.model
    g_att = None if m.g_attention is None else list(m.g_attention)
    d_att = None if m.d_attention is None else list(m.d_attention)
    g = Generator(m.resolution, cfg.data.num_classes, m.z_dim, m.g_channels, g_att,
                  m.attention_pool, m.init)
    d = Discriminator(m.resolution, cfg.data.num_classes, m.d_channels, d_att,
                      m.attention_pool, m.init)
    return g, d

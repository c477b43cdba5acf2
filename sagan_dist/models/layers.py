"""Building blocks: spectral-normed conv/linear/embedding, conditional BatchNorm, residual blocks.

Spectral norm is our own parametrization rather than torch's because the power iteration must run
in fp32 whatever the module's dtype (DeepSpeed casts whole modules to bf16/fp16) or autocast state,
sigma must never reach 0 (a zero weight would turn the net into NaN), and an activation-checkpoint
recomputation must not advance the iteration a second time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


class SpectralNorm(nn.Module):
    """Parametrization ``W -> W / sigma(W)`` with one power-iteration step per training forward."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6, init_iterations: int = 15) -> None:
        super().__init__()
        self.eps = eps
        # Set by activation checkpointing while it recomputes a forward: reuse u, v as they are.
        self.recomputing = False
        rows, cols = weight.shape[0], weight[0].numel()
        g = torch.Generator().manual_seed(rows * 7919 + cols)  # same u, v on every rank
        self.register_buffer("_u", F.normalize(torch.randn(rows, generator=g), dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(torch.randn(cols, generator=g), dim=0, eps=eps))
        with torch.no_grad():
            for _ in range(init_iterations):
                self._power_iteration(weight.detach().flatten(1).float())

    @torch.no_grad()
    def _power_iteration(self, w: torch.Tensor) -> None:
        v = F.normalize(torch.mv(w.t(), self._u.float()), dim=0, eps=self.eps)
        u = F.normalize(torch.mv(w, v), dim=0, eps=self.eps)
        self._v.copy_(v)
        self._u.copy_(u)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=weight.device.type, enabled=False):
            w = weight.flatten(1).float()
            if self.training and not self.recomputing:
                self._power_iteration(w)
            # Clones: autograd must see the u, v of this forward, not later in-place updates.
            u, v = self._u.float().clone(), self._v.float().clone()
            sigma = torch.dot(u, torch.mv(w, v)).clamp_min(self.eps)
            return (weight.float() / sigma).to(weight.dtype)


def sigma_of(module: nn.Module) -> torch.Tensor:
    """Largest singular value of a spectral-normed module's effective weight (for tests/metrics)."""
    return torch.linalg.matrix_norm(module.weight.detach().flatten(1).float(), ord=2)


def _init(weight: torch.Tensor, init: str) -> None:
    if init == "ortho":
        nn.init.orthogonal_(weight)
    elif init == "normal":
        nn.init.normal_(weight, 0.0, 0.02)
    elif init == "xavier":
        nn.init.xavier_uniform_(weight)
    else:
        raise ValueError(f"unknown init {init!r}; allowed: ortho | normal | xavier")


def spectral_norm(module: nn.Module, init: str = "ortho") -> nn.Module:
    """Initialise ``module.weight`` and register the spectral-norm parametrization on it."""
    _init(module.weight.data, init)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    parametrize.register_parametrization(module, "weight", SpectralNorm(module.weight.detach()))
    return module


def sn_conv(cin: int, cout: int, kernel: int = 3, init: str = "ortho") -> nn.Conv2d:
    return spectral_norm(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), init)


def sn_linear(cin: int, cout: int, init: str = "ortho", bias: bool = True) -> nn.Linear:
    return spectral_norm(nn.Linear(cin, cout, bias=bias), init)


def sn_embedding(num: int, dim: int, init: str = "ortho") -> nn.Embedding:
    return spectral_norm(nn.Embedding(num, dim), init)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine, then a per-class gain and bias from spectral-normed embeddings."""

    def __init__(self, channels: int, num_classes: int, init: str = "ortho") -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = sn_embedding(num_classes, channels, init)  # the gain is 1 + gain(y)
        self.bias = sn_embedding(num_classes, channels, init)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain(y)[:, :, None, None]
        bias = self.bias(y)[:, :, None, None]
        return self.bn(x) * gain.to(x.dtype) + bias.to(x.dtype)


class GBlock(nn.Module):
    """Residual up-block: cBN-ReLU-up-conv-cBN-ReLU-conv, plus up-conv1x1 shortcut (BigGAN)."""

    def __init__(self, cin: int, cout: int, num_classes: int, resolution: int, init: str) -> None:
        super().__init__()
        self.resolution = resolution  # output feature-map size, for activation checkpointing
        self.bn1 = ConditionalBatchNorm2d(cin, num_classes, init)
        self.conv1 = sn_conv(cin, cout, 3, init)
        self.bn2 = ConditionalBatchNorm2d(cout, num_classes, init)
        self.conv2 = sn_conv(cout, cout, 3, init)
        self.shortcut = sn_conv(cin, cout, 1, init)

    # Three pieces, so that activation checkpointing can recompute one at a time (the whole
    # block's activations at once set the step's memory peak at 256 px, see BENCHMARKS.md).
    def first(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """cBN-ReLU-upsample-conv1."""
        return self.conv1(F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest"))

    def second(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """cBN-ReLU-conv2."""
        return self.conv2(F.relu(self.bn2(h, y)))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample-conv1x1 shortcut."""
        return self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x, y), y) + self.skip(x)


class DBlock(nn.Module):
    """Residual down-block: (ReLU)-conv-ReLU-conv-(avgpool), plus conv1x1-(avgpool) shortcut."""

    def __init__(self, cin: int, cout: int, resolution: int, init: str,
                 downsample: bool = True, preactivation: bool = True) -> None:
        super().__init__()
        self.resolution = resolution  # input feature-map size, for activation checkpointing
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = sn_conv(cin, cout, 3, init)
        self.conv2 = sn_conv(cout, cout, 3, init)
        self.shortcut = sn_conv(cin, cout, 1, init) if (cin != cout or downsample) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.shortcut is not None:
            if self.preactivation:  # BigGAN: conv then pool in pre-activated blocks, else pool first
                s = self.shortcut(s)
                s = F.avg_pool2d(s, 2) if self.downsample else s
            else:
                s = self.shortcut(F.avg_pool2d(s, 2) if self.downsample else s)
        return h + s

"""SAGAN self-attention (Zhang et al. 2018, section 3) on scaled_dot_product_attention.

For every query position i the output is ``o_i = sum_j softmax_j(f(x_i) . g(x_j)) h(x_j)``: the
weights over key positions j sum to 1. (The widely copied ``bmm(h, softmax(f^T g))`` normalises
over the query axis instead.) The paper applies no 1/sqrt(d) scaling, so neither do we.

Why the padding below: PyTorch's fused attention kernels (flash / memory-efficient) need equal
head sizes for q/k and v and a contiguous last dimension on every input; otherwise SDPA silently
falls back to the math path, which materialises the N x N matrix (3.1 GB at a 128x128 map). Query
and key have channels//8 features and value channels//2, so q and k are zero-padded to the value's
size: the zero features add nothing to any dot product, and the kernel stays fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sagan_dist.models.layers import sn_conv


class SelfAttention(nn.Module):
    def __init__(self, channels: int, pool: bool = False, init: str = "ortho",
                 resolution: int = 0) -> None:
        super().__init__()
        if channels < 8 or channels % 8:
            raise ValueError(f"SelfAttention needs channels divisible by 8, got {channels}")
        self.pool = pool
        self.resolution = resolution  # feature-map size, for activation checkpointing
        self.query = sn_conv(channels, channels // 8, 1, init)
        self.key = sn_conv(channels, channels // 8, 1, init)
        self.value = sn_conv(channels, channels // 2, 1, init)
        self.out = sn_conv(channels // 2, channels, 1, init)
        self.gamma = nn.Parameter(torch.zeros(()))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output ``o`` before the output conv: (B, channels//2, H, W)."""
        b, _, h, w = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.pool:
            k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)
        q, k, v = (_tokens(t) for t in (q, k, v))  # (B, 1, N, C') with contiguous last dim
        pad = v.shape[-1] - q.shape[-1]
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        chunks = _query_chunks(b, q.shape[2], x.device)
        if chunks > 1:
            # CPU flash attention parallelises over batch x heads only; at batch 1 its backward ran
            # on one thread with MKL teams stalling on a busy core (10x slower). Query chunks in
            # the heads dimension (keys/values expanded, no copy) give every thread work; each
            # query's softmax still runs over all keys, so the result is the same.
            q = q.view(b, chunks, -1, q.shape[-1])
            k, v = k.expand(b, chunks, -1, -1), v.expand(b, chunks, -1, -1)
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return o.reshape(b, -1, o.shape[-1]).transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma.to(x.dtype) * self.out(self.attend(x))

    def attention_rows(self, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The weights `attend` gives the query positions ``queries`` over all keys, and no others.

        ``queries``: (K,) flat indices into the H x W map. Returns float32 (B, K, H', W'), each
        (H', W') map summing to 1: the key grid, (H/2, W/2) with ``pool``. Softmax over keys with
        no 1/sqrt(d) scale, as in `attend`, but only K rows, never the N x N matrix. The query conv
        is 1x1, so applying it to the K picked pixels is the same as applying it to all and picking.
        """
        b = x.shape[0]
        q = self.query(x.flatten(2)[:, :, queries.to(x.device)].unsqueeze(-1)).squeeze(-1)  # (B, C', K)
        k = self.key(x)
        if self.pool:
            k = F.max_pool2d(k, 2)
        logits = torch.einsum("bck,bcn->bkn", q.float(), k.flatten(2).float())
        return logits.softmax(dim=-1).view(b, len(queries), *k.shape[2:])


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()


def _query_chunks(batch: int, queries: int, device: torch.device) -> int:
    """Query chunks so that batch x chunks covers the CPU threads (1 on GPUs)."""
    chunks = 1
    if device.type == "cpu":
        while batch * chunks < _cpu_threads() and queries % (2 * chunks) == 0:
            chunks *= 2
    return chunks


@torch.compiler.assume_constant_result
def _cpu_threads() -> int:
    # A constant to torch.compile: get_num_threads() returns an int that dynamo cannot trace, which
    # broke every graph at each attention layer.
    return torch.get_num_threads()

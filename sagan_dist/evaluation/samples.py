"""Generated samples for evaluation: the same latents on any number of processes.

Every rank generates its share of the samples with the EMA generator, batch by batch, and the
uint8 images are gathered on rank 0. The latents are one stream drawn from ``eval.seed`` over the
global sample index (labels: index modulo the number of classes, so the classes are evenly spread)
and rank r takes the indices r, r + W, r + 2W, ...: the shares differ, every evaluation of a run
scores the same z, and the images do not depend on the number of processes.

The samples of one class (intra-class FID) reuse the first latents of that stream with every label
set to the class, so two classes are compared on the same noise.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from sagan_dist import dist
from sagan_dist.dist import DistInfo
from sagan_dist.models.sagan import Generator
from sagan_dist.sample import to_uint8, truncated_normal


def share_indices(n: int, world_size: int, rank: int) -> torch.Tensor:
    """Global sample indices of one rank: rank, rank + W, ...; every rank gets ceil(n / W) of them,
    so the last ones may be padding (>= n) that rank 0 drops after gathering."""
    per_rank = math.ceil(n / world_size)
    return torch.arange(per_rank) * world_size + rank


def sample_latents(n: int, padded: int, z_dim: int, num_classes: int, truncation: float, seed: int,
                   class_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z and labels by global index, the same on every rank and world size; rows n.. are padding.

    Labels cycle through the classes, or are all ``class_id`` when given.
    """
    z = truncated_normal((n, z_dim), truncation, torch.Generator().manual_seed(seed), torch.device("cpu"))
    labels = torch.arange(padded) % num_classes if class_id is None else torch.full((padded,), class_id)
    return torch.cat([z, torch.zeros(padded - n, z_dim)]), labels


@torch.no_grad()
def generate(g: Generator, cfg: DictConfig, info: DistInfo, n: int | None = None,
             class_id: int | None = None) -> torch.Tensor | None:
    """``n`` (default ``eval.num_samples``) uint8 images (N, 3, H, W) in global index order on rank
    0, None elsewhere; all of class ``class_id`` when given.

    Collective. Gathering batch by batch keeps only one batch per rank on the device.
    """
    e, world = cfg.eval, info.world_size
    n = e.num_samples if n is None else n
    shares = [share_indices(n, world, r) for r in range(world)]
    z_all, y_all = sample_latents(n, len(shares[0]) * world, g.z_dim, g.num_classes, e.truncation, e.seed,
                                  class_id)
    mine = shares[info.rank]
    out = torch.empty(n, 3, g.resolution, g.resolution, dtype=torch.uint8) if info.is_main else None
    for start in range(0, len(mine), e.batch_size):
        idx = mine[start:start + e.batch_size]
        images = to_uint8(g(z_all[idx].to(info.device), y_all[idx].to(info.device)))
        gathered = dist.all_gather_tensor(images.to(info.device)).cpu()
        if out is not None:
            where = torch.cat([s[start:start + e.batch_size] for s in shares])
            keep = where < n  # drop the padding
            out[where[keep]] = gathered[keep]
    return out

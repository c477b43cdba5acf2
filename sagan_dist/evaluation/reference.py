"""The real images' Inception features: read from the shards once, then kept in our own .npz cache.

The real images come from the run's shards through `sagan_dist.data.build_loader` with a center
crop and no flip, streamed batch by batch through the extractor (the images themselves are never
all in memory). Their pool features, labels (intra-class FID needs them) and FID statistics are
written to ``<eval.cache_dir>/<name>.npz`` by `fsio.atomic_write`, under a name that hashes what
they depend on (`reference_key`), with the key beside it as JSON for people.

The cache lives on shared storage, so it is read with ``np.load(allow_pickle=False)``: arrays of
numbers and text only, never code. A file that is refused, damaged, of other shapes or of another
key is named in a warning with the reason and recomputed. torch-fidelity's own cache (which it
reads with ``torch.load(weights_only=False)``) is never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sagan_dist import fsio
from sagan_dist.evaluation.weights import FEATURE_EXTRACTOR, FEATURE_PRECISION, POOL
from sagan_dist.sample import to_uint8

log = logging.getLogger(__name__)
FORMAT = 2  # 1 was torch-fidelity's .pt cache; bump when the arrays change


class ReferenceImagesError(RuntimeError):
    """The shards cannot give the reference images asked for."""


@dataclass
class Reference:
    """Pool features (n, 2048) float32, labels (n,) int64, and their FID mean and covariance."""

    features: np.ndarray
    labels: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features: np.ndarray, labels: np.ndarray) -> "Reference":
        mu, sigma = fid_statistics(features)
        return cls(features.astype(np.float32), labels.astype(np.int64), mu, sigma)


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance as torch-fidelity computes them (float64, unbiased covariance)."""
    x = features.astype(np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


# ---- which images ---------------------------------------------------------------------------
def reference_config(cfg: DictConfig, shards: str) -> DictConfig:
    """The run's data settings for the reference: center crop, no flip, each image once per pass."""
    from sagan_dist.data.loader import shard_urls

    workers = min(cfg.data.workers, len(shard_urls(shards)))  # disjoint passes need a shard per reader
    return OmegaConf.merge(cfg, {"data": {"crop": "center", "flip": False, "resampled": False,
                                          "workers": workers}})


def reference_count(cfg: DictConfig, shards: str) -> int:
    """``eval.reference_samples``, capped at the shards' size when their index tells it: the first
    pass holds every image once, a second one would only repeat them."""
    from sagan_dist.data.loader import index_total, shard_urls

    total = index_total(shard_urls(shards))
    if total is not None and total < cfg.eval.reference_samples:
        log.warning("the shards hold %d images, fewer than eval.reference_samples=%d: the reference "
                    "uses all %d", total, cfg.eval.reference_samples, total)
        return total
    return cfg.eval.reference_samples


def reference_batches(cfg: DictConfig, shards: str, count: int):
    """The first ``count`` images of one reader over all shards: uint8 (b, 3, H, W) and labels (b,)."""
    from sagan_dist.data import build_loader  # the data stack is only needed on a cache miss

    total = 0
    stream = build_loader(reference_config(cfg, shards), shards, 0, 1, cfg.eval.seed)
    try:
        for batch, labels in stream:
            take = count - total
            yield to_uint8(batch[:take]), labels[:take].cpu()
            total += min(take, len(batch))
            if total >= count:
                return
    finally:
        stream.close()
    raise ReferenceImagesError(f"the shards {shards!r} ended after {total} of eval.reference_samples={count} images")


def read_reference_images(cfg: DictConfig, shards: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``count`` reference images and labels at once (for tests and inspection)."""
    images, labels = zip(*reference_batches(cfg, shards, count))
    return torch.cat(images), torch.cat(labels)


def compute_reference(cfg: DictConfig, shards: str, count: int,
                      pool_features: Callable[[torch.Tensor], torch.Tensor]) -> Reference:
    """Stream the images through ``pool_features`` (uint8 batch -> (b, 2048) on the CPU)."""
    log.info("computing the Inception features of %d reference images from %s", count, shards)
    features, labels = [], []
    for images, y in reference_batches(cfg, shards, count):
        features.append(pool_features(images).numpy())
        labels.append(y.numpy())
    return Reference.from_features(np.concatenate(features), np.concatenate(labels))


# ---- the cache ------------------------------------------------------------------------------
def reference_key(cfg: DictConfig, shards: str, count: int, weights_digest: str) -> dict[str, Any]:
    """What the reference features depend on."""
    return {"shards": shards, "resolution": cfg.model.resolution, "decode": cfg.data.decode,
            "crop": "center", "flip": False, "count": count, "seed": cfg.eval.seed,
            "feature_extractor": FEATURE_EXTRACTOR, "layer": POOL, "weights_sha256": weights_digest,
            "precision": FEATURE_PRECISION, "format": FORMAT}


def reference_cache_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"reference-{key['resolution']}px-{key['count']}-{digest}"


def save_reference(path: Path, ref: Reference, key: dict[str, Any]) -> None:
    """The arrays as .npz and the key as JSON beside it, each written atomically."""
    arrays = {"features": ref.features, "labels": ref.labels, "mu": ref.mu, "sigma": ref.sigma,
              "key": np.array(json.dumps(key, sort_keys=True))}
    fsio.atomic_write(path, lambda f: np.savez(f, **arrays))
    fsio.atomic_write(path.with_suffix(".json"), json.dumps(key, indent=2, sort_keys=True) + "\n")


def load_reference(path: Path, key: dict[str, Any]) -> Reference | None:
    """The cached reference, or None (with a warning naming the file and why) if it cannot be used."""
    if not path.exists():
        return None
    try:
        return _read_checked(path, key)
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        text = str(e).strip()
        # numpy refuses pickles with a ValueError whose wording changes between versions.
        reason = ("it holds pickled data, which could run code and was not loaded" if "pickle" in text.lower()
                  else f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}")
        log.warning("reference cache %s was not used (%s); recomputing it", path, reason)
        return None


def _read_checked(path: Path, key: dict[str, Any]) -> Reference:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with z:
        if json.loads(str(z["key"])) != key:
            raise ValueError("it was computed for other settings than its name says")
        ref = Reference(*(z[k] for k in ("features", "labels", "mu", "sigma")))
    n, d = key["count"], int(POOL)
    shapes = {"features": (n, d), "labels": (n,), "mu": (d,), "sigma": (d, d)}
    for name, shape in shapes.items():
        a = getattr(ref, name)
        if a.shape != shape or a.dtype.kind not in "fi":
            raise ValueError(f"array {name!r} is {a.dtype}{list(a.shape)}, expected numbers of shape {list(shape)}")
    if not (np.isfinite(ref.features).all() and np.isfinite(ref.sigma).all()):
        raise ValueError("it holds NaN or infinite values")
    return ref

"""Where a run's data comes from: `prepare_data` (rank 0, before training starts).

``data.source=digits`` is the embedded default for the demo and the tests: scikit-learn's 1,797
handwritten 8x8 digits (10 classes, shipped with scikit-learn, no download), upscaled to
``model.resolution`` RGB and written once as PNG webdataset shards into ``<run_dir>/data``, so the
demo goes through exactly the reader that ImageNet does. ``data.source=shards`` uses
``data.shards`` as it is (written by ``sagan-dist make-shards``).
"""
from __future__ import annotations

import io
import logging
import pathlib
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from sagan_dist.data.loader import shard_urls
from sagan_dist.data.shardfiles import read_index, shard_name, write_metadata, write_shard

log = logging.getLogger(__name__)

DIGITS_SPLIT = "digits"
# 16 shards, so up to 16 readers (ranks x data.workers) each get their own in every pass.
DIGITS_SHARDS = 16
DIGITS_SEED = 0  # fixed: the digits shards are the same bytes for every run


def prepare_data(cfg: DictConfig, run_dir: pathlib.Path) -> str:
    """Make the run's shards available and return their URL pattern (brace notation).

    Called on rank 0 only (the other ranks wait at a barrier). Idempotent: digits shards already
    complete in ``run_dir/data`` are reused.
    """
    if cfg.data.source == "shards":
        shard_urls(cfg.data.shards)  # fails here, with the pattern named, if the list is empty
        return str(cfg.data.shards)
    if cfg.data.source == "digits":
        return write_digits(pathlib.Path(run_dir) / "data", cfg.model.resolution)
    raise ValueError(f"data.source {cfg.data.source!r} is not digits | shards")


def write_digits(out: pathlib.Path, resolution: int) -> str:
    """Write the digits as shards into ``out`` unless a complete set at this resolution is there."""
    pattern = str(out / f"{DIGITS_SPLIT}-{{000000..{DIGITS_SHARDS - 1:06d}}}.tar")
    index = read_index(out, DIGITS_SPLIT)
    if index is not None and index.get("resolution") == resolution \
            and len(index["shards"]) == DIGITS_SHARDS:
        log.info("reusing the digits shards in %s", out)
        return pattern
    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_images(resolution)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(labels))  # every shard mixes classes
    shards = []
    for i, part in enumerate(np.array_split(order, DIGITS_SHARDS)):
        count, size = write_shard(out / shard_name(DIGITS_SPLIT, i), _samples(images, labels, part))
        shards.append({"name": shard_name(DIGITS_SPLIT, i), "samples": count, "bytes": size})
    write_metadata(out, DIGITS_SPLIT, [str(c) for c in range(10)], shards, {"resolution": resolution})
    log.info("wrote %d digits in %d shards to %s", len(labels), DIGITS_SHARDS, out)
    return pattern


def digits_images(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 RGB (n, resolution, resolution, 3) and labels (n,)."""
    from sklearn.datasets import load_digits  # imported here: only the digits source needs it

    digits = load_digits()
    gray = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # values are 0..16
    up = np.stack([np.asarray(Image.fromarray(g).resize((resolution, resolution), Image.Resampling.BICUBIC))
                   for g in gray])
    return np.repeat(up[..., None], 3, axis=3), digits.target.astype(np.int64)


def _samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> Iterator[dict[str, Any]]:
    for i in indices:
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, "PNG")  # lossless; the images are tiny
        yield {"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": int(labels[i])}

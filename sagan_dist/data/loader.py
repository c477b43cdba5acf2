"""Read webdataset shards as one rank's infinite stream of (images, labels) batches.

Each rank runs ``data.workers`` reader processes (a torch DataLoader; 0 = read in the training
process). A reader goes through *passes* over its shards, for ever:

* ``data.resampled=false`` (default): in pass ``e`` every rank shuffles the full shard list with
  the same seed ``(seed, e)`` and takes every ``world_size``-th shard, and each of its readers
  every ``workers``-th of those, so within a pass no shard is read twice and none is left out;
* ``data.resampled=true``: each reader draws its shards with replacement, seeded by
  ``(seed, rank, reader, pass)``; any shard count works.

A pass's samples go through a shuffle buffer seeded by ``(seed, rank, reader, pass)`` and drained
at the end of the pass, so a pass holds each of its samples exactly once, in its own order. A
sample's augmentation (random crop, flip) is seeded by its place in the pass, so a reader can
start at any position (position.py): it reads that pass and drops the samples before it without
decoding them, and yields from there exactly what a reader started at the beginning would.

Batches are cut from the endless sequence of passes: a rank whose shards hold fewer samples
simply starts its next pass sooner, so every rank yields as many batches as it is asked for (no
DDP hang on uneven shards) and no sample is dropped to even them out.

Decoding uses PIL's JPEG draft mode: the decoder scales the DCT by 1/2, 1/4 or 1/8 to the
smallest size whose crop is still at least ``model.resolution``, which skips most of the work for
large photos. Crops are square (center, or random with area >= ``data.min_scale`` of the largest
square) and resized to ``model.resolution``; the GAN should not learn stretched objects.

A bad sample (undecodable image, no ``.cls``, label out of range) or an unreadable shard is
skipped and counted (``stream.skipped``) with at most ``data.max_warnings`` warnings per rank.
A reader fails, naming the shard pattern, when a whole sequence of shards yields nothing, or when
more than ``data.max_bad_fraction`` of its samples are bad.

The DataLoader is read ahead by a thread and waited for with a deadline (stream.py); workers
ignore the stop signals sent to the trainer's process group and are killed by ``close()``
(procs.py). Images of any mode become RGB by one rule (images.py); an image over
``data.max_pixels`` (from its header) is a bad sample.

Everything random derives from ``seed`` (which must be the same on every rank): building the
loader again with the same arguments yields the same batches in the same order, with or without
worker processes (the DataLoader takes batches from its workers in a fixed round-robin; a resumed
stream renumbers its workers so that its first batch comes from the reader whose turn it was).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import make_seed

from sagan_dist.data.images import open_capped, to_rgb
from sagan_dist.data.position import StreamPosition
from sagan_dist.data.procs import ShardOpener
from sagan_dist.data.stream import BatchStream

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WANTED_EXTENSIONS = frozenset(IMAGE_KEYS + ("cls",))  # .json metadata is not even read
MIN_SAMPLES_FOR_FRACTION = 500  # bad samples a reader must have seen before the fraction counts
EMPTY_SHARDS_FACTOR = 2  # fail after this many times the shard count of shards in a row with nothing


class BadSample(ValueError):
    """A sample that cannot be used; the message names the shard and the sample key."""


# ------------------------------------------------------------------------------ shard lists
def shard_urls(pattern: str) -> list[str]:
    """Expand brace notation (and ``::``-joined lists); fail clearly if nothing can be read.

    Local paths and ``file:`` URLs must exist (at least one of them; missing ones are only warned
    about), other URLs must use a scheme webdataset can open, such as
    ``pipe:aws s3 cp s3://bucket/train-{000000..001281}.tar -``.
    """
    urls = wds.shardlists.expand_urls(pattern) if pattern else []
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    schemes = {urlparse(u).scheme for u in urls} - {"", "file"}
    unknown = schemes - set(wds.gopen_schemes) - {"__default__"}
    if unknown:
        raise ValueError(f"shard pattern {pattern!r}: cannot open {sorted(unknown)} URLs; read them "
                         f"through a command, e.g. 'pipe:aws s3 cp s3://bucket/train-000000.tar -'")
    local = [_local_path(u) for u in urls if urlparse(u).scheme in ("", "file")]
    missing = [p for p in local if not os.path.isfile(p)]
    if local and len(missing) == len(urls):
        raise ValueError(f"shard pattern {pattern!r}: none of its {len(urls)} shards exists "
                         f"(first: {missing[0]})")
    if missing:
        log.warning("shard pattern %r: %d of %d shards do not exist (first: %s); they will be skipped",
                    pattern, len(missing), len(urls), missing[0])
    return urls


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def index_total(urls: Sequence[str]) -> Optional[int]:
    """Samples in these shards by make-shards' ``{split}-index.json`` next to them; None if unknown."""
    counts: dict[str, int] = {}
    read: set[str] = set()
    total = 0
    for url in urls:
        path = _local_path(url)
        m = re.fullmatch(r"(.*)-\d+\.tar", path)
        if urlparse(url).scheme not in ("", "file") or not m:
            return None
        index_path = f"{m[1]}-index.json"
        if index_path not in read:
            read.add(index_path)
            try:
                with open(index_path, encoding="utf-8") as f:
                    shards = json.load(f)["shards"]
            except (OSError, ValueError, KeyError):
                return None
            folder = os.path.dirname(path)
            counts.update({os.path.join(folder, s["name"]): s["samples"] for s in shards})
        if path not in counts:
            return None
        total += counts[path]
    return total


# ------------------------------------------------------------------------------ decoding
def crop_box(size: tuple[int, int], crop: str, min_scale: float, rng: random.Random) -> tuple[float, ...]:
    """A square (x0, y0, x1, y1) in the image: the largest centered one, or a random one."""
    w, h = size
    side = float(min(w, h))
    if crop == "center":
        x0, y0 = (w - side) / 2, (h - side) / 2
    else:
        side *= math.sqrt(rng.uniform(min_scale, 1.0))
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    return x0, y0, x0 + side, y0 + side


def draft(img: Image.Image, box: tuple[float, ...], resolution: int) -> tuple[float, ...]:
    """Ask the JPEG decoder for the smallest DCT scale at which ``box`` still spans >= resolution.

    Returns ``box`` in the coordinates of the (smaller) image the decoder will produce. Not JPEG,
    or not at least twice the size needed: nothing changes.
    """
    side = box[2] - box[0]
    if side < 2 * resolution:
        return box
    w, h = img.size
    # draft() picks the largest scale s in {1,2,4,8} with s <= size // request, so s <= side/res.
    result = img.draft("RGB", (math.ceil(w * resolution / side), math.ceil(h * resolution / side)))
    if result is None:
        return box
    scale = w / result[1][2]
    return tuple(c / scale for c in box)


def decode_image(data: bytes, resolution: int, crop: str = "center", min_scale: float = 1.0,
                 flip: bool = False, use_draft: bool = True, rng: Optional[random.Random] = None,
                 max_pixels: int = sys.maxsize) -> torch.Tensor:
    """Image bytes -> uint8 tensor (3, resolution, resolution): crop, resize, maybe flip.

    Any mode is converted by images.to_rgb; more than ``max_pixels`` (from the header) is refused.
    """
    rng = rng or random.Random(0)
    with open_capped(data, max_pixels, "data.max_pixels") as img:
        box = crop_box(img.size, crop, min_scale, rng)
        if use_draft:
            box = draft(img, box, resolution)
        rgb = to_rgb(img)
        out = rgb.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


# ------------------------------------------------------------------------------ one reader
@dataclass(frozen=True)
class ReaderSpec:
    """Everything a reader process needs (picklable, unlike the config)."""
    pattern: str
    urls: tuple[str, ...]
    rank: int
    world_size: int
    seed: int
    batch: int
    resolution: int
    num_classes: int
    resampled: bool
    shuffle_buffer: int
    use_draft: bool
    crop: str
    min_scale: float
    flip: bool
    max_warnings: int  # per reader
    max_bad_fraction: float
    max_pixels: int
    start: Optional[StreamPosition] = None  # None: every reader at the beginning of pass 0


class _Tally:
    """A reader's bad samples and unreadable shards, with rate-limited warnings."""

    def __init__(self, spec: ReaderSpec, worker: int) -> None:
        self.spec, self.worker = spec, worker
        self.good = self.bad_samples = self.bad_shards = self.warned = 0
        self.empty_shards = 0  # shards in a row that gave no usable sample

    @property
    def skipped(self) -> int:
        return self.bad_samples + self.bad_shards

    def sample_failed(self, exn: Exception) -> bool:
        self.bad_samples += 1
        self._warn(f"skipped a bad sample: {exn}")
        seen = self.good + self.bad_samples
        if seen >= MIN_SAMPLES_FOR_FRACTION and self.bad_samples > self.spec.max_bad_fraction * seen:
            raise RuntimeError(
                f"shards {self.spec.pattern!r}: {self.bad_samples} of {seen} samples read by rank "
                f"{self.spec.rank} worker {self.worker} are bad (> data.max_bad_fraction = "
                f"{self.spec.max_bad_fraction}); last: {exn}")
        return True  # webdataset handler protocol: True = skip and continue

    def read_failed(self, exn: Exception) -> bool:
        self.bad_shards += 1
        self._warn(f"skipped (the rest of) a shard: {exn!r}")
        return True

    def end_pass(self, good: int, shards: int) -> None:
        self.empty_shards = 0 if good else self.empty_shards + shards
        if self.empty_shards >= EMPTY_SHARDS_FACTOR * len(self.spec.urls):
            raise RuntimeError(
                f"shards {self.spec.pattern!r}: nothing readable: rank {self.spec.rank} worker "
                f"{self.worker} read {self.empty_shards} shards in a row without one usable sample "
                f"({self.bad_samples} bad samples, {self.bad_shards} shard read errors so far)")

    def _warn(self, message: str) -> None:
        if self.warned < self.spec.max_warnings:
            self.warned += 1
            last = " (further ones are only counted: stream.skipped)" \
                if self.warned == self.spec.max_warnings else ""
            log.warning("rank %d worker %d: %s%s", self.spec.rank, self.worker, message, last)


def _pass_shards(spec: ReaderSpec, reader: int, readers: int) -> Callable[[int], list[str]]:
    """The shards one reader reads in pass ``e``, as a function of ``e`` (any ``e``, in any order)."""
    if spec.resampled:
        per_pass = math.ceil(len(spec.urls) / (spec.world_size * readers))
        # -1: not the seed of the same pass's shuffle buffer
        return lambda epoch: random.Random(make_seed(spec.seed, spec.rank, reader, epoch, -1)).choices(spec.urls,
                                                                                                       k=per_pass)

    def disjoint(epoch: int) -> list[str]:
        urls = list(spec.urls)
        random.Random(make_seed(spec.seed, epoch)).shuffle(urls)  # same order on every rank
        return urls[spec.rank::spec.world_size][reader::readers]

    return disjoint


def _wanted(fname: str) -> bool:
    return fname.rsplit(".", 1)[-1].lower() in WANTED_EXTENSIONS


def decode_sample(sample: dict[str, Any], spec: ReaderSpec, rng: random.Random) -> tuple[torch.Tensor, int]:
    """A webdataset sample -> (uint8 image (3, R, R), label); raises BadSample naming it."""
    try:
        if "cls" not in sample:
            raise BadSample("no .cls (label)")
        label = int(sample["cls"])
        if not 0 <= label < spec.num_classes:
            raise BadSample(f"label {label} not in 0..{spec.num_classes - 1} (data.num_classes)")
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise BadSample(f"no image (.{', .'.join(IMAGE_KEYS)})")
        image = decode_image(data, spec.resolution, spec.crop, spec.min_scale, spec.flip, spec.use_draft, rng,
                             spec.max_pixels)
    except Exception as e:
        raise BadSample(f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: {e}") from e
    return image, label


def reader_samples(spec: ReaderSpec, reader: int, readers: int, tally: _Tally, opener: ShardOpener,
                   start: tuple[int, int] = (0, 0)) -> Iterator[tuple[torch.Tensor, int, tuple[int, int]]]:
    """One reader's decoded samples, pass after pass, for ever, each with the reader's position
    after it; from ``start`` = (pass, drawn) on: the samples before it are read, not decoded."""
    shards_of = _pass_shards(spec, reader, readers)
    first_epoch, skip = start
    for epoch in itertools.count(first_epoch):
        urls = shards_of(epoch)
        # webdataset's tarfile_samples, with our opener: it can end a stalled pipe: command.
        files = tar_file_expander(opener.streams(urls, tally.read_failed), handler=tally.read_failed,
                                  select_files=_wanted)
        samples = group_by_keys(files, handler=tally.read_failed)
        if spec.shuffle_buffer > 1:
            rng = random.Random(make_seed(spec.seed, spec.rank, reader, epoch))
            samples = wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng)(samples)
        good = 0
        for drawn, sample in enumerate(samples, 1):
            if epoch == first_epoch and drawn <= skip:
                good += 1  # read before the resume: not an empty pass
                continue
            # Seeded by the sample's place, not by a running generator: a skipped sample draws nothing.
            augment = random.Random(make_seed(spec.seed, spec.rank, reader, epoch, drawn))
            try:
                image, label = decode_sample(sample, spec, augment)
            except BadSample as e:
                tally.sample_failed(e)
                continue
            good += 1
            tally.good += 1
            yield image, label, (epoch, drawn)
        tally.end_pass(good, len(urls))


def _collate(samples: Sequence[tuple[torch.Tensor, int, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    # Stacked as uint8 and scaled to [-1, 1] in one op per batch: a quarter of the bytes to copy.
    images = torch.stack([s[0] for s in samples]).to(torch.float32).div_(127.5).sub_(1.0)
    return images, torch.tensor([s[1] for s in samples], dtype=torch.int64)


class _RankDataset(IterableDataset):
    """The batches of one rank; inside a DataLoader worker, that worker's share of them."""

    def __init__(self, spec: ReaderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.opener = ShardOpener()  # a worker gets a fresh one (ShardOpener.__getstate__)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, readers = (info.id, info.num_workers) if info else (0, 1)
        start = self.spec.start or StreamPosition.at_pass(readers)
        # The DataLoader's worker 0 gives its first batch: make it the reader whose turn it is.
        reader = (worker + start.next_reader) % readers
        tally = _Tally(self.spec, reader)
        samples = reader_samples(self.spec, reader, readers, tally, self.opener, start.readers[reader])
        while chunk := list(itertools.islice(samples, self.spec.batch)):
            images, labels = _collate(chunk)
            epoch, drawn = chunk[-1][2]
            # The counts and the position ride along with the batch: workers have no other way back.
            yield images, labels, torch.tensor([reader, tally.skipped, tally.bad_shards, epoch, drawn])


# ------------------------------------------------------------------------------ the rank's stream
def build_loader(cfg: DictConfig, shards: str, rank: int, world_size: int, seed: int,
                 device: Optional[torch.device] = None, start: Optional[StreamPosition] = None) -> BatchStream:
    """The infinite batch stream of ``rank`` out of ``world_size``; same arguments, same batches.

    Micro-batch b = train.batch_size // (world_size * train.accumulation). Batches come on
    ``device`` when it is given (copied ahead on a side stream when it is CUDA). ``start``: where
    to read on (a `BatchStream.position()` of a stream with the same arguments); None: the start.
    """
    d, t = cfg.data, cfg.train
    urls = shard_urls(shards)
    readers = max(1, d.workers)
    if not d.resampled and len(urls) < world_size * readers:
        raise ValueError(
            f"shard pattern {shards!r}: {len(urls)} shards cannot give each of {world_size} ranks x "
            f"{readers} readers (data.workers) its own shard in every pass; write more, smaller "
            f"shards (make-shards --per-shard), lower data.workers, or set data.resampled=true")
    batch = t.batch_size // (world_size * t.accumulation)
    spec = ReaderSpec(
        pattern=shards, urls=tuple(urls), rank=rank, world_size=world_size, seed=seed, batch=batch,
        resolution=cfg.model.resolution, num_classes=d.num_classes, resampled=d.resampled,
        shuffle_buffer=d.shuffle_buffer, use_draft=d.decode == "draft", crop=d.crop,
        min_scale=d.min_scale, flip=d.flip, max_warnings=math.ceil(d.max_warnings / readers),
        max_bad_fraction=d.max_bad_fraction, max_pixels=d.max_pixels)
    if start is not None and len(start.readers) != readers:
        raise ValueError(f"a stream position of {len(start.readers)} readers cannot start {readers} (data.workers)")
    spec = dataclasses.replace(spec, start=start or StreamPosition.at_pass(readers))
    total = d.epoch_samples or index_total(urls)
    dataset = _RankDataset(spec)
    return BatchStream(dataset, dataset.opener, pattern=shards, rank=rank, seed=seed, workers=d.workers,
                       start=spec.start,
                       epoch_batches=total // (world_size * batch) if total else None,
                       stall_timeout_s=d.stall_timeout_s, device=device)

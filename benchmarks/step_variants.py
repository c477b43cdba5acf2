"""What `benchmarks/train_step.py` measures: the variants, and the real Trainer built for one of them.

A variant is a resolution x precision x activation checkpointing x compute setting (compile,
channels_last) x per-process batch; the Setup is what every variant of a run shares. The Trainer
is the one ``sagan-dist train`` builds (DDP engine) on the demo config, handed synthetic batches.
"""
from __future__ import annotations

import functools
import gc
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sagan_dist.config import load
from sagan_dist.dist import DistInfo
from sagan_dist.train import Trainer

# name -> (checkpoint attention blocks, also checkpoint residual blocks)
CHECKPOINTING = {"off": (False, False), "attention": (True, False),
                 "attention+blocks": (True, True)}
# name -> (train.compile, model.channels_last); explicit, so "auto" never decides a row
COMPUTE = {"eager": (False, False), "compile": (True, False), "channels_last": (False, True),
           "compile+channels_last": (True, True)}
BASELINE = ("fp32", "off", "eager")  # ratios are against this variant of the same resolution
GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Setup:
    """What every variant of a run shares (the command-line flags)."""

    channels: int
    batch: int
    checkpoint_from: int
    classes: int
    init: str
    device: str  # "cpu" or "cuda:<index>"
    threads: int  # torch intra-op threads; 0 = torch's default


@dataclass(frozen=True)
class Variant:
    resolution: int
    precision: str
    checkpointing: str  # a key of CHECKPOINTING
    batch: int  # per process (= per GPU); the Setup's, or what --max-batch found
    compute: str = "eager"  # a key of COMPUTE

    @property
    def name(self) -> str:
        return (f"{self.resolution}px {self.precision} ckpt={self.checkpointing} "
                f"{self.compute} b={self.batch}")


def overrides(v: Variant, s: Setup, workdir: Path, placeholder: Path, world_size: int) -> list[str]:
    """``key=value`` overrides of the demo config that make this variant."""
    attention, blocks = CHECKPOINTING[v.checkpointing]
    compiled, channels_last = COMPUTE[v.compute]
    return [f"model.resolution={v.resolution}", f"model.g_channels={s.channels}",
            f"model.d_channels={s.channels}", f"model.init={s.init}",
            f"model.checkpoint_from={s.checkpoint_from if attention else 0}",
            f"model.checkpoint_blocks={str(blocks).lower()}", f"data.num_classes={s.classes}",
            "data.source=shards", f"data.shards={placeholder}", f"train.precision={v.precision}",
            f"train.batch_size={v.batch * world_size}", f"train.run_dir={workdir / 'run'}",
            "train.resume=never", "tracking.enabled=false", "eval.every=0",
            f"train.compile={str(compiled).lower()}",
            f"model.channels_last={str(channels_last).lower()}"]


class SyntheticStream:
    """A batch stream as the Trainer's ``batch_source`` returns it: two random batches, cycled.

    Images in [-1, 1] and labels made on the CPU, as the loader yields them, and moved to the
    run's device per batch as the loader's prefetch thread does (from pinned memory, non_blocking),
    so the host-to-device copy stays in the step; nothing is read from storage
    (``benchmarks/loader.py`` measures that).
    """

    wait_s, skipped = 0.0, 0

    def __init__(self, n: int, resolution: int, classes: int, seed: int,
                 device: torch.device = torch.device("cpu")) -> None:
        g = torch.Generator().manual_seed(seed)
        pin = device.type == "cuda"
        batches = [(torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1,
                    torch.randint(classes, (n,), generator=g)) for _ in range(2)]
        self._device = device
        self._batches = itertools.cycle([(x.pin_memory(), y.pin_memory()) if pin else (x, y) for x, y in batches])

    def next_batch(self, stop: Callable[[], bool] = lambda: False) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self._batches)
        if self._device.type == "cpu":
            return x, y  # already there (and no call for benchmarks/counters.py to count as a host read)
        return x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)

    def position(self) -> None:
        return None  # nothing to resume: the batches are random

    def close(self) -> None:
        pass


def build_trainer(v: Variant, s: Setup, info: DistInfo, workdir: Path) -> Trainer:
    # data.source=shards with an empty placeholder tar: config validation wants a pattern, and
    # with a batch source the trainer never reads it.
    placeholder = workdir / "synthetic.tar"
    workdir.mkdir(parents=True, exist_ok=True)
    placeholder.touch()
    cfg = load(["demo"], overrides(v, s, workdir, placeholder, info.world_size),
               world_size=info.world_size)
    trainer = Trainer(cfg, info, batch_source=lambda seed, start: SyntheticStream(v.batch, v.resolution, s.classes,
                                                                                   seed, info.device))
    trainer.start_segment()  # seeds latents exactly as training does, opens the batch stream
    return trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(trainer: Trainer) -> Callable[[], None]:
    """One ``train_step``, finished on the device before it returns (so it can be timed)."""
    def step() -> None:
        trainer.train_step()
        synchronize(trainer.info.device)

    return step


def wrapped_blocks(trainer: Trainer) -> int:
    """How many blocks of G and D activation checkpointing wrapped (it replaces ``forward``)."""
    return sum(isinstance(m.__dict__.get("forward"), functools.partial)
               for net in (trainer.G.raw, trainer.D.raw) for m in net.modules())


def free_memory(device: torch.device) -> None:
    """Drop what is unreferenced; on CUDA also the allocator's cache, which a child's GPU needs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)

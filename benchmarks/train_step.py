"""One full training step (n_critic D updates + 1 G update + EMA) of the real Trainer, per variant.

Variants, all in one run: 128 and 256 px x fp32 / bf16 (autocast, as ``train.precision``) x
activation checkpointing off / attention blocks only / attention + residual blocks
(``model.checkpoint_from``, ``model.checkpoint_blocks``). For each one:

* images/s as the trainer logs it (``train.batch_size * n_critic`` real images per step), from the
  median step time of several round-robin repeats over the variants of one resolution, after a
  warm-up step. On CPU the step time is the process's CPU time with one intra-op thread (the
  cores are shared: lost time slices do not count, ``interleaved_wall_cpu_times``), the wall
  time is shown beside it; on CUDA it is wall time after synchronising;
* peak memory of one step in a fresh child process: growth of the peak RSS over the steady state
  after a warm-up step (weights, gradients, Adam moments and EMA are in the baseline, so what is
  left is what a step keeps alive: activations and temporaries, which is what checkpointing
  trades for time); on CUDA, ``torch.cuda.max_memory_allocated`` over the same step;
* FLOPs per image (``FlopCounterMode`` over one step; checkpointed variants include their
  recomputation) and achieved FLOP/s as a fraction of a GEMM peak of the same dtype measured in
  the same run;
* ratios against the fp32, no-checkpointing variant of the same resolution.

* host reads per step and collectives per step with the bytes they move (benchmarks/counters.py
  says what is counted; one extra step under each counter, outside the timing). Collectives are
  non-zero only under torchrun with 2+ processes (gloo on CPU, NCCL on CUDA).

The data is synthetic: the Trainer is handed a ``batch_source`` of random images and labels, so
the shard reader's cost is not in the step (``benchmarks/loader.py`` measures that). The Trainer
is otherwise the one ``sagan-dist train`` builds (DDP engine). ``--compute`` adds rows per
``train.compile`` / ``model.channels_last`` setting; FLOPs are counted eagerly for all of them.

Run from the repository root:  ``.venv/bin/python -m benchmarks.train_step`` (``--quick``: smoke)
Collectives on CPU:  ``OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 -m
benchmarks.train_step --quick``
On GPUs (untested):  ``torchrun --nproc-per-node <GPUs> -m benchmarks.train_step --device cuda
--channels 64 --resolutions 256 --precisions bf16 --checkpointing off attention+blocks --max-batch``
(DDP over NCCL; memory is measured in single-GPU child processes, without DDP's buckets).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (count_flops, describe_machine, format_table, gemm_peak_flops,
                               interleaved_times, mib, peak_rss_growth, run_json_child,
                               start_peak_rss)
from benchmarks.counters import count_collectives, count_host_reads
from sagan_dist import dist
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
GOAL_MEMORY_RATIO = 0.60  # at 256 px: checkpointing cuts step peak memory by >= 40% ...
GOAL_TIME_RATIO = 1.30  # ... for at most 30% more step time
GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_BATCH_CAP = 4096  # --max-batch stops doubling here


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


# ------------------------------------------------------------------------------ the Trainer
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

    Images in [-1, 1] and labels on the CPU, as the loader yields them, so the host-to-device copy
    stays in the step; nothing is read from storage (``benchmarks/loader.py`` measures that).
    """

    wait_s, skipped = 0.0, 0

    def __init__(self, n: int, resolution: int, classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self._batches = itertools.cycle([(torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1,
                                          torch.randint(classes, (n,), generator=g)) for _ in range(2)])

    def next_batch(self, stop: Callable[[], bool] = lambda: False) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._batches)

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
    micro = v.batch
    trainer = Trainer(cfg, info, batch_source=lambda seed, start: SyntheticStream(micro, v.resolution,
                                                                                   s.classes, seed))
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


# ------------------------------------------------------------------------ child: peak memory
def _return_freed_memory_to_os() -> None:
    """Make glibc mmap every allocation over 256 KiB and so unmap it again on free.

    By default glibc raises its mmap threshold (up to 32 MiB) after the first large free and then
    keeps freed chunks in its heap: the warm-up step's activations would stay resident, be counted
    in the baseline and be reused by the measured step without any RSS growth. With a fixed
    threshold, the RSS follows what is alive, so the growth is the step's own peak.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 * 1024)
    libc.mallopt(m_trim_threshold, 256 * 1024)


def measure_memory(v: Variant, s: Setup) -> dict[str, object]:
    """Peak memory of one step after a warm-up step; runs in a fresh process (``--child``).

    On CUDA an out-of-memory error is reported as ``ok: false`` (for ``--max-batch``).
    """
    device = torch.device(s.device)
    set_threads(s.threads)
    if device.type == "cpu":
        _return_freed_memory_to_os()
    else:
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(v, s, DistInfo(0, 1, 0, device), Path(tmp))
        step = step_fn(trainer)
        try:
            step()  # warm-up: compilation, gradients, Adam moments, thread pools
            if device.type == "cpu":
                baseline = start_peak_rss()
                step()
                growth = peak_rss_growth(baseline)
                return {"ok": True, "step_peak": growth, "process_peak": baseline.bytes + growth,
                        "method": "VmHWM" if baseline.resettable else "ru_maxrss"}
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            peak = torch.cuda.max_memory_allocated(device)
            return {"ok": True, "step_peak": peak - before, "process_peak": peak,
                    "method": "cuda.max_memory_allocated"}
        except torch.cuda.OutOfMemoryError:
            return {"ok": False}


def memory_in_child(v: Variant, s: Setup) -> dict[str, object]:
    spec = json.dumps({"variant": dataclasses.asdict(v), "setup": dataclasses.asdict(s)})
    return run_json_child(["-m", "benchmarks.train_step", "--child", spec], timeout=1800)


def largest_batch(v: Variant, s: Setup) -> int:
    """The largest per-GPU batch whose step fits (doubling, then bisection; fresh processes)."""
    fits = lambda b: bool(memory_in_child(dataclasses.replace(v, batch=b), s)["ok"])  # noqa: E731
    lo, hi = 0, v.batch
    while hi <= MAX_BATCH_CAP and fits(hi):
        lo, hi = hi, hi * 2
    if lo == 0:
        raise RuntimeError(f"{v.name}: not even batch {v.batch} fits")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------ parent
def time_and_count(variants: Sequence[Variant], s: Setup, info: DistInfo,
                   repeats: int) -> dict[Variant, dict]:
    """Median step time (round-robin over ``variants``), FLOPs, host reads, collectives."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {v: build_trainer(v, s, info, Path(tmp) / str(i))
                    for i, v in enumerate(variants)}
        steps = {v: step_fn(t) for v, t in trainers.items()}
        # The warm-up step of each trainer compiles (if it does) and creates Adam's moments.
        times = interleaved_times({v.name: fn for v, fn in steps.items()}, repeats=repeats,
                                  warmup=1, sync=lambda: synchronize(info.device))
        clock = "cpu" if info.device.type == "cpu" else "wall"
        results = {}
        for v in variants:
            t = times[v.name]
            results[v] = {"time": t.median(clock), "wall": t.median("wall"),
                          "spread": t.spread(clock), "wrapped": wrapped_blocks(trainers[v]),
                          **counted_step(steps[v], info.device)}
        del trainers, steps
        free_memory(info.device)
    return results


def counted_step(step: Callable[[], None], device: torch.device) -> dict[str, object]:
    """One more step under each counter (outside the timing: counting slows a step down).

    FLOPs are counted in eager mode (``force_eager``): FlopCounterMode sees aten ops, which a
    compiled graph hides in fused kernels; the maths, and so the FLOPs, are the same.
    """
    with torch.compiler.set_stance("force_eager"):
        flops = count_flops(step)
    with count_host_reads(device) as reads:
        step()
    with count_collectives() as comms:
        step()
    return {"flops": flops, "host_reads": reads.total, "collectives": sum(comms.calls.values()),
            "comm_bytes": comms.bytes(), "comm_detail": comms.summary(1)}


def measure_resolution(resolution: int, args: argparse.Namespace, s: Setup,
                       info: DistInfo) -> dict[Variant, dict]:
    variants = [Variant(resolution, p, c, s.batch, k)
                for p in args.precisions for c in args.checkpointing for k in args.compute]
    if args.max_batch:  # rank 0 searches on its GPU; every rank then uses what it found
        found = [largest_batch(v, s) for v in variants] if info.is_main else None
        found = dist.broadcast_object(found)
        variants = [dataclasses.replace(v, batch=b) for v, b in zip(variants, found)]
    # With --max-batch every trainer fills its GPU, so time them one at a time, not side by side.
    groups = [[v] for v in variants] if args.max_batch else [variants]
    results = {}
    for group in groups:
        results |= time_and_count(group, s, info, args.repeats)
    for v in variants:  # memory: single process on this rank's device, no DDP buckets
        results[v].update(memory_in_child(v, s))
    return results


HEADERS = ["res", "precision", "checkpointing", "compute", "wrapped G+D", "batch", "step s (median)*",
           "wall s (median)", "images/s*", "time vs base", "step peak MiB", "mem vs base",
           "process peak MiB", "GFLOP/image", "GFLOP/s", "of GEMM peak", "host reads/step",
           "collectives/step", "MiB reduced/step"]


def baseline_of(results: dict[Variant, dict], v: Variant) -> dict | None:
    return next((r for u, r in results.items() if u.resolution == v.resolution
                 and (u.precision, u.checkpointing, u.compute) == BASELINE), None)


def table_rows(results: dict[Variant, dict], peaks: dict[str, float],
               world: int) -> list[list[str]]:
    rows = []
    for v, r in results.items():
        base, images = baseline_of(results, v), v.batch * world  # n_critic = 1 in the demo config
        rate = r["flops"] / r["time"]
        ratio = lambda key: f"{r[key] / base[key]:.2f}" if base else ""  # noqa: E731
        rows.append([f"{v.resolution} px", v.precision, v.checkpointing, v.compute, str(r["wrapped"]),
                     str(v.batch), f"{r['time']:.2f}", f"{r['wall']:.2f}",
                     f"{images / r['time']:.2f}", ratio("time"), mib(r["step_peak"]),
                     ratio("step_peak"), mib(r["process_peak"]),
                     f"{r['flops'] / v.batch / 1e9:.1f}", f"{rate / 1e9:.1f}",
                     f"{rate / peaks[v.precision]:.2f}", str(r["host_reads"]), str(r["collectives"]),
                     mib(r["comm_bytes"])])
    return rows


def goal_lines(results: dict[Variant, dict]) -> list[str]:
    """At 256 px, for each checkpointing variant: memory and time against the same precision."""
    lines = []
    for v, r in results.items():
        if v.resolution != 256 or v.checkpointing == "off":
            continue
        plain = next((q for u, q in results.items() if u.resolution == 256
                      and u.precision == v.precision and u.checkpointing == "off"
                      and u.compute == v.compute), None)
        if plain is None:
            continue
        mem, tim = r["step_peak"] / plain["step_peak"], r["time"] / plain["time"]
        met = mem <= GOAL_MEMORY_RATIO and tim <= GOAL_TIME_RATIO
        lines.append(f"goal at 256 px, {v.precision}, ckpt={v.checkpointing} vs off: step peak "
                     f"memory x{mem:.2f} (<= {GOAL_MEMORY_RATIO:.2f}), time x{tim:.2f} "
                     f"(<= {GOAL_TIME_RATIO:.2f}): {'MET' if met else 'NOT MET'}")
    return lines


def note_lines(results: dict[Variant, dict]) -> list[str]:
    idle = sorted({f"{v.resolution} px ckpt={v.checkpointing}" for v, r in results.items()
                   if v.checkpointing != "off" and r["wrapped"] == 0})
    if not idle:
        return []
    return [f"{', '.join(idle)}: no block is at a map >= checkpoint_from, so nothing is wrapped; "
            "these rows run the plain model and show the noise between identical variants"]


def run(args: argparse.Namespace, info: DistInfo) -> None:
    say = print if info.is_main else (lambda *a, **k: None)
    s = Setup(args.channels, args.batch, args.checkpoint_from, args.classes, args.init,
              str(info.device), args.threads if info.device.type == "cpu" else 0)
    set_threads(s.threads)  # before the GEMM peak: the ceiling is for the same thread count
    say(f"machine: {describe_machine()}, device {info.device}, world size {info.world_size}")
    # On CPU every rate is per CPU-second (see interleaved_wall_cpu_times), the ceiling too.
    clock = time.process_time if info.device.type == "cpu" else time.perf_counter
    peaks = {p: gemm_peak_flops(dtype=GEMM_DTYPES[p], device=info.device, clock=clock)
             for p in args.precisions}
    free_memory(info.device)
    say(f"GEMM peak (2048x2048 matmul, best of 7, {'CPU' if info.device.type == 'cpu' else 'wall'} "
        "time): " + ", ".join(f"{p} {f / 1e9:.1f} GFLOP/s" for p, f in peaks.items()))
    load_start = os.getloadavg()[0]
    results: dict[Variant, dict] = {}
    for resolution in args.resolutions:
        results |= measure_resolution(resolution, args, s, info)
    say(f"\nsynthetic data; width {s.channels} (g_channels = d_channels), {s.classes} classes, "
        f"checkpoint_from={s.checkpoint_from}, model.init={s.init}, n_critic=1; times: median of "
        f"{args.repeats} round-robin steps after a warm-up step\n")
    say(format_table(HEADERS, table_rows(results, peaks, info.world_size)))
    clock_name = ("process CPU time (not wall: the cores are shared)" if info.device.type == "cpu"
                  else "wall time")
    say(f"\n* step s, images/s, time vs base, GFLOP/s: {clock_name}; largest "
        "(max - min) / median over a variant's repeats: "
        f"{max(r['spread'] for r in results.values()):.2f}")
    say(f"1-min load average: {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"(on {os.cpu_count()} cores)")
    methods = sorted({str(r["method"]) for r in results.values()})
    say(f"step peak: growth over the state after a warm-up step, fresh process per row "
        f"({', '.join(methods)})")
    for line in note_lines(results) + goal_lines(results):
        say(line)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one process per GPU (under torchrun: DDP over NCCL); untested")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    p.add_argument("--precisions", nargs="+", choices=tuple(GEMM_DTYPES), default=["fp32", "bf16"])
    p.add_argument("--checkpointing", nargs="+", choices=tuple(CHECKPOINTING),
                   default=list(CHECKPOINTING))
    p.add_argument("--compute", nargs="+", choices=tuple(COMPUTE), default=["eager"],
                   help="train.compile / model.channels_last per row (gpu_check.sh: all four)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 64 px, width 8, batch 2, 10 classes, 1 repeat (any other flag "
                        "still applies on top)")
    p.add_argument("--channels", type=int, default=32,
                   help="model.g_channels and d_channels (full: 64)")
    p.add_argument("--batch", type=int, default=4,
                   help="per-process batch (--max-batch: where to start)")
    p.add_argument("--checkpoint-from", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000, help="data.num_classes (ImageNet-like)")
    p.add_argument("--init", default="normal", choices=("ortho", "normal", "xavier"),
                   help="model.init: 'ortho' runs QR decompositions for ~10 s per model here, and "
                        "the init does not change what a step computes")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (0: torch's default, one per core). 1 because on a "
                        "shared 2-core machine two OpenMP threads spin against other processes: a "
                        "128 px step took 20-30 s with 2 threads and 4-5 s with 1 under load 6-8")
    p.add_argument("--max-batch", action="store_true",
                   help="CUDA: per variant, the largest per-GPU batch that fits (found in fresh "
                        "processes), then timed at it")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON {variant, setup}: measure_memory
    args = p.parse_args(argv)
    if args.quick:
        args.resolutions, args.channels, args.batch, args.classes = [64], 8, 2, 10
        args.repeats, args.checkpoint_from = 1, 32
    if args.max_batch and args.device != "cuda":
        p.error("--max-batch needs --device cuda (a CPU does not run out of memory cleanly)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_memory(Variant(**spec["variant"]), Setup(**spec["setup"]))))
        return
    # Two hours, not the usual 30 min: with --max-batch the other ranks wait in a broadcast while
    # rank 0 searches.
    with dist.process_group(timeout_s=7200) as pg:
        device = pg.device if args.device == "cuda" else torch.device("cpu")
        if args.device == "cuda" and device.type != "cuda":
            raise SystemExit("--device cuda: no CUDA device available")
        run(args, DistInfo(pg.rank, pg.world_size, pg.local_rank, device))


if __name__ == "__main__":
    main()

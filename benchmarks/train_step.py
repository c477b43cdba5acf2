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

Modules: ``step_variants`` (the variants and the Trainer built for one), ``step_measure`` (timing,
counting, memory, the batch search; in this process or in a child per variant), ``step_report``
(the rows, printed as each is measured). ``--isolate`` (default for one CUDA process): each variant
in a fresh child, so a CUDA error or a timeout (``--row-timeout``) is that row's error.

Run from the repository root:  ``.venv/bin/python -m benchmarks.train_step`` (``--quick``: smoke)
Collectives on CPU:  ``OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 -m
benchmarks.train_step --quick``
On GPUs (``benchmarks/gpu_check.sh`` runs the prepared set on one):  ``torchrun --nproc-per-node <GPUs>
-m benchmarks.train_step --device cuda --channels 64 --resolutions 256 --precisions bf16
--checkpointing off attention+blocks --max-batch``
(DDP over NCCL; memory is measured in single-GPU child processes, without DDP's buckets).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence

import torch

from benchmarks.common import describe_machine, gemm_peak_flops
from benchmarks.step_measure import MAX_BATCH_CAP, MAX_BATCH_PROBES, child_main, in_child, time_and_count
from benchmarks.step_report import RowPrinter, goal_lines, note_lines
from benchmarks.step_variants import CHECKPOINTING, COMPUTE, GEMM_DTYPES, Setup, Variant, free_memory, set_threads
from sagan_dist import dist
from sagan_dist.dist import DistInfo

MEMORY_CHILD_TIMEOUT_S = 1800


def batch_of(v: Variant, args: argparse.Namespace, s: Setup) -> tuple[Variant, dict]:
    """The variant at the largest batch the capped search found, and what to say about it
    (``{"error": ...}`` when not even the first batch fits or the search failed)."""
    found = in_child("search", v, s, args.row_timeout, cap=args.max_batch_cap, probes=args.max_batch_probes)
    if "error" in found:
        return v, found
    if not found["largest"]:
        return v, {"error": f"not even batch {v.batch} fits"}
    note = (f" (OOM at {found['failed_at']})" if found["failed_at"]
            else f"+ (search stopped: cap {args.max_batch_cap}, {args.max_batch_probes} probes)")
    return dataclasses.replace(v, batch=found["largest"]), {"batch_note": note}


def measure_resolution(resolution: int, args: argparse.Namespace, s: Setup, info: DistInfo,
                       printer: RowPrinter) -> None:
    variants = [Variant(resolution, p, c, s.batch, k)
                for p in args.precisions for c in args.checkpointing for k in args.compute]
    if args.isolate:  # one child per variant: rows appear one by one, an error costs its row only
        for v in variants:
            v, found = batch_of(v, args, s) if args.max_batch else (v, {})
            row = found if "error" in found else {**in_child("row", v, s, args.row_timeout, repeats=args.repeats),
                                                  **found}
            printer.row(v, row)
        return
    notes = [{} for _ in variants]
    if args.max_batch:  # rank 0 searches on its GPU; every rank then uses what it found
        found = [batch_of(v, args, s) for v in variants] if info.is_main else None
        variants, notes = map(list, zip(*dist.broadcast_object(found)))
    # With --max-batch every trainer fills its GPU, so time them one at a time, not side by side.
    groups = [[v] for v in variants] if args.max_batch else [variants]
    results: dict[Variant, dict] = {}
    for group in groups:
        results |= time_and_count([v for v in group if "error" not in notes[variants.index(v)]], s, info,
                                  args.repeats)
    for v, note in zip(variants, notes):  # memory: single process on this rank's device, no DDP buckets
        row = note if "error" in note else {**results[v], **in_child("memory", v, s, MEMORY_CHILD_TIMEOUT_S),
                                            **note}
        printer.row(v, row)


def run(args: argparse.Namespace, info: DistInfo) -> None:
    say = print if info.is_main else (lambda *a, **k: None)
    s = Setup(args.channels, args.batch, args.checkpoint_from, args.classes, args.init,
              str(info.device), args.threads if info.device.type == "cpu" else 0)
    set_threads(s.threads)  # before the GEMM peak: the ceiling is for the same thread count
    say(f"machine: {describe_machine()}, device {info.device}, world size {info.world_size}")
    # On CPU every rate is per CPU-second (see interleaved_wall_cpu_times), the ceiling too.
    cpu = info.device.type == "cpu"
    clock = time.process_time if cpu else time.perf_counter
    # 8192^3 on a GPU: a 2048^3 product takes ~20 us on an H200, where launch overhead would
    # lower the ceiling and inflate "of GEMM peak"; on a CPU 2048^3 already takes long enough.
    n = args.gemm_n or (2048 if cpu else 8192)
    peaks = {p: gemm_peak_flops(n, dtype=GEMM_DTYPES[p], device=info.device, clock=clock)
             for p in args.precisions}
    free_memory(info.device)
    say(f"GEMM peak ({n}x{n} matmul, best of 7, {'CPU' if cpu else 'wall'} time): "
        + ", ".join(f"{p} {f / 1e9:.1f} GFLOP/s" for p, f in peaks.items()))
    say(f"synthetic data; width {s.channels} (g_channels = d_channels), {s.classes} classes, "
        f"checkpoint_from={s.checkpoint_from}, model.init={s.init}, n_critic=1; times: median of "
        f"{args.repeats} {'steps' if args.isolate else 'round-robin steps'} after a warm-up step"
        f"{', each variant in a fresh process' if args.isolate else ''}\n", flush=True)
    load_start = os.getloadavg()[0]
    printer = RowPrinter(peaks, info.world_size, say)
    for resolution in args.resolutions:
        measure_resolution(resolution, args, s, info, printer)
    ok = [r for r in printer.results.values() if "error" not in r]
    clock_name = "process CPU time (not wall: the cores are shared)" if cpu else "wall time"
    say(f"\n* step s, images/s, time vs base, GFLOP/s: {clock_name}; largest (max - min) / median over "
        f"a variant's repeats: {max((r['spread'] for r in ok), default=0):.2f}")
    say(f"1-min load average: {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"(on {os.cpu_count()} cores)")
    methods = sorted({str(r["method"]) for r in ok if "method" in r})
    say(f"step peak: growth over the state after a warm-up step, fresh process per row ({', '.join(methods)})")
    for line in note_lines(printer.results) + goal_lines(printer.results):
        say(line)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one process per GPU (under torchrun: DDP over NCCL)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    p.add_argument("--precisions", nargs="+", choices=tuple(GEMM_DTYPES), default=["fp32", "bf16"])
    p.add_argument("--checkpointing", nargs="+", choices=tuple(CHECKPOINTING),
                   default=list(CHECKPOINTING))
    p.add_argument("--compute", nargs="+", choices=tuple(COMPUTE), default=["eager"],
                   help="train.compile / model.channels_last per row")
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
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each variant in a fresh child process, its row printed when measured (default: "
                        "on for one CUDA process, off otherwise: CPU rows are timed round-robin)")
    p.add_argument("--row-timeout", type=float, default=600.0,
                   help="seconds an isolated variant (or its batch search) may take before it is that "
                        "row's error")
    p.add_argument("--max-batch", action="store_true",
                   help="CUDA: per variant, the largest per-GPU batch that fits (doubling from --batch, "
                        "one child process per variant), then timed at it")
    p.add_argument("--max-batch-cap", type=int, default=MAX_BATCH_CAP, help="--max-batch tries no batch above this")
    p.add_argument("--max-batch-probes", type=int, default=MAX_BATCH_PROBES,
                   help="--max-batch builds at most this many trainers per variant")
    p.add_argument("--gemm-n", type=int, default=None,
                   help="size of the GEMM peak's square matmul (default 8192 on CUDA, 2048 on CPU; --quick: 512)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec: step_measure.child_main
    args = p.parse_args(argv)
    if args.quick:
        args.resolutions, args.channels, args.batch, args.classes = [64], 8, 2, 10
        args.repeats, args.checkpoint_from, args.gemm_n = 1, 32, args.gemm_n or 512
    if args.max_batch and args.device != "cuda":
        p.error("--max-batch needs --device cuda (a CPU does not run out of memory cleanly)")
    if args.isolate is None:
        args.isolate = args.device == "cuda" and dist.env_world_size() == 1
    if args.isolate and dist.env_world_size() > 1:
        p.error("--isolate runs each variant in one process: not under torchrun")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_main(args.child)))
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

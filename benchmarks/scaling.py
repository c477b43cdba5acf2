"""Predicted weak-scaling efficiency of DDP training on N nodes x G GPUs, from a step time, the
gradient bytes per step and how much of the all-reduce hides behind backward.

Model (stated so that each input can be replaced by a measurement):

* per step, D's gradients are all-reduced once (its update) and G's once (its update); bytes =
  parameter count x bytes of the reduce dtype (fp32 by default: DDP reduces in the parameters'
  dtype, and autocast keeps fp32 weights; ``--reduce-bytes 2`` models a bf16 compression hook);
* ring all-reduce over n = nodes x GPUs ranks: each rank sends and receives 2(n-1)/n x bytes over
  its slowest link, the inter-node NIC at ``bandwidth`` (one NIC per GPU, rail-optimised; with one
  NIC shared by a node's 8 GPUs, divide the bandwidth by 8), plus ``latency`` per bucket and ring
  (DDP buckets of ``--bucket-mib``, 25 MiB by default);
* overlap: DDP launches each bucket's all-reduce as soon as its gradients are ready, so up to
  ``--overlap`` x the backward time (backward = 2/3 of the step's compute: twice the forward's
  FLOPs) hides communication; the last bucket (the first layers, finished last) never hides;
* efficiency = compute time / (compute time + exposed communication); weak scaling, so the
  per-GPU batch and compute time stay what they are on one GPU.

The step time: ``--step-s`` (a measured GPU step at this per-GPU batch, e.g. from
``benchmarks/gpu_check.sh``), else FLOPs per step counted with FlopCounterMode on fake
tensors (shapes only: no memory, no compute) over an assumed achieved rate (``--peak-tflops`` x ``--mfu``).

Run:  ``.venv/bin/python -m benchmarks.scaling``  (``--quick``: 64 px width 8, for a smoke test)
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.common import count_flops, format_table
from sagan_dist.models.sagan import Discriminator, Generator

KNOBS = ("bigger DDP buckets (fewer latencies) or a bf16 compression hook (half the bytes) when "
         "bandwidth-bound; train.accumulation k (one all-reduce per k micro-batches: k x the "
         "compute per byte); ZeRO stage 1/2 (DeepSpeed) shards optimizer state and gradients but "
         "moves the same bytes (reduce-scatter + all-gather), so it saves memory, not time")


@dataclass(frozen=True)
class Inputs:
    step_s: float  # compute time of one step on one GPU
    g_bytes: int  # G's gradient bytes per all-reduce
    d_bytes: int
    bucket_bytes: int
    latency_s: float
    overlap: float  # share of backward time that can hide communication


def allreduce_s(n_bytes: int, ranks: int, gbit_s: float, inp: Inputs) -> tuple[float, float]:
    """(whole ring all-reduce time, time of its last bucket) for one network's gradients."""
    buckets = max(1, math.ceil(n_bytes / inp.bucket_bytes))
    per_byte = 2 * (ranks - 1) / ranks / (gbit_s * 1e9 / 8)
    total = n_bytes * per_byte + buckets * inp.latency_s
    last = min(n_bytes, inp.bucket_bytes) * per_byte + inp.latency_s
    return total, last


def efficiency(inp: Inputs, ranks: int, gbit_s: float) -> tuple[float, float]:
    """(weak-scaling efficiency, exposed communication seconds per step)."""
    backward_s = inp.step_s * 2 / 3
    exposed = 0.0
    for n_bytes in (inp.d_bytes, inp.g_bytes):
        total, last = allreduce_s(n_bytes, ranks, gbit_s, inp)
        # each network's backward is about half of the step's backward
        exposed += max(last, total - inp.overlap * backward_s / 2)
    return inp.step_s / (inp.step_s + exposed), exposed


def model_numbers(resolution: int, channels: int, classes: int, batch: int) -> tuple[int, int, int]:
    """(G parameters, D parameters, FLOPs of one D+G step at ``batch``), with fake tensors.

    FakeTensorMode gives every tensor its shape and dtype but no storage, so a 256 px width-64
    step is counted in seconds and without its gigabytes (the meta device would do the same, but
    spectral norm's ``autocast(device_type=...)`` has no meta variant).
    """
    with FakeTensorMode():
        return _count(resolution, channels, classes, batch)


def _count(resolution: int, channels: int, classes: int, batch: int) -> tuple[int, int, int]:
    g = Generator(resolution, classes, 128, channels, init="normal")
    d = Discriminator(resolution, classes, channels, init="normal")
    z, y = torch.randn(batch, 128), torch.zeros(batch, dtype=torch.long)
    x = torch.randn(batch, 3, resolution, resolution)

    def step() -> None:
        with torch.no_grad():
            fake = g(z, y)
        d(torch.cat([x, fake]), torch.cat([y, y])).sum().backward()  # D step
        d(g(z, y), y).sum().backward()  # G step (through D)

    flops = count_flops(step)
    return (sum(p.numel() for p in g.parameters()), sum(p.numel() for p in d.parameters()), flops)


def run(args: argparse.Namespace) -> None:
    g_params, d_params, flops = model_numbers(args.resolution, args.channels, args.classes, args.batch)
    assumed = args.step_s is None
    step_s = flops / (args.peak_tflops * 1e12 * args.mfu) if assumed else args.step_s
    inp = Inputs(step_s, g_params * args.reduce_bytes, d_params * args.reduce_bytes,
                 int(args.bucket_mib * 2**20), args.latency_us * 1e-6, args.overlap)
    ranks = args.nodes * args.gpus
    print(f"{args.resolution} px, width {args.channels}, {args.classes} classes, per-GPU batch "
          f"{args.batch}: G {g_params / 1e6:.1f} M + D {d_params / 1e6:.1f} M parameters -> "
          f"{(inp.g_bytes + inp.d_bytes) / 2**20:.0f} MiB all-reduced per step "
          f"({args.reduce_bytes} B/element); {flops / 1e12:.2f} TFLOP per step (FlopCounterMode)")
    source = (f"assumed: {flops / 1e12:.2f} TFLOP / ({args.peak_tflops:g} TFLOP/s x MFU {args.mfu:g})"
              if assumed else "given (--step-s)")
    print(f"step compute time {step_s * 1e3:.1f} ms ({source}); {args.nodes} nodes x {args.gpus} "
          f"GPUs = {ranks} ranks, DDP buckets {args.bucket_mib:g} MiB, latency {args.latency_us:g} "
          f"us per bucket, overlap {args.overlap:g} of backward\n")
    rows = []
    for gbit in args.bandwidths:
        eff, exposed = efficiency(inp, ranks, gbit)
        total = sum(allreduce_s(b, ranks, gbit, inp)[0] for b in (inp.g_bytes, inp.d_bytes))
        rows.append([f"{gbit:g} Gb/s", f"{total * 1e3:.1f}", f"{exposed * 1e3:.1f}",
                     f"{(step_s + exposed) * 1e3:.1f}", f"{eff:.2f}"])
    print(format_table(["inter-node bandwidth per GPU", "all-reduce ms/step", "exposed ms/step",
                        "step ms", "weak-scaling efficiency"], rows))
    print(f"\nknobs: {KNOBS}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch (imagenet256: 256 / 8 GPUs)")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--bandwidths", type=float, nargs="+", default=[100, 200, 400], help="Gb/s")
    p.add_argument("--step-s", type=float, default=None,
                   help="measured compute time of one step on one GPU (replaces the FLOP estimate)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak for the estimate (H100/H200 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.3, help="assumed achieved share of the peak")
    p.add_argument("--reduce-bytes", type=int, default=4, help="bytes per gradient element")
    p.add_argument("--bucket-mib", type=float, default=25.0, help="DDP bucket_cap_mb")
    p.add_argument("--latency-us", type=float, default=30.0, help="per bucket all-reduce latency")
    p.add_argument("--overlap", type=float, default=0.8, help="share of backward that hides comm")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 px, width 8, batch 2")
    p.add_argument("--device", default="cpu", help="ignored (fake tensors); accepted like the other entry points")
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.channels, args.batch = 64, 8, 2
    return args


if __name__ == "__main__":
    run(parse_args())

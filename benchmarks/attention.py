"""Our fused-SDPA SelfAttention against a naive layer that materialises the N x N attention matrix.

Forward + backward, batch 1, 64 channels, maps 32x32, 64x64 and 128x128 (plus pool=True at
128x128), all in one run:

* time: median of several round-robin repeats after warm-up (see ``common.interleaved_times``);
* peak memory: growth of the peak resident set over one forward + backward, each measured in its
  own fresh child process (``--measure-memory``), so no measurement inherits another's peak;
* achieved GFLOP/s (FLOPs from FlopCounterMode / time) as a fraction of an fp32 GEMM peak
  measured in the same run;
* which attention kernel ran, by the aten op names the profiler recorded.

An extra, experimental row per map (``QueryChunkedSelfAttention``) tries a change to our layer
in the benchmark only: see its docstring.

Run from the repository root:  ``.venv/bin/python -m benchmarks.attention``
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (count_flops, describe_machine, format_table, gemm_peak_flops,
                               interleaved_times, mib, op_names, peak_rss_growth,
                               run_json_child, start_peak_rss)
from sagan_dist.models.attention import SelfAttention

CHANNELS = 64
SIZES = (32, 64, 128)
POOL_SIZE = 128  # the pool=True rows are measured at this map only
REPEATS = {32: 20, 64: 10, 128: 5}
GOAL_MEMORY_RATIO = 1 / 20  # at 128x128: ours/naive peak extra memory
GOAL_TIME_RATIO = 1 / 4  # at 128x128: ours/naive forward+backward time
CHUNKS = 2  # query chunks of the experimental variant: one per core here
FUSED_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH_OP = "aten::_scaled_dot_product_attention_math"


class NaiveSelfAttention(nn.Module):
    """The same function as ``SelfAttention`` (sharing its weights), written as SAGAN code often is.

    It builds the (N_q x N_k) energy matrix with ``bmm``, softmaxes it and multiplies by the
    values, so forward keeps O(N^2) activations alive for backward.
    """

    def __init__(self, layer: SelfAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.layer
        b, _, h, w = x.shape
        q, k, v = att.query(x), att.key(x), att.value(x)
        if att.pool:
            k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, C', N)
        energy = torch.bmm(q.transpose(1, 2), k)  # (B, N_q, N_k); no 1/sqrt(d), as in the paper
        # Normalise over the KEY axis (dim=-1) and contract that axis with v: weights per query
        # sum to 1. Many copies of SAGAN code write ``bmm(proj_value, attention)`` without the
        # transpose below, which contracts the query axis instead, i.e. normalises along the
        # wrong axis (tests/test_attention.py checks that this gives a different result).
        attention = torch.softmax(energy, dim=-1)
        o = torch.bmm(v, attention.transpose(1, 2))  # (B, C/2, N_q)
        return x + att.gamma.to(x.dtype) * att.out(o.reshape(b, -1, h, w))


class QueryChunkedSelfAttention(nn.Module):
    """EXPERIMENT, benchmark only: ``SelfAttention`` with its queries split into chunks for SDPA.

    Why: the CPU flash backward parallelises over batch x heads only. At batch 1 with one head
    it is one work item, run on the calling thread outside any OpenMP region, so each of its
    thousands of small block GEMMs lets MKL open its own thread team. On an idle machine that
    is merely wasteful; when another process holds a core, every team waits for a descheduled
    thread and the backward becomes up to ~20x slower. (Checked: forcing MKL to one thread for the
    calling thread, or running at batch 2, removes the slowdown.)

    Each query's softmax is over all keys, so splitting the queries into ``chunks`` "heads"
    (keys/values expanded with stride 0, no copy) computes the same function, keeps the fused
    kernel, and gives the backward ``chunks`` work items run inside the kernel's own parallel
    region, where MKL stays single-threaded.
    """

    def __init__(self, layer: SelfAttention, chunks: int) -> None:
        super().__init__()
        self.layer, self.chunks = layer, chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.layer
        b, _, h, w = x.shape
        q, k, v = att.query(x), att.key(x), att.value(x)
        if att.pool:
            k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for t in (q, k, v))
        pad = v.shape[-1] - q.shape[-1]
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))  # (B, 1, N, C/2), as in SelfAttention
        n, c = q.shape[2], self.chunks if q.shape[2] % self.chunks == 0 else 1
        q = q.reshape(b, c, n // c, q.shape[-1])
        k, v = k.expand(b, c, *k.shape[2:]), v.expand(b, c, *v.shape[2:])
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0).reshape(b, n, -1)
        o = o.transpose(1, 2).reshape(b, -1, h, w)
        return x + att.gamma.to(x.dtype) * att.out(o)


@dataclass(frozen=True)
class Variant:
    """One row of the table: which layer, with or without pooled keys/values, at which map."""

    impl: str  # "ours" | "naive" | "chunked"
    pool: bool
    size: int

    @property
    def name(self) -> str:
        label = {"chunked": f"ours, {CHUNKS} query chunks (experiment)"}.get(self.impl, self.impl)
        return f"{label}{' pool=True' if self.pool else ''}"


def build(impl: str, pool: bool, seed: int = 0) -> nn.Module:
    """The layer under test; gamma non-zero so the attention branch matters to the output."""
    torch.manual_seed(seed)
    layer = SelfAttention(CHANNELS, pool=pool)
    with torch.no_grad():
        layer.gamma.fill_(0.5)
    if impl == "chunked":
        return QueryChunkedSelfAttention(layer, CHUNKS)
    return layer if impl == "ours" else NaiveSelfAttention(layer)


def step_fn(model: nn.Module, size: int) -> Callable[[], None]:
    """A closure running one forward + backward at a ``size`` x ``size`` map, batch 1."""
    x = torch.randn(1, CHANNELS, size, size, requires_grad=True)

    def step() -> None:
        model(x).sum().backward()

    return step


# ------------------------------------------------------------------------------ child: memory
def measure_memory(impl: str, pool: bool, size: int) -> dict[str, object]:
    """Peak RSS growth of one forward + backward; meant to run in a fresh process.

    A warm-up step on a small 16x16 map first starts thread pools and allocates the parameter
    gradients, so the measured growth is what the step at ``size`` itself needs: activations kept
    for backward, temporaries, and (for the naive layer) every N x N matrix.
    """
    model = build(impl, pool)
    step_fn(model, 16)()
    step = step_fn(model, size)  # the input exists before the baseline
    baseline = start_peak_rss()
    step()
    return {"peak_growth": peak_rss_growth(baseline), "resettable": baseline.resettable}


def memory_in_child(v: Variant) -> dict[str, object]:
    args = ["-m", "benchmarks.attention", "--measure-memory", v.impl, str(int(v.pool)), str(v.size),
            "--threads", str(torch.get_num_threads())]  # per-thread kernel buffers count too
    return run_json_child(args)


# ------------------------------------------------------------------------------------- parent
def kernel_label(names: list[str]) -> str:
    """Which attention path ran, from the profiler's op names."""
    if FUSED_OP in names:
        return "SDPA flash (fused)"
    if MATH_OP in names:
        return "SDPA math (N x N)"
    if "aten::bmm" in names and "aten::_softmax" in names:
        return "bmm+softmax (materialised)"
    return "?"


def attention_ops(step: Callable[[], None]) -> list[str]:
    """Profiler op names of one step that tell the attention path apart."""
    keys = ("scaled_dot_product", "bmm", "softmax")
    return [n for n in op_names(step) if any(k in n for k in keys)]


def measure_group(size: int, pool: bool, impls: tuple[str, ...]) -> dict[Variant, dict]:
    """Time, FLOPs, kernels and memory of each implementation at one map size."""
    variants = [Variant(impl, pool, size) for impl in impls]
    steps = {v: step_fn(build(v.impl, v.pool), size) for v in variants}
    times = interleaved_times({v.name: steps[v] for v in variants},
                              repeats=REPEATS[size], warmup=1)
    results = {}
    for v in variants:
        mem = memory_in_child(v)
        results[v] = {"time": times[v.name].median(), "best": times[v.name].best(),
                      "flops": count_flops(steps[v]), "ops": attention_ops(steps[v]),
                      "mem": mem["peak_growth"], "resettable": mem["resettable"]}
    return results


def table_rows(results: dict[Variant, dict], peak: float) -> list[list[str]]:
    rows = []
    for v, r in results.items():
        naive = results[Variant("naive", v.pool, v.size)]
        ours = v.impl != "naive"
        rate = r["flops"] / r["time"]
        rows.append([
            f"{v.size}x{v.size}", v.name, kernel_label(r["ops"]), f"{r['time'] * 1e3:.1f}",
            f"{r['best'] * 1e3:.1f}", f"{r['time'] / naive['time']:.3f}" if ours else "",
            mib(r["mem"]), f"{r['mem'] / naive['mem']:.4f}" if ours else "",
            f"{r['flops'] / 1e9:.2f}", f"{rate / 1e9:.1f}", f"{rate / peak:.2f}",
        ])
    return rows


HEADERS = ["map", "layer", "attention kernel (profiler)", "fwd+bwd ms (median)", "best ms",
           "time ours/naive", "peak extra MiB", "mem ours/naive", "GFLOP (counted)",
           "GFLOP/s", "of GEMM peak"]


def goal_lines(results: dict[Variant, dict]) -> list[str]:
    ours = results[Variant("ours", False, 128)]
    naive = results[Variant("naive", False, 128)]
    mem, tim = ours["mem"] / naive["mem"], ours["time"] / naive["time"]
    return [
        f"goal at 128x128: memory ours/naive = {mem:.4f} (<= {GOAL_MEMORY_RATIO:.3f}: "
        f"{'MET' if mem <= GOAL_MEMORY_RATIO else 'NOT MET'}), time ours/naive = {tim:.3f} "
        f"(<= {GOAL_TIME_RATIO:.2f}: {'MET' if tim <= GOAL_TIME_RATIO else 'NOT MET'})",
    ]


def note_lines(results: dict[Variant, dict]) -> list[str]:
    lines = ["profiler op names (attention-related) in one forward+backward:"]
    maps_by_ops: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for v, r in results.items():
        maps_by_ops.setdefault((v.name, tuple(r["ops"])), []).append(f"{v.size}x{v.size}")
    for (name, ops), maps in maps_by_ops.items():
        lines.append(f"  {name} @ {', '.join(maps)}: {', '.join(ops)}")
    for size in SIZES:
        n = size * size
        ours = results[Variant("ours", False, size)]
        useful = results[Variant("naive", False, size)]["flops"] / ours["time"]
        lines.append(f"{size}x{size} (N={n}): one N x N fp32 matrix = {mib(4 * n * n)} MiB; "
                     f"ours at the naive layer's FLOP count = {useful / 1e9:.1f} GFLOP/s")
    method = "VmHWM after clear_refs reset" if all(r["resettable"] for r in results.values()) \
        else "ru_maxrss"
    lines.append(f"memory: peak RSS growth over one fwd+bwd, fresh process per row ({method})")
    lines.append("GFLOP (counted) is what FlopCounterMode counts for the work run: ours includes "
                 "q/k zero-padded from C/8 to C/2 features and the recomputation in flash backward")
    return lines


def main() -> None:
    torch.manual_seed(0)
    print(f"machine: {describe_machine()}")
    peak = gemm_peak_flops()
    print(f"fp32 GEMM peak (2048x2048 matmul, best of 7): {peak / 1e9:.1f} GFLOP/s\n")
    load_before = os.getloadavg()[0]
    results: dict[Variant, dict] = {}
    for size in SIZES:
        results |= measure_group(size, False, ("ours", "naive", "chunked"))
    results |= measure_group(POOL_SIZE, True, ("ours", "naive"))
    print(format_table(HEADERS, table_rows(results, peak)))
    print(f"\n1-min load average: {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end "
          f"(on {os.cpu_count()} cores; far above that, the times are contended)")
    for line in goal_lines(results) + note_lines(results):
        print(line)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-memory", nargs=3, metavar=("IMPL", "POOL", "SIZE"),
                        help="child mode: print the peak RSS growth of one step as JSON")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads (default: torch's choice, one per core); "
                             "1 takes thread-team effects out of the comparison on a busy host")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    if ARGS.measure_memory:
        impl, pool, size = ARGS.measure_memory
        print(json.dumps(measure_memory(impl, bool(int(pool)), int(size))))
    else:
        main()

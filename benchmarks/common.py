"""Helpers shared by the scripts in ``benchmarks/``: timing, FLOP counting, GEMM peak, peak memory.

Timings on a shared CPU are noisy, so every number here is meant to be compared side by side with
another number measured in the same run (a ratio), never against a constant.

Peak memory is measured in a *fresh* child process (see :func:`run_json_child`) because the kernel's
resident-set high-water mark only ever grows within a process: after one large allocation a
second, smaller measurement in the same process would read the earlier peak.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


# --------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU model string from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> str:
    """One line naming what the numbers were measured on."""
    return (f"nproc={os.cpu_count()}, CPU: {cpu_model()}, torch {torch.__version__}, "
            f"intra-op threads={torch.get_num_threads()}, python {platform.python_version()}")


# ---------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Times:
    """Seconds of every timed call of one function, in call order: wall clock and process CPU.

    CPU time (``time.process_time``, all threads of this process) leaves out the time slices lost
    to other processes, so on a shared CPU it is the steadier measure of the work a call does;
    wall time is what a user waits, and the only meaningful clock for CUDA work.
    """

    wall: list[float]
    cpu: list[float]

    def median(self, clock: str = "wall") -> float:
        """The median, not the mean or the minimum: robust to a call that lost its core a while."""
        return statistics.median(getattr(self, clock))

    def best(self, clock: str = "wall") -> float:
        """The fastest call: how fast it can go here (a median far above it = contended run)."""
        return min(getattr(self, clock))

    def spread(self, clock: str = "wall") -> float:
        """(max - min) / median: how much the repeats disagree."""
        samples = getattr(self, clock)
        return (max(samples) - min(samples)) / statistics.median(samples)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                      sync: Callable[[], None] | None = None) -> dict[str, Times]:
    """Wall and CPU time of every call of each function, timed round-robin (a, b, a, b, ...).

    The one timing helper of all benchmarks. Interleaving makes a ratio between two functions
    fair on a shared machine: a burst of load from another process hits both of them rather than
    only whichever was timed during it. ``sync`` runs after each call before the clocks stop
    (``torch.cuda.synchronize``: CUDA kernels run asynchronously).
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times = {name: Times([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name].cpu.append(time.process_time() - cpu)
            times[name].wall.append(time.perf_counter() - wall)
    return times


def gemm_peak_flops(n: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu",
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """Best achieved FLOP/s of an ``n x n`` matmul: the practical compute ceiling of this machine.

    Best of several, not median, because this is a ceiling: contention only ever lowers it.
    On CUDA each matmul is synchronised before the clock stops (kernels run asynchronously).
    ``clock=time.process_time`` gives FLOP per CPU-second, the ceiling for rates measured in CPU
    time (see :class:`Times`).
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up: thread pool start, BLAS buffers
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        torch.mm(a, b)
        sync()
        best = min(best, clock() - start)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------------------- FLOPs
def _cpu_flash_flop(query_shape: Sequence[int], key_shape: Sequence[int],
                    value_shape: Sequence[int], *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flop(grad_out_shape: Sequence[int], query_shape: Sequence[int],
                             key_shape: Sequence[int], value_shape: Sequence[int], *args: Any,
                             out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel (torch 2.14): without
# these entries our attention would count as 0 FLOPs. Same formulas as the CUDA flash kernel.
CPU_SDPA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and SDPA; elementwise ops count 0)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------- kernels
def op_names(fn: Callable[[], Any], needle: str = "") -> list[str]:
    """Sorted names of the aten ops that one call of ``fn`` ran, those containing ``needle``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if needle in e.name})


# ----------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class RssBaseline:
    """Where a peak-RSS measurement starts, and how the peak will be read."""

    bytes: int
    resettable: bool  # True: the kernel's high-water mark was reset to the current RSS


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS; this suite runs on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_peak_rss() -> RssBaseline:
    """Begin a peak-RSS measurement; call after all setup (model, inputs, warm-up) is done.

    Preferred: write "5" to /proc/self/clear_refs, which resets the kernel's peak RSS (VmHWM) to
    the current RSS, so the baseline is exactly what is resident now. Where that is not allowed,
    fall back to ``ru_maxrss``, whose baseline is the setup's own high-water mark; a setup peak
    above its steady state would then hide some growth, so keep setup small in that case.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return RssBaseline(_status_kib("VmRSS") * 1024, resettable=True)
    except OSError:
        return RssBaseline(_maxrss_bytes(), resettable=False)


def peak_rss_growth(baseline: RssBaseline) -> int:
    """Bytes by which the process's peak resident set rose above ``baseline``.

    RSS counts pages actually touched, and torch's CPU allocator hands big tensors straight to the
    OS (glibc mmaps anything above its 32 MiB ceiling and unmaps it on free), so a materialised
    N x N matrix shows up here in full, and nothing freed before the baseline is reused silently.
    """
    peak = _status_kib("VmHWM") * 1024 if baseline.resettable else _maxrss_bytes()
    return max(0, peak - baseline.bytes)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json_child(args: Sequence[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process and parse the JSON object on its last stdout line.

    The child runs from the repository root with it on ``PYTHONPATH``, so ``-m benchmarks.x``
    and ``import sagan_dist`` work without an install.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO_ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (so it can be pasted into BENCHMARKS.md as printed)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 20:.1f}"

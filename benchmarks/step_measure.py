"""How `benchmarks/train_step.py` measures a variant: step time, FLOPs, host reads, collectives, peak
memory, and the largest batch that fits.

Two ways to run the variants of a run:

* side by side in this process (CPU, or several processes under torchrun): the steps of all
  variants of a resolution are timed round-robin, so a burst of load on a shared machine hits
  them all; peak memory is then measured in a fresh child per variant (the kernel's peak RSS only
  grows within a process);
* isolated (``--isolate``, the default for one CUDA process): everything of one variant in one
  fresh child, so a CUDA error, a crash or a hang (``--row-timeout``) costs that row alone, and the
  row is printed as soon as it is measured.

A child is ``python -m benchmarks.train_step --child JSON`` and prints one JSON object.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (count_flops, interleaved_times, peak_rss_growth, run_json_child,
                               start_peak_rss)
from benchmarks.counters import count_collectives, count_host_reads
from benchmarks.step_variants import (Setup, Variant, build_trainer, free_memory, set_threads, step_fn,
                                      synchronize, wrapped_blocks)
from sagan_dist.dist import DistInfo
from sagan_dist.memory import BatchTooLargeError

MAX_BATCH_CAP = 2048  # --max-batch doubles up to here at most
MAX_BATCH_PROBES = 6  # ... and builds at most this many trainers (one child per variant)


# ------------------------------------------------------------------------------------ children
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


def _prepare_child(s: Setup) -> torch.device:
    device = torch.device(s.device)
    set_threads(s.threads)
    if device.type == "cpu":
        _return_freed_memory_to_os()
    else:
        torch.cuda.set_device(device)
    return device


def _step_peak(step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """Peak memory of one step, called after a warm-up step (weights, gradients, Adam moments are
    then in the baseline, so what is left is what a step keeps alive)."""
    if device.type == "cpu":
        baseline = start_peak_rss()
        step()
        growth = peak_rss_growth(baseline)
        return {"step_peak": growth, "process_peak": baseline.bytes + growth,
                "method": "VmHWM" if baseline.resettable else "ru_maxrss"}
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    peak = torch.cuda.max_memory_allocated(device)
    return {"step_peak": peak - before, "process_peak": peak, "method": "cuda.max_memory_allocated"}


def measure_memory(v: Variant, s: Setup) -> dict[str, Any]:
    """Child: peak memory of one step after a warm-up step."""
    device = _prepare_child(s)
    with tempfile.TemporaryDirectory() as tmp:
        step = step_fn(build_trainer(v, s, DistInfo(0, 1, 0, device), Path(tmp)))
        step()  # warm-up: compilation, gradients, Adam moments, thread pools
        return _step_peak(step, device)


def measure_row(v: Variant, s: Setup, repeats: int) -> dict[str, Any]:
    """Child: all of one variant. Memory first (right after the warm-up, as `measure_memory`),
    then the timed steps, then one step under each counter."""
    device = _prepare_child(s)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(v, s, DistInfo(0, 1, 0, device), Path(tmp))
        step = step_fn(trainer)
        step()
        result = _step_peak(step, device)
        t = interleaved_times({v.name: step}, repeats=repeats, warmup=0, sync=lambda: synchronize(device))[v.name]
        clock = "cpu" if device.type == "cpu" else "wall"
        return {**result, "time": t.median(clock), "wall": t.median("wall"), "spread": t.spread(clock),
                "wrapped": wrapped_blocks(trainer), **counted_step(step, device)}


def search_batch(v: Variant, s: Setup, cap: int, probes: int) -> dict[str, Any]:
    """Child: the largest per-GPU batch whose step fits, doubling from ``v.batch`` in this process.

    An out-of-memory error (or the trainer's refusal of a batch whose largest activation cannot fit)
    is recoverable (the allocator frees what the failed step held); any
    other error ends the child and becomes the row's error. At most ``probes`` trainers, none
    over ``cap``: the answer is a lower bound when the search stops there (``limited``).
    """
    device = _prepare_child(s)
    fits, failed, batch = 0, None, v.batch
    for _ in range(probes):
        if batch > cap:
            break
        try:
            with tempfile.TemporaryDirectory() as tmp:
                step = step_fn(build_trainer(dataclasses.replace(v, batch=batch), s, DistInfo(0, 1, 0, device),
                                             Path(tmp)))
                step(), step()  # the second step holds Adam's moments too
                del step
            fits = batch
        except (torch.cuda.OutOfMemoryError, BatchTooLargeError):  # the trainer's own check refuses it too
            failed = batch
        free_memory(device)
        if failed:
            break
        batch *= 2
    return {"largest": fits, "failed_at": failed, "limited": failed is None}


def child_main(spec_json: str) -> dict[str, Any]:
    spec = json.loads(spec_json)
    v, s = Variant(**spec["variant"]), Setup(**spec["setup"])
    if spec["mode"] == "memory":
        return measure_memory(v, s)
    if spec["mode"] == "row":
        return measure_row(v, s, spec["repeats"])
    return search_batch(v, s, spec["cap"], spec["probes"])


def in_child(mode: str, v: Variant, s: Setup, timeout: float, **extra: Any) -> dict[str, Any]:
    """A child's JSON, or ``{"error": <its last error line>}`` if it failed or ran out of time."""
    spec = json.dumps({"mode": mode, "variant": dataclasses.asdict(v), "setup": dataclasses.asdict(s), **extra})
    try:
        return run_json_child(["-m", "benchmarks.train_step", "--child", spec], timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    except (RuntimeError, ValueError) as e:
        return {"error": last_error_line(str(e))}


def last_error_line(text: str) -> str:
    """The line that names the error in a traceback (the last ``SomethingError: ...``)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if ln.split(":", 1)[0].rsplit(".", 1)[-1].endswith(("Error", "Exception"))]
    return (named or lines or ["(no output)"])[-1][:300]


# ------------------------------------------------------------------------------------ in process
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


def counted_step(step: Callable[[], None], device: torch.device) -> dict[str, Any]:
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

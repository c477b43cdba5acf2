"""What a training step asks of the host and of the network: device-to-host reads and collectives.

Both are counted over whole steps and divided by the number of steps by the caller.

Host reads. On CUDA every wait of the host for the device is counted: ``torch.profiler``'s CUDA
runtime events ``cudaDeviceSynchronize`` (an explicit ``torch.cuda.synchronize()``, e.g. DeepSpeed's
timers), ``cudaStreamSynchronize`` (inside every implicit read: ``.item()``, ``float(t)``,
``bool(t)``, ``.tolist()``, ``.cpu()``, ``nonzero``, ...) and ``cudaEventSynchronize``. Beside them,
``torch.cuda.set_sync_debug_mode("warn")`` flags the implicit reads (``HostReads.flagged``); it does
not flag explicit synchronizes, which is why the profiler is the count. Where the profiler records
no CUDA runtime events (no CUPTI), the flagged reads are the count. (Not testable on a CPU-only
machine beyond the counting of event names.) On CPU nothing synchronises, so the calls that *would* read a device
tensor on the host are counted instead, from Python, with a ``TorchFunctionMode``: ``Tensor.item``,
``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``tolist``, ``numpy``, and ``cpu`` or ``to``
with a CPU target called from outside torch. Not counted on CPU: reads made inside C++ (none in
our step's ops), moves to the CPU inside torch's Python code (device-generic, such as
``clip_grad_norm_``'s ``.to(first_device)``), and reads from ``torch.optim``, which reads its step
counters with ``.item()``: those live on the host on every device (not fused/capturable), so they
do not synchronise a GPU either.

Collectives. ``torch.profiler`` records each gloo/NCCL collective as an event named
``gloo:<op>`` / ``nccl:<op>`` whose first input shape is the tensor's element count, including
those DDP's reducer launches from C++ (gradient buckets). Bytes are elements x 4: every tensor our
DDP step communicates is fp32 (gradients of fp32 master weights, BatchNorm statistics and
spectral-norm vectors), except the int64 batch counters (one element per BatchNorm layer).
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.overrides import TorchFunctionMode

_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy}
_MOVES = {torch.Tensor.cpu, torch.Tensor.to}
_OPTIM_DIR = os.path.dirname(torch.optim.__file__)
_TORCH_DIR = os.path.dirname(torch.__file__)


def _is_host_target(args: tuple, kwargs: dict) -> bool:
    targets = list(args[1:2]) + [kwargs.get("device")]
    return any(str(t).startswith("cpu") for t in targets if isinstance(t, (str, torch.device)))


def _caller_files() -> list[str]:
    frame, files = sys._getframe(2), []
    while frame is not None:
        files.append(frame.f_code.co_filename)
        frame = frame.f_back
    return files


def _counts(func: Callable, args: tuple, kwargs: dict) -> bool:
    if func not in _READS and func not in _MOVES:
        return False
    files = _caller_files()
    if any(f.startswith(_OPTIM_DIR) for f in files):
        return False  # host-side step counters (module docstring)
    if func in _READS:
        return True
    # A move to the CPU written in torch itself is device-generic (``.to(first_device)`` in
    # clip_grad_norm_ is a no-op move on a GPU run's GPU tensors); in our code it is a real read.
    called_from_torch = files[1].startswith(_TORCH_DIR) if len(files) > 1 else False
    return not called_from_torch and (func is torch.Tensor.cpu or _is_host_target(args, kwargs))


class _CountReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _counts(func, args, kwargs):
            self.counts[getattr(func, "__name__", str(func))] += 1
        return func(*args, **kwargs)


@dataclass
class HostReads:
    """Device-to-host reads counted while the context was open, by kind."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    flagged: int = 0  # CUDA: reads flagged by sync debug mode (implicit ones; also in counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# CUDA runtime calls that block the host until the device (or a stream, an event) is done; the
# profiler may report versioned names (cudaStreamSynchronize_v2 ...), hence prefixes.
CUDA_SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


def cuda_syncs(event_names: Iterable[str]) -> collections.Counter:
    """How many of ``event_names`` (profiler event names) are host waits, by runtime call."""
    found: collections.Counter[str] = collections.Counter()
    for name in event_names:
        for sync in CUDA_SYNCS:
            if name.startswith(sync):
                found[sync] += 1
    return found


@contextlib.contextmanager
def count_host_reads(device: torch.device) -> Iterator[HostReads]:
    """Count device-to-host reads (see the module docstring for what is counted).

    On CUDA it runs a profiler: do not nest it in `count_collectives` (profilers do not nest).
    """
    result = HostReads()
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught, \
                    profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                warnings.simplefilter("always")
                yield result
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        result.flagged = sum("synchronizing" in str(w.message) for w in caught)
        result.counts.update(cuda_syncs(e.name for e in prof.events()))
        if not result.counts and result.flagged:  # no runtime events recorded (no CUPTI)
            result.counts["cuda sync (debug mode)"] = result.flagged
        return
    mode = _CountReads()
    with mode:
        yield result
    result.counts.update(mode.counts)


@dataclass
class Collectives:
    """Collective calls and elements per op name (``all_reduce``, ``broadcast``, ...)."""

    calls: collections.Counter = field(default_factory=collections.Counter)
    elements: collections.Counter = field(default_factory=collections.Counter)

    def bytes(self, op: str | None = None) -> int:
        """Bytes at 4 per element (fp32; see the module docstring)."""
        return 4 * (self.elements[op] if op else sum(self.elements.values()))

    def summary(self, steps: int) -> str:
        return ", ".join(f"{op} {self.calls[op] / steps:g}x {self.bytes(op) / steps / 2**20:.2f} MiB"
                         for op in sorted(self.calls)) or "none"


@contextlib.contextmanager
def count_collectives() -> Iterator[Collectives]:
    """Collectives that ran while the context was open, from torch.profiler's gloo/nccl events."""
    from torch.profiler import ProfilerActivity, profile

    result = Collectives()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield result
    for event in prof.events():
        backend, _, op = event.name.partition(":")
        if backend not in ("gloo", "nccl") or not op:
            continue
        result.calls[op] += 1
        shapes = [s for s in event.input_shapes if s]
        result.elements[op] += sum(int(torch.Size(s).numel()) for s in shapes[:1])

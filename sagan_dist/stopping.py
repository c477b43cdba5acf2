"""How a run stops: SIGTERM/SIGINT become a stop request, and all ranks agree on the step to stop at.

A scheduler's SIGTERM, torchrun's signal to the whole process group and Ctrl-C's SIGINT all land
here: the handler only records the request (signal handlers must not do work), the loop polls it.
"""
from __future__ import annotations

import signal
import time
from typing import Any, Optional

import torch
import torch.distributed as tdist

from sagan_dist import dist


class StopSignals:
    """SIGTERM and SIGINT (a scheduler, torchrun's process-group signal, Ctrl-C) request a stop."""

    def __init__(self) -> None:
        self.requested_at: Optional[float] = None
        self.signum = signal.SIGTERM  # the first stop signal; a stopped run exits 128 + it

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def install(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested_at is None:
            self.requested_at, self.signum = time.monotonic(), signal.Signals(signum)


class StopAgreement:
    """Whether any rank asked to stop, agreed on by all ranks without stalling a step.

    Each step end starts an asynchronous MAX all-reduce of this rank's flag on the CPU control
    group and reads the one started a step earlier (long finished by then): every rank stops at
    the same step, one step after the first request, and no step waits on the network or the GPU.
    """

    def __init__(self) -> None:
        self._flag = torch.zeros(1)
        self._pending: Any = None
        self._value = torch.zeros(1)

    def poll(self, requested: bool) -> bool:
        """Called once per step end on every rank; True on all ranks at the same step."""
        if not dist.is_distributed():
            return requested
        agreed = False
        if self._pending is not None:
            self._pending.wait()
            agreed = bool(self._value[0] > 0)  # a CPU tensor: no device read
        self._value = torch.tensor([1.0 if requested else 0.0])
        self._pending = tdist.all_reduce(self._value, op=tdist.ReduceOp.MAX, group=dist.control_group(), async_op=True)
        return agreed

    def now(self, requested: bool) -> bool:
        """A blocking agreement (after a stop interrupted a step, or at the end)."""
        if not dist.is_distributed():
            return requested
        if self._pending is not None:
            self._pending.wait()
            requested = requested or bool(self._value[0] > 0)
            self._pending = None
        value = torch.tensor([1.0 if requested else 0.0])
        tdist.all_reduce(value, op=tdist.ReduceOp.MAX, group=dist.control_group())
        return bool(value[0] > 0)

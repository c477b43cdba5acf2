"""Step statistics kept on the device between logging steps, read (and reduced over ranks) there.

Reading a GPU tensor on the host drains the device's queue; a step that did so four times idled
the GPU four times. `StepStats` adds each step's losses, logits and gradient norms into one device
vector and tracks skipped (non-finite) updates with device counters; `read` does the only
device-to-host transfer and the only all-reduce, at logging steps.

Non-finite updates are counted per network (NETS): a D-only storm must stop the run even though
the G updates between its D updates are applied.
"""
from __future__ import annotations

import time

import torch

from sagan_dist import dist
from sagan_dist.engines import StepResult

KEYS = ("loss_d", "d_real", "d_fake", "grad_norm_d", "loss_g", "grad_norm_g")
NETS = ("D", "G")  # the order of the per-network streak counters


class StepStats:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Consecutive skipped updates of each network (NETS), carried across intervals.
        self.bad_streak = torch.zeros(len(NETS), dtype=torch.int64, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(KEYS), dtype=torch.float64, device=self.device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.max_streak = torch.zeros(len(NETS), dtype=torch.int64, device=self.device)
        self.steps, self.t0 = 0, time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, values: torch.Tensor) -> None:
        """One step's vector in the order of KEYS."""
        self.sums += values.detach().to(torch.float64)
        self.steps += 1

    def update_applied(self, result: StepResult, net: str) -> None:
        """Count a skipped update of ``net`` ("D" or "G") and its run of consecutive ones, on the device."""
        i = NETS.index(net)
        bad = (~result.applied).to(torch.int64)
        self.bad_streak[i] = (self.bad_streak[i] + 1) * bad
        self.max_streak[i] = torch.maximum(self.max_streak[i], self.bad_streak[i])
        self.skipped += bad

    def read(self) -> tuple[dict[str, float], int, dict[str, int]]:
        """Means over the interval and ranks, skipped updates, and each network's longest run of them."""
        packed = torch.cat([self.sums / max(self.steps, 1), self.skipped.reshape(1).double(),
                            self.max_streak.double()])
        if dist.is_distributed():
            torch.distributed.all_reduce(packed)  # means: sum / world; counts agree on every rank
            packed /= torch.distributed.get_world_size()
        values = packed.tolist()
        streaks = {net: round(v) for net, v in zip(NETS, values[len(KEYS) + 1:])}
        return dict(zip(KEYS, values[:len(KEYS)])), round(values[len(KEYS)]), streaks

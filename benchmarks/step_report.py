"""What `benchmarks/train_step.py` prints: one markdown row per variant as soon as it is measured
(a run cut short keeps what it measured), then the notes and goal lines over all rows."""
from __future__ import annotations

import sys
from collections.abc import Callable

from benchmarks.common import mib
from benchmarks.step_variants import BASELINE, Variant

GOAL_MEMORY_RATIO = 0.60  # at 256 px: checkpointing cuts step peak memory by >= 40% ...
GOAL_TIME_RATIO = 1.30  # ... for at most 30% more step time

HEADERS = ["res", "precision", "checkpointing", "compute", "wrapped G+D", "batch", "step s (median)*",
           "wall s (median)", "images/s*", "time vs base", "step peak MiB", "mem vs base",
           "process peak MiB", "GFLOP/image", "GFLOP/s", "of GEMM peak", "host reads/step",
           "collectives/step", "MiB reduced/step"]


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def baseline_of(results: dict[Variant, dict], v: Variant) -> dict | None:
    return next((r for u, r in results.items() if u.resolution == v.resolution and "error" not in r
                 and (u.precision, u.checkpointing, u.compute) == BASELINE), None)


def row_cells(v: Variant, r: dict, base: dict | None, peak: float, world: int) -> list[str]:
    """The table's cells for one variant (``r["error"]``: the error in place of the figures)."""
    head = [f"{v.resolution} px", v.precision, v.checkpointing, v.compute]
    batch = f"{v.batch}{r.get('batch_note', '')}"
    if "error" in r:
        return head + ["", batch, f"error: {r['error']}"] + [""] * (len(HEADERS) - 7)
    images = v.batch * world  # n_critic = 1 in the demo config
    rate = r["flops"] / r["time"]
    ratio = lambda key: f"{r[key] / base[key]:.2f}" if base else ""  # noqa: E731
    return head + [str(r["wrapped"]), batch, f"{r['time']:.3f}", f"{r['wall']:.3f}",
                   f"{images / r['time']:.2f}", ratio("time"), mib(r["step_peak"]), ratio("step_peak"),
                   mib(r["process_peak"]), f"{r['flops'] / v.batch / 1e9:.1f}", f"{rate / 1e9:.1f}",
                   f"{rate / peak:.2f}", str(r["host_reads"]), str(r["collectives"]), mib(r["comm_bytes"])]


class RowPrinter:
    """Prints the header once, then each row when it is measured (flushed: a pipe or a file that a
    timeout cuts off still holds every finished row)."""

    def __init__(self, peaks: dict[str, float], world: int, say: Callable[..., None] = print) -> None:
        self.peaks, self.world, self.say = peaks, world, say
        self.results: dict[Variant, dict] = {}

    def row(self, v: Variant, r: dict) -> None:
        if not self.results:
            self.say(markdown_row(HEADERS))
            self.say("|" + "|".join("---" for _ in HEADERS) + "|")
        self.results[v] = r
        self.say(markdown_row(row_cells(v, r, baseline_of(self.results, v), self.peaks[v.precision], self.world)))
        sys.stdout.flush()


def goal_lines(results: dict[Variant, dict]) -> list[str]:
    """At 256 px, for each checkpointing variant: memory and time against the same precision."""
    ok = {v: r for v, r in results.items() if "error" not in r}
    lines = []
    for v, r in ok.items():
        if v.resolution != 256 or v.checkpointing == "off":
            continue
        plain = next((q for u, q in ok.items() if u.resolution == 256 and u.precision == v.precision
                      and u.checkpointing == "off" and u.compute == v.compute and u.batch == v.batch), None)
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
                   if v.checkpointing != "off" and r.get("wrapped") == 0})
    if not idle:
        return []
    return [f"{', '.join(idle)}: no block is at a map >= checkpoint_from, so nothing is wrapped; "
            "these rows run the plain model and show the noise between identical variants"]

"""Peak memory of each phase of one training step, on the CPU: where a step's memory goes.

The step of the real Trainer (DDP engine, one process, synthetic batches) is cut into its phases
by wrapping the engines' ``step`` and the EMA's ``update``:

    D fwd/bwd  (zero_grad, G forward under no_grad, D forward, loss, backward; n_critic times)
    D update   (norm, clipping, Adam)
    G fwd/bwd  (G and D forward, loss, backward)
    G update
    EMA

For each phase: its peak = growth of the peak RSS over the step's starting RSS (so weights, Adam
moments and the EMA copy are not counted, as in ``benchmarks/train_step.py``), and the RSS it
leaves behind (what the next phase inherits). The step peak is the largest phase peak. Each tree
is measured in a fresh child process after a warm-up step, with glibc returning freed memory to
the OS (``benchmarks.train_step``'s method: VmHWM reset through /proc/self/clear_refs).

``--tree DIR`` (repeatable) measures other checkouts of the project side by side in the same run,
e.g. an older commit made with ``git worktree add /work/wt-old <commit>``: the child imports
``sagan_dist`` from that tree; this file and the Python are the current ones. The child uses only
``sagan_dist`` and the standard library, so it runs against older trees as well.

Run from the repository root:
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.step_memory --resolution 128
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.step_memory --tree . --tree /work/wt-old
"""
from __future__ import annotations

import argparse
import ctypes
import inspect
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = ("D fwd/bwd", "D update", "G fwd/bwd", "G update", "EMA")
HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------ child: one tree
def _kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM := VmRSS


class PhasePeaks:
    """Peak RSS growth (over the step's start) of every phase; a phase seen twice keeps its max."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.current: str | None = None
        self.start = 0

    def begin_step(self, first: str) -> None:
        _reset_peak()
        self.start = _kib("VmRSS") * 1024
        self.current = first

    def mark(self, name: str | None) -> None:
        """The current phase ends here; ``name`` begins (None: the step is over)."""
        assert self.current is not None
        peak, now = _kib("VmHWM") * 1024 - self.start, _kib("VmRSS") * 1024 - self.start
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
        self.after[self.current] = now
        self.current = name
        _reset_peak()


def _wrap(fn: Callable[..., Any], before: Callable[[], None], after: Callable[[], None]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before()
        out = fn(*args, **kwargs)
        after()
        return out

    return wrapped


def _build_trainer(spec: dict[str, Any], workdir: Path) -> Any:
    """The demo config at the spec's size, handed synthetic batches (two, cycled)."""
    import torch

    from sagan_dist.config import load
    from sagan_dist.dist import DistInfo
    from sagan_dist.train import Trainer

    placeholder = workdir / "synthetic.tar"  # config validation wants shards; they are never read
    placeholder.touch()
    r, b, c, k = spec["resolution"], spec["batch"], spec["channels"], spec["classes"]
    items = [f"model.resolution={r}", f"model.g_channels={c}", f"model.d_channels={c}",
             f"model.g_attention=[{spec['attention']}]", f"model.d_attention=[{spec['attention']}]",
             f"model.checkpoint_from={spec['checkpoint_from']}",
             f"model.checkpoint_blocks={str(spec['checkpoint_blocks']).lower()}",
             f"data.num_classes={k}", "data.source=shards", f"data.shards={placeholder}",
             f"train.precision={spec['precision']}", f"train.batch_size={b}", f"train.run_dir={workdir / 'run'}",
             "train.resume=never", "tracking.enabled=false", "eval.every=0"]
    cfg = load(["demo"], items, world_size=1)  # train.compile: auto, off on CPU (older trees lack the key)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(b, 3, r, r, generator=g) * 2 - 1, torch.randint(k, (b,), generator=g)) for _ in range(2)]
    info = DistInfo(0, 1, 0, torch.device("cpu"))

    class Stream:
        wait_s, skipped = 0.0, 0

        def __init__(self) -> None:
            self._it = itertools.cycle(batches)

        def next_batch(self, stop: Callable[[], bool] = lambda: False) -> Any:
            return next(self._it)

        def close(self) -> None:
            pass

    if "batch_source" in inspect.signature(Trainer.__init__).parameters:
        trainer = Trainer(cfg, info, batch_source=lambda seed: Stream())
        trainer.start_segment()
    else:  # trees before the Trainer took a batch source: it pulled batches from ``self.data``
        trainer = Trainer(cfg, info)
        trainer._start_segment()
        trainer.data = itertools.cycle(batches)
    return trainer


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-phase peaks of one step after a warm-up step, in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: big blocks are unmapped when freed ...
    libc.mallopt(-1, 256 * 1024)  # ... M_TRIM_THRESHOLD: ... and the heap trimmed (RSS = alive)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _build_trainer(spec, Path(tmp))
        trainer.train_step()  # warm-up: gradients, Adam moments, thread pools
        phases, n_critic = PhasePeaks(), trainer.cfg.train.n_critic
        d_steps = itertools.count(1)
        trainer.D.step = _wrap(trainer.D.step, lambda: phases.mark("D update"),
                               lambda: phases.mark("D fwd/bwd" if next(d_steps) < n_critic else "G fwd/bwd"))
        trainer.G.step = _wrap(trainer.G.step, lambda: phases.mark("G update"), lambda: phases.mark("other"))
        trainer.ema.update = _wrap(trainer.ema.update, lambda: phases.mark("EMA"), lambda: phases.mark("other"))
        phases.begin_step("D fwd/bwd")
        trainer.train_step()
        phases.mark(None)
    return {"peaks": phases.peaks, "after": phases.after, "start": phases.start, "torch": torch.__version__}


# ------------------------------------------------------------------------------ parent: the table
def run_child(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=tree, check=False, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"child for {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or str(tree)) + ("+dirty" if dirty else "")


def table(results: dict[str, dict[str, Any]]) -> str:
    """MiB per phase: peak (and what the phase leaves alive), one column per tree."""
    mib = lambda n: f"{n / 2 ** 20:.0f}"  # noqa: E731
    names = list(results)
    lines = ["| phase | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for phase in [*PHASES, "other"]:
        cells = [f"{mib(r['peaks'][phase])} ({mib(r['after'][phase])})" if phase in r["peaks"] else "-"
                 for r in results.values()]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| **step peak** | " + " | ".join(f"**{mib(max(r['peaks'].values()))}**"
                                                  for r in results.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tree", action="append", type=Path, help="checkout to measure (default: this one)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--attention", type=int, default=64, help="feature-map size of G's and D's attention")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--checkpoint-from", type=int, default=0, help="model.checkpoint_from (0: off)")
    p.add_argument("--checkpoint-blocks", action="store_true", help="model.checkpoint_blocks=true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    spec = {"resolution": args.resolution, "channels": args.channels, "batch": args.batch, "classes": args.classes,
            "attention": args.attention, "precision": args.precision, "checkpoint_from": args.checkpoint_from,
            "checkpoint_blocks": args.checkpoint_blocks}
    trees = [t.resolve() for t in (args.tree or [HERE.parent.parent])]
    results = {f"{_commit(t)} MiB": run_child(t, spec) for t in trees}
    print(f"# step memory per phase: {json.dumps(spec)}; peak over the step's start (left alive after)")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one training step asks of the host, per engine: host reads, device synchronizes, collectives.

A small model (width 16, 32 px, batch 4 per process) trained by the real Trainer on synthetic
batches; after warm-up steps (DeepSpeed's throughput timer only starts timing at its third step),
a few steps are counted:

* host reads: ``benchmarks.counters.count_host_reads`` (on CPU: Python-level reads of a tensor);
* device synchronizes: calls of DeepSpeed's ``get_accelerator().synchronize()`` (what its timers
  call; a no-op on CPU but counted, so the GPU behaviour shows on a CPU machine), plus
  ``torch.cuda.synchronize`` on CUDA;
* collectives launched from Python (``torch.distributed`` calls, wrapped) and all collectives the
  profiler sees (``benchmarks.counters.count_collectives``, DDP's C++ reducer included).

Run from the repository root, e.g. for two processes, ZeRO-2, with and without DeepSpeed's timer:
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 -m benchmarks.engine_syncs engine=deepspeed \\
        deepspeed.zero_stage=2
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 -m benchmarks.engine_syncs engine=deepspeed \\
        deepspeed.zero_stage=2 "deepspeed.extra={timers: {throughput: {enabled: true}}}"
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist

from benchmarks.counters import count_collectives, count_host_reads
from benchmarks.train_step import SyntheticStream
from sagan_dist import dist
from sagan_dist.config import load
from sagan_dist.train import Trainer

WARMUP, COUNTED = 3, 3
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "reduce", "all_to_all_single", "barrier", "all_reduce_coalesced")


class CallCounter:
    """Counts calls of module-level functions while installed (by ``name``)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return original(*args, **kwargs)

        setattr(owner, attr, counted)
        self._undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()


def _calls(device: torch.device) -> CallCounter:
    from deepspeed.accelerator import get_accelerator

    counter = CallCounter()
    counter.wrap(get_accelerator(), "synchronize", "accelerator.synchronize")
    if device.type == "cuda":
        counter.wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
    for op in COLLECTIVES:
        counter.wrap(tdist, op, f"dist.{op}")
    return counter


def run(items: list[str]) -> dict[str, Any]:
    with dist.process_group() as info, tempfile.TemporaryDirectory() as tmp:
        placeholder = Path(tmp) / "synthetic.tar"
        placeholder.touch()
        cfg = load(["demo"], ["model.g_channels=16", "model.d_channels=16", f"train.batch_size={4 * info.world_size}",
                              "data.source=shards", f"data.shards={placeholder}", f"train.run_dir={tmp}/run",
                              "train.resume=never", "tracking.enabled=false", "eval.every=0", *items],
                   world_size=info.world_size)
        trainer = Trainer(cfg, info, batch_source=lambda seed: SyntheticStream(4, 32, cfg.data.num_classes, seed))
        trainer.start_segment()
        for _ in range(WARMUP):
            trainer.train_step()
        calls = _calls(info.device)
        try:
            with count_host_reads(info.device) as reads:
                for _ in range(COUNTED):
                    trainer.train_step()
        finally:
            calls.restore()
        with count_collectives() as collectives:
            for _ in range(COUNTED):
                trainer.train_step()
        return {"rank": info.rank, "host reads": {k: v / COUNTED for k, v in reads.counts.items()},
                "calls": {k: v / COUNTED for k, v in sorted(calls.calls.items())},
                "collectives (profiler)": collectives.summary(COUNTED)}


def _lines(result: dict[str, Any]) -> Iterator[str]:
    for key, value in result.items():
        yield f"  {key}: {value}"


def main(argv: list[str]) -> int:
    result = run(argv)
    print(f"per step, rank {result['rank']}, overrides {argv}:", *_lines(result), sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

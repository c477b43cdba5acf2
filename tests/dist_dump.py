"""Run the real Trainer in every process of a torchrun job and dump what each rank holds.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_dump.py OUT PHASES [key=value ...]

PHASES is a comma-separated list of:
  full      train run_dir OUT/full from scratch to 4 steps (snapshot every 2)
  first     train run_dir OUT/split from scratch to 2 steps
  resume    resume OUT/split (from its step-2 snapshot) and train to 4 steps
  nonfinite one D update where only rank 1's loss is NaN: every rank must skip it

After each training phase every rank writes its G, D and EMA state dicts and counters to
``OUT/<phase>-rank<r>.pt``, so a test can check that the ranks agree and that an interrupted run
resumed to the same weights as the uninterrupted one. Used by tests/test_distributed.py.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

from sagan_dist import config, dist
from sagan_dist.logs import setup_logging
from sagan_dist.train import Trainer

TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.checkpoint_every=2", "train.log_every=2", "train.sample_every=1000",
        "train.samples_per_class=2", "tracking.enabled=false"]
RUNS = {"full": ("full", 4), "first": ("split", 2), "resume": ("split", 4)}


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train(out: Path, phase: str, overrides: list[str], info: dist.DistInfo) -> None:
    run, steps = RUNS[phase]
    cfg = config.load(["demo"], [*TINY, *overrides, f"train.run_dir={out / run}", f"train.steps={steps}"],
                      world_size=info.world_size)
    trainer = Trainer(cfg, info)
    started = trainer.step
    trainer.fit()
    torch.save({"started": started, "step": trainer.step, "skipped_steps": trainer.skipped_steps,
                "G": cpu_state(trainer.G.raw), "D": cpu_state(trainer.D.raw), "ema": cpu_state(trainer.ema.model)},
               out / f"{phase}-rank{info.rank}.pt")


def nonfinite(out: Path, overrides: list[str], info: dist.DistInfo) -> None:
    """A NaN loss on rank 1 only: the all-reduced gradients are NaN on every rank, so all skip."""
    cfg = config.load(["demo"], [*TINY, *overrides, f"train.run_dir={out / 'nonfinite'}", "train.steps=1"],
                      world_size=info.world_size)
    trainer = Trainer(cfg, info)
    trainer.start_segment()
    D = trainer.D
    before = {k: p.detach().clone() for k, p in D.raw.named_parameters()}  # buffers: SN moves u, v
    x, y = trainer.data_stream.next_batch()
    D.zero_grad()
    with D.accumulating(last=True):
        with D.autocast():
            logits = D.module(x.to(info.device), y.to(info.device))
        loss = trainer.d_loss(logits.float(), logits.float())
        D.backward(loss * (float("nan") if info.rank == 1 else 1.0))
    result = D.step()
    unchanged = all(torch.equal(p, before[k]) for k, p in D.raw.named_parameters())
    torch.save({"applied": result.applied, "grad_norm": result.grad_norm, "unchanged": unchanged},
               out / f"nonfinite-rank{info.rank}.pt")


def main(out: Path, phases: list[str], overrides: list[str]) -> None:
    with dist.process_group() as info:
        setup_logging(info)
        for phase in phases:
            if phase == "nonfinite":
                nonfinite(out, overrides, info)
            else:
                train(out, phase, overrides, info)
            # DeepSpeed engines sit in reference cycles: free them (and any gloo work they hold)
            # while the process group is alive, not during interpreter shutdown.
            gc.collect()
            dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:])

"""A DDP run resumed on another world size: 2 processes to step 4, then 1 process to step 7.

`train.batch_size` is global, so the resumed run keeps it and doubles the micro-batch; weights,
optimizer state, EMA and counters come from the snapshot. Real `sagan-launch local` (torchrun,
gloo on 127.0.0.1) for both runs; the continuation is equivalent, not bitwise equal, to a run that
kept 2 processes (the new rank draws its own data and latents), so only what must carry over is
compared exactly.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sagan_dist import checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=100000", "tracking.enabled=false", "train.samples_per_class=2"]


def launch(nproc: int, run_dir: Path, steps: int) -> str:
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "local", "--nproc", str(nproc), "demo", *TINY,
                           f"train.run_dir={run_dir}", f"train.steps={steps}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def load(run_dir: Path, step: int) -> dict[str, dict]:
    snapshot = checkpoint.checkpoints_dir(run_dir) / f"step-{step:08d}"
    return {name: torch.load(snapshot / f"{name}.pt", weights_only=True) for name in ("G", "D", "state")}


@pytest.mark.timeout(400)
def test_a_ddp_run_resumes_on_one_process_with_the_same_global_batch(tmp_path):
    run_dir = tmp_path / "run"
    first = launch(2, run_dir, 4)
    assert "training from step 0 to 4 on 2 process(es)" in first and "micro-batch 4" in first, first[-2000:]
    second = launch(1, run_dir, 7)
    assert "resumed from" in second and "at step 4" in second, second[-2000:]
    assert "training from step 4 to 7 on 1 process(es)" in second and "micro-batch 8" in second, second[-2000:]

    before, after = load(run_dir, 4), load(run_dir, 7)
    # What carried over: the counters (images at batch_size 8 for all 7 steps) and Adam's state
    # (its step count continued from 4: the optimizer was restored, not started anew).
    assert after["state"]["step"] == 7 and after["state"]["images_seen"] == 7 * 8
    for net in ("G", "D"):
        adam_steps = {float(s["step"]) for s in after[net]["optimizer"]["state"].values()}
        assert adam_steps == {7.0}, f"{net}: Adam steps {adam_steps}"
    for net in ("G", "D"):
        for name, value in after[net]["model"].items():
            assert torch.isfinite(value.float()).all(), f"{net}.{name} is not finite"
        changed = [n for n, v in after[net]["model"].items()
                   if v.is_floating_point() and not torch.equal(v, before[net]["model"][n])]
        assert changed, f"{net} did not change in the 3 steps on one process"
    ema_before, ema_after = before["state"]["G_ema"], after["state"]["G_ema"]
    assert any(not torch.equal(v, ema_before[k]) for k, v in ema_after.items() if v.is_floating_point())

"""A real two-process training run logs to a real MLflow server, through rank 0 only, and a resume
of it continues the same MLflow run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_server import mlflow_server, server  # noqa: F401 (fixtures)
from sagan_dist import checkpoint

TINY = ["train.log_every=2", "train.batch_size=8", "model.g_channels=8", "model.d_channels=8",
        "train.sample_every=2", "train.checkpoint_every=2", "train.samples_per_class=2",
        "tracking.experiment=two-process"]


def train(run_dir: Path, uri: str, steps: int, nproc: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "sagan_dist.cli", "train", "demo", f"train.steps={steps}",
           f"train.run_dir={run_dir}", f"tracking.uri={uri}", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_two_process_training_logs_through_rank_0_and_resume_continues_its_run(server, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, server.uri, steps=4, nproc=2)
    run_id = checkpoint.load_state(checkpoint.list_checkpoints(run_dir)[-1])["tracking_run_id"]
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("two-process")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    assert len(list((run_dir / "tracking").iterdir())) == 1  # one journal: rank 1 wrote none
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.tags["world_size"] == "2"
    assert run.data.params["train.batch_size"] == "8"
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "lr_d", "lr_g",
                "images_per_s", "skipped_samples", "skipped_steps", "kimg"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [2, 4], key
    assert any(k.startswith("gamma/G.") for k in run.data.metrics)
    assert any(k.startswith("gamma/D.") for k in run.data.metrics)
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert samples == {"samples/step-00000002.png", "samples/step-00000004.png"}
    # What attention learned: a sheet per G attention layer at every sample step, with its metrics.
    layers = [a.path.split("/", 1)[1] for a in client.list_artifacts(run_id, "attention")]
    assert layers, "no attention sheets reached MLflow"
    for layer in layers:
        sheets = {a.path for a in client.list_artifacts(run_id, f"attention/{layer}")}
        assert sheets == {f"attention/{layer}/step-00000002.png", f"attention/{layer}/step-00000004.png"}
        for metric in ("distance", "entropy"):
            history = client.get_metric_history(run_id, f"attention/{layer}/{metric}")
            assert [m.step for m in history] == [2, 4] and all(m.value >= 0 for m in history), metric
    assert [m.step for m in client.get_metric_history(run_id, "gpu_hours")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run_id, "data_wait_share")] == [2, 4]

    train(run_dir, server.uri, steps=6, nproc=1)  # resumes from step 4 (on one process)
    assert checkpoint.load_state(checkpoint.list_checkpoints(run_dir)[-1])["tracking_run_id"] == run_id
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == [2, 4, 6]
    assert client.get_run(run_id).info.status == "FINISHED"

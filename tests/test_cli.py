"""The CLI as a user runs it: train writes samples, a snapshot and an MLflow run; sample writes files."""
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=2", "train.checkpoint_every=2"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sagan_dist.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    run = _cli("train", "demo", *TINY, "train.steps=2", f"train.run_dir={root / 'run'}",
               f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "tracking.experiment=cli-test")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "step 2/2" in run.stdout
    return root


def test_train_writes_samples_snapshot_and_mlflow_run(trained):
    assert (trained / "run" / "samples" / "step-00000002.png").is_file()
    assert (trained / "run" / "checkpoints" / "step-00000002" / "state.pt").is_file()
    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cli-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model.resolution"] == "32"
    assert "loss_d" in runs[0].data.metrics


def test_sample_spreads_images_over_classes(trained, tmp_path):
    out = tmp_path / "samples"
    res = _cli("sample", str(trained / "run"), "--out", str(out), "--n", "7", "--classes", "0,3,9")
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["0_0.png", "0_1.png", "0_2.png", "3_0.png", "3_1.png", "9_0.png", "9_1.png", "grid.png"])


def test_sample_from_a_snapshot_directory_with_truncation(trained, tmp_path):
    snap = trained / "run" / "checkpoints" / "step-00000002"
    res = _cli("sample", str(snap), "--out", str(tmp_path), "--n", "10", "--truncation", "0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list(tmp_path.glob("*_*.png"))) == 10  # all 10 classes, one each


def test_sample_rejects_a_class_out_of_range(trained, tmp_path):
    res = _cli("sample", str(trained / "run"), "--out", str(tmp_path), "--classes", "3,12")
    assert res.returncode != 0 and "0..9" in res.stderr


def test_sample_from_missing_checkpoint_names_it(tmp_path):
    res = _cli("sample", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "nope" in res.stderr


def test_config_error_exits_2_with_the_key(tmp_path):
    res = _cli("train", "demo", "model.resolution=48", f"train.run_dir={tmp_path}")
    assert res.returncode == 2 and "model.resolution" in res.stderr and "32 | 64" in res.stderr


def test_every_command_has_help():
    for cmd in ("train", "sample", "evaluate", "make-shards", "sync"):
        res = _cli(cmd, "--help")
        assert res.returncode == 0 and "usage: sagan-dist " + cmd in res.stdout, cmd

"""MLflow tracking against a real `mlflow server`: what is logged is read back, an outage or an
unreachable server loses nothing and duplicates nothing, a resume continues the same run, and a
server that never answers cannot stall training."""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tracking_helpers import MAIN, artifact_paths, make_cfg, steps_of, write_png
from mlflow_server import mlflow_server, server  # noqa: F401 (fixtures)
from sagan_dist import cli, config
from sagan_dist.dist import DistInfo
from sagan_dist.tracking import PENDING, Journal, Tracker, tracking_uri


def test_params_metrics_images_and_run_id_are_read_back(server, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(server.uri, run_dir, "readback", "tracking.system_metrics=true",
                   "tracking.system_metrics_interval_s=0.5", "tracking.log_checkpoints=true")
    tracker = Tracker.open(cfg, run_dir, None, MAIN)
    tracker.log_config(cfg, MAIN)
    for step in (2, 4):
        tracker.log_metrics({"loss_d": 1.0 / step, "gamma/G.blocks.3": 0.1 * step}, step)
    tracker.log_image(write_png(run_dir / "samples" / "step-00000004.png", 200), 4)
    snapshot = run_dir / "checkpoints" / "step-00000004"
    write_png(snapshot / "G" / "weights.png", 1)
    tracker.log_artifact(snapshot, f"checkpoints/{snapshot.name}")
    time.sleep(1.5)  # a few system-metric samples
    assert tracker.flush(30)
    run_id = tracker.run_id
    tracker.close("FINISHED")

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "readback"
    assert run.data.params["train.lr_d"] == "0.0004" and run.data.params["model.resolution"] == "32"
    assert run.data.params["world_size"] == "1"
    tags = run.data.tags
    assert tags["engine"] == "ddp" and tags["precision"] == "fp32" and tags["world_size"] == "1"
    assert tags["version.torch"] == torch.__version__ and tags["version.mlflow"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "gamma/G.blocks.3")] == \
        [(2, pytest.approx(0.2)), (4, pytest.approx(0.4))]
    assert steps_of(client, run_id, "loss_d") == [2, 4]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    paths = artifact_paths(client, run_id)
    assert {"config.yaml", "samples/step-00000004.png", "checkpoints/step-00000004/G/weights.png"} <= set(paths)
    assert [p for p in paths if p.startswith("images/samples+step+4+") and p.endswith(".png")]
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert config.load([config_yaml]).tracking.experiment == "readback"


def test_server_outage_mid_run_loses_and_duplicates_nothing(server, tmp_path, caplog):
    run_dir = tmp_path / "run"
    cfg = make_cfg(server.uri, run_dir, "outage", "tracking.retry_s=0.3")
    tracker = Tracker.open(cfg, run_dir, None, MAIN)
    log_steps(tracker, range(1, 6))
    assert tracker.flush(30)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="sagan_dist.tracking"):
        slowest = log_steps(tracker, range(6, 16))
        tracker.log_image(write_png(run_dir / "samples" / "step-00000010.png", 9), 10)
        time.sleep(1.5)  # several failed attempts
        down = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(down) == 1 and "sagan-dist sync" in down[0].getMessage()
        assert tracker.undelivered >= 10
        server.start()
        log_steps(tracker, range(16, 21))
        assert tracker.flush(30)
    assert slowest < 0.5, "logging must not wait on the unreachable server"
    assert any("is back" in r.getMessage() for r in caplog.records)
    run_id = tracker.run_id
    tracker.close("FINISHED")
    client = MlflowClient(server.uri)
    for key in ("loss_d", "gamma/G.blocks.3"):
        assert steps_of(client, run_id, key) == list(range(1, 21))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "samples/step-00000010.png" in artifact_paths(client, run_id, "samples")


def log_steps(tracker: Tracker, steps) -> float:
    """Log a step's worth of metrics per step; returns the slowest call's seconds."""
    slowest = 0.0
    for step in steps:
        t0 = time.perf_counter()
        tracker.log_metrics({"loss_d": float(step), "gamma/G.blocks.3": step / 100}, step)
        slowest = max(slowest, time.perf_counter() - t0)
    return slowest


def test_resume_continues_the_same_run_and_keeps_first_value_of_repeated_steps(server, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(server.uri, run_dir, "resume")
    first = Tracker.open(cfg, run_dir, None, MAIN)
    first.log_config(cfg, MAIN)
    log_steps(first, range(1, 7))
    assert first.flush(30)
    run_id = first.run_id
    first.close("KILLED")  # preempted after step 6; its last snapshot was at step 4
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "KILLED"

    second = Tracker.open(cfg, run_dir, run_id, MAIN)
    assert second.run_id == run_id
    assert second.flush(30)
    assert client.get_run(run_id).info.status == "RUNNING"
    second.log_metrics({"loss_d": -5.0}, 5)  # steps 5..6 again from the snapshot, then on
    second.log_metrics({"loss_d": -6.0}, 6)
    log_steps(second, range(7, 9))
    second.close("FINISHED")

    exp = client.get_experiment_by_name("resume")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss_d")}
    assert sorted(history) == list(range(1, 9)) and history[5] == 5.0
    assert len(client.get_metric_history(run_id, "loss_d")) == 8
    assert client.get_run(run_id).info.status == "FINISHED"

    evaluation = Tracker.open(cfg, run_dir, run_id, MAIN, reopen=False)  # adds, leaves status
    evaluation.log_metrics({"evaluate/fid": 42.0}, 8)
    evaluation.close(None)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["evaluate/fid"] == 42.0


def test_unreachable_at_start_is_journaled_and_sync_delivers_it(server, tmp_path, capsys):
    server.stop()  # down before the run starts
    run_dir = tmp_path / "run"
    cfg = make_cfg(server.uri, run_dir, "offline", "tracking.retry_s=60")
    t0 = time.perf_counter()
    first = Tracker.open(cfg, run_dir, None, MAIN)
    first.log_config(cfg, MAIN)
    log_steps(first, range(1, 4))
    pending_id = first.run_id
    first.close("KILLED")
    assert time.perf_counter() - t0 < 10, "an unreachable server must not hold training up"
    assert pending_id.startswith(PENDING) and first.undelivered > 0
    resumed = Tracker.open(cfg, run_dir, pending_id, MAIN)  # the id a snapshot would hold
    assert resumed.run_id == pending_id
    log_steps(resumed, range(3, 5))
    resumed.log_image(write_png(run_dir / "samples" / "step-00000004.png", 50), 4)
    resumed.close("FINISHED")

    assert cli.main(["sync", str(run_dir)]) == 1  # still down: says so, keeps everything
    assert f"{resumed.undelivered} record(s) left" in capsys.readouterr().out
    server.start()
    sync = [sys.executable, "-m", "sagan_dist.cli", "sync", str(run_dir)]
    done = subprocess.run(sync, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    state = json.loads(next((run_dir / "tracking").glob("*/state.json")).read_text())
    run_id = state["run_id"]
    assert run_id and f"delivered {resumed.undelivered} record(s) to MLflow run {run_id}" in done.stdout
    assert cli.main(["sync", str(run_dir)]) == 0  # again: nothing left, nothing sent twice
    assert "nothing to deliver" in capsys.readouterr().out

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.start_time == state["start_time"]
    assert run.data.params["train.steps"] == "600" and run.data.tags["engine"] == "ddp"
    assert steps_of(client, run_id, "loss_d") == [1, 2, 3, 4]
    assert {"config.yaml", "samples/step-00000004.png"} <= set(artifact_paths(client, run_id))


def test_replay_after_losing_the_cursor_and_the_run_id_logs_nothing_twice(server, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(server.uri, run_dir, "replay")
    tracker = Tracker.open(cfg, run_dir, None, MAIN)
    tracker.log_config(cfg, MAIN)
    log_steps(tracker, range(1, 4))
    tracker.log_image(write_png(run_dir / "samples" / "step-00000003.png", 3), 3)
    tracker.close("FINISHED")
    run_id = tracker.run_id
    # A crash right after each delivery, before its cursor was saved: everything is sent again,
    # even the run creation, and the image was "in flight".
    state_path = next((run_dir / "tracking").glob("*/state.json"))
    state = json.loads(state_path.read_text())
    image_seq = next(r["seq"] for r in map(json.loads, (state_path.parent / "records.jsonl").open())
                     if r["kind"] == "image")
    state.update(run_id=None, delivered=0, offset=0, attempt=image_seq)
    state_path.write_text(json.dumps(state))
    assert cli.main(["sync", str(run_dir)]) == 0

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("replay")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    assert json.loads(state_path.read_text())["run_id"] == run_id
    assert len(client.get_metric_history(run_id, "loss_d")) == 3
    stepped = [p for p in artifact_paths(client, run_id, "images") if p.endswith(".png")]
    assert len(stepped) == 1 and "+step+3+" in stepped[0]


def test_records_of_a_tracker_never_closed_are_delivered_at_exit(server, tmp_path):
    script = (
        "import sys, torch\n"
        "from sagan_dist import config\n"
        "from sagan_dist.dist import DistInfo\n"
        "from sagan_dist.tracking import Tracker\n"
        "cfg = config.load(['demo'], sys.argv[1:])\n"
        "tracker = Tracker.open(cfg, cfg.train.run_dir, None, DistInfo(0, 1, 0, torch.device('cpu')))\n"
        "tracker.log_metrics({'loss_d': 1.5}, 3)\n"  # and exit without close()
    )
    overrides = [f"tracking.uri={server.uri}", "tracking.experiment=unclosed", f"train.run_dir={tmp_path}"]
    done = subprocess.run([sys.executable, "-c", script, *overrides], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("unclosed").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss_d")] == [(3, 1.5)]
    assert run.info.status == "RUNNING"  # only close() says how a run ended


def test_server_that_never_answers_cannot_stall_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with socket.socket() as silent:  # accepts connections (kernel backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        run_dir = tmp_path / "run"
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        cfg = make_cfg(uri, run_dir, "silent", "tracking.close_timeout_s=1")
        t0 = time.perf_counter()
        tracker = Tracker.open(cfg, run_dir, None, MAIN)
        tracker.log_config(cfg, MAIN)
        slowest = log_steps(tracker, range(1, 21))
        tracker.close("FINISHED")
        assert slowest < 0.5 and time.perf_counter() - t0 < 5
        assert tracker.undelivered == 24  # params, tags, config.yaml, 20 steps, status: all kept
        # The courier still waits on its request, so the journal stays this process's.
        assert cli.main(["sync", str(run_dir)]) == 1
        assert "in use by a running training process" in capsys.readouterr().out


def test_journal_survives_a_torn_last_line(tmp_path):
    journal = Journal.create(tmp_path, "sqlite:///x.db", "e", "r")
    journal.append_metrics({"loss_d": 1.0}, 1)
    journal.append_metrics({"loss_d": 2.0}, 2)
    journal.close()
    with open(journal.records, "ab") as f:
        f.write(b'{"seq":2,"t":1,"kind":"metr')  # the process died mid-write
    reopened = Journal.acquire(journal.path)
    assert reopened.next_seq == 2 and reopened.last_steps == {"loss_d": 2}
    reopened.append_metrics({"loss_d": 3.0}, 3)
    assert [r["step"] for r, _ in reopened.pending()] == [1, 2, 3]
    assert reopened.append_metrics({"loss_d": 9.0}, 3) == 1  # step 3 is journaled already


def test_other_ranks_and_disabled_tracking_record_nothing(tmp_path):
    cfg = make_cfg("http://127.0.0.1:9", tmp_path, "x")
    rank1 = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    off = make_cfg("http://127.0.0.1:9", tmp_path, "x", "tracking.enabled=false")
    for tracker in (Tracker.open(cfg, tmp_path, None, rank1), Tracker.open(off, tmp_path, None, MAIN)):
        tracker.log_config(cfg, rank1)
        tracker.log_metrics({"loss_d": 1.0}, 1)
        tracker.close("FINISHED")
        assert tracker.run_id is None
    assert not (tmp_path / "tracking").exists()


def test_uri_comes_from_config_then_environment_then_mlflow_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(make_cfg("", tmp_path)) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri(make_cfg("", tmp_path)) == "http://env:5000"
    assert tracking_uri(make_cfg("http://cfg:5000", tmp_path)) == "http://cfg:5000"

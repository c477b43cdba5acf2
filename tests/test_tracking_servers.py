"""Tracking against real `mlflow server`s, where the server is not the one the run began with, and
images whose keys group them (attention maps): a resume against a server that does not know the
run continues in a new run there, and ``attention/<layer>`` keys arrive as artifacts and stepped
images, once each, even when replayed."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tracking_helpers import MAIN, artifact_paths, make_cfg, steps_of, write_png
from mlflow_server import MlflowServer, mlflow_server, server  # noqa: F401 (fixtures)
from sagan_dist import cli
from sagan_dist.tracking import PREVIOUS_RUN_TAG, Tracker


@pytest.fixture
def server_b(tmp_path_factory: pytest.TempPathFactory):
    other = MlflowServer(tmp_path_factory.mktemp("mlflow-b")).start()
    yield other
    other.stop()


def test_resume_against_a_server_that_does_not_know_the_run_continues_in_a_new_run(
        server, server_b, tmp_path, caplog):
    run_dir = tmp_path / "run"
    cfg_a = make_cfg(server.uri, run_dir, "moved")
    first = Tracker.open(cfg_a, run_dir, None, MAIN)
    first.log_config(cfg_a, MAIN)
    for step in (1, 2, 3):
        first.log_metrics({"loss_d": float(step)}, step)
    assert first.flush(30)
    old_id = first.run_id
    first.close("KILLED")

    cfg_b = make_cfg(server_b.uri, run_dir, "moved")
    with caplog.at_level(logging.WARNING, logger="sagan_dist.tracking"):
        resumed = Tracker.open(cfg_b, run_dir, old_id, MAIN)  # the id its snapshot holds
        for step in (4, 5):
            resumed.log_metrics({"loss_d": float(step)}, step)
        assert resumed.flush(60)
    new_id = resumed.run_id
    resumed.close("KILLED")
    told = [r for r in caplog.records if "does not know run" in r.getMessage()]
    assert len(told) == 1 and old_id in told[0].getMessage()
    assert new_id != old_id

    b = MlflowClient(server_b.uri)
    run = b.get_run(new_id)
    assert run.data.tags[PREVIOUS_RUN_TAG] == old_id and run.data.tags["engine"] == "ddp"
    assert run.data.params["train.lr_d"] == "0.0004" and run.data.params["world_size"] == "1"
    assert "config.yaml" in artifact_paths(b, new_id)
    assert steps_of(b, new_id, "loss_d") == [4, 5] and run.info.status == "KILLED"

    # A later resume from an older snapshot still names the first run: the journal knows where
    # that run went on; nothing new is created and nothing said again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sagan_dist.tracking"):
        again = Tracker.open(cfg_b, run_dir, old_id, MAIN)
        again.log_metrics({"loss_d": 6.0}, 6)
        assert again.flush(60)
    assert again.run_id == new_id
    again.close("FINISHED")
    assert not [r for r in caplog.records if "does not know run" in r.getMessage()]
    (only,) = b.search_runs([b.get_experiment_by_name("moved").experiment_id])
    assert only.info.run_id == new_id and only.info.status == "FINISHED"
    assert steps_of(b, new_id, "loss_d") == [4, 5, 6]
    a = MlflowClient(server.uri)
    assert steps_of(a, old_id, "loss_d") == [1, 2, 3] and a.get_run(old_id).info.status == "KILLED"


def test_attention_images_with_slashes_and_dots_arrive_once_even_when_replayed(server, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(server.uri, run_dir, "attention")
    tracker = Tracker.open(cfg, run_dir, None, MAIN)
    for step in (2, 4):
        tracker.log_image(write_png(run_dir / "attention" / f"G.blocks.3-{step}.png", step), step,
                          key="attention/G.blocks.3.attn")
    tracker.log_image(write_png(run_dir / "attention" / "d.png", 7), 4, key="attention/D.block[1]")
    with pytest.raises(ValueError, match="no valid MLflow key"):
        tracker.log_image(run_dir / "attention" / "d.png", 4, key="/./")
    tracker.close("FINISHED")
    run_id = tracker.run_id

    # A crash while the last image was in flight, before its cursor was saved: sync sends it
    # again, and finds its stepped image already there (MLflow stores "/" in its name as "~").
    (state_path,) = run_dir.glob("tracking/*/state.json")
    lines = (state_path.parent / "records.jsonl").read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-2])  # the record before the status
    assert last["kind"] == "image" and last["key"] == "attention/D.block_1_"
    state = json.loads(state_path.read_text())
    state.update(delivered=last["seq"], offset=sum(map(len, lines[:-2])), attempt=last["seq"])
    state_path.write_text(json.dumps(state))
    assert cli.main(["sync", str(run_dir)]) == 0

    client = MlflowClient(server.uri)
    paths = artifact_paths(client, run_id)
    assert {"attention/G.blocks.3.attn/G.blocks.3-2.png", "attention/G.blocks.3.attn/G.blocks.3-4.png",
            "attention/D.block_1_/d.png"} <= set(paths)
    stepped = sorted(p.split("+timestamp")[0] for p in paths if p.startswith("images/") and p.endswith(".png"))
    assert stepped == ["images/attention~D.block_1_+step+4", "images/attention~G.blocks.3.attn+step+2",
                       "images/attention~G.blocks.3.attn+step+4"]
    local = Path(client.download_artifacts(run_id, "attention/G.blocks.3.attn/G.blocks.3-4.png", str(tmp_path)))
    assert np.asarray(Image.open(local))[0, 0, 0] == 4

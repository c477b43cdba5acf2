"""Tracking on shared storage and with unlucky input, against a real `mlflow server`: planted
symlinks in the journal are never followed, config keys MLflow refuses cost only themselves, and
credentials in the tracking URI reach no file and no output."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tracking_helpers import MAIN, make_cfg
from mlflow_server import mlflow_server, server  # noqa: F401 (fixtures)
from sagan_dist import cli
from sagan_dist.fsio import UnsafeFileError
from sagan_dist.tracking import Journal, Tracker, redact_uri, redacted_config


def plant(link: Path, target: Path) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def test_planted_symlinks_in_the_journal_are_never_followed(server, tmp_path, caplog):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    run_dir = tmp_path / "run"
    cfg = make_cfg(server.uri, run_dir, "symlinks")
    first = Tracker.open(cfg, run_dir, None, MAIN)
    journal = next((run_dir / "tracking").iterdir())
    plant(journal / "state.json.tmp", outside)
    plant(journal / "rejected.jsonl", outside)
    with caplog.at_level(logging.WARNING, logger="sagan_dist.tracking"):
        first.log_metrics({"loss_d": 1.0}, 1)
        first.log_artifact(tmp_path / "deleted-before-upload.png")  # refused: goes to rejected.jsonl
        first.log_metrics({"loss_d": 2.0}, 2)
        assert first.flush(30)
    run_id = first.run_id
    first.close("KILLED")
    assert outside.read_text() == "precious\n"
    assert any(str(journal / "rejected.jsonl") in r.getMessage() and "symbolic link" in r.getMessage()
               for r in caplog.records)
    assert [m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "loss_d")] == [1, 2]

    plant(journal / "records.jsonl", outside)  # the resume must not read, cut or extend it
    with caplog.at_level(logging.WARNING, logger="sagan_dist.tracking"):
        resumed = Tracker.open(cfg, run_dir, run_id, MAIN)
    assert any(str(journal / "records.jsonl") in r.getMessage() for r in caplog.records)
    assert resumed.run_id == run_id  # same MLflow run, through a new journal
    resumed.log_metrics({"loss_d": 3.0}, 3)
    assert resumed.flush(30)
    resumed.close("FINISHED")
    assert outside.read_text() == "precious\n"
    assert [m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "loss_d")] == [1, 2, 3]

    assert cli.main(["sync", str(run_dir)]) == 1  # names the planted file, leaves it alone
    assert outside.read_text() == "precious\n"
    plant(journal / "lock", outside)
    with pytest.raises(UnsafeFileError, match=str(journal / "lock")):
        Journal.acquire(journal)
    assert outside.read_text() == "precious\n"


def test_config_keys_mlflow_refuses_cost_only_themselves(server, tmp_path, caplog):
    run_dir = tmp_path / "run"
    extra = '{"weird key!": 1, "a/../b": 2, "long": "%s", "%s": 3}' % ("x" * 7000, "k" * 300)
    cfg = make_cfg(server.uri, run_dir, "params", f"deepspeed.extra={extra}")
    tracker = Tracker.open(cfg, run_dir, None, MAIN)
    with caplog.at_level(logging.WARNING, logger="sagan_dist.tracking"):
        tracker.log_config(cfg, MAIN)
        assert tracker.flush(60)
    run_id = tracker.run_id
    tracker.close("KILLED")
    client = MlflowClient(server.uri)
    params = client.get_run(run_id).data.params
    assert params["train.lr_d"] == "0.0004" and params["world_size"] == "1"
    assert params["deepspeed.extra.weird key_"] == "1" and params["deepspeed.extra.a/__/b"] == "2"
    assert params["deepspeed.extra.long"] == "x" * 6000
    assert not [k for k in params if "kkk" in k]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "'deepspeed.extra.weird key!' logged as 'deepspeed.extra.weird key_'" in said
    assert "dropped 'deepspeed.extra.kkk" in said and "'deepspeed.extra.long' cut" in said

    # A resume that logs a changed value: MLflow refuses that param (values are immutable); the
    # other params of the same record, including a new one, still arrive.
    changed = make_cfg(server.uri, run_dir, "params", "train.lr_d=0.001", 'deepspeed.extra={"added": 2}')
    resumed = Tracker.open(changed, run_dir, run_id, MAIN)
    with caplog.at_level(logging.WARNING, logger="sagan_dist.tracking"):
        resumed.log_config(changed, MAIN)
        assert resumed.flush(120)
    resumed.close("FINISHED")
    params = client.get_run(run_id).data.params
    assert params["train.lr_d"] == "0.0004" and params["deepspeed.extra.added"] == "2"
    assert "MLflow refused param 'train.lr_d'" in " ".join(r.getMessage() for r in caplog.records)
    (journal,) = [p for p in (run_dir / "tracking").iterdir()]
    (entry,) = map(json.loads, (journal / "rejected.jsonl").read_text().splitlines())
    assert entry["record"]["params"] == {"train.lr_d": "0.001"}


CREDENTIALED_RUN = """
import logging, sys, torch
from pathlib import Path
from sagan_dist import config
from sagan_dist.dist import DistInfo
from sagan_dist.tracking import Tracker
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
run_dir, run_id = Path(sys.argv[1]), (sys.argv[2] or None)
cfg = config.load(['demo'], sys.argv[3:])
tracker = Tracker.open(cfg, run_dir, run_id, DistInfo(0, 1, 0, torch.device('cpu')))
if run_id is None:
    tracker.log_config(cfg, DistInfo(0, 1, 0, torch.device('cpu')))
tracker.log_metrics({'loss_d': 1.0}, 2 if run_id else 1)
assert tracker.flush(60)
print('RUN', tracker.run_id)
tracker.close('FINISHED')
"""


def test_credentials_in_the_uri_reach_no_file_and_no_output(server, tmp_path):
    password = "S3cret-pw-4711"
    secret_uri = server.uri.replace("http://", f"http://alice:{password}@")  # the server ignores them
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}

    def run(run_id: str, overrides: list[str], extra_env: dict[str, str]) -> str:
        cmd = [sys.executable, "-c", CREDENTIALED_RUN, str(run_dir), run_id, "tracking.experiment=creds",
               f"train.run_dir={run_dir}", *overrides]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**env, **extra_env})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert password not in done.stdout + done.stderr
        assert "alice:REDACTED@127.0.0.1" in done.stdout  # it still says where it logs to
        return done.stdout.split("RUN ")[1].split()[0]

    run_id = run("", [f"tracking.uri={secret_uri}"], {})  # in the config
    assert run(run_id, [], {"MLFLOW_TRACKING_URI": secret_uri}) == run_id  # in the environment
    client = MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == [1, 2]
    assert client.get_run(run_id).data.params["tracking.uri"] == redact_uri(secret_uri)

    # Replay everything with sync: the stored URI lost its password, so sync asks for one.
    (state_path,) = run_dir.glob("tracking/*/state.json")
    state = json.loads(state_path.read_text())
    state.update(delivered=0, offset=0)
    state_path.write_text(json.dumps(state))
    sync = [sys.executable, "-m", "sagan_dist.cli", "sync", str(run_dir)]
    done = subprocess.run(sync, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and "--uri or MLFLOW_TRACKING_URI" in done.stdout
    assert "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in done.stdout
    done = subprocess.run(sync, capture_output=True, text=True, timeout=120,
                          env={**env, "MLFLOW_TRACKING_URI": secret_uri})
    assert done.returncode == 0 and f"to MLflow run {run_id}" in done.stdout, done.stdout + done.stderr
    assert password not in done.stdout + done.stderr
    assert len(client.get_metric_history(run_id, "loss_d")) == 2

    leaks = [p for p in run_dir.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert leaks == []
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert password not in config_yaml.read_text()


def test_redact_uri_hides_passwords_and_secret_query_values_and_keeps_the_rest():
    assert redact_uri("http://alice:pw@host:5000/x?token=t&a=1#f") == \
        "http://alice:REDACTED@host:5000/x?token=REDACTED&a=1#f"
    assert redact_uri("https://TOKEN@host/mlflow") == "https://REDACTED@host/mlflow"
    assert redact_uri("postgresql://u:p/w@db:5432/mlflow?sslmode=require&password=z") == \
        "postgresql://u:REDACTED@db:5432/mlflow?sslmode=require&password=REDACTED"
    assert redact_uri("s3://bucket/x?X-Amz-Signature=abc&X-Amz-Credential=k") == \
        "s3://bucket/x?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED"
    plain = "http://127.0.0.1:5000"
    assert redact_uri(plain) == plain and redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact_uri("API request to http://a:b@h/api failed") == "API request to http://a:REDACTED@h/api failed"
    container = {"tracking": {"uri": "http://a:b@h"}, "train": {"lr_d": 1}}
    assert redacted_config(container) == {"tracking": {"uri": "http://a:REDACTED@h"}, "train": {"lr_d": 1}}
    assert container["tracking"]["uri"] == "http://a:b@h"  # a copy


def test_a_redacted_uri_from_a_saved_config_takes_credentials_from_the_environment(monkeypatch):
    from sagan_dist.tracking.uri import client_uri

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")
    assert client_uri("http://alice:REDACTED@host:5000/x") == "http://host:5000/x"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-env"
    assert client_uri("https://bob:p%40ss@host") == "https://host"  # the URI's own win
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("bob", "p@ss")
    assert client_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"

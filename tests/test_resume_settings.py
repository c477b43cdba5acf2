"""Learning rates and Adam betas changed in the config win over a snapshot's on resume (both
engines), are logged as a change, and reach MLflow; unchanged ones are not reported."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mlflow_server import mlflow_server, server  # noqa: F401 (fixtures)
from sagan_dist.config import load
from sagan_dist.dist import DistInfo
from sagan_dist.train import Trainer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=2", "train.sample_every=100", "train.samples_per_class=2", "train.lr_d=4e-4",
        "train.lr_g=1e-4", "train.betas=[0.0,0.9]"]
ENGINES = {"ddp": [], "deepspeed-zero0": ["engine=deepspeed"],
           "deepspeed-zero2": ["engine=deepspeed", "deepspeed.zero_stage=2"]}


def _trainer(run_dir: Path, *overrides: str, tracking: str = "tracking.enabled=false") -> Trainer:
    return Trainer(load(["demo"], TINY + [f"train.run_dir={run_dir}", tracking, *overrides]), INFO)


def _groups(tr: Trainer, net: str) -> list[dict]:
    engine = getattr(tr, net)
    return engine.optimizer.param_groups if hasattr(engine, "optimizer") else engine.engine.optimizer.param_groups


@pytest.mark.parametrize("engine", ENGINES)
def test_changed_rates_and_betas_are_applied_on_resume_and_logged(tmp_path, caplog, engine):
    _trainer(tmp_path, "train.steps=2", *ENGINES[engine]).fit()
    with caplog.at_level(logging.WARNING, logger="sagan_dist.train"):
        tr = _trainer(tmp_path, "train.steps=3", "train.lr_d=1e-5", "train.betas=[0.5,0.99]", *ENGINES[engine])
    assert tr.step == 2
    assert tr.D.lr() == pytest.approx(1e-5) and tr.G.lr() == pytest.approx(1e-4)
    for net in ("G", "D"):
        assert all(tuple(g["betas"]) == (0.5, 0.99) for g in _groups(tr, net)), net
    assert tr.changed_on_resume == {"train.lr_d": 1e-5, "train.betas": (0.5, 0.99)}
    assert "train.lr_d of D changed since step-00000002: 0.0004 there, 1e-05 now (applied)" in caplog.text
    assert "train.lr_g" not in caplog.text
    d_before = {k: v.clone() for k, v in tr.D.raw.state_dict().items()}
    tr.fit()  # the step runs with the new rate: D moves, by a step of the new size
    assert any(not torch.equal(v, d_before[k]) for k, v in tr.D.raw.state_dict().items() if k.endswith("original"))
    assert tr.D.lr() == pytest.approx(1e-5)


def test_unchanged_settings_are_not_reported(tmp_path, caplog):
    _trainer(tmp_path, "train.steps=2").fit()
    with caplog.at_level(logging.WARNING, logger="sagan_dist.train"):
        tr = _trainer(tmp_path, "train.steps=3", "train.lr_d=0.0004")  # the same value, spelled otherwise
    assert tr.step == 2 and tr.changed_on_resume == {}
    assert "changed since" not in caplog.text


@pytest.mark.slow
def test_a_changed_rate_reaches_mlflow_at_the_resume_step(server, tmp_path):
    tracking = f"tracking.uri={server.uri}"
    _trainer(tmp_path, "train.steps=2", "tracking.experiment=lr-change", tracking=tracking).fit()
    tr = _trainer(tmp_path, "train.steps=4", "train.lr_g=3e-4", "tracking.experiment=lr-change", tracking=tracking)
    run_id = tr.tracker.run_id
    tr.fit()
    assert tr.tracker.flush(30)
    client = MlflowClient(server.uri)
    history = client.get_metric_history(run_id, "resume_changed/train.lr_g")
    assert [(m.step, m.value) for m in history] == [(2, pytest.approx(3e-4))]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr_g")] == \
        [(2, pytest.approx(1e-4)), (4, pytest.approx(3e-4))]
    assert client.get_run(run_id).data.params["train.lr_g"] == "0.0001"  # params are immutable in MLflow

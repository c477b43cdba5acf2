"""MLflow tracking on rank 0: config as params, step metrics, sample grids, snapshots.

Other ranks get a tracker that records nothing, so the loop calls it unconditionally.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sagan_dist.dist import DistInfo

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default tracking store


def tracking_uri(cfg: DictConfig) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


class Tracker:
    def __init__(self, client: Any = None, run_id: str | None = None) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: Path, run_id: str | None, info: DistInfo) -> "Tracker":
        if not (info.is_main and cfg.tracking.enabled):
            return cls()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri(cfg))
        if run_id is None:
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
            run_id = client.create_run(exp_id, run_name=cfg.tracking.run_name or Path(run_dir).name).info.run_id
        return cls(client, run_id)

    def log_config(self, cfg: DictConfig, info: DistInfo) -> None:
        if self.client is None:
            return
        params = flatten(OmegaConf.to_container(cfg, resolve=True))
        params.update({"world_size": str(info.world_size)})
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value[:6000])
        self.client.log_text(self.run_id, OmegaConf.to_yaml(cfg), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key.replace("/", "."), value, step=step)

    def log_image(self, path: Path, step: int) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), "samples")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifacts(self.run_id, str(path), artifact_path) if Path(path).is_dir() \
                else self.client.log_artifact(self.run_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status)
            self.client = None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (train.run_dir)")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("sync: nothing to replay (this build writes to MLflow directly)")

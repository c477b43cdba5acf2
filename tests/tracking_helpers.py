"""Helpers shared by the tracking tests: configs pointing at a server, small PNGs, MLflow look-ups."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from sagan_dist import config
from sagan_dist.dist import DistInfo

MAIN = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_cfg(uri: str, run_dir: Path, experiment: str = "test", *overrides: str):
    """The demo config tracking to ``uri`` ("" -> the environment / MLflow's default)."""
    uri_override = [f"tracking.uri={uri}"] if uri else []
    return config.load(["demo"], [*uri_override, f"tracking.experiment={experiment}",
                                  f"train.run_dir={run_dir}", *overrides])


def write_png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 16, 3), value, np.uint8)).save(path)
    return path


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, a.path) if a.is_dir else [a.path]
    return out

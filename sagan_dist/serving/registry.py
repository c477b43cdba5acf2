"""``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``, ``models:/<model_id>``) for the CLI.

The model's artifacts are downloaded with MLflow's own client (tracking server from
``$MLFLOW_TRACKING_URI``), and only its two data files are read: ``artifacts/generator.pt``
weights-only and ``artifacts/generator.json`` as JSON. Nothing else stored with the model (its
pyfunc code, or a pickle someone planted there) is run.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from sagan_dist.errors import Reported
from sagan_dist.serving.files import CONFIG_FILE, WEIGHTS_FILE

PREFIX = "models:/"


class ModelNotFound(LookupError, Reported):
    """A models:/ URI MLflow cannot resolve, or a model that is not a sagan-dist generator."""


def is_model_uri(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def load_registered_generator(uri: str, device: torch.device) -> tuple[torch.nn.Module, DictConfig]:
    """The generator (eval mode) and config of a registered or logged model."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from sagan_dist.serving.files import load_model_files

    with tempfile.TemporaryDirectory(prefix="sagan-model-") as tmp:
        files = {}
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            try:
                files[name] = Path(download_artifacts(f"{uri.rstrip('/')}/artifacts/{name}", dst_path=tmp))
            except MlflowException as e:
                raise ModelNotFound(f"{uri}: no sagan-dist generator there ({name}: "
                                    f"{str(e).splitlines()[0][:300]})") from None
            except OSError as e:
                raise ModelNotFound(f"{uri}: {name} could not be downloaded ({e})") from None
        return load_model_files(files[WEIGHTS_FILE], files[CONFIG_FILE], device)

"""The EMA generator of an evaluated snapshot as an MLflow LoggedModel, and its registration.

Two journal record kinds, delivered in order with the rest (so an outage loses nothing and
`sagan-dist sync` sends them later):

- ``model``: a LoggedModel of the run named ``step-<N>`` (found again by run and name, so a replay
  never makes a second one), its output link to the run at step N, the run's metrics of that step
  named in the record linked to it (``model_id``: `mlflow.search_logged_models` ranks by them), and
  its files uploaded with MLflow's own artifact client (the server's artifact proxy). It turns READY
  last; a record for a model already READY only links metrics (e.g. `sagan-dist evaluate --mlflow`).
- ``register``: that model as a version of a registered model (found again by its model id), with
  aliases moved to it (``best`` at each new best FID, ``final`` at the end of training; MLflow
  reserves ``latest`` for its own "newest version", ``models:/NAME/latest``).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from sagan_dist.tracking.journal import Journal
from sagan_dist.tracking.senders import Rejected

log = logging.getLogger(__name__)

MODEL_TYPE = "sagan-generator"
MODEL_ID_TAG = "sagan.model_id"  # on a model version: the LoggedModel it registers


def model_name(step: int) -> str:
    return f"step-{step:08d}"


def _find_model(client: Any, run_id: str, name: str) -> Any:
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'", max_results=1)
    return found[0] if found else None


def send_model(client: Any, journal: Journal, run_id: str, batch: list[dict[str, Any]]) -> None:
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    record = batch[0]
    model = _find_model(client, run_id, record["name"])
    if model is None:
        model = client.create_logged_model(client.get_run(run_id).info.experiment_id, record["name"],
                                           source_run_id=run_id, tags=record["tags"], params=record["params"],
                                           model_type=MODEL_TYPE)
    outputs = client.get_run(run_id).outputs
    if not any(o.model_id == model.model_id for o in (outputs.model_outputs if outputs else [])):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=record["step"])])
    _link_metrics(client, run_id, model, record["step"], record["metric_keys"])
    if model.status == LoggedModelStatus.READY:
        return
    _upload(client, run_id, model.model_id, record)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def _link_metrics(client: Any, run_id: str, model: Any, step: int, keys: list[str]) -> None:
    """The run's values of ``keys`` at ``step``, also as the model's metrics (as MLflow's own
    log_model does), each once."""
    from mlflow.entities import Metric

    have = {(m.key, m.step) for m in client.get_logged_model(model.model_id).metrics or []}
    metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, run_id=run_id)
               for key in keys if (key, step) not in have
               for m in client.get_metric_history(run_id, key) if m.step == step]
    if metrics:
        client.log_batch(run_id, metrics=metrics, synchronous=True)


def _upload(client: Any, run_id: str, model_id: str, record: dict[str, Any]) -> None:
    """An MLflow pyfunc model directory built from the journaled files, uploaded to the model."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from sagan_dist.serving import pyfunc
    from sagan_dist.serving.files import CONFIG_FILE, WEIGHTS_FILE

    files = {"weights": Path(record["path"]) / WEIGHTS_FILE, "config": Path(record["path"]) / CONFIG_FILE}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise Rejected(f"{', '.join(missing)} no longer exist(s): the model of step {record['step']} "
                       "cannot be uploaded")
    code = Path(pyfunc.__file__).with_name("pyfunc_code.py")
    with tempfile.TemporaryDirectory(prefix="sagan-model-") as tmp:
        local = Path(tmp) / "model"
        meta = Model(model_uuid=model_id, run_id=run_id, model_id=model_id)
        mlflow.pyfunc.save_model(str(local), python_model=str(code), artifacts={k: str(p) for k, p in files.items()},
                                 signature=pyfunc.signature(), input_example=pyfunc.input_example(),
                                 pip_requirements=record["requirements"], mlflow_model=meta)
        client.log_model_artifacts(model_id, str(local))


def send_register(client: Any, journal: Journal, run_id: str, batch: list[dict[str, Any]]) -> None:
    from mlflow.exceptions import MlflowException

    record = batch[0]
    name = record["registered_model"]
    model = _find_model(client, run_id, record["name"])
    if model is None:
        raise Rejected(f"the model {record['name']} of run {run_id} is not in MLflow (its record was "
                       "refused): nothing to register")
    versions = client.search_model_versions(f"name = '{name}'")
    version = next((v for v in versions if v.tags.get(MODEL_ID_TAG) == model.model_id), None)
    if version is None:
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # The artifact location, not models:/<id>: a local (sqlite) registry resolves a models:/ source
        # through MLflow's global tracking URI, not this client's.
        version = client.create_model_version(name, model.artifact_location, run_id=run_id,
                                              tags={MODEL_ID_TAG: model.model_id, "sagan.step": str(record["step"])},
                                              model_id=model.model_id, await_creation_for=0)
        client.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": json.dumps(
            [{"name": name, "version": version.version}])})
    for alias in record["aliases"]:
        client.set_registered_model_alias(name, alias, version.version)
    log.info("MLflow model %s version %s (%s), aliases %s", name, version.version, record["name"],
             ", ".join(record["aliases"]) or "none")


MODEL_SENDERS: dict[str, Callable[[Any, Journal, str, list[dict[str, Any]]], None]] = {
    "model": send_model, "register": send_register,
}


def registered_model(setting: Optional[str], run_name: str) -> str:
    """tracking.registered_model: None -> the run name; "" -> off."""
    return run_name if setting is None else setting

"""The EMA generator as an MLflow model, against a real `mlflow server` (artifact proxy on):
LoggedModels per evaluated step with their metrics linked, registry versions and aliases, delivery
after an outage, the pyfunc in a fresh process, `models:/` URIs in the CLI, and a planted pickle.

Images are compared with a tolerance of one uint8 level: the pyfunc generates rows in one batch,
`sagan-dist sample --n 1` one image at a time, and a batch of another size may take other GEMM
kernels (other summation orders); the latents are the same draws.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from mlflow_server import MlflowServer, mlflow_server, server  # noqa: F401 (fixtures)
from tracking_helpers import MAIN, make_cfg
from sagan_dist import cli
from sagan_dist.models.sagan import build_models
from sagan_dist.serving.pyfunc import MAX_ROWS, parse_rows
from sagan_dist.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("model.g_channels=8", "model.d_channels=8", "model.resolution=32")


def generator(cfg, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_models(cfg)[0].eval()


def log_two_evaluations(uri: str, run_dir: Path, experiment: str, registered: str) -> tuple[str, dict]:
    """A run with evaluations at steps 100 (FID 50, a new best) and 200 (FID 60), then its end:
    what the Trainer journals. Returns the run id and the generators by step."""
    cfg = make_cfg(uri, run_dir, experiment, f"tracking.registered_model={registered}", "tracking.retry_s=0.5",
                   "tracking.close_timeout_s=60", *SMALL)
    tracker = Tracker.open(cfg, run_dir, None, MAIN)
    gens = {100: generator(cfg, 1), 200: generator(cfg, 2)}
    tracker.log_metrics({"fid": 50.0, "isc": 2.0}, 100)
    tracker.log_model(gens[100], cfg, 100, 6.4, ["fid", "isc"], aliases=("best",))
    tracker.log_metrics({"fid": 60.0, "isc": 2.5}, 200)
    tracker.log_model(gens[200], cfg, 200, 12.8, ["fid", "isc"])
    tracker.log_model(gens[200], cfg, 200, 12.8, aliases=("final",))  # the end of training
    tracker.close("FINISHED")
    return tracker.run_id, gens


def check_logged(client: MlflowClient, run_id: str, registered: str) -> None:
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                         order_by=[{"field_name": "metrics.fid", "ascending": True}])
    assert [m.name for m in models] == ["step-00000100", "step-00000200"]
    assert all(m.status.to_proto() == 2 for m in models)  # READY
    assert {(m.key, m.step, m.value) for m in models[0].metrics} == {("fid", 100, 50.0), ("isc", 100, 2.0)}
    assert models[0].tags["sagan.step"] == "100" and models[0].params["kimg"] == "6.4"
    assert models[0].params["model.g_channels"] == "8" and len(models[0].tags["sagan.config_hash"]) == 16
    assert sorted((o.model_id, o.step) for o in run.outputs.model_outputs) == sorted(
        (m.model_id, int(m.tags["sagan.step"])) for m in models)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "fid")] == [(100, 50.0), (200, 60.0)]
    versions = client.search_model_versions(f"name = '{registered}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    best, final = (client.get_model_version_by_alias(registered, a) for a in ("best", "final"))
    assert (str(best.version), str(final.version)) == ("1", "2")
    assert best.tags["sagan.model_id"] == models[0].model_id and best.source == models[0].artifact_location
    files = {a.path for a in client.list_logged_model_artifacts(models[0].model_id)}
    assert {"MLmodel", "pyfunc_code.py", "artifacts", "input_example.json"} <= files
    assert not any(f.endswith(".pkl") for f in files)


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """One run logged as training does, shared by the tests that only read it."""
    if not mlflow_server.running:
        mlflow_server.start()
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    run_id, gens = log_two_evaluations(mlflow_server.uri, run_dir, "models", "gen")
    return {"run_id": run_id, "gens": gens, "uri": mlflow_server.uri, "name": "gen"}


def test_each_evaluated_generator_is_a_logged_model_ranked_by_fid_and_registered(logged):
    check_logged(MlflowClient(logged["uri"]), logged["run_id"], logged["name"])


def test_a_local_sqlite_store_gets_the_same_models_and_versions(tmp_path, monkeypatch):
    # Another working directory than the store's: MLflow's own default (./mlflow.db) is not it.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    run_id, _ = log_two_evaluations(uri, tmp_path / "run", "models-local", "gen-local")
    check_logged(MlflowClient(uri), run_id, "gen-local")


def test_models_journaled_while_the_server_is_down_arrive_once_with_sync(server, tmp_path, capsys):
    run_dir = tmp_path / "run"
    server.stop()
    run_id, _ = log_two_evaluations(server.uri, run_dir, "models-outage", "gen-outage")
    assert run_id.startswith("pending-")
    records = [json.loads(line) for p in (run_dir / "tracking").glob("*/records.jsonl") for line in p.open()]
    assert [r["kind"] for r in records if r["kind"] in ("model", "register")] == [
        "model", "register", "model", "model", "register"]
    server.start()
    assert cli.main(["sync", str(run_dir)]) == 0
    state = json.loads(next((run_dir / "tracking").glob("*/state.json")).read_text())
    client = MlflowClient(server.uri)
    check_logged(client, state["run_id"], "gen-outage")
    # A replay of the model and register records (a crash before the cursor moved) adds nothing.
    state.update(delivered=0, offset=0)
    next((run_dir / "tracking").glob("*/state.json")).write_text(json.dumps(state))
    assert cli.main(["sync", str(run_dir)]) == 0
    check_logged(client, state["run_id"], "gen-outage")


@pytest.mark.parametrize("setting, registered", [(None, "my-run"), ("''", None), ("gan-prod", "gan-prod")])
def test_registered_model_defaults_to_the_run_name_and_empty_turns_registration_off(tmp_path, setting, registered):
    overrides = [] if setting is None else [f"tracking.registered_model={setting}"]
    cfg = make_cfg("http://127.0.0.1:9", tmp_path / "my-run", "x", "tracking.close_timeout_s=0", *SMALL, *overrides)
    tracker = Tracker.open(cfg, tmp_path / "my-run", None, MAIN)
    tracker.log_model(generator(cfg, 0), cfg, 5, 0.3, aliases=("final",))
    tracker.close(None)
    journals = (tmp_path / "my-run" / "tracking").glob("*/records.jsonl")
    records = [json.loads(line) for p in journals for line in p.open()]
    names = [r["registered_model"] for r in records if r["kind"] == "register"]
    assert names == ([registered] if registered else [])
    assert (tmp_path / "my-run" / "models" / "step-00000005" / "generator.pt").is_file()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def sampled(tmp_path: Path, source: str, cls: int, seed: int, truncation: float, env: dict) -> np.ndarray:
    """The image `sagan-dist sample --n 1` writes for one class, seed and truncation."""
    out = tmp_path / f"sample-{cls}-{seed}-{truncation}"
    subprocess.run([sys.executable, "-m", "sagan_dist.cli", "sample", source, "--n", "1", "--classes", str(cls),
                    "--seed", str(seed), "--truncation", str(truncation), "--out", str(out), "--device", "cpu"],
                   check=True, env=env, capture_output=True)
    return np.asarray(Image.open(out / f"{cls}_0.png").convert("RGB"))


ROWS = pd.DataFrame({"class": [3, 0, 9], "seed": [7, 0, 123456789], "truncation": [0.0, 0.5, 2.0]})
PREDICT = """
import sys, mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
rows = pd.read_json(sys.stdin, orient="split")
out = model.predict(rows)
raw = model.predict(rows.head(1), params={"format": "uint8"})
print(out.to_json(orient="split"))
print(repr(raw["image"][0].shape), raw["image"][0].dtype)
"""


@pytest.mark.slow  # fresh processes
def test_the_registered_model_predicts_in_a_fresh_process_what_sagan_dist_sample_draws(logged, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "PYTHONPATH": str(ROOT)}
    uri = f"models:/{logged['name']}@best"
    done = subprocess.run([sys.executable, "-c", PREDICT, uri], input=ROWS.to_json(orient="split"), text=True,
                          env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    out = pd.read_json(io.StringIO(lines[-2]), orient="split")
    assert lines[-1] == "(32, 32, 3) uint8"
    assert out["class"].tolist() == [3, 0, 9] and out["seed"].tolist() == [7, 0, 123456789]
    for (_, row), b64 in zip(ROWS.iterrows(), out["image"]):
        expected = sampled(tmp_path, uri, int(row["class"]), int(row["seed"]), row["truncation"], env)
        assert np.abs(decode(b64).astype(int) - expected.astype(int)).max() <= 1
    # The registered weights are the step-100 generator's: the CLI's image is that G's.
    g = logged["gens"][100]
    from sagan_dist.serving.pyfunc import seeded_latents
    from sagan_dist.sample import to_uint8

    with torch.no_grad():
        mine = to_uint8(g(seeded_latents([7], [0.0], g.z_dim, torch.device("cpu")), torch.tensor([3])))[0]
    assert np.abs(mine.permute(1, 2, 0).numpy().astype(int) - decode(out["image"][0]).astype(int)).max() <= 1


def test_sample_and_attention_take_a_registered_model_like_a_run_directory(logged, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    name = logged["name"]
    assert cli.main(["sample", f"models:/{name}@final", "--n", "4", "--out", str(tmp_path / "s"),
                     "--device", "cpu"]) == 0
    assert len(list((tmp_path / "s").glob("*_0.png"))) == 4 and (tmp_path / "s" / "grid.png").is_file()
    assert cli.main(["sample", f"models:/{name}/1", "--sheet", "--n", "2", "--out", str(tmp_path / "v"),
                     "--device", "cpu"]) == 0
    assert cli.main(["attention", f"models:/{name}@best", "--n", "2", "--out", str(tmp_path / "a"),
                     "--device", "cpu"]) == 0
    assert (tmp_path / "a" / "maps.pt").is_file()
    with pytest.raises(SystemExit, match="holds only the generator"):
        cli.main(["attention", f"models:/{name}@best", "--net", "D", "--data", "--out", str(tmp_path / "d")])


@pytest.mark.parametrize("uri", ["models:/gen@nosuchalias", "models:/no-such-model@best", "models:/gen/99"])
def test_an_unknown_model_uri_is_one_line_naming_it(logged, tmp_path, monkeypatch, capsys, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    assert cli.main(["sample", uri, "--out", str(tmp_path / "x"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and uri in err


class _Payload:
    """A pickle that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow  # fresh processes
def test_a_planted_pickle_in_the_registered_model_folder_never_runs(server, tmp_path, monkeypatch, capsys):
    client = MlflowClient(server.uri)
    run_id, _ = log_two_evaluations(server.uri, tmp_path / "run", "models-planted", "gen-planted")
    model_id = client.get_model_version_by_alias("gen-planted", "best").tags["sagan.model_id"]
    location = client.get_logged_model(model_id).artifact_location  # mlflow-artifacts:/<exp>/models/<id>/artifacts
    folder = server.root / "artifacts" / location.removeprefix("mlflow-artifacts:/")
    assert (folder / "MLmodel").is_file()
    marker = tmp_path / "pwned"
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "artifacts" / "extra.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PREDICT, "models:/gen-planted@best"], text=True, env=env,
                          input=ROWS.to_json(orient="split"), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    # The weights themselves replaced by a pickle: refused, naming the file, not run.
    (folder / "artifacts" / "generator.pt").write_bytes(pickle.dumps(_Payload(marker)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    assert cli.main(["sample", "models:/gen-planted@best", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "generator.pt was refused" in err and not marker.exists()


@pytest.mark.parametrize("rows, message", [
    ({"seed": [1]}, "column 'class' is required"),
    ({"class": [-1]}, "'class': -1 is not an integer in 0..9"),
    ({"class": [10]}, "'class': 10 is not an integer in 0..9"),
    ({"class": [1.5]}, "'class': 1.5 is not an integer"),
    ({"class": [1], "seed": [-1]}, "'seed': -1 is not an integer"),
    ({"class": [1], "truncation": ["high"]}, "column 'truncation': expected numbers"),
    ({"class": [1], "truncation": [-0.1]}, "'truncation': -0.1 is not a finite number >= 0"),
    ({"class": [1], "truncation": [float("nan")]}, None),  # a missing cell: the default, 0
    ({"class": [0] * MAX_ROWS}, None),
    ({"class": [0] * (MAX_ROWS + 1)}, f"{MAX_ROWS + 1} rows: at most {MAX_ROWS}"),
    ({"class": [0, 9], "seed": [0, 2**63 - 1]}, None),
])
def test_rows_are_checked_at_and_beyond_their_bounds(rows, message):
    from mlflow.exceptions import MlflowException

    frame = pd.DataFrame(rows)
    if message is None:
        classes, seeds, truncs = parse_rows(frame, 10)
        assert len(classes) == len(frame) and all(t >= 0 for t in truncs) and all(s >= 0 for s in seeds)
        return
    with pytest.raises(MlflowException, match=re.escape(message)) as e:
        parse_rows(frame, 10)
    assert e.value.get_http_status_code() == 400


@pytest.mark.slow
def test_training_logs_each_evaluation_as_a_model_registers_best_and_final_and_evaluate_links_to_it(
        server, tmp_path, inception_weights):  # noqa: F811 (fixture imported below)
    from sagan_dist.train import Trainer

    run_dir = tmp_path / "run"
    cfg = eval_config(run_dir, inception_weights, f"tracking.uri={server.uri}", "tracking.experiment=models-train",
                      "tracking.registered_model=gen-train", "train.steps=4", "eval.every=2",
                      "train.checkpoint_every=2", "train.log_every=2", "train.sample_every=4", "train.batch_size=8")
    trainer = Trainer(cfg, MAIN)
    trainer.fit()
    run_id = trainer.tracker.run_id
    client = MlflowClient(server.uri)
    exp_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'",
                                         order_by=[{"field_name": "metrics.fid", "ascending": True}])
    assert sorted(m.name for m in models) == ["step-00000002", "step-00000004"]
    assert all({"fid", "isc", "kid", "precision", "recall"} <= {m.key for m in model.metrics} for model in models)
    by_alias = {a: client.get_model_version_by_alias("gen-train", a) for a in ("best", "final")}
    assert by_alias["final"].tags["sagan.step"] == "4"
    assert by_alias["best"].tags["sagan.step"] == models[0].tags["sagan.step"]  # the lowest FID
    assert models[0].tags.get("sagan.snapshot", "").endswith("checkpoints/best")
    # `sagan-dist evaluate --mlflow` of the step-2 snapshot links its metrics to that model.
    done = _cli(1, "evaluate", str(run_dir / "checkpoints" / "step-00000002"), f"tracking.uri={server.uri}",
                "--mlflow")
    assert done.returncode == 0, done.stderr[-3000:]
    step2 = client.search_logged_models(
        [exp_id], filter_string=f"source_run_id = '{run_id}' AND name = 'step-00000002'")
    assert len(step2) == 1 and any(m.key.startswith("evaluate/fid_n") for m in step2[0].metrics)


from test_evaluation import _cli, eval_config, inception_weights  # noqa: E402,F401 (fixture; at the end: slow import)

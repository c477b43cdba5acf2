"""`mlflow models serve -m models:/NAME@best --env-manager local`: a real scoring server on
127.0.0.1, queried over HTTP. It answers with the images `sagan-dist sample` draws for the same
class, seed and truncation (within one uint8 level: batched rows, see test_mlflow_models.py), and
bad input gets a 4xx answer while the server stays up.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from mlflow_server import free_port, mlflow_server, server  # noqa: F401 (fixtures)
from test_mlflow_models import ROOT, decode, logged, sampled  # noqa: F401 (fixture)


def post(url: str, body: dict | bytes, timeout: float = 300) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def scoring(logged, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    port = free_port()
    # The venv's bin first: `mlflow models serve` starts its web server by name from PATH, and
    # .ci/run calls the venv's python without activating the venv.
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "PYTHONPATH": str(ROOT), "PATH": path}
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{logged['name']}@best",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"mlflow models serve did not come up: {open(log.name, 'rb').read()[-3000:]!r}")
    yield {"url": url, "env": env, **logged}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


@pytest.mark.slow
def test_served_model_answers_with_the_images_sagan_dist_sample_draws(scoring, tmp_path):
    rows = [{"class": 3, "seed": 7, "truncation": 0.0}, {"class": 9, "seed": 42, "truncation": 0.7}]
    status, body = post(f"{scoring['url']}/invocations", {"dataframe_records": rows})
    assert status == 200, body
    status, alone = post(f"{scoring['url']}/invocations", {"dataframe_records": [{"class": 0}]})
    assert status == 200, alone  # without the seed and truncation columns: 0 and 0 (off)
    predictions = body["predictions"] + alone["predictions"]
    rows.append({"class": 0})
    assert [p["class"] for p in predictions] == [3, 9, 0] and [p["seed"] for p in predictions] == [7, 42, 0]
    source = f"models:/{scoring['name']}@best"
    for row, p in zip(rows, predictions):
        expected = sampled(tmp_path, source, row["class"], row.get("seed", 0), row.get("truncation", 0.0),
                           scoring["env"])
        assert np.abs(decode(p["image"]).astype(int) - expected.astype(int)).max() <= 1
    status, body = post(f"{scoring['url']}/invocations", {"dataframe_records": rows[:1], "params": {"format": "uint8"}})
    assert status == 200 and np.asarray(body["predictions"][0]["image"]).shape == (32, 32, 3)


@pytest.mark.slow
@pytest.mark.parametrize("body, says", [
    ({"dataframe_records": [{"class": 10, "seed": 1}]}, "'class': 10 is not an integer in 0..9"),
    ({"dataframe_records": [{"class": 1, "seed": -5}]}, "'seed': -5 is not an integer"),
    ({"dataframe_records": [{"class": 1, "truncation": "high"}]}, "truncation"),
    ({"dataframe_records": [{"seed": 1}]}, "class"),
    ({"dataframe_split": {"columns": ["class"], "data": [[0]] * 10**6}}, "1000000 rows: at most 1024"),
    ({"dataframe_records": [{"class": 1}], "params": {"format": "jpeg"}}, "param 'format'"),
    (b"{not json", ""),
])
def test_bad_input_gets_a_4xx_answer_and_the_server_stays_up(scoring, body, says):
    status, answer = post(f"{scoring['url']}/invocations", body)
    assert 400 <= status < 500, (status, answer)
    assert says in answer.get("message", "")
    status, answer = post(f"{scoring['url']}/invocations", {"dataframe_records": [{"class": 1}]})
    assert status == 200 and len(answer["predictions"]) == 1

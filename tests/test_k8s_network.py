"""The platform's NetworkPolicies and MLflow's authentication, checked for what they mean.

NetworkPolicies: a small evaluator of their semantics (policies add up; a pod selected by none
for a direction is open in it) answers "may A reach B on port P" for the pods we actually ship
and render; the matrix below is the intended one. Authentication: a real `mlflow server`
started with the Deployment's arguments, auth config and admin variables.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow_server import free_port

from launcher.manifests import JobSpec, labels

K8S = Path(__file__).resolve().parent.parent / "k8s"
NAMESPACE = {"kubernetes.io/metadata.name": "ml"}
KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}


def load(path: str) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all((K8S / path).read_text()) if o]


def policies() -> list[dict[str, Any]]:
    found = load("platform/network-policies.yaml") + load("platform-postgres/network-policies.yaml")
    assert all(p["kind"] == "NetworkPolicy" for p in found)
    return found


def template_labels(path: str, name: str) -> dict[str, str]:
    (deployment,) = [o for o in load(path) if o["kind"] == "Deployment" and o["metadata"]["name"] == name]
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    if any(pod_labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in pod_labels, pod_labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e["values"],
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def peer_matches(peer: dict[str, Any], pod: tuple[dict[str, str], dict[str, str]]) -> bool:
    pod_ns, pod_labels = pod
    if "ipBlock" in peer:
        return False  # the pods here are matched by labels only
    ns_ok = selects(peer["namespaceSelector"], pod_ns) if "namespaceSelector" in peer else pod_ns == NAMESPACE
    return ns_ok and selects(peer.get("podSelector", {}), pod_labels)


def port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    return not ports or any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports)


def direction_allows(pod, other, port, protocol, kind: str) -> bool:
    key, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    relevant = [p for p in policies() if pod[0] == NAMESPACE and kind in p["spec"].get("policyTypes", [])
                and selects(p["spec"]["podSelector"], pod[1])]
    if not relevant:
        return True
    return any((not rule.get(peers) or any(peer_matches(peer, other) for peer in rule[peers]))
               and port_matches(rule.get("ports"), port, protocol)
               for p in relevant for rule in p["spec"].get(key, []))


def may_reach(src: str, dst: str, port: int, protocol: str = "TCP") -> bool:
    a, b = PODS[src], PODS[dst]
    return direction_allows(a, b, port, protocol, "Egress") and direction_allows(b, a, port, protocol, "Ingress")


SPEC = JobSpec(name="run", image="sagan-dist", train_args=("train",), config_map="c")
PODS = {
    "trainer": (NAMESPACE, labels(SPEC, "trainjob")),
    "trainer-of-another-flavour": (NAMESPACE, labels(SPEC, "indexed-job")),
    "evaluation": (NAMESPACE, {"app.kubernetes.io/name": "sagan-dist", "app.kubernetes.io/component": "evaluation"}),
    "mlflow": (NAMESPACE, template_labels("platform/mlflow.yaml", "sagan-mlflow")),
    "postgres": (NAMESPACE, template_labels("platform-postgres/postgres.yaml", "sagan-postgres")),
    "other-pod": (NAMESPACE, {"app": "notebook"}),
    "other-namespace": ({"kubernetes.io/metadata.name": "web"}, {"app.kubernetes.io/component": "trainer"}),
    "kube-dns": (KUBE_SYSTEM, {"k8s-app": "kube-dns"}),
}
OPEN = [
    ("trainer", "trainer-of-another-flavour", 29500), ("trainer", "trainer", 23456), ("trainer", "trainer", 41234),
    ("trainer", "mlflow", 5000), ("evaluation", "mlflow", 5000), ("mlflow", "postgres", 5432),
]
CLOSED = [
    ("trainer", "mlflow", 22), ("trainer", "postgres", 5432), ("evaluation", "postgres", 5432),
    ("other-pod", "mlflow", 5000), ("other-namespace", "mlflow", 5000), ("other-pod", "trainer", 29500),
    ("other-pod", "postgres", 5432), ("mlflow", "trainer", 29500), ("postgres", "mlflow", 5000),
    ("trainer", "other-pod", 443), ("mlflow", "other-pod", 443), ("evaluation", "trainer", 29500),
    ("trainer", "kube-dns", 443),
]


@pytest.mark.parametrize("src, dst, port", OPEN)
def test_needed_paths_are_open(src, dst, port):
    assert may_reach(src, dst, port)


@pytest.mark.parametrize("src, dst, port", CLOSED)
def test_everything_else_is_closed(src, dst, port):
    assert not may_reach(src, dst, port)


@pytest.mark.parametrize("pod", ["trainer", "evaluation", "mlflow", "postgres"])
def test_every_pod_resolves_names_over_udp_and_tcp(pod):
    assert may_reach(pod, "kube-dns", 53, "UDP") and may_reach(pod, "kube-dns", 53, "TCP")


# ---- MLflow's basic auth, for real --------------------------------------------------------------
def mlflow_container() -> dict[str, Any]:
    (deployment,) = [o for o in load("platform/mlflow.yaml") if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # not listening yet


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mlflow_server_of_the_platform_requires_the_secret_credentials(tmp_path):
    container = mlflow_container()
    (auth_map,) = [o for o in load("platform/mlflow.yaml") if o["kind"] == "ConfigMap"]
    ini = auth_map["data"]["basic_auth.ini"].replace("sqlite:////mlflow/", f"sqlite:///{tmp_path}/")
    (tmp_path / "basic_auth.ini").write_text(ini)
    port = free_port()
    args = [a for a in container["args"] if not a.startswith(("--host", "--port", "--artifacts-destination",
                                                               "--workers"))]
    assert "--app-name=basic-auth" in args
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "sagan-mlflow-credentials", "key": "password"}
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].endswith("/basic_auth.ini")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "sagan-mlflow-server"
    secret = ("sagan", "s3cret-" + os.urandom(8).hex())
    server_env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
                  "MLFLOW_AUTH_ADMIN_USERNAME": secret[0], "MLFLOW_AUTH_ADMIN_PASSWORD": secret[1],
                  "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", *args, "--host=127.0.0.1", f"--port={port}", "--workers=1",
           f"--artifacts-destination={tmp_path}/artifacts"]
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=server_env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while status(f"{base}/health") != 200:  # probes need no credentials
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status(search) == 401
        assert status(search, (secret[0], "wrong")) == 401
        assert status(search, secret) == 200
        # The trainers' client, with the variables the pods get from the same Secret.
        client = subprocess.run(
            [sys.executable, "-c", "import mlflow; print(mlflow.MlflowClient().create_experiment('x'))"],
            env={**os.environ, "MLFLOW_TRACKING_URI": base, "MLFLOW_TRACKING_USERNAME": secret[0],
                 "MLFLOW_TRACKING_PASSWORD": secret[1]}, capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

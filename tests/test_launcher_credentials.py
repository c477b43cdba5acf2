"""Tracking credentials never appear in what the launcher prints or renders, and never ride DeepSpeed's
pdsh line (issue 17.3): Kubernetes gets them from its Secret, pdsh hosts from MLflow's credentials file."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import yaml

from launcher.cli import main
from launcher.k8s import cluster_spec
from launcher.manifests import SOURCES_ANNOTATION, render, to_yaml

SECRET = "secretpw"
K8S = ["k8s", "demo", "--image", "r/i:1", "--dry-run"]
CREDENTIAL_URIS = [f"http://u:{SECRET}@h:5000", f"https://{SECRET}@h", f"http://h:5000/?token={SECRET}",
                   f"http://h:5000/x?a=1&api_key={SECRET}"]


@pytest.mark.parametrize("flavor", ["trainjob", "pytorchjob", "indexed-job"])
@pytest.mark.parametrize("uri", CREDENTIAL_URIS)
@pytest.mark.parametrize("where", ["override", "flag"])
def test_k8s_refuses_a_tracking_uri_with_credentials_and_prints_none(capsys, flavor, uri, where):
    args = [f"tracking.uri={uri}"] if where == "override" else ["--tracking-uri", uri]
    assert main([*K8S, "--flavor", flavor, *args]) == 1
    out, err = capsys.readouterr()
    assert SECRET not in out + err and out == ""
    name = "tracking.uri" if where == "override" else "--tracking-uri"
    assert f"{name}=" in err and "REDACTED" in err and "sagan-mlflow-credentials" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flavor", ["trainjob", "pytorchjob", "indexed-job"])
def test_k8s_credentials_reach_the_pods_only_through_the_secret(capsys, flavor):
    assert main([*K8S, "--flavor", flavor, "tracking.uri=http://mlflow.example:5000"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    envs = [c["env"] for c in _containers(docs)]
    assert envs
    for env in envs:
        by_name = {e["name"]: e for e in env}
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert by_name[var]["valueFrom"]["secretKeyRef"]["name"] == "sagan-mlflow-credentials"
        assert "value" not in by_name["MLFLOW_TRACKING_PASSWORD"]


def _containers(node: object) -> list[dict]:
    if isinstance(node, dict):
        found = [node] if "env" in node and "image" in node else []
        return found + [c for v in node.values() for c in _containers(v)]
    if isinstance(node, list):
        return [c for v in node for c in _containers(v)]
    return []


def test_the_resolved_from_annotation_is_redacted():
    # a URL with a password may sit in another key (a pipe: command in data.shards): the provenance
    # annotation shows it redacted
    spec = cluster_spec("sagan-demo", "r/i:1")
    items = ["demo", f"data.shards=pipe:curl -s https://u:{SECRET}@s3.example/x-{{0..1}}.tar"]
    config_map = render(spec, "indexed-job", "x: 1\n", sources=items)[0]
    sources = json.loads(config_map["metadata"]["annotations"][SOURCES_ANNOTATION])
    assert sources == ["demo", "data.shards=pipe:curl -s https://u:REDACTED@s3.example/x-{0..1}.tar"]
    assert SECRET not in to_yaml([config_map])


# ---- DeepSpeed over pdsh ---------------------------------------------------------------------------
@pytest.fixture()
def two_hosts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    return hostfile


@pytest.mark.parametrize("var, value", [("MLFLOW_TRACKING_PASSWORD", SECRET), ("MLFLOW_TRACKING_TOKEN", SECRET),
                                        ("MLFLOW_TRACKING_URI", f"http://u:{SECRET}@h:5000"),
                                        ("MLFLOW_TRACKING_URI", f"http://h:5000/?token={SECRET}")])
def test_pdsh_refuses_secrets_in_exported_variables(capsys, monkeypatch, two_hosts, var, value):
    monkeypatch.setenv(var, value)
    assert main(["deepspeed", "--hostfile", str(two_hosts), "--print-command", "demo"]) == 1
    out, err = capsys.readouterr()
    assert SECRET not in out + err and out == ""
    assert var in err and "~/.mlflow/credentials" in err


@pytest.mark.parametrize("uri", CREDENTIAL_URIS)
def test_pdsh_refuses_a_tracking_uri_with_credentials(capsys, two_hosts, uri):
    assert main(["deepspeed", "--hostfile", str(two_hosts), "--print-command", "demo", f"tracking.uri={uri}"]) == 1
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "tracking.uri=" in err and "~/.mlflow/credentials" in err


def test_one_host_keeps_its_environment(capsys, monkeypatch, tmp_path):
    # one host: the runner starts the processes itself, nothing is inlined into a shell line
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    assert main(["deepspeed", "--hostfile", str(hostfile), "--print-command", "demo"]) == 0
    assert SECRET not in capsys.readouterr().out


HOSTILE_VALUES = {"MLFLOW_EXPERIMENT_NAME": "$(touch pwned) `touch pwned` \"quoted\" \\ $HOME;id",
                  "MLFLOW_RUN_NOTE": "x\"; touch pwned; echo \"",
                  "PYTHONWARNINGS": "ignore"}


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_pdsh_exports_reach_each_host_verbatim_and_run_nothing(capsys, monkeypatch, tmp_path, two_hosts, shell):
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import EXPORT_ENVS, parse_args

    for k, v in HOSTILE_VALUES.items():
        monkeypatch.setenv(k, v)
    words = printed_command(capsys, "deepspeed", "--hostfile", str(two_hosts), "--master-port", "29600", "demo")
    at = words.index(sys.executable)
    env = {**HOSTILE_VALUES, **dict(w.split("=", 1) for w in words[:at])}  # the launcher's environment for the runner
    cmd = words[at:]
    # What deepspeed.launcher.runner.main does with the environment it was started with.
    runner = PDSHRunner(parse_args(cmd[cmd.index("deepspeed.launcher.runner") + 1:]), "e30=")
    for var, value in env.items():
        if var.startswith(tuple(EXPORT_ENVS)):
            runner.add_export(var, value)
    pdsh, _, _ = runner.get_cmd({}, {"node-a": [0], "node-b": [0]})
    line = " ".join(pdsh[pdsh.index("-w") + 2:])
    monkeypatch.chdir(tmp_path)
    names = list(HOSTILE_VALUES)
    printer = f"{shell} -c 'printf \"%s\\0\" " + " ".join(f'\"${n}\"' for n in names) + "' _"
    out = subprocess.run([shell, "-c", line.replace(sys.executable, printer, 1)], capture_output=True, text=True,
                         check=True).stdout
    assert out.split("\0")[:-1] == [HOSTILE_VALUES[n] for n in names]
    assert not (tmp_path / "pwned").exists()


def printed_command(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main([*args, "--print-command"]) == 0
    return shlex.split(capsys.readouterr().out.splitlines()[-1])  # after DeepSpeed's accelerator notice


def test_the_escaped_prefixes_cover_what_deepspeed_exports():
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher.runner import EXPORT_ENVS

    from launcher.local import PDSH_EXPORT_PREFIXES

    assert set(EXPORT_ENVS) | set(get_accelerator().export_envs()) <= set(PDSH_EXPORT_PREFIXES)


def test_the_printed_local_command_is_redacted(capsys):
    assert main(["local", "--print-command", "demo", f"tracking.uri=http://u:{SECRET}@h:5000"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "tracking.uri=http://u:REDACTED@h:5000" in out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_trainer_reads_its_credentials_from_mlflows_file(tmp_path):
    """What the pdsh refusal tells users to do works: a basic-auth server, credentials only in
    ~/.mlflow/credentials (no MLFLOW_TRACKING_* variable, no user:password in the URI)."""
    import contextlib
    import os
    import signal
    import time
    import urllib.request

    from mlflow_server import free_port

    user, password = "sagan", "pw-" + os.urandom(8).hex()
    (tmp_path / "basic_auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///"
                                             f"{tmp_path}/auth.db\nadmin_username = {user}\nauthorization_function"
                                             " = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    server_env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
                  "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name=basic-auth", "--host=127.0.0.1", f"--port={port}",
           "--workers=1", f"--backend-store-uri=sqlite:///{tmp_path}/mlflow.db",
           f"--artifacts-destination={tmp_path}/artifacts"]
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(cmd, env=server_env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        home = tmp_path / "home"
        (home / ".mlflow").mkdir(parents=True)
        creds = home / ".mlflow" / "credentials"
        creds.write_text(f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n")
        creds.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        train = subprocess.run(
            [sys.executable, "-m", "sagan_dist.cli", "train", "demo", "model.g_channels=8", "model.d_channels=8",
             "model.z_dim=16", "train.batch_size=8", "train.steps=1", "train.samples_per_class=1",
             f"train.run_dir={tmp_path / 'run'}", f"tracking.uri={base}", "tracking.experiment=from-file"],
            env={**env, "HOME": str(home)}, capture_output=True, text=True, timeout=300)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert password not in train.stdout + train.stderr
        check = subprocess.run(
            [sys.executable, "-c", "import mlflow; c = mlflow.MlflowClient(); "
             "e = c.get_experiment_by_name('from-file'); print(len(c.search_runs([e.experiment_id])))"],
            env={**env, "MLFLOW_TRACKING_URI": base, "MLFLOW_TRACKING_USERNAME": user,
                 "MLFLOW_TRACKING_PASSWORD": password}, capture_output=True, text=True, timeout=120)
        assert check.stdout.strip() == "1", check.stderr[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.parametrize("hosts", ["node-a slots=1\nnode-b slots=1\n", "localhost slots=1\n"])
def test_deepspeed_refuses_any_item_with_credentials(capsys, tmp_path, hosts):
    # the runner logs its command line, items included, with one host as well as over pdsh
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hosts)
    item = f"data.shards=pipe:curl -s https://u:{SECRET}@s3.example/x-{{0..1}}.tar"
    assert main(["deepspeed", "--hostfile", str(hostfile), "--print-command", "demo", "data.source=shards",
                 item]) == 1
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "data.shards=pipe:curl -s https://u:REDACTED@" in err and "~/.netrc" in err

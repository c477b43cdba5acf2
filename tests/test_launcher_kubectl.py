"""`sagan-launch k8s|status|logs|delete` without a cluster: errors that say what is missing."""
from __future__ import annotations

import shutil

import pytest

from launcher.cli import main

K8S_ARGS = ["k8s", "demo", "--image", "registry.example.com/sagan-dist:1", "--name", "r1"]
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")


@pytest.mark.parametrize("args", [K8S_ARGS, ["status", "r1"], ["logs", "r1"], ["delete", "r1"]])
def test_missing_kubectl_is_named_with_the_way_out(capsys, monkeypatch, tmp_path, args):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no kubectl
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "kubectl not found on PATH" in err and "--dry-run" in err


def test_dry_run_needs_no_kubectl(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main([*K8S_ARGS, "--dry-run"]) == 0
    assert "kind: TrainJob" in capsys.readouterr().out


@pytest.fixture
def unreachable_cluster(monkeypatch, tmp_path):
    """A kubeconfig whose API server port is closed: kubectl fails at once, as with no cluster."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: none\n"
        "clusters: [{name: none, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "contexts: [{name: none, context: {cluster: none, user: none}}]\n"
        "users: [{name: none, user: {token: x}}]\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))


@needs_kubectl
@pytest.mark.parametrize("args", [K8S_ARGS, ["status", "r1"], ["delete", "r1", "--namespace", "ml"]])
def test_unreachable_cluster_is_reported_as_such(capsys, unreachable_cluster, args):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "no reachable Kubernetes cluster" in err and "KUBECONFIG" in err


def test_missing_kubeflow_crds_are_named_with_what_to_install():
    from launcher.kube import _explain

    stderr = ('error: resource mapping not found for name: "r1" namespace: "" from "STDIN": no matches for kind '
              '"TrainJob" in version "trainer.kubeflow.org/v1alpha1"\nensure CRDs are installed first\n')
    message = _explain(["apply", "-f", "-"], stderr)
    assert "does not know TrainJob" in message and "Kubeflow Trainer" in message


def test_resubmitting_a_running_name_says_how_to_proceed():
    from launcher.kube import _explain

    stderr = ('The Job "r1" is invalid: spec.template: Invalid value: core.PodTemplateSpec{...}: '
              'field is immutable\n')
    assert "sagan-launch delete NAME" in _explain(["apply", "-f", "-"], stderr)

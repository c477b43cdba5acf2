"""kubectl, the launcher's only way to talk to a cluster.

kubectl rather than the Python client: it is what every cluster user already has configured
(contexts, auth plugins, proxies), and what they would type to debug the same objects.
Failures become a `LauncherError` that says what was missing: kubectl itself, a reachable
cluster, or the Kubeflow CRDs a flavour needs.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Sequence

from launcher import LauncherError
from launcher.manifests import FLAVOR_LABEL, INSTANCE_LABEL

# The kinds each flavour creates, for status and delete (ConfigMaps for every flavour).
KINDS = {
    "trainjob": ["trainjobs.trainer.kubeflow.org", "trainingruntimes.trainer.kubeflow.org"],
    "pytorchjob": ["pytorchjobs.kubeflow.org"],
    "indexed-job": ["jobs.batch", "services"],
}
KLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
CRD_HINTS = {
    "TrainJob": "install Kubeflow Trainer v2 (https://www.kubeflow.org/docs/components/trainer/)",
    "TrainingRuntime": "install Kubeflow Trainer v2 (https://www.kubeflow.org/docs/components/trainer/)",
    "PyTorchJob": "install the Kubeflow training operator v1, or use --flavor trainjob|indexed-job",
}


def kubectl_path() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise LauncherError("kubectl not found on PATH: install it (https://kubernetes.io/docs/tasks/tools/) "
                            "and point it at your cluster, or use --dry-run to print the manifests")
    return path


def run_kubectl(args: Sequence[str], namespace: str | None = None, stdin: str | None = None,
                capture: bool = True) -> str:
    """Run kubectl; its stdout, or a LauncherError that explains its failure."""
    cmd = [kubectl_path(), *(["--namespace", namespace] if namespace else []), *args]
    proc = subprocess.run(cmd, input=stdin, text=True, capture_output=capture)
    if proc.returncode != 0:
        raise LauncherError(_explain(args, proc.stderr or ""))
    return proc.stdout or ""


def _explain(args: Sequence[str], stderr: str) -> str:
    first = f"kubectl {args[0]} failed"
    # Drop client-go's repeated klog lines ("E1125 11:00:12.597 ... memcache.go"); keep kubectl's own.
    text = "\n".join(line for line in stderr.strip().splitlines() if not KLOG_LINE.match(line))
    if "no matches for kind" in text:
        kind = next((k for k in CRD_HINTS if f'kind "{k}"' in text), "")
        return f"{first}: the cluster does not know {kind or 'a kind we use'}; {CRD_HINTS.get(kind, '')}\n{text}"
    unreachable = ("connection refused", "was refused", "Unable to connect", "no configuration has been provided",
                   "dial tcp", "i/o timeout", "no such host")
    if any(u in stderr for u in unreachable):
        return (f"{first}: no reachable Kubernetes cluster (check `kubectl config current-context` "
                f"and KUBECONFIG)\n{text}")
    if "field is immutable" in text:
        return (f"{first}: a run of that name exists and its job cannot be changed in place; "
                f"delete it first (sagan-launch delete NAME; its run directory stays) or pick another --name\n{text}")
    return f"{first}:\n{text}"


def apply(manifest_yaml: str, namespace: str | None) -> str:
    return run_kubectl(["apply", "-f", "-"], namespace, stdin=manifest_yaml)


def flavor_of(name: str, namespace: str | None) -> str:
    """The flavour a run was launched with, from the label on its ConfigMap."""
    jsonpath = "{.metadata.labels." + FLAVOR_LABEL.replace(".", "\\.").replace("/", "\\/") + "}"
    try:
        out = run_kubectl(["get", "configmap", f"{name}-config", "-o", f"jsonpath={jsonpath}"], namespace)
    except LauncherError as e:
        if "NotFound" in str(e):
            raise LauncherError(f"no run named {name!r}: ConfigMap {name}-config not found "
                                f"(namespace {namespace or 'of the current context'})") from None
        raise
    if out not in KINDS:
        raise LauncherError(f"ConfigMap {name}-config has no {FLAVOR_LABEL} label; it was not made by sagan-launch")
    return out


def selector(name: str) -> str:
    return f"{INSTANCE_LABEL}={name}"


def status(name: str, namespace: str | None) -> str:
    flavor = flavor_of(name, namespace)
    job = run_kubectl(["get", KINDS[flavor][0], name, "-o", "wide"], namespace)
    pods = run_kubectl(["get", "pods", "-l", selector(name), "-o", "wide"], namespace)
    return f"{job}\n{pods or 'no pods yet'}"


def logs(name: str, namespace: str | None, follow: bool, tail: int) -> None:
    """Logs of every pod of the run, each line prefixed with its pod; streamed to the terminal."""
    args = ["logs", "-l", selector(name), "--prefix", f"--tail={tail}", "--max-log-requests=64"]
    run_kubectl([*args, *(["--follow"] if follow else [])], namespace, capture=False)


def delete(name: str, namespace: str | None) -> str:
    flavor = flavor_of(name, namespace)
    kinds = ",".join([*KINDS[flavor], "configmaps"])
    return run_kubectl(["delete", kinds, "-l", selector(name)], namespace)

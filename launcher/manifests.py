"""Kubernetes manifests for a training run, built as plain Python data.

One source of truth: `sagan-launch k8s` renders these with the values of one run (name, image,
node count, the resolved config), and ``python -m launcher.export`` writes the same functions'
output with fixed values into the kustomize tree (k8s/overlays/*/); a test fails when those files
differ from what this module renders. Python rather than YAML templates because the three
flavours share most of their pod spec (volumes, security, environment, the torchrun command) and
differ in structure, which templates express badly; the output is validated against the
Kubernetes and Kubeflow schemas in tests/test_k8s_manifests.py.

Every flavour runs the same command in each node's pod::

    python -m launcher.torchrun [rendezvous flags] --module sagan_dist.cli train CONFIG...

and gets its rendezvous differently: the Kubeflow Trainer (TrainJob) and the training operator
(PyTorchJob) inject torchrun's ``PET_*`` variables, the Indexed Job passes pod 0's DNS name and
the completion index itself. torchrun (launcher.torchrun: torchrun whose stop exits 143, not 1)
runs as the container's PID 1, so the kubelet's SIGTERM reaches it and it forwards the signal to
the trainer processes, which write a snapshot and exit; the Job flavours then count exit 143 as
an interruption, not a failure.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import yaml

from launcher.secrets import redact_items
from launcher.jobspec import FLAVORS, JobSpec, check  # noqa: F401  (re-exported: one import for callers)

Manifest = dict[str, Any]

# Where the pods see their volumes: configs and overrides refer to these paths.
CONFIG_DIR = "/etc/sagan"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
RUNS_MOUNT = "/runs"
DATA_MOUNT = "/data"
USER_ID = 10001  # the image's non-root user (see Dockerfile)
RENDEZVOUS_PORT = 29500  # indexed-job: torchrun's store on pod 0
PYTORCHJOB_PORT = 23456  # the training operator's default; it looks the port up by this name
PYTORCHJOB_PORT_NAME = "pytorchjob-port"
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
FLAVOR_LABEL = "sagan-dist/flavor"
SOURCES_ANNOTATION = "sagan-dist/resolved-from"  # the CONFIG/override items, as a JSON list
TMP_GIB = 16  # /tmp emptyDir: torch, triton and matplotlib caches, evaluation scratch
INSTANCE_LABEL = "app.kubernetes.io/instance"
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": USER_ID,
    "runAsGroup": USER_ID,
    "fsGroup": USER_ID,  # the runs volume must be writable by the non-root user
    # Only re-own the volume root when it is wrong; a recursive chown of a large PVC takes minutes.
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,  # writable places are the volumes and the /tmp emptyDir
    "capabilities": {"drop": ["ALL"]},
}


def render(spec: JobSpec, flavor: str, config_yaml: str | None = None,
           sources: Sequence[str] = ()) -> list[Manifest]:
    """The objects of one run, in apply order; with ``config_yaml``, its ConfigMap first
    (``sources``: the CONFIG/override items it was resolved from, kept as an annotation)."""
    check(spec, flavor)
    objects = [_config_map(spec, flavor, config_yaml, sources)] if config_yaml is not None else []
    builders = {"trainjob": _trainjob, "pytorchjob": _pytorchjob, "indexed-job": _indexed_job}
    return objects + builders[flavor](spec, flavor)


def to_yaml(objects: list[Manifest]) -> str:
    """A multi-document YAML stream; multi-line strings (the config) as readable blocks."""
    return "---\n".join(yaml.dump(o, Dumper=_BlockDumper, sort_keys=False) for o in objects)


class _BlockDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # shared dicts (security contexts) are written out, not as &anchors


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


# ---- shared pieces ------------------------------------------------------------------------------
def labels(spec: JobSpec, flavor: str, component: str = "trainer") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "sagan-dist",
        INSTANCE_LABEL: spec.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": spec.managed_by,
        FLAVOR_LABEL: flavor,
    }


def _metadata(spec: JobSpec, flavor: str, name: str, extra: dict[str, str] | None = None) -> Manifest:
    meta: Manifest = {"name": name}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    meta["labels"] = {**labels(spec, flavor), **(extra or {})}
    return meta


def launch_command(spec: JobSpec, rendezvous: list[str]) -> list[str]:
    """torchrun as PID 1; it gives the trainers the grace period minus a margin to checkpoint."""
    shutdown = spec.grace_seconds - 20
    return ["python", "-m", "launcher.torchrun", *rendezvous, f"--shutdown-timeout={shutdown}",
            "--module", "sagan_dist.cli", *spec.train_args]


STOPPED_EXIT_CODE = 143  # launcher.torchrun after SIGTERM: the trainers wrote a snapshot


def _stopped(action: str, container: str) -> Manifest:
    """A podFailurePolicy rule for a pod that exited because it was told to stop (SIGTERM not
    marked as a disruption: a kubectl delete, a node drain without the condition)."""
    return {"action": action, "onExitCodes": {"containerName": container, "operator": "In",
                                              "values": [STOPPED_EXIT_CODE]}}


def _env(spec: JobSpec) -> list[Manifest]:
    env: list[Manifest] = [{"name": "MLFLOW_TRACKING_URI", "value": spec.tracking_uri}]
    # The server of k8s/platform requires basic auth with the same Secret's user; a missing Secret
    # keeps the pod from starting (CreateContainerConfigError names it) instead of training unlogged.
    for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
        ref = {"name": spec.mlflow_secret, "key": key}
        env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    # The root filesystem is read-only: caches (torch, triton, matplotlib) go under /tmp.
    env += [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    return env


def _volume_mounts() -> list[Manifest]:
    return [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "runs", "mountPath": RUNS_MOUNT},
        {"name": "data", "mountPath": DATA_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]


def _volumes(spec: JobSpec) -> list[Manifest]:
    return [
        {"name": "config", "configMap": {"name": spec.config_map}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": spec.runs_claim}},
        {"name": "data", "persistentVolumeClaim": {"claimName": spec.data_claim, "readOnly": True}},
        # Docker's 64 MiB /dev/shm is too small for NCCL and data-loader workers.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{spec.shm}Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": f"{TMP_GIB}Gi"}},
    ]


def resources(spec: JobSpec) -> Manifest:
    """Requests for scheduling; memory and GPUs also as limits. No CPU limit: throttling a
    data-loading trainer costs more than it protects."""
    memory = f"{spec.memory_gib}Gi"
    requests = {"cpu": str(spec.cpus_per_node or 8 * spec.procs), "memory": memory,
                "ephemeral-storage": f"{TMP_GIB}Gi"}
    # /tmp (an emptyDir on disk) and the container's logs count against ephemeral storage.
    limits = {"memory": memory, "ephemeral-storage": f"{TMP_GIB + 4}Gi"}
    if spec.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    return {"requests": requests, "limits": limits}


def _container(spec: JobSpec, name: str, command: list[str] | None, **extra: Any) -> Manifest:
    container: Manifest = {"name": name, "image": spec.image}
    if command:
        container["command"] = command
    container.update(extra)
    # The image's working directory is on the read-only root; relative paths land in /tmp instead.
    container.update(workingDir="/tmp", env=_env(spec), volumeMounts=_volume_mounts(),
                     securityContext=CONTAINER_SECURITY)
    return container


def _pod_spec(spec: JobSpec, container: Manifest, restart_policy: str, **extra: Any) -> Manifest:
    pod: Manifest = {
        "restartPolicy": restart_policy,
        # SIGTERM -> every rank finishes its step -> rank 0 writes a snapshot; then SIGKILL.
        "terminationGracePeriodSeconds": spec.grace_seconds,
        "securityContext": POD_SECURITY,
        # Trainers never call the Kubernetes API: no token to steal from a compromised pod.
        "automountServiceAccountToken": False,
        **extra,
        "containers": [container],
        "volumes": _volumes(spec),
    }
    if spec.gpus_per_node:
        # GPU node pools are commonly tainted so that only GPU workloads land there.
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return pod


def _config_map(spec: JobSpec, flavor: str, config_yaml: str, sources: Sequence[str]) -> Manifest:
    metadata = _metadata(spec, flavor, spec.config_map)
    # Provenance as data: a JSON list survives any character an override may hold; URLs redacted
    # (a data.shards pipe: command may hold one with a password, which the config itself must keep).
    metadata["annotations"] = {SOURCES_ANNOTATION: json.dumps(redact_items(sources))}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"config.yaml": config_yaml}}


# ---- flavours -----------------------------------------------------------------------------------
def _trainjob(spec: JobSpec, flavor: str) -> list[Manifest]:
    """Kubeflow Trainer v2: a TrainingRuntime of this run (its pod template) and the TrainJob.

    The runtime is namespaced and per run because its pod template names the run's ConfigMap;
    that works on every Trainer v2 release, unlike patching a shared ClusterTrainingRuntime.
    The Trainer's torch plugin injects PET_NNODES/NPROC_PER_NODE/NODE_RANK/MASTER_ADDR/MASTER_PORT
    into the container named "node", which torchrun reads, so no rendezvous flags are passed.
    """
    container = _container(spec, "node", None)
    job_template = {
        "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
        "spec": {
            # A failed node fails its Job at once; the JobSet then restarts all nodes together and
            # they resume from the newest snapshot (a lone restarted rank could not rejoin).
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                _stopped("FailJob", "node")]},
            "template": {"metadata": {"labels": labels(spec, flavor)},
                         "spec": _pod_spec(spec, container, "Never")},
        },
    }
    runtime = {
        "apiVersion": TRAINER_API,
        "kind": "TrainingRuntime",
        "metadata": _metadata(spec, flavor, spec.name, {"trainer.kubeflow.org/framework": "torch"}),
        "spec": {
            "mlPolicy": {"numNodes": spec.nodes, "torch": {}},
            "template": {"spec": {
                "failurePolicy": {
                    "maxRestarts": spec.max_restarts,
                    # Preemption and stops (the podFailurePolicy above) restart without using up maxRestarts.
                    "rules": [{"name": "preempted", "action": "RestartJobSetAndIgnoreMaxRestarts",
                               "onJobFailureReasons": ["PodFailurePolicy"]}],
                },
                "replicatedJobs": [{"name": "node", "replicas": 1, "template": job_template}],
            }},
        },
    }
    trainjob = {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": _metadata(spec, flavor, spec.name),
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": spec.name},
            "trainer": {
                "image": spec.image,
                "command": launch_command(spec, []),
                "numNodes": spec.nodes,
                "numProcPerNode": spec.procs,
                "resourcesPerNode": resources(spec),
            },
        },
    }
    return [runtime, trainjob]


def _pytorchjob(spec: JobSpec, flavor: str) -> list[Manifest]:
    """Training operator v1: Master + Workers (static rendezvous on the master's Service), or
    Workers only with an elasticPolicy (c10d rendezvous, nodes may come and go in [min, max])."""
    elastic = spec.elastic_min_nodes > 0
    # The operator sets PET_NNODES (and PET_RDZV_* when elastic) but PET_NPROC_PER_NODE only in
    # some modes, and MASTER_ADDR/PORT rather than torchrun's PET_MASTER_*: pass those as flags
    # (kubelet expands $(VAR) from the container's environment).
    rendezvous = [f"--nproc-per-node={spec.procs}"]
    if not elastic:
        rendezvous += ["--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
    ports = [{"name": PYTORCHJOB_PORT_NAME, "containerPort": PYTORCHJOB_PORT}]
    container = _container(spec, "pytorch", launch_command(spec, rendezvous), ports=ports,
                           resources=resources(spec))

    def replica(count: int) -> Manifest:
        template = {"metadata": {"labels": labels(spec, flavor)},
                    "spec": _pod_spec(spec, container, "OnFailure")}
        return {"replicas": count, "restartPolicy": "OnFailure", "template": template}

    if elastic:
        replicas = {"Worker": replica(spec.nodes)}
    else:
        replicas = {"Master": replica(1)}
        if spec.nodes > 1:
            replicas["Worker"] = replica(spec.nodes - 1)
    body: Manifest = {
        "nprocPerNode": str(spec.procs),
        # A failure restarts every node's trainer (the group must re-form), hence x nodes.
        "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": spec.max_restarts * spec.nodes},
        "pytorchReplicaSpecs": replicas,
    }
    if elastic:
        body["elasticPolicy"] = {"rdzvBackend": "c10d", "rdzvId": spec.name,
                                 "minReplicas": spec.elastic_min_nodes, "maxReplicas": spec.nodes,
                                 "maxRestarts": spec.max_restarts}
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
             "metadata": _metadata(spec, flavor, spec.name), "spec": body}]


def _indexed_job(spec: JobSpec, flavor: str) -> list[Manifest]:
    """Plain Kubernetes: an Indexed Job (one pod per node) and a headless Service that gives pod i
    the DNS name <name>-i.<name>; node rank = completion index, master = pod 0 (static
    rendezvous, as the Trainer and the operator do it)."""
    selector = {INSTANCE_LABEL: spec.name, "app.kubernetes.io/component": "trainer"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, flavor, spec.name),
        "spec": {
            "clusterIP": "None",
            # Pods must resolve each other while starting, before any readiness.
            "publishNotReadyAddresses": True,
            "selector": selector,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }
    rendezvous = [f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.procs}", "--node-rank=$(NODE_RANK)",
                  f"--master-addr={spec.name}-0.{spec.name}", f"--master-port={RENDEZVOUS_PORT}"]
    container = _container(spec, "trainer", launch_command(spec, rendezvous),
                           ports=[{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
                           resources=resources(spec))
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    container["env"] = [{"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}},
                        *container["env"]]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, flavor, spec.name),
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            # One failure makes every node fail its next collective, hence x nodes.
            "backoffLimit": spec.max_restarts * spec.nodes,
            # Preempted, evicted or stopped pods are replaced without counting as failures.
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                _stopped("Ignore", "trainer")]},
            "template": {
                "metadata": {"labels": labels(spec, flavor)},
                "spec": _pod_spec(spec, container, "Never", subdomain=spec.name),
            },
        },
    }
    return [service, job]

"""Rendered Kubernetes manifests: valid against the schemas, and carrying the fields that matter.

Offline validation, three ways: core kinds (and every pod template inside the Kubeflow kinds)
with kubernetes-validate's strict JSON schemas; TrainJob/TrainingRuntime through the typed
models of kubeflow-trainer-api; PyTorchJob through those of kubeflow-training. The typed models
ignore unknown keys when parsing, so `validate_object` first walks each dict against the model's
declared fields: a misspelled field fails (see the tests at the end), as the API server would.
"""
from __future__ import annotations

import json
import re
import typing
from typing import Any

import kubernetes.client.models as k8s_models
import kubernetes_validate
import pytest
import yaml
from kubeflow.training import models as training_models
from kubeflow_trainer_api import models as trainer_models
from pydantic import BaseModel

from launcher import LauncherError
from launcher.cli import main
from launcher.manifests import CONFIG_FILE, JobSpec, render
from sagan_dist import config

# The oldest cluster we support (podFailurePolicy GA 1.31, beta on) and the newest schema.
K8S_VERSIONS = ("1.30", "1.37")
TRAINER_KINDS = {"TrainJob": trainer_models.TrainerV1alpha1TrainJob,
                 "TrainingRuntime": trainer_models.TrainerV1alpha1TrainingRuntime,
                 "ClusterTrainingRuntime": trainer_models.TrainerV1alpha1ClusterTrainingRuntime}
IMAGE = "registry.example.com/sagan-dist:1.2.3"


class SchemaError(AssertionError):
    pass


# ---- strict walkers over the typed models ------------------------------------------------------
def check_pydantic(model: type[BaseModel], data: Any, path: str) -> None:
    """Every key is a declared field (by its JSON name); recurse into nested models."""
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected an object ({model.__name__}), got {data!r}")
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    for key, value in data.items():
        if key not in fields:
            raise SchemaError(f"{path}.{key}: not a field of {model.__name__} ({', '.join(fields)})")
        _check_annotation(fields[key].annotation, value, f"{path}.{key}")


def _check_annotation(annotation: Any, value: Any, path: str) -> None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if value is not None and len(inner) == 1:
            _check_annotation(inner[0], value, path)
    elif origin is typing.Annotated:
        _check_annotation(args[0], value, path)
    elif origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            _check_annotation(args[0], item, f"{path}[{i}]")
    elif origin is dict and isinstance(value, dict) and len(args) == 2:
        for key, item in value.items():
            _check_annotation(args[1], item, f"{path}.{key}")
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if "actual_instance" not in annotation.model_fields:  # oneOf wrappers (Quantity) are scalars
            check_pydantic(annotation, value, path)


def build_openapi(cls: type, data: Any, path: str) -> Any:
    """Construct an openapi-generator model (kubeflow-training, kubernetes client) from JSON,
    rejecting unknown keys and wrong types; the constructors check required fields."""
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected an object ({cls.__name__}), got {data!r}")
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        if key not in by_json:
            raise SchemaError(f"{path}.{key}: not a field of {cls.__name__} ({', '.join(by_json)})")
        attr = by_json[key]
        kwargs[attr] = _build_type(cls.openapi_types[attr], value, f"{path}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise SchemaError(f"{path}: {e}") from None


PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def _build_type(type_name: str, value: Any, path: str) -> Any:
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list, got {value!r}")
        return [_build_type(m.group(1), v, f"{path}[{i}]") for i, v in enumerate(value)]
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a map, got {value!r}")
        return {k: _build_type(m.group(1), v, f"{path}.{k}") for k, v in value.items()}
    if type_name in PRIMITIVES:
        expected = PRIMITIVES[type_name]
        if not isinstance(value, expected) or (type_name == "int" and isinstance(value, bool)):
            raise SchemaError(f"{path}: expected {type_name}, got {value!r}")
        return value
    if type_name == "object":
        return value
    cls = getattr(training_models, type_name, None) or getattr(k8s_models, type_name)
    return build_openapi(cls, value, path)


# ---- one entry point ----------------------------------------------------------------------------
def validate_core(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise SchemaError(f"{obj['kind']} {obj['metadata'].get('name')} (k8s {version}): {e.message}") from None


def _pod_template_as_core(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def validate_object(obj: dict[str, Any]) -> None:
    """Validate any object we render or ship; raises SchemaError naming the bad field."""
    kind = obj["kind"]
    if kind in TRAINER_KINDS:
        check_pydantic(TRAINER_KINDS[kind], obj, kind)
        TRAINER_KINDS[kind].from_dict(obj)  # types and required fields
        for job in obj["spec"].get("template", {}).get("spec", {}).get("replicatedJobs", []):
            validate_core({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job["name"]},
                           "spec": job["template"]["spec"]})
        if trainer := obj["spec"].get("trainer"):
            container = {"name": "node", "image": trainer.get("image", "x"), "command": trainer.get("command", []),
                         "resources": trainer.get("resourcesPerNode", {})}
            validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                           "spec": {"containers": [container]}})
    elif kind == "PyTorchJob":
        build_openapi(training_models.KubeflowOrgV1PyTorchJob, obj, kind)
        for replica in obj["spec"]["pytorchReplicaSpecs"].values():
            validate_core(_pod_template_as_core(replica["template"]))
    else:
        validate_core(obj)


# ---- rendering helpers --------------------------------------------------------------------------
def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert main(["k8s", *args, "--image", IMAGE, "--dry-run"]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pod spec in a flavour's objects."""
    specs = []
    for o in objects:
        if o["kind"] == "TrainingRuntime":
            jobs = o["spec"]["template"]["spec"]["replicatedJobs"]
            specs += [j["template"]["spec"]["template"]["spec"] for j in jobs]
        elif o["kind"] == "PyTorchJob":
            specs += [r["template"]["spec"] for r in o["spec"]["pytorchReplicaSpecs"].values()]
        elif o["kind"] == "Job":
            specs.append(o["spec"]["template"]["spec"])
    return specs


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ---- every flavour validates and carries the essentials -----------------------------------------
@pytest.mark.parametrize("flavor", ["trainjob", "pytorchjob", "indexed-job"])
def test_dry_run_of_every_flavour_validates_against_the_schemas(capsys, flavor):
    objects = dry_run(capsys, "demo", "--flavor", flavor, "--nodes", "2", "--gpus-per-node", "4")
    assert objects[0]["kind"] == "ConfigMap"
    for obj in objects:
        validate_object(obj)


@pytest.mark.parametrize("flavor", ["trainjob", "pytorchjob", "indexed-job"])
def test_every_pod_runs_the_image_non_root_with_volumes_grace_and_tracking(capsys, flavor):
    objects = dry_run(capsys, "demo", "--flavor", flavor, "--nodes", "2", "--gpus-per-node", "4", "--name", "run-a")
    specs = pod_specs(objects)
    assert specs
    for pod in specs:
        assert pod["terminationGracePeriodSeconds"] == 120
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["config"]["configMap"]["name"] == "run-a-config"
        assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "sagan-runs"
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "sagan-data", "readOnly": True}
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {m["name"] for m in container["volumeMounts"]} == set(volumes)
        env = env_of(container)
        assert env["MLFLOW_TRACKING_URI"] == "http://sagan-mlflow:5000"
        assert env["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["name"] == "sagan-mlflow-credentials"


@pytest.mark.parametrize("flavor", ["trainjob", "pytorchjob", "indexed-job"])
def test_configmap_holds_the_resolved_config_on_the_runs_volume(capsys, tmp_path, flavor):
    objects = dry_run(capsys, "demo", "train.steps=7", "--flavor", flavor, "--name", "run-b")
    text = by_kind(objects)["ConfigMap"]["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    shipped = config.load([path])
    direct = config.load(["demo"], ["train.steps=7", "train.run_dir=/runs/run-b"])
    assert config.to_container(shipped) == config.to_container(direct)


def test_trainjob_sets_nodes_procs_resources_and_references_its_runtime(capsys):
    objects = by_kind(dry_run(capsys, "demo", "--flavor", "trainjob", "--nodes", "2", "--gpus-per-node", "4",
                              "--name", "tj"))
    trainer = objects["TrainJob"]["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4 and trainer["image"] == IMAGE
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["command"][:3] == ["python", "-m", "launcher.torchrun"]
    assert trainer["command"][-4:] == ["--module", "sagan_dist.cli", "train", CONFIG_FILE]
    ref = objects["TrainJob"]["spec"]["runtimeRef"]
    assert ref == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": "tj"}
    runtime = objects["TrainingRuntime"]
    assert runtime["metadata"]["name"] == "tj" and "torch" in runtime["spec"]["mlPolicy"]
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    # The Trainer injects PET_* only into the container named "node" of the "trainer" ancestor.
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert job["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == "node"
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] == 3


def test_pytorchjob_has_master_and_workers_with_nproc_and_restart_policy(capsys):
    manifests = dry_run(capsys, "demo", "--flavor", "pytorchjob", "--nodes", "4", "--gpus-per-node", "2")
    job = by_kind(manifests)["PyTorchJob"]
    spec = job["spec"]
    assert spec["nprocPerNode"] == "2"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    for replica in spec["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "OnFailure"
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the operator injects its environment by this name
        assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
        assert "--master-addr=$(MASTER_ADDR)" in container["command"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert "elasticPolicy" not in spec


def test_elastic_pytorchjob_is_workers_only_and_checks_every_world_size(capsys):
    # 2..4 nodes x 2 = 4, 6 or 8 ranks: 48 splits over each.
    job = by_kind(dry_run(capsys, "demo", "train.batch_size=48", "--flavor", "pytorchjob", "--nodes", "4",
                          "--gpus-per-node", "2", "--elastic-min-nodes", "2"))["PyTorchJob"]
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 2 and job["spec"]["elasticPolicy"]["maxReplicas"] == 4
    # 3 nodes x 2 = 6 ranks do not split demo's batch of 64: refused before rendering.
    assert main(["k8s", "demo", "--flavor", "pytorchjob", "--nodes", "3", "--gpus-per-node", "2",
                 "--elastic-min-nodes", "2", "--image", IMAGE, "--dry-run"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_indexed_job_rendezvous_uses_pod_zero_dns_and_completion_index(capsys):
    objects = by_kind(dry_run(capsys, "demo", "--flavor", "indexed-job", "--nodes", "2", "--gpus-per-node", "8",
                              "train.batch_size=64", "--name", "ij"))
    service, job = objects["Service"], objects["Job"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "ij"
    assert all(spec["template"]["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    (container,) = pod["containers"]
    assert "--master-addr=ij-0.ij" in container["command"]
    assert "--node-rank=$(NODE_RANK)" in container["command"] and "--nproc-per-node=8" in container["command"]
    field = env_of(container)["NODE_RANK"]["fieldRef"]["fieldPath"]
    assert field.endswith("['batch.kubernetes.io/job-completion-index']")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert spec["podFailurePolicy"]["rules"][0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_cpu_only_run_requests_no_gpu_and_one_process(capsys):
    objects = by_kind(dry_run(capsys, "demo", "--flavor", "trainjob"))
    trainer = objects["TrainJob"]["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 1
    assert "nvidia.com/gpu" not in trainer["resourcesPerNode"]["requests"]
    assert "tolerations" not in pod_specs(list(objects.values()))[0]


def test_namespace_is_set_on_every_object(capsys):
    for obj in dry_run(capsys, "demo", "--flavor", "indexed-job", "--namespace", "ml"):
        assert obj["metadata"]["namespace"] == "ml"


# ---- mistakes are refused before rendering ------------------------------------------------------
def test_bad_config_fails_before_anything_is_rendered(capsys):
    assert main(["k8s", "demo", "train.no_such_key=1", "--image", IMAGE, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "train.no_such_key" in captured.err


def test_run_dir_off_the_runs_volume_is_refused(capsys):
    assert main(["k8s", "demo", "train.run_dir=/tmp/x", "--image", IMAGE, "--dry-run"]) == 1
    assert "not on the runs volume" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["Upper", "-dash", "a" * 41, "under_score"])
def test_invalid_run_names_are_refused(name):
    spec = JobSpec(name=name, image=IMAGE, train_args=("train",), config_map="c")
    with pytest.raises(LauncherError, match="name"):
        render(spec, "trainjob")


# ---- the validators themselves catch mistakes ---------------------------------------------------
def _spec() -> JobSpec:
    return JobSpec(name="v", image=IMAGE, train_args=("train", CONFIG_FILE), config_map="v-config",
                   nodes=2, gpus_per_node=2)


def test_validator_rejects_a_misspelled_trainjob_field():
    runtime, trainjob = render(_spec(), "trainjob")
    trainjob["spec"]["trainer"]["numProcsPerNode"] = trainjob["spec"]["trainer"].pop("numProcPerNode")
    with pytest.raises(SchemaError, match="numProcsPerNode"):
        validate_object(trainjob)
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNod"] = 2
    with pytest.raises(SchemaError, match="numProcPerNod"):
        validate_object(runtime)


def test_validator_rejects_bad_pytorchjob_fields_and_types():
    (job,) = render(_spec(), "pytorchjob")
    job["spec"]["nProcPerNode"] = "2"
    with pytest.raises(SchemaError, match="nProcPerNode"):
        validate_object(job)
    (job,) = render(_spec(), "pytorchjob")
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "1"
    with pytest.raises(SchemaError, match="expected int"):
        validate_object(job)


def test_validator_rejects_unknown_fields_in_pod_templates_of_every_kind():
    for flavor in ("trainjob", "pytorchjob", "indexed-job"):
        objects = render(_spec(), flavor)
        pod_specs(objects)[0]["containers"][0]["volumeMount"] = []
        with pytest.raises(SchemaError, match="volumeMount"):
            for obj in objects:
                validate_object(obj)


# ---- the ConfigMap is data, whatever the overrides hold -----------------------------------------
HOSTILE_OVERRIDES = [
    "tracking.run_name='#1 \"a\"\n  b: c'",                 # a raw newline in the item
    'tracking.experiment="x\\n# Resolved: evil\\ntrain: {steps: 1}"',  # newlines inside the value
    "tracking.uri=\\${oc.env:HOME}",                       # a literal ${...}: no interpolation on load
    "data.shards='/d/{0..9}.tar # not a comment'",
]


def test_hostile_overrides_cannot_break_the_configmap_and_load_back_unchanged(capsys, tmp_path):
    objects = dry_run(capsys, "demo", *HOSTILE_OVERRIDES, "--name", "run-h")
    config_map = by_kind(objects)["ConfigMap"]
    validate_object(config_map)
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    shipped = config.to_container(config.load([path]))
    direct = config.to_container(config.load(["demo"], ["train.run_dir=/runs/run-h", *HOSTILE_OVERRIDES]))
    assert shipped == direct
    assert shipped["tracking"]["uri"] == "${oc.env:HOME}" and "\n" in shipped["tracking"]["experiment"]
    assert shipped["train"]["steps"] == direct["train"]["steps"] != 1
    sources = json.loads(config_map["metadata"]["annotations"]["sagan-dist/resolved-from"])
    assert sources == ["demo", *HOSTILE_OVERRIDES]


# ---- hardening: no API token, bounded scratch space --------------------------------------------
@pytest.mark.parametrize("flavor", ["trainjob", "pytorchjob", "indexed-job"])
def test_pods_mount_no_token_and_bound_every_emptydir_and_ephemeral_storage(capsys, flavor):
    objects = dry_run(capsys, "demo", "--flavor", flavor, "--nodes", "2")
    for pod in pod_specs(objects):
        assert pod["automountServiceAccountToken"] is False
        for volume in pod["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"]["sizeLimit"].endswith("Gi"), volume
        for container in pod["containers"]:
            if "resources" in container:
                assert {"ephemeral-storage"} <= set(container["resources"]["requests"]) & set(
                    container["resources"]["limits"])
    for obj in objects:
        if obj["kind"] == "TrainJob":
            assert "ephemeral-storage" in obj["spec"]["trainer"]["resourcesPerNode"]["limits"]


@pytest.mark.parametrize("image", ["registry.example.com/sagan-dist@sha256:" + "ab" * 32,
                                   "registry.example.com:5000/team/sagan-dist:1.2@sha256:" + "0" * 64])
def test_image_by_digest_is_accepted_and_used_everywhere(capsys, image):
    assert main(["k8s", "demo", "--image", image, "--dry-run"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [c["image"] for pod in pod_specs(objects) for c in pod["containers"]] == [image]
    assert by_kind(objects)["TrainJob"]["spec"]["trainer"]["image"] == image


@pytest.mark.parametrize("image", ["r/sagan@sha256:abc", "R/Sagan:1", "r/sagan:", "r/sagan:a b", "r/s@md5:" + "0" * 32])
def test_malformed_image_is_refused_naming_the_flag(capsys, image):
    assert main(["k8s", "demo", "--image", image, "--dry-run"]) == 1
    assert "--image" in capsys.readouterr().err


def test_negative_values_in_a_spec_are_refused_naming_the_flag():
    for field, flag in (("shm_gib", "--shm-size"), ("cpus_per_node", "--cpus-per-node"),
                        ("max_restarts", "--max-restarts"), ("gpus_per_node", "--gpus-per-node")):
        spec = JobSpec(name="n", image=IMAGE, train_args=("train",), config_map="c", **{field: -1})
        with pytest.raises(LauncherError, match=flag):
            render(spec, "indexed-job")


@pytest.mark.parametrize("flavor, kind, action", [("indexed-job", "Job", "Ignore"),
                                                  ("trainjob", "TrainingRuntime", "FailJob")])
def test_a_pod_stopped_by_sigterm_does_not_count_as_failed(capsys, flavor, kind, action):
    """launcher.torchrun exits 143 after a stop snapshot: not a failure for backoffLimit / maxRestarts."""
    objects = dry_run(capsys, "demo", "--flavor", flavor)
    obj = by_kind(objects)[kind]
    validate_object(obj)
    if kind == "Job":
        job_spec = obj["spec"]
    else:  # the TrainingRuntime's node Job; FailJob's reason PodFailurePolicy restarts without using up maxRestarts
        (replicated,) = obj["spec"]["template"]["spec"]["replicatedJobs"]
        job_spec = replicated["template"]["spec"]
        (rule,) = obj["spec"]["template"]["spec"]["failurePolicy"]["rules"]
        assert rule["action"] == "RestartJobSetAndIgnoreMaxRestarts"
        assert rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    (container,) = job_spec["template"]["spec"]["containers"]
    exit_rules = [r for r in job_spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
    assert exit_rules == [{"action": action, "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                             "values": [143]}}]
    command = container.get("command") or by_kind(objects)["TrainJob"]["spec"]["trainer"]["command"]
    assert command[:3] == ["python", "-m", "launcher.torchrun"]

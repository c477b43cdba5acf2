"""The kustomize tree in k8s/: generated files up to date, every file valid, every target builds.

Building needs `kustomize` or `kubectl kustomize` (either is enough); without them those tests
skip and the per-file validation below still covers every manifest in the tree.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher import export
from launcher.manifests import CONFIG_FILE
from sagan_dist import config
from test_k8s_manifests import pod_specs, validate_object

K8S = Path(__file__).resolve().parent.parent / "k8s"
TARGETS = ["overlays/trainjob", "overlays/pytorchjob", "overlays/indexed-job", "platform", "platform-postgres"]
KUSTOMIZE_FILES = {"kustomization.yaml", "kustomizeconfig.yaml"}


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


needs_kustomize = pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl on PATH")


def build(target: str) -> list[dict[str, Any]]:
    cmd = kustomize_command()
    assert cmd is not None
    out = subprocess.run([*cmd, str(K8S / target)], capture_output=True, text=True, check=True).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def patch_files() -> set[Path]:
    """Files named under `patches:` hold partial objects, not manifests."""
    found = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            found.add((kustomization.parent / patch["path"]).resolve())
    return found


def manifest_files() -> list[Path]:
    skip = patch_files() | {(K8S / "base" / "config.yaml").resolve()}
    return [p for p in sorted(K8S.rglob("*.yaml")) if p.name not in KUSTOMIZE_FILES and p.resolve() not in skip]


def test_generated_job_manifests_match_the_renderer():
    assert export.stale() == [], "run: python -m launcher.export"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates(path):
    objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
    assert objects
    for obj in objects:
        validate_object(obj)


def test_cluster_config_layer_resolves_with_the_named_config_for_the_job_world_size():
    spec = export.KUSTOMIZE_SPEC
    named = [a for a in spec.train_args[1:] if a != CONFIG_FILE]
    cfg = config.load([*named, K8S / "base" / "config.yaml"], world_size=spec.world_size)
    assert cfg.train.run_dir.startswith("/runs/") and cfg.data.source == "shards"


@needs_kustomize
@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_target_builds_and_validates(target):
    objects = build(target)
    assert objects
    for obj in objects:
        validate_object(obj)


@needs_kustomize
@pytest.mark.parametrize("target", TARGETS[:3])
def test_overlay_sets_the_image_and_the_hashed_config_name_everywhere(target):
    objects = build(target)
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    name = config_map["metadata"]["name"]
    assert name.startswith("sagan-config-")  # content hash appended
    image = yaml.safe_load((K8S / "components/image/kustomization.yaml").read_text())["images"][0]
    expected = f"{image['newName']}:{image['newTag']}"
    for pod in pod_specs(objects):
        assert pod["containers"][0]["image"] == expected
        assert {"name": "config", "configMap": {"name": name}} in pod["volumes"]
    for obj in objects:
        if obj["kind"] == "TrainJob":
            assert obj["spec"]["trainer"]["image"] == expected


@needs_kustomize
def test_postgres_overlay_points_mlflow_at_postgres_with_a_secret_password():
    objects = build("platform-postgres")
    (mlflow,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "sagan-mlflow"]
    env = {e["name"]: e for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://mlflow@sagan-postgres:5432/")
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "sagan-postgres", "key": "password"}
    assert {"Service", "Deployment", "PersistentVolumeClaim"} <= {o["kind"] for o in objects
                                                                  if "postgres" in o["metadata"]["name"]}


@needs_kustomize
@pytest.mark.parametrize("image, expected", [
    ({"newName": "registry.example.com/sagan-dist", "digest": "sha256:" + "ab" * 32},
     "registry.example.com/sagan-dist@sha256:" + "ab" * 32),
    ({"newName": "registry.example.com/sagan-dist", "newTag": "0.1.0", "digest": "sha256:" + "cd" * 32},
     "registry.example.com/sagan-dist:0.1.0@sha256:" + "cd" * 32),
])
def test_image_pinned_by_digest_reaches_every_pod_and_the_trainjob(tmp_path, image, expected):
    # What `kustomize edit set image sagan-dist=REGISTRY/sagan-dist[:TAG]@sha256:...` writes.
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    component = tree / "components/image/kustomization.yaml"
    data = yaml.safe_load(component.read_text())
    data["images"] = [{"name": "sagan-dist", **image}]
    component.write_text(yaml.safe_dump(data))
    cmd = kustomize_command()
    assert cmd is not None
    for target in ["overlays/trainjob", "overlays/pytorchjob", "platform"]:
        out = subprocess.run([*cmd, str(tree / target)], capture_output=True, text=True, check=True).stdout
        objects = [o for o in yaml.safe_load_all(out) if o]
        images = [c["image"] for pod in pod_specs(objects) for c in pod["containers"]]
        images += [o["spec"]["trainer"]["image"] for o in objects if o["kind"] == "TrainJob"]
        images += [c["image"] for o in objects if o["kind"] == "Deployment"
                   for c in o["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"]
        assert images and set(images) == {expected}, (target, images)

"""What one training run asks of the cluster (`JobSpec`), and the checks that refuse a spec the
cluster would reject later or that could not train, each naming the `sagan-launch k8s` flag."""
from __future__ import annotations

import re
from dataclasses import dataclass

from launcher import LauncherError
from launcher.secrets import refuse_uri_credentials

FLAVORS = ("trainjob", "pytorchjob", "indexed-job")
# Pod names add suffixes such as "-node-0-0-abcde" to the run's name; 40 characters keeps every
# derived name and pod hostname under the 63-character DNS label limit.
MAX_NAME = 40
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# An image reference, as Docker's reference grammar has it: [registry[:port]/]path[:tag][@digest].
_HOST = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_RE = re.compile(rf"^(?:{_HOST}(?:\.{_HOST})*(?::[0-9]+)?/)?{_PATH}(?:/{_PATH})*"
                      r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64}|@sha512:[0-9a-f]{128})?$")


@dataclass(frozen=True)
class JobSpec:
    """What one training run asks of the cluster."""

    name: str
    image: str
    train_args: tuple[str, ...]  # after `--module sagan_dist.cli`, e.g. ("train", CONFIG_FILE)
    config_map: str  # ConfigMap holding config.yaml, mounted at CONFIG_DIR
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int = 0  # 0: one per GPU, or one on CPU-only nodes
    cpus_per_node: int = 0  # 0: 8 per process
    memory_gib_per_node: int = 0  # 0: 32 GiB per process
    shm_gib: int = 0  # 0: a quarter of the memory; /dev/shm counts against the memory limit
    namespace: str | None = None
    runs_claim: str = "sagan-runs"
    data_claim: str = "sagan-data"
    tracking_uri: str = "http://sagan-mlflow:5000"
    mlflow_secret: str = "sagan-mlflow-credentials"
    grace_seconds: int = 120
    max_restarts: int = 3
    elastic_min_nodes: int = 0  # pytorchjob only: > 0 makes the job elastic in [min, nodes]
    managed_by: str = "sagan-launch"

    @property
    def procs(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs

    @property
    def memory_gib(self) -> int:
        return self.memory_gib_per_node or 32 * self.procs

    @property
    def shm(self) -> int:
        return self.shm_gib or max(1, self.memory_gib // 4)


def secret_hint(spec: JobSpec) -> str:
    """Where a run's MLflow credentials go: the Secret its pods read (k8s/platform/mlflow.yaml)."""
    return f"the Secret {spec.mlflow_secret} (keys username, password), which the pods read"


def check(spec: JobSpec, flavor: str) -> None:
    """Reject a spec the cluster would reject later, or that could not train, with the reason."""
    if flavor not in FLAVORS:
        raise LauncherError(f"unknown flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    if len(spec.name) > MAX_NAME or not NAME_RE.match(spec.name):
        raise LauncherError(
            f"name {spec.name!r} must be lower-case letters, digits and '-', start with a letter, "
            f"end with a letter or digit, and have at most {MAX_NAME} characters")
    if not IMAGE_RE.match(spec.image):
        raise LauncherError(f"--image {spec.image!r} is not an image reference: use REGISTRY/REPO:TAG, "
                            "REGISTRY/REPO@sha256:<64 hex digits> or REGISTRY/REPO:TAG@sha256:<64 hex digits>")
    if spec.nodes < 1:
        raise LauncherError(f"--nodes must be >= 1, got {spec.nodes}")
    for flag, value in (("--gpus-per-node", spec.gpus_per_node), ("--procs-per-node", spec.procs_per_node),
                        ("--cpus-per-node", spec.cpus_per_node), ("--memory-per-node", spec.memory_gib_per_node),
                        ("--shm-size", spec.shm_gib), ("--max-restarts", spec.max_restarts),
                        ("--elastic-min-nodes", spec.elastic_min_nodes)):
        if value < 0:
            raise LauncherError(f"{flag} must be >= 0 (0: the default), got {value}")
    if spec.shm >= spec.memory_gib:
        raise LauncherError(f"/dev/shm ({spec.shm} GiB) must be smaller than the memory per node "
                            f"({spec.memory_gib} GiB): it is counted against the same limit")
    if spec.elastic_min_nodes and (flavor != "pytorchjob" or spec.elastic_min_nodes > spec.nodes):
        raise LauncherError("--elastic-min-nodes needs --flavor pytorchjob and a value <= --nodes")
    refuse_uri_credentials(spec.tracking_uri, "--tracking-uri", secret_hint(spec))
    if spec.grace_seconds < 30:
        raise LauncherError("--grace-period must be >= 30 s: the trainer needs time to write a snapshot")

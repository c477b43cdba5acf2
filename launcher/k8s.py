"""`sagan-launch k8s`: resolve the config, render one run's manifests, print or apply them.

The config is resolved here, with the run's world size, exactly as the trainer will resolve it
(sagan_dist.config.load), and the result is what the pods read from their ConfigMap: a bad key,
a batch size that does not split over the ranks, or a run directory off the runs volume fails
before anything reaches the cluster, and the cluster runs the config that was checked.
"""
from __future__ import annotations

import re
from typing import Sequence

from sagan_dist import config

from launcher import LauncherError, kube, split_items
from launcher.manifests import CONFIG_FILE, RUNS_MOUNT, JobSpec, check, render, to_yaml


def default_name(yamls: Sequence[str]) -> str:
    """sagan-<first config's stem>: the same config resubmitted resumes the same run directory."""
    stem = re.sub(r"\.ya?ml$", "", yamls[0].rstrip("/").rsplit("/", 1)[-1]) if yamls else "run"
    name = re.sub(r"[^a-z0-9-]+", "-", f"sagan-{stem}".lower()).strip("-")
    return name[:40].rstrip("-")


def resolve_config(items: Sequence[str], spec: JobSpec) -> str:
    """The run's config as YAML, checked for every world size the job may run with."""
    yamls, overrides = split_items(items)
    if not yamls:
        raise config.ConfigError("no CONFIG given: name a YAML file or a shipped config such as 'demo'")
    # Listed first so that an explicit train.run_dir=... override still wins.
    overrides = [f"train.run_dir={RUNS_MOUNT}/{spec.name}", *overrides]
    cfg = None
    for nodes in range(spec.elastic_min_nodes or spec.nodes, spec.nodes + 1):
        cfg = config.load(yamls, overrides, world_size=nodes * spec.procs)
    assert cfg is not None
    run_dir = str(cfg.train.run_dir)
    if not run_dir.startswith(f"{RUNS_MOUNT}/"):
        raise LauncherError(f"train.run_dir={run_dir} is not on the runs volume mounted at {RUNS_MOUNT}: "
                            "snapshots there would be lost when a pod restarts")
    source = " ".join([*yamls, *overrides])
    return f"# Resolved by sagan-launch from: {source}\n{config.to_yaml(cfg)}"


def launch(items: Sequence[str], spec: JobSpec, flavor: str, dry_run: bool) -> str:
    """Render the run; return the YAML (dry run) or kubectl's report of what it applied."""
    check(spec, flavor)
    text = to_yaml(render(spec, flavor, resolve_config(items, spec)))
    if dry_run:
        return text
    return kube.apply(text, spec.namespace)


def cluster_spec(name: str, image: str, **options: object) -> JobSpec:
    """A JobSpec whose pods read the resolved config from the run's own ConfigMap."""
    return JobSpec(name=name, image=image, train_args=("train", CONFIG_FILE),
                   config_map=f"{name}-config", **options)  # type: ignore[arg-type]

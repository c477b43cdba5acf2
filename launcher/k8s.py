"""`sagan-launch k8s`: resolve the config, render one run's manifests, print or apply them.

The config is resolved here, with the run's world size, exactly as the trainer will resolve it
(sagan_dist.config.load), and the result is what the pods read from their ConfigMap: a bad key,
a batch size that does not split over the ranks, or a run directory off the runs volume fails
before anything reaches the cluster, and the cluster runs the config that was checked.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import yaml

from sagan_dist import config

from launcher import LauncherError, kube
from launcher.checks import load_for_nodes
from launcher.secrets import refuse_uri_credentials
from launcher.jobspec import secret_hint
from launcher.manifests import CONFIG_FILE, RUNS_MOUNT, SOURCES_ANNOTATION, JobSpec, check, render, to_yaml


def default_name(yamls: Sequence[str]) -> str:
    """sagan-<first config's stem>: the same config resubmitted resumes the same run directory."""
    stem = re.sub(r"\.ya?ml$", "", yamls[0].rstrip("/").rsplit("/", 1)[-1]) if yamls else "run"
    name = re.sub(r"[^a-z0-9-]+", "-", f"sagan-{stem}".lower()).strip("-")
    return name[:40].rstrip("-")


def resolve_config(items: Sequence[str], spec: JobSpec) -> str:
    """The run's config as a YAML document, checked for every world size the job may run with.

    Built as data (yaml.safe_dump of the resolved values), never by pasting the user's items into
    text, so no override can change its structure; OmegaConf's ``${`` is escaped so that a value
    holding it loads back as the same string instead of an interpolation.
    """
    nodes = range(spec.elastic_min_nodes or spec.nodes, spec.nodes + 1)
    # Listed first so that an explicit train.run_dir=... override still wins.
    cfg = load_for_nodes(items, nodes, spec.procs, first_overrides=[f"train.run_dir={RUNS_MOUNT}/{spec.name}"],
                         nodes_flag="--elastic-min-nodes:--nodes")
    refuse_uri_credentials(str(cfg.tracking.uri), "tracking.uri", secret_hint(spec))
    run_dir = str(cfg.train.run_dir)
    if not run_dir.startswith(f"{RUNS_MOUNT}/"):
        raise LauncherError(f"train.run_dir={run_dir} is not on the runs volume mounted at {RUNS_MOUNT}: "
                            "snapshots there would be lost when a pod restarts")
    values = _literal(config.to_container(cfg))
    return (f"# Resolved by sagan-launch; the items it came from are in the annotation {SOURCES_ANNOTATION}.\n"
            + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))


def _literal(value: Any) -> Any:
    """Escape OmegaConf interpolations (``${``, and the backslashes before one) in every string."""
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return value


def launch(items: Sequence[str], spec: JobSpec, flavor: str, dry_run: bool) -> str:
    """Render the run; return the YAML (dry run) or kubectl's report of what it applied."""
    check(spec, flavor)
    text = to_yaml(render(spec, flavor, resolve_config(items, spec), sources=items))
    if dry_run:
        return text
    return kube.apply(text, spec.namespace)


def cluster_spec(name: str, image: str, **options: object) -> JobSpec:
    """A JobSpec whose pods read the resolved config from the run's own ConfigMap."""
    return JobSpec(name=name, image=image, train_args=("train", CONFIG_FILE),
                   config_map=f"{name}-config", **options)  # type: ignore[arg-type]

"""Checks every launcher makes before it starts anything: option ranges and the config.

The config is resolved as the trainer will resolve it, for every world size the launch allows
(an elastic job may run with any node count in its range), so a batch that does not split over
one of them fails here, naming that size, instead of hours later when a node is lost.
"""
from __future__ import annotations

import argparse
import re
from typing import Callable, Sequence

import yaml
from omegaconf import DictConfig

from sagan_dist import config
from sagan_dist.config import ConfigError, split_items

from launcher import LauncherError


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def port_or_zero(text: str) -> int:
    """An argparse type: a TCP port, or 0 for "pick a free one"."""
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 1..65535 (or 0: a free one), got {value}")
    return value


# Kubernetes object names (RFC 1123): a namespace is a DNS label, a PVC a DNS subdomain.
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_LABEL_RE = re.compile(rf"^{_LABEL}$")
DNS_SUBDOMAIN_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


def namespace_name(text: str) -> str:
    """An argparse type: a Kubernetes namespace (kubectl would refuse it only after the config work)."""
    if len(text) > 63 or not DNS_LABEL_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Kubernetes namespace: lower-case letters, digits "
                                         "and '-', starting and ending with a letter or digit, at most 63")
    return text


def claim_name(text: str) -> str:
    """An argparse type: a PersistentVolumeClaim name (a DNS subdomain)."""
    if len(text) > 253 or not DNS_SUBDOMAIN_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a PersistentVolumeClaim name: lower-case letters, "
                                         "digits, '-' and '.', starting and ending with a letter or digit, "
                                         "at most 253")
    return text


def load_for_nodes(items: Sequence[str], node_counts: Sequence[int], procs: int,
                   first_overrides: Sequence[str] = (), nodes_flag: str = "--nnodes") -> DictConfig:
    """The resolved config, checked for ``n x procs`` processes for every n in ``node_counts``.

    ``first_overrides`` go before the user's, so that an explicit override still wins.
    """
    yamls, overrides = split_items(items)
    overrides = [*first_overrides, *overrides]
    cfg = None
    for nodes in node_counts:
        try:
            cfg = _load(yamls, overrides, nodes * procs)
        except ConfigError as e:
            if len(node_counts) == 1:
                raise
            raise ConfigError(f"with {nodes} node(s) x {procs} process(es) = {nodes * procs} "
                              f"(allowed by {nodes_flag} {node_counts[0]}:{node_counts[-1]}): {e}") from None
    assert cfg is not None
    if len(node_counts) > 1:
        refuse_resharding(cfg, nodes_flag)
    return cfg


def _load(yamls: Sequence[str], overrides: Sequence[str], world_size: int) -> DictConfig:
    try:
        return config.load(yamls, overrides, world_size=world_size)
    except yaml.YAMLError as e:  # OmegaConf parses each override's value as YAML
        bad = next((o for o in overrides if _yaml_error(o.partition("=")[2])), "?")
        raise ConfigError(f"override {bad!r} is not valid YAML: {str(e).splitlines()[0]}; quote the value, "
                          "e.g. key='\"text\"'") from None


def _yaml_error(value: str) -> bool:
    try:
        yaml.safe_load(value)
        return False
    except yaml.YAMLError:
        return True


def refuse_resharding(cfg: DictConfig, nodes_flag: str) -> None:
    """ZeRO 1/2 optimizer shards are per rank and cannot be re-split over another world size;
    the trainer would refuse the snapshot after the first node change, so refuse now."""
    if cfg.engine == "deepspeed" and cfg.deepspeed.zero_stage > 0:
        raise LauncherError(f"an elastic node range ({nodes_flag}) changes the world size, which DeepSpeed "
                            f"ZeRO {cfg.deepspeed.zero_stage} cannot resume on (its optimizer shards are per "
                            "rank); use engine=ddp, or deepspeed.zero_stage=0, or a fixed node count")

"""`sagan-launch`: start sagan-dist training locally (torchrun, DeepSpeed) or on Kubernetes.

``local`` and ``deepspeed`` build a launcher command line and replace this process with it;
``k8s`` renders manifests (launcher/manifests.py) and applies them with kubectl (launcher/kube.py).
"""

from typing import Sequence


class LauncherError(RuntimeError):
    """A launch cannot proceed; the message names the problem and what to do about it."""


def split_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """CONFIG files and key=value overrides, in any order: sagan_dist.train.split_args's rule,
    repeated here so that the launcher does not import torch to read its command line."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]

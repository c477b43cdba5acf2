"""`sagan-launch`: start sagan-dist training locally (torchrun, DeepSpeed) or on Kubernetes.

``local`` and ``deepspeed`` build a launcher command line and replace this process with it;
``k8s`` renders manifests (launcher/manifests.py) and applies them with kubectl (launcher/kube.py).
"""

class LauncherError(RuntimeError):
    """A launch cannot proceed; the message names the problem and what to do about it."""


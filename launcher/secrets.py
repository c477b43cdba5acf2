"""Tracking credentials and the launcher: where they may travel, and their printable form.

Credentials reach the trainers only through channels nobody prints: on Kubernetes the Secret the
pods read with secretKeyRef (k8s/platform: sagan-mlflow-credentials); over DeepSpeed's pdsh path
MLflow's own credentials file on each host (~/.mlflow/credentials), because the runner writes
every exported ``MLFLOW_*`` variable and every train item into the command line it logs and hands
each host's shell. A URI or variable that carries one is refused on those paths, naming it in its
redacted form; whatever the launcher prints or renders is redacted as well.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from launcher import LauncherError

# MLflow's variables whose value is a secret; MLFLOW_TRACKING_URI is checked for user:password@ and tokens.
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
CREDENTIALS_FILE_HINT = ("~/.mlflow/credentials on the hosts (mode 0600; '[mlflow]' then "
                         "'mlflow_tracking_username = USER' and 'mlflow_tracking_password = PASSWORD'), "
                         "which MLflow reads itself")


def redact(text: str) -> str:
    """``text`` with the passwords and secret query values of every URL in it replaced."""
    if "://" not in text:
        return text
    # Imported here: the sagan_dist.tracking package imports torch, which only a URL needs.
    from sagan_dist.tracking.uri import redact_uri

    return redact_uri(text)


def has_credentials(uri: str) -> bool:
    return redact(uri) != uri


def refuse_uri_credentials(uri: str, name: str, instead: str) -> None:
    """LauncherError if ``uri`` (the value of ``name``) carries credentials; ``instead``: where they go."""
    if has_credentials(uri):
        raise LauncherError(f"{name}={redact(uri)} carries credentials, which would be printed and stored "
                            f"in plain text; give the URI without them and put them in {instead}")


def refuse_logged_items(items: Sequence[str]) -> None:
    """DeepSpeed's runner logs its command line, train items included, on every path."""
    for item in items:
        if has_credentials(item):
            hint = (CREDENTIALS_FILE_HINT if item.startswith("tracking.") else
                    "the file of the tool that uses them (e.g. ~/.netrc for curl) on the hosts")
            raise LauncherError(f"{redact(item)} carries credentials, but DeepSpeed's runner prints its command "
                                f"line; give it without them and put them in {hint}")


def refuse_pdsh_secrets(tracking_uri: str, env: Mapping[str, str] = os.environ) -> None:
    """DeepSpeed's pdsh path writes MLFLOW_* variables into each host's command line (and its log):
    no credentials may be among them (tracking.uri may also come from a YAML)."""
    why = "over pdsh DeepSpeed's runner writes it into every host's command line and its log"
    for var in SECRET_VARIABLES:
        if env.get(var):
            raise LauncherError(f"{var} is set, but {why}; unset it and put the credentials in "
                                f"{CREDENTIALS_FILE_HINT}")
    for name, uri in (("MLFLOW_TRACKING_URI", env.get("MLFLOW_TRACKING_URI", "")), ("tracking.uri", tracking_uri)):
        if has_credentials(uri):
            raise LauncherError(f"{name}={redact(uri)} carries credentials, but {why}; give the URI without "
                                f"them and put them in {CREDENTIALS_FILE_HINT}")


def redact_items(items: Sequence[str]) -> list[str]:
    return [redact(i) for i in items]

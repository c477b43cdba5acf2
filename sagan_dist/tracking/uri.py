"""Which tracking server, and how to name it without giving its secrets away.

A tracking URI may carry credentials (``http://user:password@host``, ``...?token=...``). The real
URI lives only in the memory of the process that uses it, derived at start from tracking.uri or
``$MLFLOW_TRACKING_URI``; whatever is written or logged (state.json, config.yaml, params, train.log,
stdout) gets `redact_uri`'s form. Credentials in an http(s) URI are handed to MLflow through its
own ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` variables and the client is given the
URI without them, so that MLflow's own messages (``View run ... at <host>``, ``API request to <url>
failed``) cannot show them either.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from omegaconf import DictConfig

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default tracking store
REDACTED = "REDACTED"
# The courier is the only code that talks to the server. MLflow's own default (7 retries with
# exponential back-off, 120 s timeout) would only delay noticing an outage and make `close` wait;
# our retry loop replaces it. Values the user exported win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

# A URL inside any text: scheme, then everything up to white space or a quote.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
# Query parameters whose value is a secret (tokens, passwords, signed-URL signatures, keys).
_SECRET_PARAM = re.compile(r"token|secret|passw|pwd|key|sig|credential|auth", re.IGNORECASE)


def tracking_uri(cfg: DictConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else MLflow's default ``sqlite:///mlflow.db``.

    A relative SQLite path is made absolute, so that `sagan-dist sync` run from another directory
    reaches the same database.
    """
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def redact_uri(uri: str) -> str:
    """``uri`` (or any text holding URLs) with passwords and secret query values replaced.

    Scheme, user name, host, port and path stay, so the message still says where it went:
    ``http://alice:pw@host:5000/x?token=t&a=1`` -> ``http://alice:REDACTED@host:5000/x?token=REDACTED&a=1``.
    A user part without a password (``https://TOKEN@host``) is often a token itself, so it goes too.
    """
    return _URL.sub(lambda m: _redact_one(m.group(0)), uri)


def _redact_one(url: str) -> str:
    scheme, rest = url.split("://", 1)
    end = min([i for i in (rest.find("?"), rest.find("#")) if i >= 0], default=len(rest))
    head, tail = rest[:end], rest[end:]
    # The authority ends at the first "/", unless a password holds an unescaped "/" before "@":
    # then the last "@" still ends the user part (what a parser would make of it is moot, the
    # point is that no secret is shown).
    at = head.rfind("@")
    if at >= 0:
        user, colon, _ = head[:at].partition(":")
        head = (f"{user}:{REDACTED}" if colon else REDACTED) + head[at:]
    if tail.startswith("?"):
        query, hash_, fragment = tail[1:].partition("#")
        tail = "?" + "&".join(_redact_param(p) for p in query.split("&")) + hash_ + fragment
    return f"{scheme}://{head}{tail}"


def _redact_param(pair: str) -> str:
    name, eq, _ = pair.partition("=")
    return f"{name}={REDACTED}" if eq and _SECRET_PARAM.search(name) else pair


def redacted_config(container: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a config container (``OmegaConf.to_container``) with tracking.uri redacted:
    the form to print, save or log."""
    out = copy.deepcopy(container)
    tracking = out.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):
        tracking["uri"] = redact_uri(tracking["uri"])
    return out


def client_uri(uri: str) -> str:
    """The URI to give MlflowClient: an http(s) URI's ``user:password@`` moves into MLflow's
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (those of the URI win: they are the more
    specific), so that no message of MLflow's can print it."""
    match = re.match(r"(https?://)([^/?#]*)@(.*)", uri, re.IGNORECASE | re.DOTALL)
    if match is None:
        return uri
    user, colon, password = match.group(2).partition(":")
    if REDACTED in (user, password):
        # A URI from a saved config (a snapshot's, for `evaluate --mlflow`): its secret is gone,
        # the environment has to supply it.
        log.warning("the tracking URI %s had its credentials redacted when it was saved; MLflow uses "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead", uri)
    else:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
        if colon:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return match.group(1) + match.group(3)


def set_http_defaults() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


"""How each kind of journal record is sent to MLflow.

A sender gets the MLflow client, the journal and run id, and a batch of records of one kind
(several only for metrics). It raises `Rejected` (or lets MLflow's own refusal through) for a
record that can never be delivered; any other error means "not now, try again".

Params and tags share one sender. MLflow refuses a whole log_batch for one bad key, so keys are
made valid first (characters MLflow does not accept become ``_``, empty or ``.``/``..`` path parts
go), values are cut to MLflow's limits, each change named in a warning; and if the server still
refuses a batch (say a param whose value changed across a resume), its items are sent one by one,
and only those refused are kept in rejected.jsonl.
"""
from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any, Callable

from sagan_dist.tracking.journal import Journal

log = logging.getLogger(__name__)

MAX_BATCH_ITEMS = 100  # MLflow's log_batch limit for params and tags
MAX_KEY_LENGTH = 250
MAX_VALUE_LENGTH = {"params": 6000, "tags": 8000}
# Errors where the server understood the request and refused it: re-sending cannot help.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow: slashes, word characters, . - space :


class Rejected(Exception):
    """A record that can never be delivered (e.g. its file was deleted before upload)."""


def is_refusal(error: BaseException) -> bool:
    return isinstance(error, Rejected) or getattr(error, "error_code", None) in PERMANENT_ERRORS


def valid_key(key: str) -> str:
    """A param or tag key MLflow accepts, as close to ``key`` as can be ("" if none is)."""
    key = _INVALID_KEY_CHARS.sub("_", key)
    # MLflow also wants a normalised relative path: no empty, "." or ".." parts.
    parts = ["__" if p == ".." else p for p in key.split("/") if p not in ("", ".")]
    key = "/".join(parts)
    if len(key) > MAX_KEY_LENGTH or posixpath.normpath(key) != key:
        return ""
    return key


def valid_items(kind: str, items: dict[str, str]) -> dict[str, str]:
    """``items`` with each key made valid and each value cut to length; warns for each change."""
    limit = MAX_VALUE_LENGTH[kind]
    out: dict[str, str] = {}
    for key, value in items.items():
        new = valid_key(key)
        if not new or new in items and new != key or new in out:
            log.warning("MLflow %s: dropped %r (not a key MLflow accepts, and no valid form of it is free)",
                        kind, key)
            continue
        if new != key:
            log.warning("MLflow %s: %r logged as %r (MLflow does not accept that key)", kind, key, new)
        if len(value) > limit:
            log.warning("MLflow %s: the value of %r cut to MLflow's %d characters", kind, key, limit)
        out[new] = value[:limit]
    return out


def send_metrics(client: Any, journal: Journal, run_id: str, batch: list[dict[str, Any]]) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(k, v, r["t"], r["step"]) for r in batch for k, v in r["metrics"].items()]
    client.log_batch(run_id, metrics=metrics, synchronous=True)


def send_items(client: Any, journal: Journal, run_id: str, batch: list[dict[str, Any]]) -> None:
    """A params or tags record: in chunks of MLflow's batch limit; a refused chunk item by item."""
    record = batch[0]
    kind = record["kind"]
    items = list(valid_items(kind, record[kind]).items())
    for i in range(0, len(items), MAX_BATCH_ITEMS):
        chunk = items[i:i + MAX_BATCH_ITEMS]
        try:
            _log_items(client, run_id, kind, chunk)
        except Exception as e:
            if not is_refusal(e):
                raise
            for key, value in chunk:
                _send_item(client, journal, run_id, record, key, value)


def _send_item(client: Any, journal: Journal, run_id: str, record: dict[str, Any], key: str,
               value: str) -> None:
    kind = record["kind"]
    try:
        _log_items(client, run_id, kind, [(key, value)])
    except Exception as e:
        if not is_refusal(e):
            raise
        log.warning("MLflow refused %s %r", kind[:-1], key)
        journal.reject({**record, kind: {key: value}}, e)


def _log_items(client: Any, run_id: str, kind: str, items: list[tuple[str, str]]) -> None:
    from mlflow.entities import Param, RunTag

    if kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in items], synchronous=True)
    else:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items], synchronous=True)


def _existing(path_str: str) -> Path:
    path = Path(path_str)
    if not path.exists():
        raise Rejected(f"{path} no longer exists (deleted before it could be uploaded, e.g. by "
                       "checkpoint rotation)")
    return path


def send_artifact(client: Any, journal: Journal, run_id: str, batch: list[dict[str, Any]]) -> None:
    record = batch[0]
    path = _existing(record["path"])
    if path.is_dir():
        client.log_artifacts(run_id, str(path), record["artifact_path"])
    else:
        client.log_artifact(run_id, str(path), record["artifact_path"])


def send_image(client: Any, journal: Journal, run_id: str, batch: list[dict[str, Any]]) -> None:
    """An image twice: as ``<key>/<file>`` (fixed name, easy to fetch) and as MLflow's stepped
    image (the UI's image slider), whose file name has a random part."""
    from PIL import Image

    record = batch[0]
    path = _existing(record["path"])
    client.log_artifact(run_id, str(path), record["key"])
    if journal.state["attempt"] == record["seq"] and _stepped_image_exists(client, run_id, record):
        return
    journal.mark_attempt(record["seq"])
    with Image.open(path) as image:
        image.load()
        client.log_image(run_id, image, key=record["key"], step=record["step"],
                         timestamp=record["t"], synchronous=True)


def _stepped_image_exists(client: Any, run_id: str, record: dict[str, Any]) -> bool:
    """Whether an earlier, interrupted attempt completed: MLflow names stepped images
    ``images/<key, / as ~>+step+<step>+timestamp+<t>+<uuid>[+compressed].<ext>``, the thumbnail last."""
    prefix = f"images/{record['key'].replace('/', '~')}+step+{record['step']}+timestamp+{record['t']}+"
    return any(a.path.startswith(prefix) and a.path.endswith("+compressed.webp")
               for a in client.list_artifacts(run_id, "images"))


def send_status(client: Any, journal: Journal, run_id: str, batch: list[dict[str, Any]]) -> None:
    record = batch[0]
    if record["status"] == "RUNNING":  # a resumed run continues
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, record["status"], end_time=record["t"])


SENDERS: dict[str, Callable[[Any, Journal, str, list[dict[str, Any]]], None]] = {
    "metrics": send_metrics, "params": send_items, "tags": send_items,
    "artifact": send_artifact, "image": send_image, "status": send_status,
}

"""The training loop's view of MLflow: `Tracker`, and what it says about a run (params, tags).

Every call journals first and returns; the courier delivers in the background (see the package
docstring for the guarantees).
"""
from __future__ import annotations

import atexit
import getpass
import importlib.metadata
import logging
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from sagan_dist import fsio
from sagan_dist.dist import DistInfo
from sagan_dist.fsio import UnsafeFileError
from sagan_dist.tracking.delivery import Courier
from sagan_dist.tracking.journal import JOURNAL_DIR, PENDING, Journal, read_state
from sagan_dist.tracking.senders import valid_key
from sagan_dist.tracking.system_metrics import SystemMetrics
from sagan_dist.tracking.uri import redact_uri, redacted_config, set_http_defaults, tracking_uri

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr_d": "0.0004", ...}."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def metric_key(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_-./`` and space); slashes group in the UI."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def image_key(key: str) -> str:
    """An image key MLflow accepts both as a stepped image's key and as an artifact directory."""
    valid = valid_key(metric_key(key))
    if not valid:
        raise ValueError(f"image key {key!r}: no valid MLflow key can be made of it (use letters, "
                         "digits, _-. and space, with / between parts)")
    return valid


class Tracker:
    """Journals params, metrics, images and artifacts of one MLflow run; a courier delivers them."""

    def __init__(self, journal: Optional[Journal] = None, courier: Optional[Courier] = None,
                 close_timeout_s: float = 0.0) -> None:
        self._journal, self._courier, self._close_timeout_s = journal, courier, close_timeout_s
        self._system: Optional[SystemMetrics] = None
        self._closed = journal is None
        self._told_repeats = False

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: Path, run_id: Optional[str], info: DistInfo,
             reopen: bool = True) -> "Tracker":
        """Rank 0: the journal of ``run_id`` (continued, and with ``reopen`` RUNNING again, as a
        resumed training is; ``reopen=False`` only adds records, e.g. an evaluation of one of its
        snapshots) or of a new run. Returns at once: the run is created and records are sent in
        the background. Other ranks and tracking.enabled=false get a tracker that records nothing."""
        if not (info.is_main and cfg.tracking.enabled):
            return cls()
        set_http_defaults()
        uri = tracking_uri(cfg)
        journal = _open_journal(cfg, Path(run_dir), run_id, uri, reopen)
        tracker = cls(journal, Courier(journal, uri, cfg.tracking.retry_s), cfg.tracking.close_timeout_s)
        log.info("MLflow tracking to %s (run %s), journaled in %s", redact_uri(uri), tracker.run_id,
                 journal.path)
        if cfg.tracking.system_metrics:
            tracker._system = SystemMetrics(journal, tracker._courier.notify,  # type: ignore[union-attr]
                                            cfg.tracking.system_metrics_interval_s)
        # A tracker nobody closed (an error before the loop, a caller that only adds records)
        # still gets its records delivered at exit, within the same bounded wait.
        atexit.register(tracker._close_at_exit)
        return tracker

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run id; ``pending-<key>`` until the run could be created; None if not tracking."""
        if self._journal is None:
            return None
        return self._journal.state["run_id"] or PENDING + self._journal.state["key"]

    @property
    def undelivered(self) -> int:
        """Records journaled but not yet accepted by the server."""
        return 0 if self._journal is None else self._journal.undelivered

    def log_config(self, cfg: DictConfig, info: DistInfo) -> None:
        """The resolved config (tracking.uri redacted) as flattened params and as config.yaml;
        run facts as tags."""
        if self._journal is None:
            return
        container = redacted_config(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        params = flatten(container)
        params["world_size"] = str(info.world_size)
        self._append("params", params=params)
        self._append("tags", tags=run_tags(cfg, info))
        yaml_path = self._journal.path / "config.yaml"
        fsio.atomic_write(yaml_path, OmegaConf.to_yaml(OmegaConf.create(container)))
        self._append("artifact", path=str(yaml_path.resolve()), artifact_path=None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._journal is None:
            return
        repeated = self._journal.append_metrics({metric_key(k): float(v) for k, v in metrics.items()},
                                                int(step))
        if repeated and not self._told_repeats:
            self._told_repeats = True
            log.info("step %d was already logged to MLflow run %s before this resume; a repeated "
                     "step keeps its first value", step, self.run_id)
        self._courier.notify()  # type: ignore[union-attr]

    def log_image(self, path: Path, step: int, key: str = "samples") -> None:
        """An image at a step: artifact ``<key>/<file name>`` and MLflow stepped image ``key``
        (e.g. ``attention/G.blocks.3``: slashes group, characters MLflow refuses become ``_``)."""
        if self._journal is None:
            return
        if self._journal.append_image(Path(path), image_key(key), int(step)):
            self._courier.notify()  # type: ignore[union-attr]

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """A file or a directory (e.g. a snapshot), uploaded under ``artifact_path``."""
        if self._journal is not None:
            self._append("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_model(self, generator: Any, cfg: DictConfig, step: int, kimg: float,
                  metric_keys: Sequence[str] = (), snapshot: Optional[Path] = None,
                  aliases: Sequence[str] = ()) -> None:
        """``generator`` (the EMA G of step ``step``) as the run's LoggedModel ``step-<N>``, linked
        to its metrics ``metric_keys`` (already logged at ``step``), and with ``aliases`` a version of
        tracking.registered_model. Files go to ``<run_dir>/models/step-<N>`` once; the upload, the
        links and the registration are journaled and delivered like metrics (tracking/models.py)."""
        if self._journal is None:
            return
        from sagan_dist.serving.files import config_hash, write_model_files
        from sagan_dist.tracking.models import model_name, registered_model

        name = model_name(step)
        path = self._journal.path.parent.parent / "models" / name
        container = redacted_config(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        if f"model:{step}" not in self._journal.last_steps:
            write_model_files(path, generator, container)
        digest = config_hash(container)
        tags = {"sagan.step": str(step), "sagan.kimg": f"{kimg:g}", "sagan.config_hash": digest}
        if snapshot is not None:
            tags["sagan.snapshot"] = str(Path(snapshot).resolve())
        params = {**flatten({"model": container["model"]}, ""), "data.num_classes": str(cfg.data.num_classes),
                  "step": str(step), "kimg": f"{kimg:g}", "config_hash": digest}
        self._append("model", step=step, name=name, path=str(path.resolve()), tags=tags, params=params,
                     metric_keys=[metric_key(k) for k in metric_keys], requirements=[_requirement()])
        target = registered_model(cfg.tracking.registered_model, self._journal.state["run_name"])
        if target and aliases:
            self._append("register", registered_model=target, step=step, name=name, aliases=list(aliases))

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for everything journaled to be delivered; True if it was."""
        deadline = time.monotonic() + timeout_s
        while self.undelivered and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.undelivered

    def close(self, status: Optional[str] = "FINISHED") -> None:
        """End the run with ``status`` (None: leave its status as it is, e.g. after an evaluation);
        waits at most tracking.close_timeout_s for delivery, the rest is left to `sagan-dist sync`."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"run status {status!r} is not one of {STATUSES} (or None)")
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        journal, courier = self._journal, self._courier
        assert journal is not None and courier is not None
        if self._system is not None:
            self._system.stop()
        if status is not None:
            self._append("status", status=status)
        ended = courier.stop(self._close_timeout_s)
        if journal.undelivered:
            log.warning("%d tracking record(s) were not delivered to %s; they are kept in %s. Deliver "
                        "them with `sagan-dist sync %s`", journal.undelivered, courier.shown_uri,
                        journal.records, journal.path.parent.parent)
        if ended:  # else the courier still works in this process and needs the lock until exit
            journal.close()

    def _close_at_exit(self) -> None:
        self.close(None)

    def _append(self, kind: str, **fields: Any) -> None:
        self._journal.append(kind, **fields)  # type: ignore[union-attr]
        self._courier.notify()  # type: ignore[union-attr]


def _open_journal(cfg: DictConfig, run_dir: Path, run_id: Optional[str], uri: str, reopen: bool) -> Journal:
    """The journal of a continued run (reopened as RUNNING if ``reopen``), or a new one."""
    t = cfg.tracking
    path = Journal.find(run_dir, run_id) if run_id else None
    journal, why = None, "is not in this run directory"
    if path is not None:
        try:
            journal = Journal.acquire(path)
            why = "is in use by another process"
        except (UnsafeFileError, OSError, ValueError) as e:  # a planted symlink, a torn state.json:
            why = f"cannot be used ({e})"  # leave that journal alone, tracking must not stop training
    if run_id and journal is None:
        new_run = " (and a new MLflow run)" if run_id.startswith(PENDING) else ""
        log.warning("the tracking journal of run %s %s; journaling to a new one%s", run_id, why, new_run)
    if journal is None:
        _report_leftovers(run_dir)
        known = run_id if run_id and not run_id.startswith(PENDING) else None
        journal = Journal.create(run_dir, uri, t.experiment, t.run_name or run_dir.resolve().name, known)
    journal.set_uri(uri)  # the URI last used is the one `sagan-dist sync` should use
    if run_id and reopen:
        journal.append("status", status="RUNNING")
    return journal


def _report_leftovers(run_dir: Path) -> None:
    """Journals of earlier runs in this directory that still hold undelivered records."""
    for state_path in sorted((run_dir / JOURNAL_DIR).glob("*/state.json")):
        try:
            state = read_state(state_path.parent)
            size = (state_path.parent / "records.jsonl").lstat().st_size
        except (OSError, ValueError, UnsafeFileError):
            continue
        if size > state["offset"]:
            log.warning("the tracking journal %s of an earlier run (MLflow run %s) holds undelivered "
                        "records; deliver them with `sagan-dist sync %s`", state_path.parent,
                        state["run_id"] or "not created yet", run_dir)


def run_tags(cfg: DictConfig, info: DistInfo) -> dict[str, str]:
    """Engine, world size, precision, versions and the git commit, as run tags."""
    tags = {"engine": cfg.engine, "world_size": str(info.world_size), "precision": cfg.train.precision,
            "device": info.device.type, "host": platform.node(), "mlflow.source.name": "sagan-dist train",
            "version.python": platform.python_version()}
    import torch  # its own version string names the build (+cu130, +cpu), the metadata's does not

    tags["version.torch"], tags["version.cuda"] = torch.__version__, str(torch.version.cuda)
    for package in ("deepspeed", "mlflow", "sagan-dist"):
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        pass
    tags.update(_git_tags())
    return tags


def _requirement() -> str:
    """The pip requirement a served model needs: this sagan-dist (unpinned when not installed)."""
    try:
        return f"sagan-dist=={importlib.metadata.version('sagan-dist')}"
    except importlib.metadata.PackageNotFoundError:
        return "sagan-dist"


def _git_tags() -> dict[str, str]:
    """The commit of the sagan_dist source, when it runs from a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if commit.returncode != 0:
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip(),
            "git.dirty": str(bool(dirty.stdout.strip())).lower()}

"""MLflow tracking on rank 0 that never stalls or kills training and loses nothing.

Every record (params, tags, metrics with their step and time, sample grids, artifacts, run status)
is first appended to a journal in the run directory, ``<run_dir>/tracking/<key>/records.jsonl``
(one JSON line each, fsynced), and one background thread, the courier, delivers the journal to
MLflow in order. The training thread only ever writes a local file, so a server that is down,
slow or black-holed delays delivery, never a step. While the server is unreachable the courier
says so once and retries every ``tracking.retry_s`` seconds; ``close`` waits at most
``tracking.close_timeout_s`` for the rest; ``sagan-dist sync RUN_DIR`` delivers what is left.

Replay is idempotent, so nothing is logged twice. ``state.json`` holds a cursor that moves past a
batch once MLflow accepted it; a batch re-sent after a crash between the two is harmless: metrics
keep their original timestamp (MLflow's SQL stores see the identical row), params, tags and
artifacts overwrite with the same content, a run is looked up by its journal tag before one is
created, and a stepped image is looked up before it is re-sent. A metric step that a resumed run
logs again (it restarted from a snapshot older than its last log) keeps its first value.

If the run cannot be created at start, it is created on first contact and its id is written to
``state.json``; until then ``Tracker.run_id`` is ``pending-<key>``, which resume and sync resolve
through the run directory. Other ranks, and ``tracking.enabled=false``, get a tracker that records
nothing, so the training loop calls it unconditionally.
"""
from __future__ import annotations

import argparse
import atexit
import fcntl
import getpass
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from sagan_dist.dist import DistInfo

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default tracking store
SPOOL_DIR = "tracking"  # under the run directory: one journal per MLflow run
PENDING = "pending-"  # prefix of a run id before the MLflow run could be created
SPOOL_TAG = "sagan.journal"  # run tag naming its journal, so that run creation is idempotent
# The courier is the only code that talks to the server. MLflow's own default (7 retries with
# exponential back-off, 120 s timeout) would only delay noticing an outage and make `close` wait;
# our retry loop replaces it. Values the user exported win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MAX_BATCH_METRICS, MAX_BATCH_ITEMS = 1000, 100  # MLflow's log_batch limits (metrics; params, tags)
MAX_PARAM_LENGTH = 6000
# Errors where the server understood the request and refused it: re-sending cannot help.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
STATUSES = ("FINISHED", "FAILED", "KILLED")


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- the journal ------------------------------------------------------------------------------
class Spool:
    """One MLflow run's journal: ``records.jsonl`` (append-only), ``state.json`` (run id, delivery
    cursor), ``rejected.jsonl`` (records the server refused), ``lock`` (held by the one process that
    appends or delivers: a training run, or `sagan-dist sync`)."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path, self.state = path, state
        self.records = path / "records.jsonl"
        self.next_seq, self.rejected = 0, 0
        self.last_steps: dict[str, int] = {}  # metric (or "image:<key>") -> last step journaled
        self._mutex = threading.RLock()  # training and system-metrics threads both append
        self._out: Any = None
        self._lock_file: Any = None

    @classmethod
    def create(cls, run_dir: Path, uri: str, experiment: str, run_name: str,
               run_id: Optional[str] = None) -> "Spool":
        key = uuid.uuid4().hex[:16]
        path = run_dir / SPOOL_DIR / key
        path.mkdir(parents=True)
        state = {"key": key, "uri": uri, "experiment": experiment, "run_name": run_name,
                 "start_time": _now_ms(), "run_id": run_id, "delivered": 0, "offset": 0, "attempt": None}
        spool = cls(path, state)
        spool._try_lock()
        spool.records.touch()
        spool.save_state()
        return spool

    @classmethod
    def acquire(cls, path: Path) -> Optional["Spool"]:
        """An existing journal, locked for this process; None while another process holds it."""
        spool = cls(path, json.loads((path / "state.json").read_text()))
        if not spool._try_lock():
            return None
        spool._scan()
        return spool

    @staticmethod
    def find(run_dir: Path, run_id: str) -> Optional[Path]:
        """The journal of an MLflow run id, or of a ``pending-<key>`` id, in a run directory."""
        root = run_dir / SPOOL_DIR
        if run_id.startswith(PENDING):
            path = root / run_id[len(PENDING):]
            return path if (path / "state.json").exists() else None
        found = [p.parent for p in root.glob("*/state.json") if json.loads(p.read_text()).get("run_id") == run_id]
        # Two journals of one run exist if records were added (an evaluation) while it trained;
        # the training's own journal is by far the longer one.
        return max(found, key=lambda p: (p / "records.jsonl").stat().st_size, default=None)

    def _try_lock(self) -> bool:
        f = open(self.path / "lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._lock_file = f
        return True

    def close(self) -> None:
        """Release the file handle and the lock (the process's exit would do the same)."""
        for f in (self._out, self._lock_file):
            if f is not None:
                f.close()
        self._out = self._lock_file = None

    def _scan(self) -> None:
        """Next sequence number and last step per metric; cut a last line torn by a crash."""
        good = 0
        with open(self.records, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                good += len(line)
                record = self._parse(line)
                if record is not None:
                    self._note(record)
        if good < self.records.stat().st_size:
            log.warning("%s: dropping a last record torn by a crash", self.records)
            os.truncate(self.records, good)

    def _parse(self, line: bytes) -> Optional[dict[str, Any]]:
        try:
            return json.loads(line)
        except ValueError:
            log.warning("%s: skipping an unreadable line: %r", self.records, line[:200])
            return None

    def _note(self, record: dict[str, Any]) -> None:
        self.next_seq = record["seq"] + 1
        if record["kind"] == "metrics":
            for key in record["metrics"]:
                self.last_steps[key] = max(self.last_steps.get(key, -1), record["step"])
        elif record["kind"] == "image":
            key = "image:" + record["key"]
            self.last_steps[key] = max(self.last_steps.get(key, -1), record["step"])

    # -- writing (training thread, system-metrics thread) --
    def append(self, kind: str, **fields: Any) -> None:
        """Journal one record durably (fsync): after this returns, a crash cannot lose it."""
        with self._mutex:
            record = {"seq": self.next_seq, "t": _now_ms(), "kind": kind, **fields}
            if self._out is None:
                self._out = open(self.records, "ab")
            self._out.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
            self._out.flush()
            os.fsync(self._out.fileno())
            self._note(record)

    def append_metrics(self, metrics: dict[str, float], step: int) -> int:
        """Journal the metrics not already journaled at this step or later; returns how many not."""
        with self._mutex:
            fresh = {k: v for k, v in metrics.items() if step > self.last_steps.get(k, -1)}
            if fresh:
                self.append("metrics", step=step, metrics=fresh)
        return len(metrics) - len(fresh)

    def append_image(self, path: Path, key: str, step: int) -> bool:
        with self._mutex:
            if step <= self.last_steps.get("image:" + key, -1):
                return False
            self.append("image", path=str(Path(path).resolve()), key=key, step=step)
        return True

    # -- delivering (courier thread, or sync) --
    @property
    def undelivered(self) -> int:
        return self.next_seq - self.state["delivered"]

    def pending(self) -> Iterator[tuple[dict[str, Any], int]]:
        """Undelivered records in order, each with the journal offset just after it."""
        offset = self.state["offset"]
        with open(self.records, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):  # being written right now: next pass
                    return
                offset += len(line)
                record = self._parse(line)
                if record is not None:
                    yield record, offset

    def mark_delivered(self, seq: int, offset: int) -> None:
        attempt = self.state["attempt"]
        self.state.update(delivered=seq + 1, offset=offset,
                          attempt=attempt if attempt is not None and attempt > seq else None)
        self.save_state()

    def mark_attempt(self, seq: int) -> None:
        """Remember that a record without a natural identity (a stepped image) is being sent."""
        self.state["attempt"] = seq
        self.save_state()

    def set_run_id(self, run_id: str) -> None:
        self.state["run_id"] = run_id
        self.save_state()

    def reject(self, record: dict[str, Any], error: BaseException) -> None:
        """Keep a record the server refused (next to the journal) and say so."""
        entry = {"record": record, "error": f"{type(error).__name__}: {error}"}
        with open(self.path / "rejected.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.rejected += 1
        if self.rejected <= 5:
            log.warning("MLflow refused a %s record (seq %d): %s; kept in %s", record["kind"],
                        record["seq"], entry["error"][:300], self.path / "rejected.jsonl")

    def save_state(self) -> None:
        _write_atomic(self.path / "state.json", json.dumps(self.state, indent=1))


# ---- delivery ---------------------------------------------------------------------------------
class _Rejected(Exception):
    """A record that can never be delivered (e.g. its file was deleted before upload)."""


def deliver(spool: Spool, client: Any) -> int:
    """Send a journal's undelivered records in order; returns how many were sent.

    Errors other than a refused record propagate, and the cursor stays before the first record
    not yet accepted, so the next attempt resumes exactly there.
    """
    run_id = _ensure_run(spool, client)
    sent = 0
    for batch, end in _batches(spool.pending()):
        _send_or_reject(client, spool, run_id, batch)
        spool.mark_delivered(batch[-1]["seq"], end)
        sent += len(batch)
    return sent


def _ensure_run(spool: Spool, client: Any) -> str:
    """The journal's MLflow run, created (with the run's real start time) on first contact."""
    run_id = spool.state["run_id"]
    if run_id:
        return run_id
    exp_id = _experiment_id(client, spool.state["experiment"])
    key = spool.state["key"]
    # A creation whose reply was lost (crash, timeout) must not leave a second run behind.
    found = client.search_runs([exp_id], filter_string=f"tags.`{SPOOL_TAG}` = '{key}'", max_results=1)
    run = found[0] if found else client.create_run(
        exp_id, start_time=spool.state["start_time"], tags={SPOOL_TAG: key},
        run_name=spool.state["run_name"] or None)
    spool.set_run_id(run.info.run_id)
    log.info("MLflow run %s in experiment %r at %s", run.info.run_id, spool.state["experiment"],
             spool.state["uri"])
    return run.info.run_id


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException as e:  # created meanwhile by another run
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise MlflowException(f"experiment {name!r} is deleted; restore it (mlflow experiments "
                              "restore) or set another tracking.experiment")
    return exp.experiment_id


def _batches(pending: Iterator[tuple[dict[str, Any], int]]) -> Iterator[tuple[list[dict[str, Any]], int]]:
    """Consecutive metric records share one log_batch call; any other record goes alone."""
    batch: list[dict[str, Any]] = []
    size, end = 0, 0
    for record, offset in pending:
        n = len(record["metrics"]) if record["kind"] == "metrics" else 0
        if batch and (not n or size + n > MAX_BATCH_METRICS):
            yield batch, end
            batch, size = [], 0
        batch.append(record)
        size, end = size + n, offset
        if not n:
            yield batch, end
            batch, size = [], 0
    if batch:
        yield batch, end


def _send_or_reject(client: Any, spool: Spool, run_id: str, batch: list[dict[str, Any]]) -> None:
    try:
        _SENDERS[batch[0]["kind"]](client, spool, run_id, batch)
    except Exception as e:
        if not (isinstance(e, _Rejected) or getattr(e, "error_code", None) in PERMANENT_ERRORS):
            raise
        if len(batch) == 1:
            spool.reject(batch[0], e)
            return
        for record in batch:  # find which record the server refused
            _send_or_reject(client, spool, run_id, [record])


def _send_metrics(client: Any, spool: Spool, run_id: str, batch: list[dict[str, Any]]) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(k, v, r["t"], r["step"]) for r in batch for k, v in r["metrics"].items()]
    client.log_batch(run_id, metrics=metrics, synchronous=True)


def _send_params(client: Any, spool: Spool, run_id: str, batch: list[dict[str, Any]]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in batch[0]["params"].items()]
    for i in range(0, len(items), MAX_BATCH_ITEMS):
        client.log_batch(run_id, params=items[i:i + MAX_BATCH_ITEMS], synchronous=True)


def _send_tags(client: Any, spool: Spool, run_id: str, batch: list[dict[str, Any]]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in batch[0]["tags"].items()]
    for i in range(0, len(items), MAX_BATCH_ITEMS):
        client.log_batch(run_id, tags=items[i:i + MAX_BATCH_ITEMS], synchronous=True)


def _existing(path_str: str) -> Path:
    path = Path(path_str)
    if not path.exists():
        raise _Rejected(f"{path} no longer exists (deleted before it could be uploaded, e.g. by "
                        "checkpoint rotation)")
    return path


def _send_artifact(client: Any, spool: Spool, run_id: str, batch: list[dict[str, Any]]) -> None:
    record = batch[0]
    path = _existing(record["path"])
    if path.is_dir():
        client.log_artifacts(run_id, str(path), record["artifact_path"])
    else:
        client.log_artifact(run_id, str(path), record["artifact_path"])


def _send_image(client: Any, spool: Spool, run_id: str, batch: list[dict[str, Any]]) -> None:
    """A sample grid twice: as ``<key>/<file>`` (fixed name, easy to fetch) and as MLflow's
    stepped image (the UI's image slider), whose file name has a random part."""
    from PIL import Image

    record = batch[0]
    path = _existing(record["path"])
    client.log_artifact(run_id, str(path), record["key"])
    if spool.state["attempt"] == record["seq"] and _stepped_image_exists(client, run_id, record):
        return
    spool.mark_attempt(record["seq"])
    with Image.open(path) as image:
        image.load()
        client.log_image(run_id, image, key=record["key"], step=record["step"],
                         timestamp=record["t"], synchronous=True)


def _stepped_image_exists(client: Any, run_id: str, record: dict[str, Any]) -> bool:
    """Whether an earlier, interrupted attempt completed: MLflow names stepped images
    ``images/<key>+step+<step>+timestamp+<t>+<uuid>[+compressed].<ext>``, the thumbnail last."""
    prefix = f"images/{record['key'].replace('/', '~')}+step+{record['step']}+timestamp+{record['t']}+"
    return any(a.path.startswith(prefix) and a.path.endswith("+compressed.webp")
               for a in client.list_artifacts(run_id, "images"))


def _send_status(client: Any, spool: Spool, run_id: str, batch: list[dict[str, Any]]) -> None:
    record = batch[0]
    if record["status"] == "RUNNING":  # a resumed run continues
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, record["status"], end_time=record["t"])


_SENDERS: dict[str, Callable[[Any, Spool, str, list[dict[str, Any]]], None]] = {
    "metrics": _send_metrics, "params": _send_params, "tags": _send_tags,
    "artifact": _send_artifact, "image": _send_image, "status": _send_status,
}


class _Courier:
    """The one thread that talks to the server: delivers the journal whenever records arrive, and
    every ``retry_s`` seconds while the server is unreachable."""

    def __init__(self, spool: Spool, uri: str, retry_s: float) -> None:
        self.spool, self.uri, self.retry_s = spool, uri, retry_s
        self.client: Any = None
        self.reachable = True
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-courier", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float) -> bool:
        """One last attempt, waited for at most ``timeout_s``; True if the thread has ended."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            stopping = self._stop.is_set()
            delivered = self._attempt()
            if stopping:
                return
            if delivered:
                self._wake.wait()
                self._wake.clear()
            else:
                self._stop.wait(self.retry_s)

    def _attempt(self) -> bool:
        from mlflow.tracking import MlflowClient

        try:
            self.client = self.client or MlflowClient(self.uri)
            sent = deliver(self.spool, self.client)
        except Exception as e:  # whatever went wrong only delays delivery: the journal keeps all
            if self.reachable:
                run_dir = self.spool.path.parent.parent
                log.warning(
                    "MLflow tracking at %s failed (%s: %s). Training continues; records are kept in "
                    "%s and sent when the server is back (retried every %gs), or deliver them later "
                    "with `sagan-dist sync %s`.", self.uri, type(e).__name__, str(e)[:300],
                    self.spool.records, self.retry_s, run_dir)
            self.reachable = False
            return False
        if not self.reachable:
            log.warning("MLflow tracking at %s is back: delivered %d journaled records", self.uri, sent)
        self.reachable = True
        return True


class _SystemMetrics:
    """CPU, memory, disk, network and GPU use as ``system/*`` metrics: sampled by MLflow's system
    monitors, journaled like any metric. (MLflow's SystemMetricsMonitor posts to the server itself
    and stops for good at its first failed request.) The step is seconds since the run began:
    unique and increasing across resumes, with no state to keep."""

    def __init__(self, spool: Spool, notify: Callable[[], None], interval_s: float) -> None:
        self.spool, self.notify, self.interval_s = spool, notify, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            monitors = _system_monitors()
            while not self._stop.wait(self.interval_s):
                metrics: dict[str, float] = {}
                for monitor in monitors:
                    monitor.collect_metrics()
                    metrics.update(monitor.aggregate_metrics())
                    monitor.clear_metrics()
                step = (_now_ms() - self.spool.state["start_time"]) // 1000
                self.spool.append_metrics({f"system/{k}": float(v) for k, v in metrics.items()}, step)
                self.notify()
        except Exception as e:  # a broken sampler must not take training down
            log.warning("system metrics stopped: %s: %s", type(e).__name__, e)


def _system_monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            return monitors + [gpu()]
        except Exception:  # no such GPU, or no driver library for it
            continue
    import torch

    if torch.cuda.is_available():
        log.warning("system metrics: no GPU metrics, MLflow's GPU monitor needs the nvidia-ml-py "
                    "package (pip install nvidia-ml-py)")
    return monitors


# ---- what the training loop uses --------------------------------------------------------------
class Tracker:
    """The training loop's view of MLflow. See the module docstring for the guarantees."""

    def __init__(self, spool: Optional[Spool] = None, courier: Optional[_Courier] = None,
                 close_timeout_s: float = 0.0) -> None:
        self._spool, self._courier, self._close_timeout_s = spool, courier, close_timeout_s
        self._system: Optional[_SystemMetrics] = None
        self._closed = spool is None
        self._told_repeats = False

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: Path, run_id: Optional[str], info: DistInfo,
             reopen: bool = True) -> "Tracker":
        """Rank 0: the journal of ``run_id`` (continued, and with ``reopen`` RUNNING again, as a
        resumed training is; ``reopen=False`` only adds records, e.g. an evaluation of one of its
        snapshots) or of a new run. Returns at once: the run is created and records are sent in
        the background."""
        if not (info.is_main and cfg.tracking.enabled):
            return cls()
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        uri = tracking_uri(cfg)
        spool = _open_spool(cfg, Path(run_dir), run_id, uri, reopen)
        tracker = cls(spool, _Courier(spool, uri, cfg.tracking.retry_s), cfg.tracking.close_timeout_s)
        log.info("MLflow tracking to %s (run %s), journaled in %s", uri, tracker.run_id, spool.path)
        if cfg.tracking.system_metrics:
            tracker._system = _SystemMetrics(spool, tracker._courier.notify,
                                             cfg.tracking.system_metrics_interval_s)
        # A tracker nobody closed (an error before the loop, a caller that only adds records)
        # still gets its records delivered at exit, within the same bounded wait.
        atexit.register(tracker._close_at_exit)
        return tracker

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run id; ``pending-<key>`` until the run could be created; None if not tracking."""
        if self._spool is None:
            return None
        return self._spool.state["run_id"] or PENDING + self._spool.state["key"]

    @property
    def undelivered(self) -> int:
        """Records journaled but not yet accepted by the server."""
        return 0 if self._spool is None else self._spool.undelivered

    def log_config(self, cfg: DictConfig, info: DistInfo) -> None:
        """The resolved config as flattened params and as config.yaml; run facts as tags."""
        if self._spool is None:
            return
        params = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        params["world_size"] = str(info.world_size)
        self._append("params", params={k: v[:MAX_PARAM_LENGTH] for k, v in params.items()})
        self._append("tags", tags=run_tags(cfg, info))
        yaml_path = self._spool.path / "config.yaml"
        _write_atomic(yaml_path, OmegaConf.to_yaml(cfg, resolve=True))
        self._append("artifact", path=str(yaml_path), artifact_path=None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._spool is None:
            return
        repeated = self._spool.append_metrics({metric_key(k): float(v) for k, v in metrics.items()},
                                              int(step))
        if repeated and not self._told_repeats:
            self._told_repeats = True
            log.info("step %d was already logged to MLflow run %s before this resume; a repeated "
                     "step keeps its first value", step, self.run_id)
        self._courier.notify()  # type: ignore[union-attr]

    def log_image(self, path: Path, step: int, key: str = "samples") -> None:
        """A sample grid at a step: artifact ``<key>/<file name>`` and MLflow stepped image ``key``."""
        if self._spool is not None and self._spool.append_image(Path(path), key, int(step)):
            self._courier.notify()  # type: ignore[union-attr]

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """A file or a directory (e.g. a snapshot), uploaded under ``artifact_path``."""
        if self._spool is not None:
            self._append("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

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
        spool, courier = self._spool, self._courier
        assert spool is not None and courier is not None
        if self._system is not None:
            self._system.stop()
        if status is not None:
            self._append("status", status=status)
        ended = courier.stop(self._close_timeout_s)
        if spool.undelivered:
            log.warning("%d tracking record(s) were not delivered to %s; they are kept in %s. Deliver "
                        "them with `sagan-dist sync %s`", spool.undelivered, courier.uri,
                        spool.records, spool.path.parent.parent)
        if ended:  # else the courier still works in this process and needs the lock until exit
            spool.close()

    def _close_at_exit(self) -> None:
        self.close(None)

    def _append(self, kind: str, **fields: Any) -> None:
        self._spool.append(kind, **fields)  # type: ignore[union-attr]
        self._courier.notify()  # type: ignore[union-attr]


def _open_spool(cfg: DictConfig, run_dir: Path, run_id: Optional[str], uri: str, reopen: bool) -> Spool:
    """The journal of a continued run (reopened as RUNNING if ``reopen``), or a new one."""
    t = cfg.tracking
    path = Spool.find(run_dir, run_id) if run_id else None
    spool = Spool.acquire(path) if path is not None else None
    if run_id and spool is None:
        why = "is in use by another process" if path is not None else "is not in this run directory"
        new_run = " (and a new MLflow run)" if run_id.startswith(PENDING) else ""
        log.warning("the tracking journal of run %s %s; journaling to a new one%s", run_id, why, new_run)
    if spool is None:
        _report_leftovers(run_dir)
        known = run_id if run_id and not run_id.startswith(PENDING) else None
        spool = Spool.create(run_dir, uri, t.experiment, t.run_name or run_dir.resolve().name, known)
    spool.state["uri"] = uri  # the URI last used is the one `sagan-dist sync` should use
    spool.save_state()
    if run_id and reopen:
        spool.append("status", status="RUNNING")
    return spool


def _report_leftovers(run_dir: Path) -> None:
    """Journals of earlier runs in this directory that still hold undelivered records."""
    for state_path in sorted((run_dir / SPOOL_DIR).glob("*/state.json")):
        state = json.loads(state_path.read_text())
        records = state_path.parent / "records.jsonl"
        if records.exists() and records.stat().st_size > state["offset"]:
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


# ---- `sagan-dist sync RUN_DIR` ----------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (train.run_dir)")
    parser.add_argument("--uri", default=None,
                        help="tracking URI to deliver to (default: the one the run last used, "
                             "recorded in RUN_DIR/tracking/*/state.json)")


def run(args: argparse.Namespace) -> int:
    """Deliver every journal in RUN_DIR; 0 when nothing is left undelivered, else 1."""
    logging.basicConfig(level=logging.WARNING, format="sagan-dist sync: %(message)s")
    if not args.run_dir.is_dir():
        print(f"sagan-dist sync: {args.run_dir} is not a directory")
        return 2
    paths = sorted(p.parent for p in (args.run_dir / SPOOL_DIR).glob("*/state.json"))
    if not paths:
        print(f"sagan-dist sync: no tracking journal in {args.run_dir / SPOOL_DIR}: nothing to do")
        return 0
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    results = [_sync_one(path, args.uri) for path in paths]
    return 0 if all(results) else 1


def _sync_one(path: Path, uri: Optional[str]) -> bool:
    """Deliver one journal; True when nothing of it is left undelivered."""
    from mlflow.tracking import MlflowClient

    spool = Spool.acquire(path)
    if spool is None:
        print(f"{path}: in use by a running training process, which delivers it itself; skipped")
        return False
    try:
        if uri:
            spool.state["uri"] = uri
        uri = spool.state["uri"]
        if not spool.undelivered:
            print(f"{path}: nothing to deliver (MLflow run {spool.state['run_id'] or 'not created'} at {uri})")
            return True
        try:
            sent = deliver(spool, MlflowClient(uri))
        except Exception as e:  # report and keep the records for the next sync
            print(f"{path}: MLflow at {uri} failed ({type(e).__name__}: {str(e)[:300]}); "
                  f"{spool.undelivered} record(s) left, run sync again when it is reachable")
            return False
        refused = f"; {spool.rejected} refused, kept in {path / 'rejected.jsonl'}" if spool.rejected else ""
        print(f"{path}: delivered {sent} record(s) to MLflow run {spool.state['run_id']} at {uri}{refused}")
        return True
    finally:
        spool.save_state()
        spool.close()

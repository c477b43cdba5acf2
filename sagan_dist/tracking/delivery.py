"""Delivering a journal to MLflow: in order, idempotently, by one courier thread (or by sync).

Replay is idempotent, so nothing is logged twice. ``state.json`` holds a cursor that moves past a
batch once MLflow accepted it; a batch re-sent after a crash between the two is harmless: metrics
keep their original timestamp (MLflow's SQL stores see the identical row), params, tags and
artifacts overwrite with the same content, a run is looked up by its journal tag before one is
created, and a stepped image is looked up before it is re-sent.

A run the server does not know (a resume against another server, or a store that was reset) is
not retried forever: delivery continues in a new run on that server, tagged
``sagan.previous_run_id``, which first gets the run's params, tags and config.yaml again.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

from sagan_dist.tracking.journal import Journal
from sagan_dist.tracking.models import MODEL_SENDERS
from sagan_dist.tracking.senders import SENDERS, is_refusal
from sagan_dist.tracking.uri import client_uri, redact_uri

log = logging.getLogger(__name__)

JOURNAL_TAG = "sagan.journal"  # run tag naming its journal, so that run creation is idempotent
PREVIOUS_RUN_TAG = "sagan.previous_run_id"  # on a run that continues one this server does not know
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
# MLflow 3's UI files an experiment without this tag under GenAI; ours is model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def deliver(journal: Journal, client: Any, check_run: bool = True) -> int:
    """Send a journal's undelivered records in order; returns how many were sent.

    ``check_run``: first ask the server whether it knows the journal's run (on first contact, and
    after a failure: the server may be another one now). Errors other than a refused record
    propagate, and the cursor stays before the first record not yet accepted, so the next attempt
    resumes exactly there.
    """
    run_id = ensure_run(journal, client, check_run)
    if journal.state.get("resend_setup"):
        for record in list(journal.delivered_setup()):
            send_or_reject(client, journal, run_id, [record])
        journal.state["resend_setup"] = False
        journal.save_state()
    sent = 0
    for batch, end in _batches(journal.pending()):
        send_or_reject(client, journal, run_id, batch)
        journal.mark_delivered(batch[-1]["seq"], end)
        sent += len(batch)
    return sent


def ensure_run(journal: Journal, client: Any, check_run: bool = True) -> str:
    """The journal's MLflow run, created (with the run's real start time) on first contact."""
    run_id = journal.state["run_id"]
    if run_id and (not check_run or _run_exists(client, run_id)):
        return run_id
    if run_id:
        log.warning("MLflow at %s does not know run %s (another server, or its store was reset): "
                    "continuing in a new run there, tagged %s=%s, with the params and config again",
                    journal.state["uri"], run_id, PREVIOUS_RUN_TAG, run_id)
        journal.replace_run()
    exp_id = _experiment_id(client, journal.state["experiment"])
    key = journal.state["key"]
    # A creation whose reply was lost (crash, timeout) must not leave a second run behind.
    found = client.search_runs([exp_id], filter_string=f"tags.`{JOURNAL_TAG}` = '{key}'", max_results=1)
    tags = {JOURNAL_TAG: key}
    if journal.state.get("previous_run_ids"):
        tags[PREVIOUS_RUN_TAG] = journal.state["previous_run_ids"][-1]
    run = found[0] if found else client.create_run(
        exp_id, start_time=journal.state["start_time"], tags=tags, run_name=journal.state["run_name"] or None)
    journal.set_run_id(run.info.run_id)
    log.info("MLflow run %s in experiment %r at %s", run.info.run_id, journal.state["experiment"],
             journal.state["uri"])
    return run.info.run_id


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        except MlflowException as e:  # created meanwhile by another run
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise MlflowException(f"experiment {name!r} is deleted; restore it (mlflow experiments "
                              "restore) or set another tracking.experiment")
    if EXPERIMENT_KIND[0] not in exp.tags:  # a kind the user chose stays
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
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


def send_or_reject(client: Any, journal: Journal, run_id: str, batch: list[dict[str, Any]]) -> None:
    try:
        (SENDERS.get(batch[0]["kind"]) or MODEL_SENDERS[batch[0]["kind"]])(client, journal, run_id, batch)
    except Exception as e:
        if not is_refusal(e):
            raise
        if len(batch) == 1:
            journal.reject(batch[0], e)
            return
        for record in batch:  # find which record the server refused
            send_or_reject(client, journal, run_id, [record])


class Courier:
    """The one thread that talks to the server: delivers the journal whenever records arrive, and
    every ``retry_s`` seconds while the server is unreachable."""

    def __init__(self, journal: Journal, uri: str, retry_s: float) -> None:
        self.journal, self.uri, self.retry_s = journal, uri, retry_s
        self.shown_uri = redact_uri(uri)  # the form that may be logged
        self.client: Any = None
        self.reachable = True
        self._run_checked = False
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
            self.client = self.client or MlflowClient(client_uri(self.uri))
            sent = deliver(self.journal, self.client, check_run=not self._run_checked)
        except Exception as e:  # whatever went wrong only delays delivery: the journal keeps all
            self._run_checked = False  # the server that comes back may be another one
            if self.reachable:
                run_dir = self.journal.path.parent.parent
                log.warning(
                    "MLflow tracking at %s failed (%s: %s). Training continues; records are kept in "
                    "%s and sent when the server is back (retried every %gs), or deliver them later "
                    "with `sagan-dist sync %s`.", self.shown_uri, type(e).__name__,
                    redact_uri(str(e))[:300], self.journal.records, self.retry_s, run_dir)
            self.reachable = False
            return False
        self._run_checked = True
        if not self.reachable:
            log.warning("MLflow tracking at %s is back: delivered %d journaled records", self.shown_uri, sent)
        self.reachable = True
        return True

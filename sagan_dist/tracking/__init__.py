"""MLflow tracking on rank 0 that never stalls or kills training and loses nothing.

Every record (params, tags, metrics with their step and time, images, artifacts, run status) is
first appended to a journal in the run directory (`journal`), and one background thread, the
courier, delivers the journal to MLflow in order (`delivery`, `senders`). The training thread only
ever writes a local file, so a server that is down, slow or black-holed delays delivery, never a
step. While the server is unreachable the courier says so once and retries every
``tracking.retry_s`` seconds; ``close`` waits at most ``tracking.close_timeout_s`` for the rest;
``sagan-dist sync RUN_DIR`` (`sync`) delivers what is left. A metric step that a resumed run logs
again (it restarted from a snapshot older than its last log) keeps its first value.

Evaluated generators are journaled too (``model`` and ``register`` records, `models`): each a
LoggedModel of the run with its metrics linked, the final and best ones registry versions.

If the run cannot be created at start, it is created on first contact and its id is written to
the journal's state; until then ``Tracker.run_id`` is ``pending-<key>``, which resume and sync
resolve through the run directory. Other ranks, and ``tracking.enabled=false``, get a tracker that
records nothing, so the training loop calls it unconditionally.

Credentials in the tracking URI stay in memory: whatever is written or logged shows `redact_uri`'s
form (`uri`).
"""
from sagan_dist.tracking.delivery import JOURNAL_TAG, PREVIOUS_RUN_TAG, deliver
from sagan_dist.tracking.journal import JOURNAL_DIR, PENDING, Journal
from sagan_dist.tracking.tracker import Tracker, flatten, metric_key, run_tags
from sagan_dist.tracking.uri import DEFAULT_URI, redact_uri, redacted_config, tracking_uri

__all__ = ["DEFAULT_URI", "JOURNAL_DIR", "JOURNAL_TAG", "PENDING", "PREVIOUS_RUN_TAG", "Journal", "Tracker",
           "deliver", "flatten", "metric_key", "redact_uri", "redacted_config", "run_tags", "tracking_uri"]

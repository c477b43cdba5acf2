"""One MLflow run's journal in the run directory: every record, durably, before it is sent.

``<run_dir>/tracking/<key>/`` holds ``records.jsonl`` (append-only, one JSON record a line,
fsynced), ``state.json`` (run id, delivery cursor, redacted URI), ``rejected.jsonl`` (records the
server refused), ``config.yaml`` (the run's config, redacted) and ``lock`` (held by the one process
that appends or delivers: a training run, or `sagan-dist sync`). The run directory may be shared
storage, so no file here is opened through a symlink: appends and the lock use O_NOFOLLOW, and
state.json is replaced atomically (fsio), never written through a fixed temporary name.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from sagan_dist import fsio
from sagan_dist.fsio import UnsafeFileError
from sagan_dist.tracking.uri import redact_uri

log = logging.getLogger(__name__)

JOURNAL_DIR = "tracking"  # under the run directory: one journal per MLflow run
PENDING = "pending-"  # prefix of a run id before the MLflow run could be created


def now_ms() -> int:
    return int(time.time() * 1000)


def open_nofollow(path: Path, write: bool = False) -> IO[bytes]:
    """Open a journal file for reading (and writing) without following a symlink planted there."""
    try:
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link; refusing to read or write through "
                                  "it (remove it: the run directory should hold only what the run "
                                  "wrote)") from None
        raise
    return os.fdopen(fd, "r+b" if write else "rb")


def read_state(path: Path) -> dict[str, Any]:
    with open_nofollow(path / "state.json") as f:
        return json.loads(f.read())


class Journal:
    """The records of one MLflow run, and how far they have been delivered."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path, self.state = path, state
        self.records = path / "records.jsonl"
        self.next_seq, self.rejected = 0, 0
        self.last_steps: dict[str, int] = {}  # metric (or "image:<key>") -> last step journaled
        self._mutex = threading.RLock()  # training and system-metrics threads both append
        self._out: Optional[IO[bytes]] = None
        self._lock_file: Optional[IO[bytes]] = None

    @classmethod
    def create(cls, run_dir: Path, uri: str, experiment: str, run_name: str,
               run_id: Optional[str] = None) -> "Journal":
        """A new journal; ``uri`` is stored as `redact_uri` shows it (see `set_uri`)."""
        key = uuid.uuid4().hex[:16]
        path = run_dir / JOURNAL_DIR / key
        path.mkdir(parents=True)
        state = {"key": key, "uri": None, "uri_redacted": False, "experiment": experiment,
                 "run_name": run_name, "start_time": now_ms(), "run_id": run_id, "previous_run_ids": [],
                 "resend_setup": False, "delivered": 0, "offset": 0, "attempt": None}
        journal = cls(path, state)
        journal._try_lock()
        fsio.open_append(journal.records).close()
        journal.set_uri(uri)
        return journal

    @classmethod
    def acquire(cls, path: Path) -> Optional["Journal"]:
        """An existing journal, locked for this process; None while another process holds it.
        Raises UnsafeFileError (naming the file) if one of its files is a symlink."""
        journal = cls(path, read_state(path))
        if not journal._try_lock():
            return None
        try:
            journal._scan()
        except BaseException:
            journal.close()
            raise
        return journal

    @staticmethod
    def find(run_dir: Path, run_id: str) -> Optional[Path]:
        """The journal of an MLflow run id (or of a run it replaced, see `replace_run`), or of a
        ``pending-<key>`` id, in a run directory."""
        root = run_dir / JOURNAL_DIR
        if run_id.startswith(PENDING):
            path = root / run_id[len(PENDING):]
            return path if (path / "state.json").is_file() else None
        found = []
        for state_path in root.glob("*/state.json"):
            try:
                state = read_state(state_path.parent)
            except (OSError, ValueError, UnsafeFileError) as e:
                log.warning("skipping the tracking journal %s: %s", state_path.parent, e)
                continue
            if run_id == state.get("run_id") or run_id in state.get("previous_run_ids", ()):
                found.append(state_path.parent)
        # Two journals of one run exist if records were added (an evaluation) while it trained;
        # the training's own journal is by far the longer one.
        return max(found, key=lambda p: (p / "records.jsonl").lstat().st_size, default=None)

    def _try_lock(self) -> bool:
        f = fsio.open_append(self.path / "lock")
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
        with open_nofollow(self.records, write=True) as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                good += len(line)
                record = self._parse(line)
                if record is not None:
                    self._note(record)
            if good < os.fstat(f.fileno()).st_size:
                log.warning("%s: dropping a last record torn by a crash", self.records)
                f.truncate(good)

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
        elif record["kind"] == "model":  # its files are written once per step (see Tracker.log_model)
            self.last_steps[f"model:{record['step']}"] = record["step"]

    # -- writing (training thread, system-metrics thread) --
    def append(self, kind: str, **fields: Any) -> None:
        """Journal one record durably (fsync): after this returns, a crash cannot lose it."""
        with self._mutex:
            record = {"seq": self.next_seq, "t": now_ms(), "kind": kind, **fields}
            if self._out is None:
                self._out = fsio.open_append(self.records)
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
        yield from self._read(self.state["offset"], None)

    def delivered_setup(self) -> Iterator[dict[str, Any]]:
        """The delivered records that describe the run rather than its progress: params, tags and
        the config.yaml artifact (what a run continued on another server must have again)."""
        for record, _ in self._read(0, self.state["offset"]):
            if record["kind"] in ("params", "tags") or (
                    record["kind"] == "artifact" and Path(record["path"]).parent == self.path.resolve()):
                yield record

    def _read(self, offset: int, end: Optional[int]) -> Iterator[tuple[dict[str, Any], int]]:
        with open_nofollow(self.records) as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n") or (end is not None and offset >= end):
                    return  # (a line without its end is being written right now: next pass)
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

    def replace_run(self) -> None:
        """The server does not know this journal's run: the next delivery creates another one
        there and first sends the run's params, tags and config again."""
        self.state["previous_run_ids"] = [*self.state.get("previous_run_ids", []), self.state["run_id"]]
        self.state.update(run_id=None, resend_setup=True)
        self.save_state()

    def set_uri(self, uri: str) -> None:
        """Record the URI last used, as `redact_uri` shows it: `sagan-dist sync` uses it unless it
        lost a secret (``uri_redacted``)."""
        shown = redact_uri(uri)
        self.state.update(uri=shown, uri_redacted=shown != uri)
        self.save_state()

    def reject(self, record: dict[str, Any], error: BaseException) -> None:
        """Keep a record the server refused (next to the journal) and say so."""
        entry = {"record": record, "error": redact_uri(f"{type(error).__name__}: {error}")}
        rejected = self.path / "rejected.jsonl"
        try:
            with fsio.open_append(rejected, binary=False) as f:
                f.write(json.dumps(entry) + "\n")
        except (OSError, UnsafeFileError) as e:  # then the warning below is all that is left of it
            log.warning("could not keep a refused record in %s (%s): %s", rejected, e,
                        json.dumps(entry)[:2000])
        self.rejected += 1
        if self.rejected <= 5:
            log.warning("MLflow refused a %s record (seq %d): %s; kept in %s", record["kind"],
                        record["seq"], entry["error"][:300], rejected)

    def save_state(self) -> None:
        fsio.atomic_write(self.path / "state.json", json.dumps(self.state, indent=1))

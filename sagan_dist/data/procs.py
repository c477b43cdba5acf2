"""The processes a rank's reader starts -- DataLoader workers and ``pipe:`` commands -- and their end.

torchrun and the kubelet signal the trainer's whole process group. A worker that died of that
SIGTERM before the trainer stopped it made the trainer's next batch fail ("DataLoader worker ...
is killed by signal") instead of leading to a snapshot. So each worker (`init_worker`):

* ignores SIGTERM and SIGINT: the trainer decides when reading stops (`BatchStream.close`);
* gets SIGKILL when the trainer dies (``PR_SET_PDEATHSIG``), so it never outlives it;
* leads a process group of its own, which the ``pipe:`` commands it starts join: one
  ``killpg`` ends the worker and every command it runs, even one stalled in a read;
* runs one intra-op thread (OpenMP threads spinning in workers starve the trainer on small CPUs).

``pipe:`` commands read in the trainer itself (``data.workers=0``) run in a process group of their
own instead, so the trainer's SIGTERM does not cut a download, and `ShardOpener.close` can end a
stalled one (and what it started, e.g. ``sleep`` after ``cat``) with one ``killpg``.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Iterable, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import get_worker_info

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PIPE_OK_STATUS = (0, 141)  # 141: SIGPIPE, the reader closed a command that still had bytes to give
GRACE_S = 0.5  # how long close() lets idle workers exit on their own before SIGKILL


class ReaderClosed(BaseException):
    """The stream was closed while its reader was inside a read (a BaseException, so that
    webdataset's shard-error handlers, which catch Exception, let it through)."""


# ------------------------------------------------------------------------------ workers
def init_worker(trainer_pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (bind ``trainer_pid`` with functools.partial)."""
    obey_parent_only(trainer_pid)
    os.setpgid(0, 0)
    torch.set_num_threads(1)


def obey_parent_only(parent_pid: int) -> None:
    """In a child process: ignore SIGTERM/SIGINT (the parent, signalled with its whole process
    group, decides when the child stops) and get SIGKILL when the parent dies, so that the child
    never outlives it. Also make-shards' writer processes (shards.py)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in a child process")
    if os.getppid() != parent_pid:  # the parent died before prctl: no death signal would come
        os._exit(1)


def stop_workers(batches: Any) -> None:
    """Stop the workers of a DataLoader iterator promptly, whatever they are doing.

    DataLoader's own shutdown joins each worker for 5 s and then sends SIGTERM, which our workers
    ignore. Here: tell them to stop (idle ones exit), wait at most GRACE_S, SIGKILL each worker's
    process group (the worker and its pipe: commands), then let DataLoader release its queues.
    The attributes used are DataLoader internals; absent ones (another torch) are skipped.
    """
    workers = list(getattr(batches, "_workers", []))
    if not workers:
        return
    if getattr(batches, "_worker_pids_set", False):
        # Forget the pids first: torch's SIGCHLD handler would otherwise raise "DataLoader worker
        # is killed by signal" in the main thread at whatever line it is running.
        from torch.utils.data._utils import signal_handling
        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    with contextlib.suppress(Exception):
        batches._workers_done_event.set()
        for q in batches._index_queues:
            q.put(None)  # wakes a worker waiting for work; it sees the done event and exits
    deadline = time.monotonic() + GRACE_S
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        # Also for workers that exited: a command they started may still run in their group.
        kill_group(w.pid)
    for w in workers:
        w.join(2.0)
    with contextlib.suppress(Exception):
        batches._shutdown_workers()


def kill_group(pid: Optional[int]) -> None:
    """SIGKILL the process group led by ``pid`` (the process alone if it leads none)."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ shard streams
class _PipeStream:
    """The stdout of a ``pipe:`` command; at its end, a failed command is an error naming it."""

    def __init__(self, command: str, opener: "ShardOpener") -> None:
        self.command, self.opener = command, opener
        own_group = get_worker_info() is None  # in a worker: join the worker's group (see above)
        self.proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     bufsize=1 << 16, process_group=0 if own_group else None)
        self.own_group = own_group

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if self.opener.closed:
            raise ReaderClosed()
        if not data:
            status = self.proc.wait()
            if status not in PIPE_OK_STATUS and -status != signal.SIGPIPE:
                raise OSError(f"pipe:{self.command}: exit status {status}")
        return data

    def close(self) -> None:
        """End the command (and, in its own group, whatever it started) and reap it."""
        if self.proc.poll() is None:
            kill_group(self.proc.pid) if self.own_group else self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()


class ShardOpener:
    """Opens one reader's shards (webdataset's ``url_opener``, plus a way to stop a stalled one).

    A shard's stream is closed (its command ended) when the next shard is asked for; `close`
    ends every command this process runs and makes reads raise `ReaderClosed`.
    """

    def __init__(self) -> None:
        self.closed = False
        self._lock = threading.Lock()
        self._open: set[_PipeStream] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a worker process starts with none of the trainer's commands

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def streams(self, urls: Iterable[str], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        for url in urls:
            if self.closed:
                raise ReaderClosed()
            try:
                stream = self._open_url(url)
            except Exception as exn:
                exn.args = exn.args + (url,)
                if handler(exn):
                    continue
                raise
            try:
                yield {"url": url, "stream": stream}
            finally:
                self._close(stream)

    def _open_url(self, url: str) -> IO[bytes] | _PipeStream:
        if url.startswith("pipe:"):
            stream = _PipeStream(url[len("pipe:"):], self)
            with self._lock:
                if self.closed:
                    stream.close()
                    raise ReaderClosed()
                self._open.add(stream)
            return stream
        if url.startswith("file:"):
            url = url[len("file:"):]
        if "://" in url:
            return wds.gopen(url)  # http(s), sftp, ...: webdataset's openers
        return open(url, "rb")

    def _close(self, stream: Any) -> None:
        with self._lock:
            self._open.discard(stream)
        with contextlib.suppress(Exception):
            stream.close()

    def close(self) -> None:
        """End every command this process runs (called by the trainer thread; reads then raise)."""
        with self._lock:
            self.closed = True
            streams, self._open = list(self._open), set()
        for stream in streams:
            with contextlib.suppress(Exception):
                kill_group(stream.proc.pid) if stream.own_group else stream.proc.kill()

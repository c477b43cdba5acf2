"""A rank's batch stream: a DataLoader read ahead by a thread, waited for with a deadline.

The trainer asks `BatchStream.next_batch(stop)` for each micro-batch. A background thread keeps up
to PREFETCH batches ready (on the device, when one is given), so decoding and the host-to-device
copy overlap the step. Waiting happens in slices of at most WAIT_SLICE_S, so that

* a SIGTERM during a data stall still leads to a snapshot: ``stop()`` is polled and
  `StopRequested` raised;
* a stalled storage or ``pipe:`` command ends the run with `DataStallError` after
  ``data.stall_timeout_s`` instead of hanging every rank at the next collective.

``wait_s`` adds up the time the consumer spent waiting: the share of step time lost to data.
Batches come in the DataLoader's order, so the same arguments still give the same batches, and
`position()` says where the consumer stands (position.py): batches read ahead do not count.
"""
from __future__ import annotations

import functools
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from sagan_dist.data.position import StreamPosition
from sagan_dist.data.procs import ReaderClosed, ShardOpener, init_worker, stop_workers
from sagan_dist.errors import Reported

PREFETCH = 2  # batches read ahead by the thread (the DataLoader's workers read ahead too)
WAIT_SLICE_S = 0.2  # how often a waiting consumer checks stop() and the stall deadline
POLL_S = 1.0  # how often the thread, waiting on workers, checks whether the stream was closed


class StopRequested(Exception):
    """``stop()`` became true while `BatchStream.next_batch` was waiting for data."""


class DataStallError(RuntimeError, Reported):
    """No batch arrived for ``data.stall_timeout_s`` seconds."""


class _Failed:
    """What the thread hands over instead of a batch when the reader raised."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class BatchStream:
    """Infinite source of (images float32 (b, 3, R, R) in [-1, 1], labels int64 (b,)).

    ``skipped``: bad samples plus unreadable shards met so far on this rank (``bad_shards``: the
    latter alone). ``epoch_batches``: batches per rank in one epoch of ``data.epoch_samples`` (or
    the index's total), None when unknown. ``wait_s``: seconds spent waiting in `next_batch`.
    """

    def __init__(self, dataset: IterableDataset, opener: ShardOpener, *, pattern: str, rank: int,
                 seed: int, workers: int, epoch_batches: Optional[int], stall_timeout_s: float,
                 device: Optional[torch.device] = None, start: Optional[StreamPosition] = None) -> None:
        self.pattern, self.rank, self.epoch_batches = pattern, rank, epoch_batches
        self.stall_timeout_s, self.device = stall_timeout_s, device
        self.wait_s = 0.0
        self._opener = opener
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(init_worker, os.getpid()) if workers else None,
            timeout=POLL_S if workers else 0,  # lets the thread notice close() while workers stall
            # Its own generator: creating the workers must not draw from the global torch RNG.
            generator=torch.Generator().manual_seed(seed))
        self._batches: Optional[Iterator] = None
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._counts: dict[int, tuple[int, int]] = {}
        start = start or StreamPosition.at_pass(max(1, workers))
        self._next_reader, self._positions = start.next_reader, list(start.readers)

    @property
    def skipped(self) -> int:
        return sum(c[0] for c in self._counts.values())

    @property
    def bad_shards(self) -> int:
        return sum(c[1] for c in self._counts.values())

    def position(self) -> StreamPosition:
        """Where the consumer stands: after the last batch `next_batch` returned."""
        return StreamPosition(self._next_reader, tuple(self._positions))

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def next_batch(self, stop: Callable[[], bool] = lambda: False) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (on ``device`` if given); see the module docstring for the waiting."""
        if self._closed.is_set():
            raise RuntimeError(f"shards {self.pattern!r}: the batch stream of rank {self.rank} is closed")
        self._start()
        began = time.monotonic()
        try:
            item = self._wait(began, stop)
        finally:
            self.wait_s += time.monotonic() - began
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        images, labels, ready, counts = item
        if ready is not None:  # the side stream's copy: order the consumer's stream after it
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            images.record_stream(current)
            labels.record_stream(current)
        reader, skipped, bad_shards, epoch, drawn = (int(c) for c in counts)
        self._counts[reader] = (skipped, bad_shards)
        self._positions[reader] = (epoch, drawn)
        self._next_reader = (reader + 1) % len(self._positions)
        return images, labels

    def _wait(self, began: float, stop: Callable[[], bool]) -> Any:
        while True:
            left = self.stall_timeout_s - (time.monotonic() - began)
            try:
                return self._queue.get(timeout=max(0.0, min(WAIT_SLICE_S, left)))
            except queue.Empty:
                pass
            if stop():
                raise StopRequested(f"stop requested while rank {self.rank} waited for data")
            if time.monotonic() - began >= self.stall_timeout_s:
                self.close()
                raise DataStallError(
                    f"shards {self.pattern!r}: no batch for {self.stall_timeout_s:g} s on rank {self.rank} "
                    f"(data.stall_timeout_s = {self.stall_timeout_s:g}); the storage or a pipe: command "
                    f"stalls, or decoding is far slower than expected")

    def _start(self) -> None:
        if self._thread is not None:
            return
        # Workers are forked here, by the consumer's thread: their PR_SET_PDEATHSIG follows the
        # thread that forked them, and the trainer's main thread outlives the prefetch thread.
        self._batches = iter(self._loader)
        copy_stream = torch.cuda.Stream(self.device) if self._on_cuda() else None
        # The thread gets no reference to the stream: a stream the trainer drops is collected,
        # and __del__ stops its workers.
        self._thread = threading.Thread(
            target=_prefetch, args=(self._batches, self._queue, self._closed, self.device, copy_stream),
            name=f"prefetch-rank{self.rank}", daemon=True)
        self._thread.start()

    def _on_cuda(self) -> bool:
        return self.device is not None and torch.device(self.device).type == "cuda"

    def close(self) -> None:
        """Stop reading: workers and pipe: commands are killed, the thread ends. Idempotent."""
        self._closed.set()
        batches, self._batches = self._batches, None
        if batches is not None:
            stop_workers(batches)
        self._opener.close()  # pipe: commands run by this process (data.workers=0)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=POLL_S + 1.0)

    def __del__(self) -> None:
        # The trainer builds a new stream at every snapshot; the old one's workers must not linger.
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown: modules may be gone
            pass


def _prefetch(batches: Iterator, out: queue.Queue, closed: threading.Event, device: Any, copy_stream: Any) -> None:
    """The thread: DataLoader -> (device) -> ``out``, until closed or the reader fails."""
    if copy_stream is not None:
        # A new thread's current device is GPU 0: leaving `torch.cuda.stream(copy_stream)` would make
        # it current and open a CUDA context there (~0.5 GB on GPU 0 for every rank of the node).
        torch.cuda.set_device(copy_stream.device)
    try:
        while not closed.is_set():
            try:
                images, labels, counts = next(batches)
            except RuntimeError as e:
                if str(e).startswith("DataLoader timed out"):  # a POLL_S slice, not an error
                    continue
                raise
            _put(out, closed, (*_to_device(images, labels, device, copy_stream), counts))
    except ReaderClosed:
        pass
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
        if not closed.is_set():
            _put(out, closed, _Failed(e))


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: Any, copy_stream: Any) -> tuple:
    """Start the copy to the GPU on a side stream; the event marks its end (None: stays on CPU)."""
    if copy_stream is None:
        return images, labels, None
    with torch.cuda.stream(copy_stream):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(copy_stream)
    return images, labels, ready


def _put(out: queue.Queue, closed: threading.Event, item: Any) -> None:
    while not closed.is_set():
        try:
            out.put(item, timeout=WAIT_SLICE_S)
            return
        except queue.Full:
            continue

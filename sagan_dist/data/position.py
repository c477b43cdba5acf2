"""Where a rank's batch stream stands, so that a resumed run reads on exactly where it stopped.

A rank reads through ``readers`` readers (its DataLoader workers, or the training process when
``data.workers=0``), each going pass after pass through its shards (loader.py). A reader's
position is ``(pass, drawn)``: the samples it has drawn from that pass's shuffled sequence, bad
ones included, up to the last sample of the last batch the trainer consumed. A rank's position
adds which reader gives the next batch (the DataLoader takes batches from its workers in turn).

The trainer stores every rank's position in each snapshot (``state["data"]``, plain lists of
ints) and hands it back to the loader on resume; a reader started at ``(pass, drawn)`` reads that
pass's shards and drops its first ``drawn`` samples without decoding them.

On another world size or ``data.workers`` the readers own other shards, so positions cannot be
carried over: every reader starts at the beginning of the earliest pass still in progress.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPosition:
    """One rank's stream: the reader of the next batch, and each reader's (pass, drawn)."""

    next_reader: int
    readers: tuple[tuple[int, int], ...]

    @classmethod
    def at_pass(cls, readers: int, epoch: int = 0) -> "StreamPosition":
        return cls(0, ((epoch, 0),) * readers)

    def to_state(self) -> dict[str, Any]:
        return {"next": self.next_reader, "readers": [list(p) for p in self.readers]}


def parse_saved(saved: Any) -> Optional[dict[str, Any]]:
    """Check a snapshot's ``data`` entry (read from storage: data, validated); None if absent.

    Raises ValueError naming the key when it is malformed, so the snapshot counts as damaged.
    """
    if saved is None:
        return None
    try:
        world = saved["world_size"]
        ranks = [(_int(r["next"]), tuple((_int(e), _int(n)) for e, n in r["readers"])) for r in saved["ranks"]]
        ok = isinstance(world, int) and world == len(ranks) and all(0 <= k < len(p) for k, p in ranks)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("state.pt key 'data' (the data stream's position) is malformed")
    return {"world_size": world, "ranks": [StreamPosition(k, p) for k, p in ranks]}


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value


def resume_position(saved: Optional[dict[str, Any]], rank: int, world_size: int,
                    readers: int) -> Optional[StreamPosition]:
    """This rank's start: its saved position, or (another layout) the earliest pass in progress."""
    if saved is None:
        return None
    ranks: list[StreamPosition] = saved["ranks"]
    if saved["world_size"] == world_size and all(len(r.readers) == readers for r in ranks):
        return ranks[rank]
    epoch = min(e for r in ranks for e, _ in r.readers)
    if rank == 0:
        log.info("the snapshot's data position is for %d rank(s) x %d reader(s), this run has %d x %d: "
                 "every reader starts pass %d from its beginning", saved["world_size"], len(ranks[0].readers),
                 world_size, readers, epoch)
    return StreamPosition.at_pass(readers, epoch)

"""Logging set-up shared by every command: rank-aware console lines and the run's train.log.

train.log is opened append-only with O_NOFOLLOW (sagan_dist.fsio.open_append): a symlink planted
in the run directory is refused, never written through.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from sagan_dist import fsio
from sagan_dist.dist import DistInfo

FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def setup_logging(info: DistInfo, run_dir: Path | None = None) -> None:
    """INFO on rank 0 and WARNING elsewhere, to stdout; rank 0 also appends to RUN_DIR/train.log."""
    fmt = FORMAT.format(rank=info.rank)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format=fmt,
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    if info.is_main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.StreamHandler(fsio.open_append(run_dir / "train.log", binary=False))
        handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
        logging.getLogger().addHandler(handler)

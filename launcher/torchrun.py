"""torchrun, with a stop signal reported as a stop instead of a crash.

torchrun (torch.distributed.run) hands SIGTERM/SIGINT on to the trainers, which write a snapshot
and exit (sagan_dist/train.py), and then raises SignalException: a traceback and exit 1, which a
scheduler or a Kubernetes Job counts as a failure. ``python -m launcher.torchrun ARGS`` runs
torchrun's own main with the same ARGS and turns that one exception into one line (which snapshot
was written, how to resume) and the shell's code for the signal: 128 + 15 = 143, 128 + 2 = 130.
Every other outcome (success, a failed worker) is torchrun's, unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

TRAIN = ("--module", "sagan_dist.cli", "train")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    run = _run_config(argv)
    before = set(_snapshots(run[0])) if run else set()
    try:
        torchrun(argv)
    except SignalException as e:
        print(f"sagan-launch: {stop_report(e.sigval.name, run, before)}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


def stop_report(signal_name: str, run: Optional[tuple[Path, str]], before: set[Path]) -> str:
    """One line: the snapshot this stop wrote (if any) and how to resume from it."""
    if run is None:
        return f"stopped by {signal_name}; the trainers were asked to write a snapshot first (see train.log)"
    run_dir, resume = run
    new = [p for p in _snapshots(run_dir) if p not in before]
    again = ("run the same command again to resume from it" if resume == "auto" else
             f"resume from it with train.resume=auto (this run has train.resume={resume})")
    if new:
        return f"stopped by {signal_name}: wrote snapshot {new[-1]}; {again}"
    return (f"stopped by {signal_name} before this run wrote a snapshot (see {run_dir / 'train.log'}); "
            f"{again.replace('from it', 'from the latest one there, if any')}")


def _run_config(argv: Sequence[str]) -> Optional[tuple[Path, str]]:
    """train.run_dir and train.resume of the trainers' config; None if the command is not ours."""
    n = len(TRAIN)
    at = next((i for i in range(len(argv) - n + 1) if tuple(argv[i:i + n]) == TRAIN), None)
    if at is None:
        return None
    from sagan_dist.config import ConfigError, load_items

    try:
        cfg = load_items(argv[at + n:])
    except ConfigError:
        return None  # the trainers will say why; this only words the stop message
    return Path(cfg.train.run_dir), str(cfg.train.resume)


def _snapshots(run_dir: Path) -> list[Path]:
    from sagan_dist.checkpoint import list_checkpoints

    return list_checkpoints(run_dir)


if __name__ == "__main__":
    sys.exit(main())

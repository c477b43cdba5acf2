"""`sagan-dist sync RUN_DIR`: deliver what the journals of a run directory still hold.

The URI is ``--uri``, else the one the run last used (state.json), else ``$MLFLOW_TRACKING_URI``
when the stored one had a secret redacted out of it. Credentials are best passed as MLflow's
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD environment variables.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Optional

from sagan_dist.fsio import UnsafeFileError
from sagan_dist.tracking.delivery import deliver
from sagan_dist.tracking.journal import JOURNAL_DIR, Journal
from sagan_dist.tracking.uri import client_uri, redact_uri, set_http_defaults


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (train.run_dir)")
    parser.add_argument("--uri", default=None,
                        help="tracking URI to deliver to (default: the one the run last used, recorded "
                             "in RUN_DIR/tracking/*/state.json; if that one had credentials, which are "
                             "never stored, $MLFLOW_TRACKING_URI). Pass credentials as "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")


def run(args: argparse.Namespace) -> int:
    """Deliver every journal in RUN_DIR; 0 when nothing is left undelivered, else 1."""
    logging.basicConfig(level=logging.WARNING, format="sagan-dist sync: %(message)s")
    if not args.run_dir.is_dir():
        print(f"sagan-dist sync: {args.run_dir} is not a directory")
        return 2
    paths = sorted(p.parent for p in (args.run_dir / JOURNAL_DIR).glob("*/state.json"))
    if not paths:
        print(f"sagan-dist sync: no tracking journal in {args.run_dir / JOURNAL_DIR}: nothing to do")
        return 0
    set_http_defaults()
    results = [_sync_one(path, args.uri) for path in paths]
    return 0 if all(results) else 1


def _sync_one(path: Path, cli_uri: Optional[str]) -> bool:
    """Deliver one journal; True when nothing of it is left undelivered."""
    try:
        journal = Journal.acquire(path)
    except (UnsafeFileError, OSError, ValueError) as e:
        print(f"{path}: cannot be read ({e}); skipped")
        return False
    if journal is None:
        print(f"{path}: in use by a running training process, which delivers it itself; skipped")
        return False
    try:
        return _deliver(journal, path, cli_uri)
    finally:
        journal.close()


def _deliver(journal: Journal, path: Path, cli_uri: Optional[str]) -> bool:
    from mlflow.tracking import MlflowClient

    uri = _uri(journal, cli_uri)
    shown = redact_uri(uri) if uri else journal.state["uri"]
    if not journal.undelivered:
        run_id = journal.state["run_id"] or "not created"
        print(f"{path}: nothing to deliver (MLflow run {run_id} at {shown})")
        return True
    if uri is None:
        print(f"{path}: the run's tracking URI had credentials, which are never stored ({shown}); "
              "give the URI with --uri or MLFLOW_TRACKING_URI, and the credentials as "
              "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        return False
    journal.set_uri(uri)
    try:
        sent = deliver(journal, MlflowClient(client_uri(uri)))
    except Exception as e:  # report and keep the records for the next sync
        print(f"{path}: MLflow at {shown} failed ({type(e).__name__}: {redact_uri(str(e))[:300]}); "
              f"{journal.undelivered} record(s) left, run sync again when it is reachable")
        return False
    finally:
        journal.save_state()
    refused = f"; {journal.rejected} refused, kept in {path / 'rejected.jsonl'}" if journal.rejected else ""
    print(f"{path}: delivered {sent} record(s) to MLflow run {journal.state['run_id']} at {shown}{refused}")
    return True


def _uri(journal: Journal, cli_uri: Optional[str]) -> Optional[str]:
    """--uri, else the stored URI unless a secret was redacted out of it, else $MLFLOW_TRACKING_URI."""
    if cli_uri:
        return cli_uri
    if not journal.state.get("uri_redacted"):
        return journal.state["uri"]
    return os.environ.get("MLFLOW_TRACKING_URI") or None

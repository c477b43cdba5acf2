"""`sagan-dist evaluate CHECKPOINT [KEY=VALUE ...] [--classes 1,2] [--json F] [--mlflow]`.

Scores a snapshot's EMA generator on any number of processes, reports the training cost that
produced it (``gpu_hours``: processes x wall-clock hours, from the snapshot's ``process_seconds``)
and optionally logs both to the snapshot's MLflow run. The snapshot's stored config is data:
shards read through a command, the FID cache folder and the tracking URI come from the command
line only (checkpoint.stored_config).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sagan_dist import checkpoint, config, dist, fsio
from sagan_dist.dist import DistInfo
from sagan_dist.evaluation.evaluator import Evaluator
from sagan_dist.evaluation.weights import INCEPTION_FILE
from sagan_dist.models.sagan import Generator

log = logging.getLogger(__name__)
EVALUATE_OVERRIDES = ("eval.", "data.", "tracking.")


def config_with_overrides(saved: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """A snapshot's config with ``key=value`` overrides of eval.*, data.* and tracking.* keys.

    Validated for one process: training-only constraints (the batch split over ranks) must not stop
    an evaluation on another number of processes.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise config.ConfigError(f"override {bad[0]!r} is not of the form key=value")
    for o in overrides:
        key = o.split("=", 1)[0]
        if not key.startswith(EVALUATE_OVERRIDES) or key == "data.num_classes":
            raise config.ConfigError(f"override {o!r}: evaluate takes eval.*, data.* and tracking.* keys "
                                     "only; the generator (model.*, data.num_classes) is the checkpoint's")
    try:
        merged = OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise config.ConfigError(str(e).splitlines()[0]) from None
    return config.from_container(OmegaConf.to_container(merged), world_size=1)


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """``--classes 3,1,3`` -> [1, 3]; anything but class indices of the generator is a ConfigError."""
    if not text:
        return []
    try:
        classes = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise config.ConfigError(f"--classes {text!r}: expected comma-separated class indices, e.g. 0,3,7") from None
    wrong = [c for c in classes if not 0 <= c < num_classes]
    if not classes or wrong:
        raise config.ConfigError(f"--classes {text!r}: the generator has classes 0..{num_classes - 1}")
    return classes


def gpu_hours(state: dict[str, Any]) -> float | None:
    """Processes x wall-clock hours of training up to the snapshot; None for snapshots from before
    the trainer recorded ``process_seconds``."""
    seconds = state.get("process_seconds")
    return None if seconds is None else float(seconds) / 3600


def load_snapshot(path: str | Path, overrides: Sequence[str],
                  device: torch.device) -> tuple[Generator, DictConfig, dict[str, Any], Path]:
    """The EMA generator (as trained), the overridden config, the state and the snapshot path."""
    g, _, state, snapshot = checkpoint.load_generator(path, device)  # its config holds no command or write path
    cfg = config_with_overrides(state["config"], overrides)
    if cfg.data.source == "shards" and cfg.data.shards == checkpoint.SHARDS_NOT_STORED:
        raise config.ConfigError(f"the snapshot {snapshot} was trained on shards read through a command or URL, "
                                 "which is never taken from a stored config: pass data.shards=PATTERN")
    return g, cfg, state, snapshot


def snapshot_run_dir(snapshot: Path) -> Path:
    """``<run_dir>/checkpoints/step-N`` (or ``best``) -> ``<run_dir>``."""
    return snapshot.parent.parent if snapshot.parent.name == "checkpoints" else snapshot.parent


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a snapshot directory, its state.pt, or a run directory "
                                           "(then its newest valid snapshot)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="eval.*, data.* or tracking.* overrides, e.g. eval.num_samples=50000 "
                             "eval.metrics=[fid,prc] eval.inception_weights=/models/" + INCEPTION_FILE)
    parser.add_argument("--classes", default=None, metavar="C1,C2,...",
                        help="also report intra-class FID (fid_class/<c>) of these classes: eval.class_samples "
                             "generated images of each against the reference images of that class")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    parser.add_argument("--mlflow", action="store_true",
                        help="also log the metrics to the checkpoint's MLflow run, as evaluate/<metric>_n<samples>, "
                             "and evaluate/gpu_hours")


def run(args: argparse.Namespace) -> int:
    from sagan_dist.data import prepare_data
    from sagan_dist.logs import setup_logging

    with dist.process_group() as info:
        setup_logging(info)
        g, cfg, state, snapshot = load_snapshot(args.checkpoint, args.overrides, info.device)
        classes = parse_classes(args.classes, g.num_classes)
        run_dir = snapshot_run_dir(snapshot)
        shards = dist.broadcast_object(prepare_data(cfg, run_dir) if info.is_main else None)
        evaluator = Evaluator(cfg, info, shards, run_dir)
        metrics = evaluator(g, int(state["step"]), classes)
        if info.is_main:
            result = _result(evaluator, snapshot, state, info, metrics or {}, classes)
            _report(result, args.json)
            if args.mlflow:
                _log_to_mlflow(cfg, run_dir, state, info, metrics or {}, evaluator.last_num_samples, g, snapshot)
    return 0


def _result(evaluator: Evaluator, snapshot: Path, state: dict[str, Any], info: DistInfo,
            metrics: dict[str, float], classes: list[int]) -> dict[str, Any]:
    result = {"checkpoint": str(snapshot), "step": int(state["step"]), "processes": info.world_size,
              "gpu_hours": gpu_hours(state), "num_samples": evaluator.last_num_samples,
              "reference_samples": evaluator.reference_count,
              "reference": "computed" if evaluator.last_reference_computed else "cached",
              "cache": str(evaluator.cache_path), **metrics}
    if classes:
        result["class_samples"] = evaluator.cfg.eval.class_samples
        result.update({f"class_reference_samples/{c}": n for c, n in evaluator.last_class_counts.items()})
    return result


def _report(result: dict[str, Any], json_path: Path | None) -> None:
    def show(v: Any) -> str:
        return "unknown" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)

    print("\n".join(f"{k:>27}  {show(v)}" for k, v in result.items()))
    print(json.dumps(result))
    if json_path is not None:
        fsio.atomic_write(json_path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def _log_to_mlflow(cfg: DictConfig, run_dir: Path, state: dict[str, Any], info: DistInfo,
                   metrics: dict[str, float], num_samples: int, g: Generator, snapshot: Path) -> None:
    """Optional: the metrics go to the run that wrote the checkpoint; failures only warn."""
    run_id = state.get("tracking_run_id")
    if not run_id or not cfg.tracking.enabled:
        log.warning("--mlflow: the checkpoint has no MLflow run (tracking was off); not logged")
        return
    try:
        from sagan_dist.tracking import Tracker
    except ImportError as e:
        log.warning("--mlflow: tracking is not importable (%s); not logged", e)
        return
    # The run keeps its status (it may still be training); the sample count is in the name because
    # an evaluation with other settings is another metric than training's own "fid".
    values = {f"evaluate/{k}_n{num_samples}": v for k, v in metrics.items()}
    hours = gpu_hours(state)
    if hours is not None:  # beside the metrics, so MLflow can plot them against the cost
        values["evaluate/gpu_hours"] = hours
    tracker = Tracker.open(cfg, run_dir, run_id, info, reopen=False)
    tracker.log_metrics(values, int(state["step"]))
    # The snapshot's G as the run's model of that step (or the one training logged), metrics linked.
    tracker.log_model(g, cfg, int(state["step"]), int(state["images_seen"]) / 1000, list(values), snapshot)
    tracker.close(None)
    log.info("logged to MLflow run %s as evaluate/<metric>_n%d, linked to its model step-%08d", run_id,
             num_samples, int(state["step"]))

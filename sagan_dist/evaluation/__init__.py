"""Evaluation with torch-fidelity: IS / FID / KID / precision-recall every ``eval.every`` steps in
training, and `sagan-dist evaluate` (with intra-class FID, ``--classes``).

- `weights`: the Inception weights file (``eval.inception_weights``, else torch hub's cache),
  loaded with weights_only and handed to torch-fidelity's network in memory;
- `samples`: the generated images, the same latents on any number of processes;
- `reference`: the real images' features, cached by us as .npz (read without pickle);
- `metrics`: torch-fidelity's IS, KID and precision/recall, and FID (`frechet_distance`);
- `evaluator`: `Evaluator`, called by every rank, metrics on rank 0;
- `command`: the ``evaluate`` subcommand (``configure_parser`` / ``run``, re-exported here so the
  CLI's module path stays ``sagan_dist.evaluation``).

Nothing read from shared storage runs code: torch-fidelity never opens a file here (its own
loaders use ``torch.load(weights_only=False)``); it is given networks and features in memory.
"""
from __future__ import annotations

from sagan_dist.evaluation.command import (config_with_overrides, configure_parser, gpu_hours, load_snapshot,
                                           parse_classes, run, snapshot_run_dir)
from sagan_dist.evaluation.evaluator import EvaluationError, Evaluator
from sagan_dist.evaluation.metrics import RESULT_KEYS, class_fid, compute_metrics, extract, frechet_distance
from sagan_dist.evaluation.reference import (Reference, ReferenceImagesError, load_reference, read_reference_images,
                                             reference_cache_name, reference_count, reference_key, save_reference)
from sagan_dist.evaluation.samples import generate, sample_latents, share_indices
from sagan_dist.evaluation.weights import (FEATURE_EXTRACTOR, INCEPTION_FILE, INCEPTION_URL, InceptionV3,
                                           InceptionWeightsError, build_extractor, check_inception_weights,
                                           load_inception_state, resolve_inception_weights, state_digest)

__all__ = [
    "EvaluationError", "Evaluator", "FEATURE_EXTRACTOR", "INCEPTION_FILE", "INCEPTION_URL", "InceptionV3",
    "InceptionWeightsError", "RESULT_KEYS", "Reference", "ReferenceImagesError", "build_extractor",
    "check_inception_weights", "class_fid", "compute_metrics", "config_with_overrides", "configure_parser",
    "extract", "frechet_distance", "generate", "gpu_hours", "load_inception_state", "load_reference",
    "load_snapshot", "parse_classes", "read_reference_images", "reference_cache_name", "reference_count",
    "reference_key", "resolve_inception_weights", "run", "sample_latents", "save_reference", "share_indices",
    "snapshot_run_dir",
    "state_digest",
]

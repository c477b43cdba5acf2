"""`Evaluator`: IS / FID / KID / precision-recall of a generator, and FID per class, on all ranks.

All ranks generate (`samples.generate`); rank 0 extracts Inception features, fetches the reference
(`reference`: our .npz cache, or the shards on a miss) and computes the metrics while the other
ranks wait for its result. A failure on rank 0 is broadcast, so every rank raises rather than
waiting for ever.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from sagan_dist import dist
from sagan_dist.dist import DistInfo
from sagan_dist.evaluation import reference as ref
from sagan_dist.evaluation.metrics import class_fid, compute_metrics, extract
from sagan_dist.evaluation.samples import generate
from sagan_dist.evaluation.weights import POOL, InceptionWeightsError, build_extractor, resolve_inception_weights

log = logging.getLogger(__name__)
NEEDS_REFERENCE = ("fid", "kid", "prc")


class EvaluationError(RuntimeError):
    """An evaluation failed (on another rank, or for want of reference images)."""


class Evaluator:
    """Constructed and called by every rank (collective); the metrics come back on rank 0."""

    def __init__(self, cfg: DictConfig, info: DistInfo, shards: str, run_dir: Path) -> None:
        self.cfg, self.info, self.shards = cfg, info, shards
        self.cache_dir = Path(cfg.eval.cache_dir or Path(run_dir) / "fidelity-cache")
        self.last_num_samples, self.last_reference_computed = 0, False
        self.last_class_counts: dict[int, int] = {}  # class -> reference images of it, last call
        self.reference_reads = 0  # how many times the shards were read (the cache tests count on it)
        self._reference: ref.Reference | None = None
        error = None
        if info.is_main:
            try:
                self._setup_main(shards)
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
                error = err
        # The other ranks raise too, so that none goes on to train and waits for rank 0 for ever.
        failed = dist.broadcast_object((isinstance(error, InceptionWeightsError), str(error)) if error else None)
        if error is not None:
            raise error
        if failed is not None:
            raise (InceptionWeightsError if failed[0] else EvaluationError)(f"on rank 0: {failed[1]}")

    def _setup_main(self, shards: str) -> None:
        """Rank 0 alone computes the metrics: weights, reference and cache name are its business."""
        e = self.cfg.eval
        self.weights = resolve_inception_weights(e.inception_weights)
        self.extractor, digest = build_extractor(self.weights)  # stays on the CPU between evaluations
        self.reference_count = ref.reference_count(self.cfg, shards)
        self.reference_key = ref.reference_key(self.cfg, shards, self.reference_count, digest)
        self.cache_name = ref.reference_cache_name(self.reference_key)
        # KID compares random subsets of both sets; its estimate is unbiased at any subset size.
        self.kid_subset_size = min(e.kid_subset_size, e.num_samples, self.reference_count)
        if "kid" in e.metrics and self.kid_subset_size < e.kid_subset_size:
            log.info("KID subsets of %d samples (eval.kid_subset_size=%d is more than the samples)",
                     self.kid_subset_size, e.kid_subset_size)

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / f"{self.cache_name}.npz"

    def __call__(self, g_ema: torch.nn.Module, step: int, classes: Sequence[int] = ()) -> dict[str, float] | None:
        """The metrics on rank 0 (with ``fid_class/<c>`` for each of ``classes``), None elsewhere."""
        was_training = g_ema.training
        g_ema.eval()
        try:
            t0 = time.perf_counter()
            images = generate(g_ema, self.cfg, self.info)
            per_class = {c: generate(g_ema, self.cfg, self.info, self.cfg.eval.class_samples, c) for c in classes}
        finally:
            g_ema.train(was_training)
        metrics, error = None, None
        if images is not None:
            try:
                metrics = self.compute(images, per_class)
                self._log(metrics, step, time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
                error = err
        failed = dist.broadcast_object(f"{type(error).__name__}: {error}" if error else None)
        if error is not None:
            raise error
        if failed is not None:
            raise EvaluationError(f"evaluation at step {step} failed on rank 0: {failed}")
        return metrics

    def compute(self, images: torch.Tensor, per_class: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
        """Rank 0: the metrics of ``images`` (uint8), and FID of each class's images in ``per_class``."""
        e, device = self.cfg.eval, self.info.device
        self.last_reference_computed, self.last_class_counts = False, {}
        # On the device for the evaluation only: rank 0 holds no more memory than the others in training.
        self.extractor.to(device)
        try:
            generated = extract(self.extractor, images, e.batch_size, device)
            reference = self.reference() if per_class or any(m in NEEDS_REFERENCE for m in e.metrics) else None
            settings = {"isc_splits": e.isc_splits, "kid_subsets": e.kid_subsets,
                        "kid_subset_size": self.kid_subset_size}
            metrics = compute_metrics(list(e.metrics), generated, reference, settings, device)
            for c, class_images in (per_class or {}).items():
                pool = extract(self.extractor, class_images, e.batch_size, device)[POOL]
                metrics[f"fid_class/{c}"], self.last_class_counts[c] = class_fid(pool, reference, c)
        finally:
            self.extractor.cpu()
        self.last_num_samples = len(images)
        return metrics

    def reference(self) -> ref.Reference:
        """The real images' features: in memory, else from the cache, else computed and cached."""
        if self._reference is None:
            self._reference = ref.load_reference(self.cache_path, self.reference_key)
        if self._reference is None:
            self.reference_reads += 1
            self._reference = ref.compute_reference(self.cfg, self.shards, self.reference_count, self._pool_features)
            ref.save_reference(self.cache_path, self._reference, self.reference_key)
            self.last_reference_computed = True
        return self._reference

    def _pool_features(self, images: torch.Tensor) -> torch.Tensor:
        return extract(self.extractor, images, self.cfg.eval.batch_size, self.info.device)[POOL]

    def _log(self, metrics: dict[str, float], step: int, seconds: float) -> None:
        reference = "computed and cached" if self.last_reference_computed else "from the cache"
        values = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info("evaluation at step %d: %s  (%d samples, reference %s in %s, %.1fs)", step, values,
                 self.last_num_samples, reference, self.cache_path, seconds)

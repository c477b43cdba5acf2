"""IS / FID / KID with torch-fidelity: every ``eval.every`` steps in training, and `sagan-dist evaluate`.

Samples. Every rank generates its share of ``eval.num_samples`` with the EMA generator, batch by
batch, and the uint8 images are gathered on rank 0, which computes the metrics while the other
ranks wait for its result. The latents are one stream drawn from ``eval.seed`` over the global
sample index (labels: index modulo the number of classes, so the classes are evenly spread) and
rank r takes the indices r, r + W, r + 2W, ...: the shares differ, every evaluation of a run scores
the same z, and the images do not depend on the number of processes.

Reference. The real images come from the run's shards through `sagan_dist.data.build_loader` with
a center crop and no flip. Their Inception features and FID statistics live in torch-fidelity's
cache (``eval.cache_dir``, default ``<run_dir>/fidelity-cache``) under a name that hashes the shard
pattern, resolution, decode mode, count and the weights' SHA-256; the images are read only when
torch-fidelity misses that cache (`ReferenceImages` is lazy), so a cached reference costs nothing.

Metrics. torch-fidelity's feature extraction, caching, IS and KID; FID from its statistics by the
same formula, with symmetric eigensolvers instead of its general one (`frechet_distance`).

Offline clusters. The Inception weights are read from ``eval.inception_weights``; when unset, from
torch hub's cache, downloading them there if needed. When none of that works, `Evaluator` fails at
construction (before training starts) with an error naming the file, its URL and the config key.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import Dataset
from torch_fidelity import metric_fid, metric_isc, metric_kid
from torch_fidelity import utils as fidelity_utils
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from sagan_dist import checkpoint, config, dist
from sagan_dist.dist import DistInfo
from sagan_dist.models.sagan import Generator, build_models
from sagan_dist.sample import to_uint8, truncated_normal

log = logging.getLogger(__name__)

INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's default for IS, FID and KID
# torch-fidelity's result keys -> ours (the names the Trainer logs).
RESULT_KEYS = {"inception_score_mean": "isc", "inception_score_std": "isc_std",
               "frechet_inception_distance": "fid",
               "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std"}
DOWNLOAD_TIMEOUT_S = 60


class InceptionWeightsError(config.ConfigError):
    """The Inception weights are missing, cannot be downloaded, or are not the right network."""


class EvaluationError(RuntimeError):
    """An evaluation failed (on another rank, or for want of reference images)."""


# ---- Inception weights ----------------------------------------------------------------------
def _weights_help() -> str:
    return (f"torch-fidelity's Inception weights file {INCEPTION_FILE} (from {INCEPTION_URL}) is needed: "
            "download it on a machine with internet access, copy it to the cluster and set "
            f"eval.inception_weights=/path/to/{INCEPTION_FILE}")


def resolve_inception_weights(path: str, hub_dir: Path | None = None, url: str = INCEPTION_URL) -> Path:
    """The local weights file: ``path`` if set, else torch hub's copy, downloaded there if missing."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"eval.inception_weights={path!r}: no such file. {_weights_help()}")
        return p
    target = Path(hub_dir or torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if target.is_file():
        return target
    try:
        _download(url, target)
    except OSError as e:  # URLError, timeouts, refused connections, a read-only hub dir
        raise InceptionWeightsError(f"eval.inception_weights is not set, {target} does not exist and "
                                    f"downloading it failed ({type(e).__name__}: {e}). {_weights_help()} "
                                    f"(or put it at {target})") from None
    return target


def _download(url: str, target: Path) -> None:
    """Download to a temporary name in the target folder, then rename: never a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, target)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            try:
                shutil.copyfileobj(response, tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            except BaseException:
                os.unlink(tmp.name)
                raise
    os.replace(tmp.name, target)


def check_inception_weights(path: Path) -> None:
    """Build torch-fidelity's extractor from the file, exactly as the metrics will, or raise."""
    try:
        FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(path))
    except Exception as e:  # noqa: BLE001 - unpickling and load_state_dict fail in many ways
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise InceptionWeightsError(f"{path} is not a torch-fidelity Inception state dict ({type(e).__name__}: "
                                    f"{first}). {_weights_help()}") from None


def file_digest(path: Path) -> str:
    """SHA-256 of a file (its identity in the reference cache name)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---- generated samples ----------------------------------------------------------------------
def share_indices(n: int, world_size: int, rank: int) -> torch.Tensor:
    """Global sample indices of one rank: rank, rank + W, ...; every rank gets ceil(n / W) of them,
    so the last ones may be padding (>= n) that rank 0 drops after gathering."""
    per_rank = math.ceil(n / world_size)
    return torch.arange(per_rank) * world_size + rank


def sample_latents(n: int, padded: int, z_dim: int, num_classes: int, truncation: float,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z and labels by global index, the same on every rank and world size; rows n.. are padding."""
    z = truncated_normal((n, z_dim), truncation, torch.Generator().manual_seed(seed), torch.device("cpu"))
    return torch.cat([z, torch.zeros(padded - n, z_dim)]), torch.arange(padded) % num_classes


@torch.no_grad()
def generate(g: Generator, cfg: DictConfig, info: DistInfo) -> torch.Tensor | None:
    """``eval.num_samples`` uint8 images (N, 3, H, W) in global index order on rank 0, None elsewhere.

    Collective. Gathering batch by batch keeps only one batch per rank on the device.
    """
    e, n, world = cfg.eval, cfg.eval.num_samples, info.world_size
    shares = [share_indices(n, world, r) for r in range(world)]
    z_all, y_all = sample_latents(n, len(shares[0]) * world, g.z_dim, g.num_classes, e.truncation, e.seed)
    mine = shares[info.rank]
    out = torch.empty(n, 3, g.resolution, g.resolution, dtype=torch.uint8) if info.is_main else None
    for start in range(0, len(mine), e.batch_size):
        idx = mine[start:start + e.batch_size]
        images = to_uint8(g(z_all[idx].to(info.device), y_all[idx].to(info.device)))
        gathered = dist.all_gather_tensor(images.to(info.device)).cpu()
        if out is not None:
            where = torch.cat([s[start:start + e.batch_size] for s in shares])
            keep = where < n  # drop the padding
            out[where[keep]] = gathered[keep]
    return out


class ImageTensorDataset(Dataset):
    """uint8 images (N, 3, H, W) as the Dataset torch-fidelity takes."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ---- reference images -----------------------------------------------------------------------
def reference_config(cfg: DictConfig, shards: str) -> DictConfig:
    """The run's data settings for the reference: center crop, no flip, each image once per pass."""
    from sagan_dist.data.loader import shard_urls

    workers = min(cfg.data.workers, len(shard_urls(shards)))  # disjoint passes need a shard per reader
    return OmegaConf.merge(cfg, {"data": {"crop": "center", "flip": False, "resampled": False,
                                          "workers": workers}})


def reference_count(cfg: DictConfig, shards: str) -> int:
    """``eval.reference_samples``, capped at the shards' size when their index tells it: the first
    pass holds every image once, a second one would only repeat them."""
    from sagan_dist.data.loader import index_total, shard_urls

    total = index_total(shard_urls(shards))
    if total is not None and total < cfg.eval.reference_samples:
        log.warning("the shards hold %d images, fewer than eval.reference_samples=%d: the reference "
                    "uses all %d", total, cfg.eval.reference_samples, total)
        return total
    return cfg.eval.reference_samples


def read_reference_images(cfg: DictConfig, shards: str, count: int) -> torch.Tensor:
    """The first ``count`` images of one reader over all shards, as uint8 (count, 3, H, W)."""
    from sagan_dist.data import build_loader  # the data stack is only needed on a cache miss

    images: list[torch.Tensor] = []
    total = 0
    stream = build_loader(reference_config(cfg, shards), shards, 0, 1, cfg.eval.seed)
    try:
        for batch, _labels in stream:
            images.append(to_uint8(batch[: count - total]))
            total += len(images[-1])
            if total >= count:
                return torch.cat(images)
    finally:
        stream.close()
    raise EvaluationError(f"the shards {shards!r} ended after {total} of eval.reference_samples={count} images")


class ReferenceImages(Dataset):
    """The real images, read on first use only: torch-fidelity touches them on a cache miss only."""

    def __init__(self, cfg: DictConfig, shards: str, count: int) -> None:
        self.cfg, self.shards, self.count = cfg, shards, count
        self.images: torch.Tensor | None = None
        self.loads = 0  # how many times the shards were read (the cache tests count on it)

    def _materialise(self) -> torch.Tensor:
        if self.images is None:
            log.info("reading %d reference images from %s", self.count, self.shards)
            self.images = read_reference_images(self.cfg, self.shards, self.count)
            self.loads += 1
        return self.images

    def release(self) -> None:
        """Drop the images once torch-fidelity has cached their features."""
        self.images = None

    def __len__(self) -> int:
        return len(self._materialise())

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._materialise()[i]


def reference_key(cfg: DictConfig, shards: str, count: int, weights_digest: str) -> dict[str, Any]:
    """What the reference statistics depend on."""
    return {"shards": shards, "resolution": cfg.model.resolution, "decode": cfg.data.decode,
            "crop": "center", "flip": False, "count": count,
            "seed": cfg.eval.seed, "feature_extractor": FEATURE_EXTRACTOR,
            "weights_sha256": weights_digest}


def reference_cache_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"reference-{key['resolution']}px-{key['count']}-{digest}"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---- FID ------------------------------------------------------------------------------------
def frechet_distance(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID between features (n, d) and the reference's mean and covariance, exactly.

    ``tr sqrt(S1 S2)`` is the sum of the square roots of the eigenvalues of S1 S2. torch-fidelity
    finds them with a general (non-symmetric) eigensolver on the d x d product: 18 CPU-seconds at
    d = 2048 measured on a 2-core box, on rank 0 while every GPU waits. With S1 = A^T A (A: centred
    features / sqrt(n - 1)) they are also the eigenvalues of the symmetric A S2 A^T (n x n: tiny
    when n < d), or else of R S2 R with R = sqrt(S1) (d x d); symmetric eigensolvers are several
    times faster and stabler.
    """
    x = features.astype(np.float64)
    mu = x.mean(axis=0)
    a = (x - mu) / math.sqrt(len(x) - 1)
    if len(x) < x.shape[1]:
        m = a @ sigma_ref @ a.T
    else:
        w, v = np.linalg.eigh(a.T @ a)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = root @ sigma_ref @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum()
    diff = mu - mu_ref
    return float(diff @ diff + (a * a).sum() + np.trace(sigma_ref) - 2 * tr_covmean)


# ---- the evaluator --------------------------------------------------------------------------
class Evaluator:
    """IS / FID / KID of a generator; constructed and called by every rank (collective)."""

    def __init__(self, cfg: DictConfig, info: DistInfo, shards: str, run_dir: Path) -> None:
        self.cfg, self.info, e = cfg, info, cfg.eval
        self.cache_dir = Path(e.cache_dir or Path(run_dir) / "fidelity-cache")
        self.last_num_samples, self.last_reference_computed = 0, False
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
        check_inception_weights(self.weights)
        count = reference_count(self.cfg, shards)
        self.reference_key = reference_key(self.cfg, shards, count, file_digest(self.weights))
        self.cache_name = reference_cache_name(self.reference_key)
        self.reference = ReferenceImages(self.cfg, shards, count)
        # KID compares random subsets of both sets; its estimate is unbiased at any subset size.
        self.kid_subset_size = min(e.kid_subset_size, e.num_samples, count)
        if "kid" in e.metrics and self.kid_subset_size < e.kid_subset_size:
            log.info("KID subsets of %d samples (eval.kid_subset_size=%d is more than the samples)",
                     self.kid_subset_size, e.kid_subset_size)

    def __call__(self, g_ema: torch.nn.Module, step: int) -> dict[str, float] | None:
        """The metrics on rank 0, None on the other ranks (which wait for rank 0 to finish)."""
        was_training = g_ema.training
        g_ema.eval()
        try:
            t0 = time.perf_counter()
            images = generate(g_ema, self.cfg, self.info)
        finally:
            g_ema.train(was_training)
        metrics, error = None, None
        if images is not None:
            try:
                metrics = self.compute(images)
                self._log(metrics, step, time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
                error = err
        failed = dist.broadcast_object(f"{type(error).__name__}: {error}" if error else None)
        if error is not None:
            raise error
        if failed is not None:
            raise EvaluationError(f"evaluation at step {step} failed on rank 0: {failed}")
        return metrics

    def compute(self, images: torch.Tensor) -> dict[str, float]:
        """torch-fidelity on rank 0: generated ``images`` (uint8) against the cached reference.

        Its pieces rather than `calculate_metrics`, for one change: FID's matrix square root (see
        `frechet_distance`). Features, caching, IS and KID are torch-fidelity's own.
        """
        e, kw = self.cfg.eval, self._fidelity_kwargs(images)
        layers = {m: FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(m) for m in e.metrics}
        extractor = fidelity_utils.create_feature_extractor(FEATURE_EXTRACTOR, sorted(set(layers.values())), **kw)
        loads = self.reference.loads
        generated = fidelity_utils.extract_featuresdict_from_input_id_cached(1, extractor, **kw)  # never cached
        metrics: dict[str, float] = {}
        if "isc" in layers:
            metrics.update(metric_isc.isc_featuresdict_to_metric(generated, layers["isc"], **kw))
        if "fid" in layers:  # the reference's statistics, from the cache or from its (cached) features
            stats = metric_fid.fid_input_id_to_statistics_cached(2, extractor, layers["fid"], **kw)
            metrics["frechet_inception_distance"] = frechet_distance(
                generated[layers["fid"]].numpy(), stats["mu"], stats["sigma"])
        if "kid" in layers:
            reference = fidelity_utils.extract_featuresdict_from_input_id_cached(2, extractor, **kw)
            metrics.update(metric_kid.kid_featuresdict_to_metric(generated, reference, layers["kid"], **kw))
        self.last_num_samples = len(images)
        self.last_reference_computed = self.reference.loads > loads
        if self.last_reference_computed:
            _write_json(self.cache_dir / f"{self.cache_name}.json", self.reference_key)
            self.reference.release()
        return {RESULT_KEYS[k]: float(v) for k, v in metrics.items()}

    def _fidelity_kwargs(self, images: torch.Tensor) -> dict[str, Any]:
        e = self.cfg.eval
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return dict(input1=ImageTensorDataset(images), input2=self.reference, input2_cache_name=self.cache_name,
                    cache_root=str(self.cache_dir), feature_extractor_weights_path=str(self.weights),
                    isc_splits=e.isc_splits, kid_subsets=e.kid_subsets, kid_subset_size=self.kid_subset_size,
                    batch_size=e.batch_size, cuda=self.info.device.type == "cuda",
                    save_cpu_ram=True,  # no DataLoader workers: the images are in memory already
                    verbose=False)

    def _log(self, metrics: dict[str, float], step: int, seconds: float) -> None:
        reference = "computed and cached" if self.last_reference_computed else "from the cache"
        values = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info("evaluation at step %d: %s  (%d samples, reference %s in %s, %.1fs)", step, values,
                 self.last_num_samples, reference, self.cache_dir / self.cache_name, seconds)


# ---- `sagan-dist evaluate` ------------------------------------------------------------------
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


def load_snapshot(path: str | Path, overrides: Sequence[str],
                  device: torch.device) -> tuple[Generator, DictConfig, dict[str, Any], Path]:
    """The EMA generator (as trained), the overridden config, the state and the snapshot path."""
    snapshot = checkpoint.resolve_snapshot(path)
    state = checkpoint.load_state(snapshot)
    g, _ = build_models(config.from_container(state["config"], world_size=1))
    g.load_state_dict(state["G_ema"])
    return g.to(device).eval(), config_with_overrides(state["config"], overrides), state, snapshot


def snapshot_run_dir(snapshot: Path) -> Path:
    """``<run_dir>/checkpoints/step-N`` (or ``best``) -> ``<run_dir>``."""
    return snapshot.parent.parent if snapshot.parent.name == "checkpoints" else snapshot.parent


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a snapshot directory, its state.pt, or a run directory "
                                           "(then its newest valid snapshot)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="eval.*, data.* or tracking.* overrides, e.g. eval.num_samples=50000 "
                             "eval.inception_weights=/models/" + INCEPTION_FILE)
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    parser.add_argument("--mlflow", action="store_true", help="also log the metrics to the checkpoint's "
                                                               "MLflow run, as evaluate/<metric>_n<samples>")


def run(args: argparse.Namespace) -> int:
    from sagan_dist.data import prepare_data
    from sagan_dist.train import setup_logging

    with dist.process_group() as info:
        setup_logging(info)
        g, cfg, state, snapshot = load_snapshot(args.checkpoint, args.overrides, info.device)
        run_dir = snapshot_run_dir(snapshot)
        shards = dist.broadcast_object(prepare_data(cfg, run_dir) if info.is_main else None)
        evaluator = Evaluator(cfg, info, shards, run_dir)
        metrics = evaluator(g, int(state["step"]))
        if info.is_main:
            result = {"checkpoint": str(snapshot), "step": int(state["step"]), "processes": info.world_size,
                      "num_samples": evaluator.last_num_samples,
                      "reference_samples": evaluator.reference.count,
                      "reference": "computed" if evaluator.last_reference_computed else "cached",
                      "cache": str(evaluator.cache_dir / evaluator.cache_name), **(metrics or {})}
            _report(result, args.json)
            if args.mlflow:
                _log_to_mlflow(cfg, run_dir, state, info, metrics or {}, evaluator.last_num_samples)
    return 0


def _report(result: dict[str, Any], json_path: Path | None) -> None:
    print("\n".join(f"{k:>17}  {v:.6g}" if isinstance(v, float) else f"{k:>17}  {v}" for k, v in result.items()))
    print(json.dumps(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(json_path, result)


def _log_to_mlflow(cfg: DictConfig, run_dir: Path, state: dict[str, Any], info: DistInfo,
                   metrics: dict[str, float], num_samples: int) -> None:
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
    tracker = Tracker.open(cfg, run_dir, run_id, info, reopen=False)
    tracker.log_metrics({f"evaluate/{k}_n{num_samples}": v for k, v in metrics.items()}, int(state["step"]))
    tracker.close(None)
    log.info("logged to MLflow run %s as evaluate/<metric>_n%d", run_id, num_samples)

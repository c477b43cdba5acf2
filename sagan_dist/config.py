"""Typed configuration: the one place defaults live.

YAML files and ``key=value`` overrides are merged onto the dataclass schema below (an OmegaConf
structured config), so unknown keys and wrong types are rejected by OmegaConf itself; `validate`
then checks the values that a type cannot express (a resolution that is not a power of two, an
attention resolution the model does not have, ...). Everything fails before any work starts, with
one message that names the key and the allowed values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sagan_dist.config_base import RESOLUTIONS, ConfigError, feature_resolutions
from sagan_dist.config_checks import validate as _check_values

__all__ = ["RESOLUTIONS", "ConfigError", "feature_resolutions"]  # re-exported: imported from here elsewhere

# configs/ is installed as the package sagan_dist.configs; in a source tree it sits beside it.
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = _HERE / "configs" if (_HERE / "configs").is_dir() else _HERE.parent / "configs"


@dataclass
class ModelConfig:
    resolution: int = 32
    z_dim: int = 128
    g_channels: int = 64  # base width; each block uses a multiple of it (see models/sagan.py)
    d_channels: int = 64
    # Feature-map resolutions that get a self-attention block; null -> the model's default (the
    # paper's placement at 128 px, see models/sagan.py), [] -> no attention.
    g_attention: Optional[list[int]] = None
    d_attention: Optional[list[int]] = None
    attention_pool: bool = False  # max-pool keys/values 2x2 as the official TF code does
    init: str = "ortho"  # ortho | normal | xavier
    sync_bn: bool = False  # SyncBatchNorm for G's conditional BN (DDP only)
    # Activation checkpointing of attention blocks at feature maps >= this resolution; 0 = off.
    checkpoint_from: int = 0
    checkpoint_blocks: bool = False  # also checkpoint residual blocks at those resolutions
    # NHWC memory format for G and D (sagan_dist/acceleration.py); null = auto: on for CUDA (tensor
    # cores read NHWC without transposes), off on CPU.
    channels_last: Optional[bool] = None


@dataclass
class DataConfig:
    # "digits": scikit-learn's handwritten digits written as shards into <run_dir>/data (no download)
    # "shards": read `shards` (brace notation; local paths, or pipe: commands for s3:// / gs://)
    source: str = "digits"
    shards: str = ""
    num_classes: int = 10
    # false: each pass, ranks and their workers read disjoint shards (needs shards >= readers);
    # true: each reader draws shards with replacement (any shard count, no exact passes)
    resampled: bool = False
    shuffle_buffer: int = 2000  # samples (still encoded) each reader shuffles among
    workers: int = 0  # DataLoader worker processes per rank
    decode: str = "draft"  # draft (PIL JPEG draft mode: DCT-scaled decode) | full
    crop: str = "center"  # center (largest square) | random (random square, see min_scale)
    min_scale: float = 0.35  # smallest area of the random square crop, as a share of the largest
    flip: bool = False  # random horizontal flip; off for digits (a mirrored 3 is no digit)
    epoch_samples: int = 0  # samples per epoch over all ranks (stream.epoch_batches); 0 = index
    max_warnings: int = 20  # warnings per rank about bad samples before they are only counted
    max_bad_fraction: float = 0.2  # a reader fails once this share of >= 500 samples is bad
    # a rank that gets no batch for this long stops with DataStallError (stalled storage or pipe:)
    stall_timeout_s: float = 600.0
    max_pixels: int = 64_000_000  # images larger than this (read from the header) are skipped


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    steps: int = 600  # generator steps; each is preceded by n_critic discriminator steps
    batch_size: int = 64  # global batch per D or G step, over all ranks and accumulation rounds
    accumulation: int = 1
    n_critic: int = 1
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    loss: str = "hinge"  # hinge | nonsat
    # EMA of G, as stylegan2-ada: half-life of ema_kimg thousand images, ramped up with the images
    # seen (half-life <= images_seen * ema_rampup) so that a short run's EMA keeps up.
    ema_start: int = 0
    ema_kimg: float = 10.0
    ema_rampup: float = 0.05
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # torch.compile of G and D (sagan_dist/acceleration.py); null = auto: on for CUDA, off on CPU
    # (no gain measured there, and the first step pays the C++ compilation).
    compile: Optional[bool] = None
    grad_clip: float = 0.0  # 0 = off
    max_bad_steps: int = 20  # consecutive non-finite updates before the run stops (checked at log steps)
    # Deadline of every collective: a lost peer or a partitioned network ends every rank with a
    # message after this long (instead of torch's 30 minutes), so the job's restart policy can act.
    # Must exceed the longest rank-0-only pause (a snapshot write, an evaluation's metrics).
    collective_timeout_s: float = 600.0
    seed: int = 0
    log_every: int = 20
    sample_every: int = 100
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    truncation: float = 0.0  # for sample grids; 0 = off
    sample_classes: int = 10  # rows of the sample grid (classes); 0 = all
    samples_per_class: int = 8
    # Query points per self-attention layer of G whose attention maps are drawn (RUN_DIR/attention,
    # MLflow images attention/<layer>) with the sample grids, plus the layers' mean attention
    # distance and entropy as metrics; 0 = off.
    attention_points: int = 4


@dataclass
class DeepSpeedConfig:
    # 0: plain data parallel; 1: optimizer states sharded over ranks; 2: gradients as well.
    zero_stage: int = 1
    # Any other DeepSpeed key, merged over the generated config (engines/deepspeed.py), e.g.
    # {zero_optimization: {overlap_comm: true}} or {fp16: {initial_scale_power: 12}}. bf16 runs
    # under torch_autocast (fp32 weights); {torch_autocast: {enabled: false}, bf16: {enabled: true}}
    # casts the weights to bf16 instead. Keys derived from train.* are refused (config_checks.DEEPSPEED_DERIVED).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    # MLflow on rank 0. Records are journaled in <run_dir>/tracking and sent by a background thread,
    # so an unreachable server never stalls training; `sagan-dist sync RUN_DIR` sends what is left.
    enabled: bool = True
    uri: str = ""  # "" -> $MLFLOW_TRACKING_URI -> MLflow's default, sqlite:///mlflow.db
    experiment: str = "sagan-dist"
    run_name: str = ""  # "" -> the run directory's name
    log_checkpoints: bool = False  # upload each snapshot as artifacts checkpoints/step-*
    system_metrics: bool = False  # CPU / memory / disk / network / GPU as system/* metrics
    system_metrics_interval_s: float = 10.0
    retry_s: float = 30.0  # while the server is unreachable, seconds between delivery attempts
    close_timeout_s: float = 60.0  # at the end of training, the longest wait for delivery
    # Each evaluated EMA generator is a LoggedModel of the run; the final one and every new best FID
    # are also versions of this registered model (aliases final, best). null -> the run name; "" -> off
    # (on the command line "tracking.registered_model=''": a bare "key=" is null).
    registered_model: Optional[str] = None


@dataclass
class EvalConfig:
    every: int = 0  # steps between IS/FID/KID/precision-recall evaluations in training; 0 = off
    num_samples: int = 10000  # generated images, spread evenly over the classes and the ranks
    batch_size: int = 100  # per rank for generation; Inception batch on rank 0
    # isc | fid | kid | prc (precision, recall, f_score on Inception pool features). prc is on by
    # default: it reuses FID's features, and its n x n distances cost ~1% of extracting them.
    metrics: list[str] = field(default_factory=lambda: ["isc", "fid", "kid", "prc"])
    # Generated images per class for `sagan-dist evaluate --classes` (intra-class FID, against the
    # reference images of that class); FID is biased upward at small counts, so compare equal counts.
    class_samples: int = 1000
    # Local path to torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth);
    # "" -> torch hub's cache, downloaded there if missing (impossible on an offline cluster).
    inception_weights: str = ""
    reference_samples: int = 10000  # real images for the reference statistics (center crop, no flip)
    cache_dir: str = ""  # "" -> <run_dir>/fidelity-cache
    truncation: float = 0.0  # redraw |z| > truncation; 0 = off
    # Latents and labels of the samples: fixed, so every evaluation of a run (and `sagan-dist
    # evaluate`, on any number of processes) scores the same z.
    seed: int = 0
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at num_samples and reference_samples


@dataclass
class Config:
    engine: str = "ddp"  # ddp | deepspeed
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A YAML path as given, or a bare name (``demo``, ``demo.yaml``) from the shipped configs/."""
    p = Path(path)
    if p.exists():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"config file {str(path)!r} not found (nor in {CONFIG_DIR})")


def load(
    yaml_paths: Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
    world_size: int = 1,
) -> DictConfig:
    """Schema <- base.yaml <- each YAML <- ``key=value`` overrides, then validated."""
    cfg = OmegaConf.structured(Config)
    paths = [CONFIG_DIR / "base.yaml"] if (CONFIG_DIR / "base.yaml").exists() else []
    paths += [resolve_config_path(p) for p in yaml_paths]
    try:
        for p in paths:
            cfg = OmegaConf.merge(cfg, _load_yaml(p))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            for override in overrides:
                cfg = OmegaConf.merge(cfg, _parse_override(override))
        _check_interpolations(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    validate(cfg, world_size)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_interpolations(cfg: DictConfig) -> None:
    """Resolve every ${oc.env:...} and ${a.b} once, so that one that cannot be fails at load, naming
    its key, not at first use. The config keeps them (an escaped \\${...} stays a literal)."""
    OmegaConf.to_container(cfg, resolve=True)


def _parse_override(override: str) -> DictConfig:
    try:
        return OmegaConf.from_dotlist([override])
    except yaml.YAMLError as e:  # a value that is not YAML, e.g. x=`a`
        raise ConfigError(f"override {override!r}: its value is not valid YAML ({str(e).splitlines()[0]})") from None


def _load_yaml(path: Path) -> DictConfig:
    """One YAML file; a syntax error names the file, line and column instead of a traceback."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of sections (model:, train:, ...), "
                          f"got a {type(loaded).__name__}")
    return loaded


def split_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """A command line's CONFIG files and key=value overrides (in any order); at least one CONFIG.

    Every CLI (sagan-dist train, sagan-launch) parses its items here; this module imports no
    torch, so the launcher stays quick to start.
    """
    yamls, overrides = [i for i in items if "=" not in i], [i for i in items if "=" in i]
    if not yamls:
        raise ConfigError("no CONFIG given: name a YAML file or a shipped config such as 'demo'")
    return yamls, overrides


def load_items(items: Sequence[str], world_size: int = 1) -> DictConfig:
    """The config of a command line's CONFIG.../key=value items."""
    yamls, overrides = split_items(items)
    return load(yamls, overrides, world_size=world_size)


def from_container(data: dict[str, Any], world_size: int = 1) -> DictConfig:
    """Rebuild a validated config from a plain dict (as stored in a checkpoint)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
        _check_interpolations(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    validate(cfg, world_size)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).splitlines()[0]
    if "not in struct" in str(e) or "Key '" in first and "not" in first:
        return f"unknown config key {key!r}: {first}"
    return f"config key {key!r}: {first}" if key else first


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Check what types cannot (config_checks.py); raises ConfigError naming the key."""
    _check_values(cfg, world_size)

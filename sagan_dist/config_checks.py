"""Checks of a merged config that its types cannot express: ranges, choices, consistency between
sections, and the DeepSpeed keys of ``deepspeed.extra`` that would contradict ours.

Every check raises ConfigError naming the key, its value and what is allowed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from sagan_dist.config_base import DEFAULT_ATTENTION, RESOLUTIONS, ConfigError, feature_resolutions

# Classes get rows in G's conditional-BN tables and D's projection (~13k floats per class at 512 px,
# ch=64): 100k classes (ImageNet-21k has 21,841) already hold ~5 GB of weights, ~25 GB with grads,
# Adam's moments and the EMA. Beyond that the allocator fails inside model construction.
MAX_CLASSES = 100_000


# DeepSpeed keys that engines/deepspeed.py derives from our config, and where to set them instead.
DEEPSPEED_DERIVED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size (split over ranks and train.accumulation)",
    "gradient_accumulation_steps": "train.accumulation",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr_g, train.lr_d and train.betas (the optimizer is torch's Adam)",
}


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} = {value!r} is not allowed; allowed: {allowed}")


def _choice(cfg: DictConfig, key: str, choices: Sequence[Any]) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value in choices, key, value, " | ".join(map(str, choices)))


def _positive(cfg: DictConfig, key: str, strict: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value > 0 if strict else value >= 0, key, value, "> 0" if strict else ">= 0")


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Check what types cannot: ranges, choices and the consistency between sections."""
    m, t, d = cfg.model, cfg.train, cfg.data
    _choice(cfg, "engine", ("ddp", "deepspeed"))
    _choice(cfg, "model.resolution", RESOLUTIONS)
    fmaps = feature_resolutions(m.resolution)
    for side in ("g_attention", "d_attention"):
        for r in m[side] or []:
            _check(r in fmaps[1:], f"model.{side}", list(m[side]), f"resolutions of this model {fmaps[1:]}")
    _check(m.checkpoint_from == 0 or m.checkpoint_from in fmaps, "model.checkpoint_from",
           m.checkpoint_from, f"0 (off) or one of {fmaps}")
    for key in ("model.z_dim", "model.g_channels", "model.d_channels"):
        _positive(cfg, key)
    _choice(cfg, "model.init", ("ortho", "normal", "xavier"))
    _choice(cfg, "data.source", ("digits", "shards"))
    _check(d.source != "shards" or bool(d.shards), "data.shards", d.shards,
           "a shard pattern such as /data/imagenet/train-{000000..001023}.tar")
    _check(1 <= d.num_classes <= MAX_CLASSES, "data.num_classes", d.num_classes, f"1 .. {MAX_CLASSES}")
    _choice(cfg, "data.decode", ("draft", "full"))
    _choice(cfg, "data.crop", ("center", "random"))
    _check(0 < d.min_scale <= 1, "data.min_scale", d.min_scale, "0 < min_scale <= 1")
    _check(0 < d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction,
           "0 < max_bad_fraction <= 1 (1 = never fail)")
    for key in ("data.workers", "data.shuffle_buffer", "data.epoch_samples", "data.max_warnings"):
        _positive(cfg, key, strict=False)
    for key in ("data.stall_timeout_s", "data.max_pixels"):  # data reader: stall deadline, pixel cap
        _positive(cfg, key)
    for key in ("train.steps", "train.batch_size", "train.accumulation", "train.n_critic",
                "train.log_every", "train.sample_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.samples_per_class", "train.max_bad_steps",
                "train.collective_timeout_s"):
        _positive(cfg, key)
    for key in ("train.lr_g", "train.lr_d"):  # inf passes "> 0" and fills the weights with nan
        lr = OmegaConf.select(cfg, key)
        _check(math.isfinite(lr) and lr > 0, key, lr, "a finite learning rate > 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", list(t.betas),
           "two floats in [0, 1), e.g. [0.0, 0.9]")
    _choice(cfg, "train.loss", ("hinge", "nonsat"))
    _choice(cfg, "train.precision", ("fp32", "bf16", "fp16"))
    for key in ("train.ema_start", "train.ema_kimg", "train.ema_rampup", "train.grad_clip", "train.attention_points",
                "train.truncation", "train.sample_classes"):
        _positive(cfg, key, strict=False)
    _check_attention_points(t.attention_points, m)
    shards = world_size * t.accumulation
    _check(t.batch_size % shards == 0, "train.batch_size", t.batch_size,
           f"a multiple of world size x train.accumulation = {world_size} x {t.accumulation} = {shards}")
    _check(t.resume in ("auto", "never") or Path(t.resume).exists(), "train.resume", t.resume,
           "auto | never | an existing checkpoint path")
    _choice(cfg, "deepspeed.zero_stage", (0, 1, 2))
    _validate_deepspeed_extra(cfg)
    _check(bool(cfg.tracking.experiment.strip()), "tracking.experiment", cfg.tracking.experiment,
           "a non-empty MLflow experiment name")
    for key in ("tracking.system_metrics_interval_s", "tracking.retry_s"):
        _positive(cfg, key)
    _positive(cfg, "tracking.close_timeout_s", strict=False)
    e = cfg.eval
    for key in ("eval.every", "eval.truncation"):
        _positive(cfg, key, strict=False)
    for key in ("eval.num_samples", "eval.reference_samples", "eval.batch_size", "eval.isc_splits",
                "eval.kid_subsets"):
        _positive(cfg, key)
    _check(len(e.metrics) > 0 and all(m in ("isc", "fid", "kid", "prc") for m in e.metrics), "eval.metrics",
           list(e.metrics), "a non-empty list of isc | fid | kid | prc")
    # precision/recall: each sample's 3rd nearest neighbour in its own set; FID: a covariance.
    least = 4 if "prc" in e.metrics else 2 if "fid" in e.metrics else 1
    for key in ("eval.num_samples", "eval.reference_samples"):
        _check(OmegaConf.select(cfg, key) >= least, key, OmegaConf.select(cfg, key),
               f">= {least} for eval.metrics={list(e.metrics)}")
    _check(e.class_samples >= 2, "eval.class_samples", e.class_samples, ">= 2 (FID needs a covariance)")
    _check("isc" not in e.metrics or e.isc_splits <= e.num_samples, "eval.isc_splits", e.isc_splits,
           f"<= eval.num_samples = {e.num_samples} (each split needs samples)")
    _check(e.kid_subset_size >= 2, "eval.kid_subset_size", e.kid_subset_size, ">= 2")


def _check_attention_points(points: int, model: DictConfig) -> None:
    """Query points are distinct positions of each G attention layer's map: at most the smallest's."""
    layers = DEFAULT_ATTENTION[model.resolution] if model.g_attention is None else list(model.g_attention)
    if points and layers:
        size = min(layers)
        _check(points <= size * size, "train.attention_points", points,
               f"0 (off) .. {size * size} (positions of G's smallest attention map, {size}x{size})")


def _validate_deepspeed_extra(cfg: DictConfig) -> None:
    """deepspeed.extra may add DeepSpeed keys but not contradict the ones we derive."""
    extra = cfg.deepspeed.extra
    for key, instead in DEEPSPEED_DERIVED.items():
        _check(key not in extra, f"deepspeed.extra.{key}", OmegaConf.select(extra, key),
               f"unset (derived from {instead})")
    stage = OmegaConf.select(extra, "zero_optimization.stage")
    _check(stage is None, "deepspeed.extra.zero_optimization.stage", stage, "unset (set deepspeed.zero_stage)")
    for key, why in DEEPSPEED_CHECKPOINT_KEYS.items():
        value = OmegaConf.select(extra, key)
        _check(value is None or value is False, f"deepspeed.extra.{key}", value, f"unset ({why})")
    _validate_deepspeed_precision(extra, cfg.train.precision, cfg.deepspeed.zero_stage)


# DeepSpeed keys whose checkpoints would not be read by the engine's weights-only loader.
DEEPSPEED_CHECKPOINT_KEYS = {
    "checkpoint.writer": "the engine saves with torch.save and loads weights-only; another writer's "
                         "files would be read by DeepSpeed's code-running loader",
    "checkpoint.load_universal": "universal checkpoints are read with weights_only=False by DeepSpeed; "
                                 "a ZeRO 1/2 run resumes on the process count it was saved with",
    "datastates_ckpt": "the engine saves with torch.save and loads weights-only",
}
# DeepSpeed 0.19.8's spellings of each dtype (DtypeEnum in deepspeed/runtime/config.py).
DEEPSPEED_DTYPES = {"fp32": ("fp32", "float32", "float", "torch.float32"),
                    "bf16": ("bf16", "bfloat16", "torch.bfloat16"),
                    "fp16": ("fp16", "float16", "half", "torch.float16")}


def _deepspeed_dtype(value: Any) -> Optional[str]:
    """Our name (fp32 | bf16 | fp16) for a DeepSpeed dtype spelling; None if it is none of them."""
    return next((name for name, spellings in DEEPSPEED_DTYPES.items() if str(value) in spellings), None)


def _validate_deepspeed_precision(extra: DictConfig, precision: str, stage: int) -> None:
    """DeepSpeed's precision keys in deepspeed.extra must say what train.precision says: the log,
    the config and the checkpoints report train.precision, and a contradiction crashed mid-step
    (e.g. torch_autocast fp16 in an fp32 run: Half vs Float)."""
    def key(name: str) -> str:
        return f"deepspeed.extra.{name}"

    _check("amp" not in extra, key("amp"), OmegaConf.select(extra, "amp"),
           "unset (DeepSpeed 0.19.8 removed Apex AMP; train.precision picks the precision)")
    # DeepSpeed reads `bfloat16` (the old name) only when `bf16` is absent: both would hide one.
    _check(not ("bf16" in extra and "bfloat16" in extra), key("bfloat16"), OmegaConf.select(extra, "bfloat16"),
           "unset when deepspeed.extra.bf16 is set (DeepSpeed would ignore it)")
    bf16_section = "bfloat16" if "bfloat16" in extra else "bf16"
    # What DeepSpeed will run with: ours (engines/deepspeed.py) unless extra overrides it.
    fp16 = OmegaConf.select(extra, "fp16.enabled", default=precision == "fp16")
    bf16 = OmegaConf.select(extra, f"{bf16_section}.enabled", default=False)
    autocast = OmegaConf.select(extra, "torch_autocast.enabled", default=precision == "bf16")
    for name, value in (("fp16.enabled", fp16), (f"{bf16_section}.enabled", bf16),
                        ("torch_autocast.enabled", autocast)):
        _check(isinstance(value, bool), key(name), value, "true | false")
    _check(fp16 == (precision == "fp16"), key("fp16.enabled"), fp16,
           "true or unset with train.precision=fp16 (false would train in fp32)" if precision == "fp16"
           else f"false or unset with train.precision={precision} (set train.precision=fp16 for fp16)")
    _check(not bf16 or precision == "bf16", key(f"{bf16_section}.enabled"), bf16,
           f"false or unset with train.precision={precision} (set train.precision=bf16 for bf16)")
    if precision == "bf16":
        # One of the two bf16 modes (README: DeepSpeed): autocast over fp32 weights, or bf16 weights.
        _check(autocast != bf16, key("torch_autocast.enabled"), autocast,
               f"false when deepspeed.extra.{bf16_section}.enabled is true (bf16 weights or autocast, not both)"
               if bf16 else f"true or unset with train.precision=bf16, unless deepspeed.extra.{bf16_section}"
                            ".enabled is true (both off would train in fp32)")
        dtype = OmegaConf.select(extra, "torch_autocast.dtype")
        _check(not autocast or dtype is None or _deepspeed_dtype(dtype) == "bf16", key("torch_autocast.dtype"),
               dtype, f"unset or one of {', '.join(DEEPSPEED_DTYPES['bf16'])} with train.precision=bf16")
    else:
        _check(not autocast, key("torch_autocast.enabled"), autocast,
               "false or unset with train.precision=fp32" if precision == "fp32" else
               "false or unset with train.precision=fp16 (fp16 uses DeepSpeed's fp16 section: under ZeRO 1/2 "
               "torch_autocast's GradScaler never backs off after an overflow)")
    _validate_deepspeed_data_types(extra, "fp16" if fp16 else "bf16" if bf16 else "fp32", precision, stage)


def _validate_deepspeed_data_types(extra: DictConfig, weights: str, precision: str, stage: int) -> None:
    """data_types.* must follow the parameters' dtype (``weights``), which train.precision (and the
    bf16 mode) decides."""
    mode = f"train.precision={precision} keeps {weights} weights"
    accum = [weights] + (["fp32"] if weights == "bf16" and stage > 0 else [])  # ZeRO's bf16 + fp32 grads
    for name, allowed in (("param_dtype", [weights]), ("grad_accum_dtype", accum),
                          ("buffer_dtype", sorted({weights, "fp32"}))):
        value = OmegaConf.select(extra, f"data_types.{name}")
        _check(value is None or _deepspeed_dtype(value) in allowed, f"deepspeed.extra.data_types.{name}", value,
               f"unset or {' | '.join(allowed)} ({mode})")

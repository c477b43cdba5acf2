"""The DeepSpeed engine in one process: its generated config, config errors, agreement with the DDP
engine, skipped non-finite and fp16-overflow steps, and checkpoints that fail loudly.

Multi-process behaviour (ZeRO sharding over ranks, replicas that agree, resume) is in
tests/test_distributed.py.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from sagan_dist import checkpoint
from sagan_dist.config import ConfigError, load
from sagan_dist.dist import DistInfo
from sagan_dist.engines.deepspeed import deepspeed_config
from sagan_dist.train import Trainer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=2", "train.sample_every=100", "tracking.enabled=false", "train.samples_per_class=2"]
DS = ["engine=deepspeed"]


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(load(["demo"], TINY + [f"train.run_dir={run_dir}", *overrides]), INFO)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def _states(tr: Trainer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (tr.G.raw, tr.D.raw, tr.ema.model)]


# ---- the generated DeepSpeed config ---------------------------------------------------------------
def test_config_follows_train_and_zero_stage_and_extra_merges_on_top():
    cfg = load(["demo"], ["train.batch_size=16", "train.accumulation=2", "train.grad_clip=1.5",
                          "deepspeed.zero_stage=2", "deepspeed.extra={zero_optimization: {overlap_comm: true}, "
                          "wall_clock_breakdown: true}"], world_size=2)
    ds = deepspeed_config(cfg, world_size=2, device=torch.device("cpu"))
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 4  # 16 over 2 ranks x 2 accumulation rounds
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.5
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # merged, not replaced
    assert ds["wall_clock_breakdown"] is True
    assert "bf16" not in ds and "fp16" not in ds and "torch_autocast" not in ds


def test_bf16_runs_under_torch_autocast_and_fp16_casts_the_weights():
    bf16 = deepspeed_config(load(["demo"], ["train.precision=bf16"]), 1, torch.device("cpu"))
    assert bf16["torch_autocast"]["enabled"] and bf16["torch_autocast"]["dtype"] == "bfloat16"
    assert "bf16" not in bf16
    fp16 = deepspeed_config(load(["demo"], ["train.precision=fp16"]), 1, torch.device("cpu"))
    assert fp16["fp16"] == {"enabled": True}
    assert fp16["data_types"] == {"buffer_dtype": "fp16"}  # CPU BatchNorm has no mixed dtypes
    on_gpu = deepspeed_config(load(["demo"], ["train.precision=fp16"]), 1, torch.device("cuda", 0))
    assert "data_types" not in on_gpu  # CUDA keeps BatchNorm statistics in fp32


@pytest.mark.parametrize("override, key", [
    ("deepspeed.extra={train_batch_size: 4}", "deepspeed.extra.train_batch_size"),
    ("deepspeed.extra={gradient_accumulation_steps: 4}", "deepspeed.extra.gradient_accumulation_steps"),
    ("deepspeed.extra={optimizer: {type: AdamW}}", "deepspeed.extra.optimizer"),
    ("deepspeed.extra={zero_optimization: {stage: 3}}", "deepspeed.extra.zero_optimization.stage"),
    ("deepspeed.extra={fp16: {enabled: true}}", "deepspeed.extra.fp16.enabled"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
])
def test_contradicting_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(["demo"], [override])


# ---- training steps -------------------------------------------------------------------------------
def test_a_bf16_step_is_the_ddp_engines_step(tmp_path):
    """Same seed, same batch, one process: DeepSpeed's torch_autocast bf16 (ZeRO 1) and DDP's
    autocast end the step bitwise equal (fp32 is compared over two ranks in test_distributed)."""
    results = []
    for engine in ("ddp", "deepspeed"):
        tr = _trainer(tmp_path / engine, f"engine={engine}", "train.precision=bf16")
        tr._start_segment()
        tr.train_step()
        results.append(_states(tr))
    for ddp, ds in zip(*results):
        assert ddp.keys() == ds.keys()
        for k in ddp:
            assert torch.equal(ddp[k], ds[k]), k


def test_bf16_weights_through_extra_train_with_bf16_parameters(tmp_path):
    """The documented switch to DeepSpeed's bf16 section: bf16 parameters (fp32 masters in the
    optimizer), inputs cast by the engine, BatchNorm statistics in bf16 on CPU."""
    tr = _trainer(tmp_path, *DS, "train.precision=bf16", "deepspeed.zero_stage=2",
                  "deepspeed.extra={torch_autocast: {enabled: false}, bf16: {enabled: true}}")
    assert {p.dtype for p in tr.G.raw.parameters()} == {torch.bfloat16}
    assert tr.G.raw.out_bn.running_var.dtype == torch.bfloat16
    tr._start_segment()
    before = _params(tr.G.raw)
    stats = tr.train_step()
    assert tr.skipped_steps == 0 and all(map(math.isfinite, stats.values()))
    assert any(not torch.equal(p, before[k]) for k, p in tr.G.raw.named_parameters())
    assert all(torch.isfinite(v.float()).all() for v in tr.ema.model.state_dict().values())


@pytest.mark.parametrize("stage", [0, 1])
def test_non_finite_gradients_skip_the_update(tmp_path, stage):
    """ZeRO 0 in fp32 is checked by the engine itself, ZeRO 1 by DeepSpeed's overflow check."""
    tr = _trainer(tmp_path, *DS, f"deepspeed.zero_stage={stage}")
    with torch.no_grad():
        tr.D.raw.linear.parametrizations.weight.original.fill_(float("nan"))
    tr._start_segment()
    d_before, g_before = _params(tr.D.raw), _params(tr.G.raw)
    stats = tr.train_step()
    assert tr.skipped_steps == 2  # D's and G's update (G's loss came through the NaN D)
    assert not torch.isfinite(torch.tensor([stats["grad_norm_d"], stats["grad_norm_g"]])).any()
    for before, net in ((d_before, tr.D.raw), (g_before, tr.G.raw)):
        for k, p in net.named_parameters():
            assert torch.equal(p, before[k]) or (p.isnan().all() and before[k].isnan().all()), k


def test_fp16_overflow_is_a_skipped_step_and_lowers_the_loss_scale(tmp_path):
    # 2^40 times any loss overflows fp16 (max 65504): DeepSpeed's loss scaler must skip the update
    # and halve the scale (at once, with hysteresis 1).
    tr = _trainer(tmp_path, *DS, "train.precision=fp16",
                  "deepspeed.extra={fp16: {initial_scale_power: 40, hysteresis: 1}}")
    assert next(tr.D.raw.parameters()).dtype == torch.float16
    tr._start_segment()
    before = _params(tr.D.raw)
    stats = tr._d_step()
    assert tr.skipped_steps == 1 and stats["grad_norm_d"] == float("inf")
    assert tr.D.engine.optimizer.loss_scaler.cur_scale == 2.0**39
    for k, p in tr.D.raw.named_parameters():
        assert torch.equal(p, before[k]), k


# ---- checkpoints ----------------------------------------------------------------------------------
def test_load_of_a_missing_checkpoint_raises(tmp_path):
    tr = _trainer(tmp_path, *DS)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        tr.G.load(tmp_path / "nowhere" / "G")


@pytest.mark.slow
def test_snapshot_missing_a_zero_shard_falls_back_to_the_previous(tmp_path, caplog):
    _trainer(tmp_path, *DS, "train.steps=2", "train.checkpoint_every=1").fit()
    newest = checkpoint.list_checkpoints(tmp_path)[-1]
    [shard] = (newest / "D" / "deepspeed").glob("*zero_pp_rank_0_*optim_states.pt")
    shard.unlink()  # DeepSpeed alone would load the weights and silently drop Adam's state
    with caplog.at_level(logging.WARNING):
        resumed = _trainer(tmp_path, *DS, "train.steps=2")
    assert resumed.step == 1
    assert "step-00000002 is truncated or corrupt" in caplog.text


@pytest.mark.slow
def test_resume_under_another_engine_stage_or_world_size_is_a_config_error(tmp_path):
    """Falling back past such snapshots would silently start the run over: refuse instead."""
    _trainer(tmp_path / "ddp", "train.steps=1").fit()
    with pytest.raises(ConfigError, match="'engine' is 'deepspeed'"):
        _trainer(tmp_path / "ddp", *DS, "train.steps=2")
    _trainer(tmp_path / "z1", *DS, "train.steps=1").fit()
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        _trainer(tmp_path / "z1", *DS, "train.steps=2", "deepspeed.zero_stage=0")
    states = checkpoint.list_checkpoints(tmp_path / "z1")[-1] / "G" / "deepspeed" / "mp_rank_00_model_states.pt"
    meta = torch.load(states, weights_only=True)
    torch.save({**meta, "dp_world_size": 2}, states)  # as if two ranks had saved it
    with pytest.raises(ConfigError, match="shards of 2 ranks"):
        _trainer(tmp_path / "z1", *DS, "train.steps=2")

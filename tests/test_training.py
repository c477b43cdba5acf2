"""The training loop on CPU: one step, exact resume, corrupt-snapshot fallback, non-finite steps."""
import logging
from pathlib import Path

import pytest
import torch

from sagan_dist import checkpoint
from sagan_dist.config import load
from sagan_dist.dist import DistInfo
from sagan_dist.ema import ema_beta
from sagan_dist.train import NonFiniteError, Trainer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=2", "train.sample_every=100", "tracking.enabled=false", "train.samples_per_class=2"]


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    cfg = load(["demo"], TINY + [f"train.run_dir={run_dir}", *overrides])
    return Trainer(cfg, INFO)


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_step_changes_d_g_and_ema_as_expected(tmp_path):
    tr = _trainer(tmp_path, "train.steps=1")
    tr.start_segment()
    g0, d0, ema0 = _params(tr.G.raw), _params(tr.D.raw), _params(tr.ema.model)
    tr.train_step()
    stats, skipped, _ = tr.stats.read()
    assert {"loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g"} <= set(stats)
    assert skipped == 0
    for before, net in ((g0, tr.G.raw), (d0, tr.D.raw)):
        changed = [k for k, v in net.state_dict().items() if k.endswith("original") and not torch.equal(v, before[k])]
        assert changed, "an update must change the weights"
    beta = ema_beta(8, 8, tr.cfg.train.ema_kimg, tr.cfg.train.ema_rampup)
    for k, p in tr.G.raw.named_parameters():
        expected = ema0[k].lerp(p.detach(), 1 - beta)
        assert torch.allclose(tr.ema.model.state_dict()[k], expected, atol=1e-6), k
    assert tr.images_seen == 8


def test_ema_half_life_ramps_up_with_images_seen():
    # After 640 images the half-life is 640 * 0.05 = 32 images: a 64-image batch weighs 3/4.
    assert ema_beta(64, 640, 10.0, 0.05) == pytest.approx(0.25)
    # Later it is capped at ema_kimg: 10,000 images.
    assert ema_beta(64, 10_000_000, 10.0, 0.05) == pytest.approx(0.5 ** (64 / 10_000))
    assert ema_beta(64, 640, 10.0, 0.0) == pytest.approx(0.5 ** (64 / 10_000))  # no ramp-up


def _final_states(tr):
    return _params(tr.G.raw), _params(tr.D.raw), _params(tr.ema.model)


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    common = ["train.checkpoint_every=3"]
    full = _trainer(tmp_path / "a", "train.steps=6", *common)
    full.fit()
    first = _trainer(tmp_path / "b", "train.steps=3", *common)
    first.fit()
    resumed = _trainer(tmp_path / "b", "train.steps=6", *common)
    assert resumed.step == 3
    resumed.fit()
    assert resumed.step == 6
    for a, b in zip(_final_states(full), _final_states(resumed)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_corrupt_newest_snapshot_falls_back_to_previous(tmp_path, caplog):
    tr = _trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    tr.fit()
    snaps = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in snaps] == ["step-00000002", "step-00000004"]
    state = snaps[-1] / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated write
    leftover = tmp_path / "checkpoints" / "step-00000006.tmp"
    leftover.mkdir()  # leftover of a crash mid-save
    with caplog.at_level(logging.WARNING):
        resumed = _trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    assert resumed.step == 2
    assert "step-00000004 cannot be loaded" in caplog.text
    assert not leftover.exists(), "stale temporaries are removed at start"


def test_corrupt_engine_file_also_falls_back(tmp_path):
    _trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2").fit()
    (checkpoint.list_checkpoints(tmp_path)[-1] / "D.pt").write_bytes(b"not a checkpoint")
    assert _trainer(tmp_path, "train.steps=4").step == 2


def test_resume_with_another_architecture_is_refused(tmp_path):
    _trainer(tmp_path, "train.steps=2").fit()
    with pytest.raises(Exception, match="model.g_channels"):
        _trainer(tmp_path, "train.steps=4", "model.g_channels=16")


def test_keeps_only_the_last_k_snapshots(tmp_path):
    _trainer(tmp_path, "train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=2").fit()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path):
    tr = _trainer(tmp_path, "train.steps=10", "train.max_bad_steps=3")
    with torch.no_grad():
        tr.D.raw.linear.parametrizations.weight.original.fill_(float("nan"))
    g_before = _params(tr.G.raw)
    with pytest.raises(NonFiniteError, match="4 consecutive D updates"):
        tr.fit()  # NaN in D spoils both networks' updates; each streak is 2 at step 2, 4 at step 4
    assert tr.skipped_steps == 8 and tr.step == 4
    for k, v in tr.G.raw.state_dict().items():
        if k.endswith("original"):
            assert torch.equal(v, g_before[k]), "a skipped update must not change weights"


@pytest.mark.parametrize("max_bad", [1, 3, 4])
def test_a_discriminator_only_storm_stops_the_run_though_g_updates_are_applied(tmp_path, max_bad):
    tr = _trainer(tmp_path, "train.steps=10", f"train.max_bad_steps={max_bad}")
    d_loss = tr.d_loss
    tr.d_loss = lambda real, fake: d_loss(real, fake) * float("inf")  # D's updates only are non-finite
    with pytest.raises(NonFiniteError, match=r"consecutive D updates.*train\.lr_d"):
        tr.fit()
    stop = 2 * ((max_bad + 1) // 2)  # the streak is read every train.log_every=2 steps (1 D update each)
    assert tr.step == stop and tr.skipped_steps == stop


def test_streaks_are_counted_per_network():
    from sagan_dist.engines import StepResult
    from sagan_dist.step_stats import StepStats

    stats = StepStats(torch.device("cpu"))
    bad, good = StepResult(torch.tensor(False), torch.tensor(0.0)), StepResult(torch.tensor(True), torch.tensor(0.0))
    for _ in range(3):
        stats.update_applied(bad, "D")
        stats.update_applied(good, "G")
    stats.update_applied(bad, "G")
    assert stats.read()[1:] == (4, {"D": 3, "G": 1})
    stats.reset()
    stats.update_applied(good, "D")  # an applied D update ends D's streak, not G's
    stats.update_applied(bad, "G")
    assert stats.read()[1:] == (1, {"D": 0, "G": 2})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train_on_cpu(tmp_path, precision):
    tr = _trainer(tmp_path, "train.steps=4", f"train.precision={precision}")
    tr.start_segment()
    g0 = _params(tr.G.raw)
    for _ in range(4):
        tr.train_step()
    assert torch.isfinite(torch.tensor(tr.stats.read()[0]["loss_d"]))
    changed = any(not torch.equal(v, g0[k]) for k, v in tr.G.raw.state_dict().items() if k.endswith("original"))
    assert changed
    # Weights, SN vectors and the EMA stay fp32 under autocast; only activations drop precision.
    assert all(p.dtype == torch.float32 for p in tr.G.raw.parameters())
    if precision == "fp16":  # separate scalers; overflowing first steps are skipped while they calibrate
        assert tr.G.scaler.is_enabled() and tr.D.scaler.is_enabled() and tr.G.scaler is not tr.D.scaler
        assert tr.D.scaler.get_scale() <= 65536.0


def test_resume_with_another_engine_is_refused(tmp_path):
    _trainer(tmp_path, "train.steps=2").fit()
    with pytest.raises(Exception, match="'engine' is 'deepspeed'"):
        _trainer(tmp_path, "train.steps=4", "engine=deepspeed")

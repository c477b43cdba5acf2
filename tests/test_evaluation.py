"""IS / FID / KID / precision-recall: offline weights, sample shares, the reference cache, and
`sagan-dist evaluate` on one and two processes (file safety: test_evaluation_safety.py; precision,
recall, intra-class FID and cost: test_evaluation_metrics.py).

There is no internet here, so the Inception weights are a randomly initialised network in the
format torch-fidelity loads (its own FeatureExtractorInceptionV3, saved as a state dict): the
metric values mean nothing, but every step torch-fidelity takes with the real file is taken.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from sagan_dist import checkpoint, config
from sagan_dist.config import ConfigError
from sagan_dist.data import prepare_data
from sagan_dist.dist import DistInfo
from sagan_dist.evaluation import (INCEPTION_FILE, INCEPTION_URL, Evaluator, InceptionWeightsError,
                                   check_inception_weights, config_with_overrides, frechet_distance,
                                   read_reference_images, reference_cache_name, reference_key,
                                   resolve_inception_weights, sample_latents, share_indices)
from sagan_dist.models.sagan import build_models

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 12  # Inception at 299 px costs ~0.5 CPU-s per image here: keep the sets small
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _UnloadedInception(FeatureExtractorInceptionV3):
    """torch-fidelity's network with its random initialisation: loading is skipped."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001 - torch's signature
        return None


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pt"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = _UnloadedInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():  # He init, so that features do not vanish through 90-odd layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = folder / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def eval_config(run_dir: Path, weights: Path | str, *overrides: str):
    return config.load(["demo"], [
        f"train.run_dir={run_dir}", f"eval.inception_weights={weights}", f"eval.num_samples={SAMPLES}",
        f"eval.reference_samples={SAMPLES}", "eval.batch_size=8", "eval.isc_splits=2",
        "eval.kid_subsets=10", "model.g_channels=8", "model.d_channels=8", *overrides])


def tiny_generator(cfg) -> nn.Module:
    torch.manual_seed(0)
    return build_models(cfg)[0].eval()


# ---- offline weights ------------------------------------------------------------------------
def test_missing_weights_file_error_names_the_file_its_url_and_the_key(tmp_path):
    cfg = eval_config(tmp_path, tmp_path / "nowhere" / INCEPTION_FILE, "eval.every=100")
    with pytest.raises(InceptionWeightsError) as err:
        Evaluator(cfg, CPU, "unused-because-the-weights-fail-first", tmp_path)
    message = str(err.value)
    assert INCEPTION_FILE in message and INCEPTION_URL in message
    assert "eval.inception_weights=" in message and str(tmp_path / "nowhere") in message


def test_training_with_evaluation_fails_before_its_first_step_without_weights(tmp_path):
    from sagan_dist.train import Trainer

    cfg = eval_config(tmp_path / "run", tmp_path / INCEPTION_FILE, "eval.every=1", "tracking.enabled=false")
    with pytest.raises(InceptionWeightsError, match="eval.inception_weights="):
        Trainer(cfg, CPU)


def test_unset_weights_that_cannot_be_downloaded_say_what_to_do(tmp_path):
    # Port 9 (discard) on loopback refuses the connection at once: a real, offline download failure.
    with pytest.raises(InceptionWeightsError) as err:
        resolve_inception_weights("", hub_dir=tmp_path, url=f"http://127.0.0.1:9/{INCEPTION_FILE}")
    message = str(err.value)
    assert "downloading it failed" in message and INCEPTION_URL in message
    assert f"eval.inception_weights=/path/to/{INCEPTION_FILE}" in message
    assert not (tmp_path / "checkpoints" / INCEPTION_FILE).exists()  # no partial file left behind


def test_weights_in_torch_hub_cache_are_used_without_download(tmp_path):
    cached = tmp_path / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    assert resolve_inception_weights("", hub_dir=tmp_path, url="http://127.0.0.1:9/never") == cached


def test_a_file_that_is_not_the_inception_network_is_rejected(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(InceptionWeightsError, match="is not a torch-fidelity Inception state dict"):
        check_inception_weights(wrong)


# ---- FID ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [20, 300])  # fewer samples than dimensions, and more
def test_frechet_distance_equals_torch_fidelity_fid(n):
    rng = np.random.default_rng(n)
    mix = rng.normal(size=(48, 48))  # correlated features, as Inception's are
    generated = (rng.normal(size=(n, 48)) @ mix).astype(np.float32)
    reference = (rng.normal(0.3, 1.2, size=(400, 48)) @ mix).astype(np.float32)
    ref = fid_features_to_statistics(torch.from_numpy(reference))
    expected = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(generated)), ref, False)
    fid = frechet_distance(generated, ref["mu"], ref["sigma"])
    assert fid == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    assert frechet_distance(reference, ref["mu"], ref["sigma"]) == pytest.approx(0, abs=1e-6)


# ---- samples --------------------------------------------------------------------------------
@pytest.mark.parametrize("n, world", [(16, 1), (16, 2), (17, 2), (10, 3), (5, 8)])
def test_rank_shares_cover_every_sample_once_with_equal_lengths(n, world):
    shares = [share_indices(n, world, r) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # equal shares: every rank joins every all_gather
    real = torch.cat(shares)
    assert sorted(real[real < n].tolist()) == list(range(n))


def test_latents_are_fixed_by_the_seed_and_classes_evenly_spread():
    z, y = sample_latents(23, 24, 8, 10, truncation=1.0, seed=3)
    z2, _ = sample_latents(23, 24, 8, 10, truncation=1.0, seed=3)
    z3, _ = sample_latents(23, 24, 8, 10, truncation=1.0, seed=4)
    assert torch.equal(z, z2) and not torch.equal(z[:23], z3[:23])
    assert z[:23].abs().max() <= 1.0 and not z[23:].any()  # truncation; padding rows are zero
    counts = torch.bincount(y[:23], minlength=10)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("override, key", [
    ("eval.isc_splits=20", "eval.isc_splits"),
    ("eval.metrics=[]", "eval.metrics"),
    ("eval.metrics=[fid,lpips]", "eval.metrics"),
    ("eval.num_samples=3", "eval.num_samples"),  # precision/recall: a 3rd nearest neighbour
    ("eval.reference_samples=1", "eval.reference_samples"),
    ("eval.class_samples=1", "eval.class_samples"),
    ("eval.kid_subset_size=1", "eval.kid_subset_size"),
    ("eval.num_samples=0", "eval.num_samples"),
])
def test_impossible_eval_settings_are_config_errors(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        eval_config(tmp_path, "w.pth", override)


def test_reference_images_are_center_cropped_uint8_at_the_model_resolution(tmp_path):
    cfg = eval_config(tmp_path, "w.pth", "data.flip=true", "data.crop=random")
    shards = prepare_data(cfg, tmp_path)
    (first, labels), (again, labels_again) = (read_reference_images(cfg, shards, 20) for _ in range(2))
    assert first.shape == (20, 3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first, again)  # no random crop or flip, whatever the run trains with
    assert labels.shape == (20,) and torch.equal(labels, labels_again) and labels.max() < cfg.data.num_classes


def test_reference_cache_name_changes_with_data_resolution_count_and_weights(tmp_path):
    cfg = eval_config(tmp_path, "w.pth")
    base = reference_cache_name(reference_key(cfg, "a-{0..3}.tar", 100, "sha-a"))
    assert base == reference_cache_name(reference_key(cfg, "a-{0..3}.tar", 100, "sha-a"))
    others = [reference_key(cfg, "b-{0..3}.tar", 100, "sha-a"), reference_key(cfg, "a-{0..3}.tar", 99, "sha-a"),
              reference_key(cfg, "a-{0..3}.tar", 100, "sha-b"),
              reference_key(eval_config(tmp_path, "w.pth", "model.resolution=64"), "a-{0..3}.tar", 100, "sha-a")]
    assert len({base, *(reference_cache_name(k) for k in others)}) == 1 + len(others)


# ---- the evaluator, as the Trainer calls it -------------------------------------------------
def test_evaluator_scores_and_a_new_one_reuses_the_cached_reference(tmp_path, inception_weights):
    cfg = eval_config(tmp_path / "run", inception_weights, "eval.every=10")
    shards = prepare_data(cfg, tmp_path / "run")
    g = tiny_generator(cfg).train()

    first = Evaluator(cfg, CPU, shards, tmp_path / "run")
    metrics = first(g, step=10)
    assert set(metrics) == {"isc", "isc_std", "fid", "kid", "kid_std", "precision", "recall", "f_score"}
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["fid"] > 0
    assert first.last_num_samples == SAMPLES and first.reference_reads == 1 and first.last_reference_computed
    assert g.training  # the caller's mode is restored
    cache = sorted((tmp_path / "run" / "fidelity-cache").glob(f"{first.cache_name}*"))
    assert [p.suffix for p in cache] == [".json", ".npz"]  # ours only: torch-fidelity wrote no cache
    stamps = {p: p.stat().st_mtime_ns for p in cache}

    second = Evaluator(cfg, CPU, shards, tmp_path / "run")  # as after a restart
    again = second(g, step=20)
    assert second.reference_reads == 0 and not second.last_reference_computed
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps
    assert again == pytest.approx(metrics)  # same z, same reference


# ---- `sagan-dist evaluate` ------------------------------------------------------------------
def _snapshot(run_dir: Path, weights: Path, tracking_run_id: str | None = None,
              process_seconds: float | None = None) -> Path:
    cfg = eval_config(run_dir, weights)
    g = tiny_generator(cfg)
    state = {"step": 7, "images_seen": 448, "skipped_steps": 0, "best_fid": math.inf,
             "G_ema": g.state_dict(), "config": config.to_container(cfg),
             "tracking_run_id": tracking_run_id, "rng": {"torch": torch.get_rng_state()}}
    if process_seconds is not None:  # snapshots written before the trainer recorded it lack it
        state["process_seconds"] = process_seconds
    return checkpoint.save(run_dir, 7, state, {}, keep=3, is_main=True)


def _cli(processes: int, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, "-m", "sagan_dist.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _evaluate(snapshot: Path, out: Path, processes: int, *overrides: str) -> dict:
    proc = _cli(processes, "evaluate", str(snapshot), *overrides, "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cli_evaluates_on_two_processes_like_on_one_and_reuses_the_cache(tmp_path, inception_weights):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("evaluation")).info.run_id  # the training run
    snapshot = _snapshot(tmp_path / "run", inception_weights, run_id, process_seconds=2 * 5400.0)
    weights = f"eval.inception_weights={inception_weights}"

    # Classes 1 and 2 have 3 images each among the first 12 of the demo shards.
    two = _evaluate(snapshot, tmp_path / "two.json", 2, weights, "eval.class_samples=4", "--classes", "2,1")
    assert two["processes"] == 2 and two["step"] == 7 and two["num_samples"] == SAMPLES
    assert two["reference"] == "computed" and two["reference_samples"] == SAMPLES
    assert two["gpu_hours"] == pytest.approx(3.0)  # 2 processes x 1.5 h
    assert all(math.isfinite(two[k]) for k in ("isc", "isc_std", "fid", "kid", "kid_std", "precision", "recall",
                                              "fid_class/1", "fid_class/2"))
    assert two["class_samples"] == 4 and two["class_reference_samples/1"] == 3
    cache = sorted(Path(two["cache"]).parent.glob(Path(two["cache"]).name + "*"))
    stamps = {p: p.stat().st_mtime_ns for p in cache}

    # The same z by global index on any number of processes: one process scores the same images,
    # against the reference the two processes cached.
    one = _evaluate(snapshot, tmp_path / "one.json", 1, weights, f"tracking.uri={uri}", "--mlflow")
    assert one["processes"] == 1 and one["reference"] == "cached"
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps
    for k in ("isc", "fid", "kid"):
        assert one[k] == pytest.approx(two[k], rel=1e-5)
    logged = client.get_metric_history(run_id, f"evaluate/fid_n{SAMPLES}")
    assert [(m.step, m.value) for m in logged] == [(7, pytest.approx(one["fid"]))]
    cost = client.get_metric_history(run_id, "evaluate/gpu_hours")
    assert [(m.step, m.value) for m in cost] == [(7, pytest.approx(3.0))]
    assert client.get_run(run_id).info.status == "RUNNING"  # an evaluation does not end the run


@pytest.mark.parametrize("override, message", [
    ("model.resolution=64", "the generator (model.*, data.num_classes) is the checkpoint's"),
    ("data.num_classes=3", "the generator (model.*, data.num_classes) is the checkpoint's"),
    ("train.steps=5", "evaluate takes eval.*, data.* and tracking.* keys only"),
    ("eval.num_sampels=5", "eval.num_sampels"),
    ("eval.num_samples", "is not of the form key=value"),
])
def test_evaluate_overrides_cannot_change_the_generator_or_name_unknown_keys(tmp_path, override, message):
    saved = config.to_container(eval_config(tmp_path, "w.pth"))
    with pytest.raises(ConfigError) as err:
        config_with_overrides(saved, [override])
    assert message in str(err.value)


def test_evaluate_overrides_are_typed_and_applied(tmp_path):
    saved = config.to_container(eval_config(tmp_path, "w.pth"))
    cfg = config_with_overrides(saved, ["eval.num_samples=50", "eval.metrics=[fid]", "data.workers=2"])
    assert cfg.eval.num_samples == 50 and list(cfg.eval.metrics) == ["fid"] and cfg.data.workers == 2


@pytest.mark.slow
def test_missing_weights_stop_every_rank_with_the_error(tmp_path, inception_weights):
    snapshot = _snapshot(tmp_path / "run", inception_weights)
    missing = tmp_path / INCEPTION_FILE
    proc = _cli(2, "evaluate", str(snapshot), f"eval.inception_weights={missing}", timeout=180)
    assert proc.returncode != 0  # and no rank waits for rank 0 until the timeout
    error = f"eval.inception_weights={str(missing)!r}: no such file"
    assert f"config error: {error}" in proc.stderr  # rank 0
    assert f"config error: on rank 0: {error}" in proc.stderr  # rank 1, told by rank 0

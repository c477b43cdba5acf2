"""Precision/recall, intra-class FID and the cost (gpu_hours) reported by `sagan-dist evaluate`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from sagan_dist import config
from sagan_dist.config import ConfigError
from sagan_dist.data import prepare_data
from sagan_dist.evaluation import (Evaluator, Reference, class_fid, compute_metrics, gpu_hours, parse_classes)
from sagan_dist.evaluation.command import _report
from test_evaluation import CPU, eval_config, inception_weights, tiny_generator  # noqa: F401 - fixture

PRC_ONLY = {"isc_splits": 1, "kid_subsets": 1, "kid_subset_size": 2}


def _pool(x: np.ndarray) -> dict[str, torch.Tensor]:
    return {"2048": torch.from_numpy(x.astype(np.float32))}


def test_precision_and_recall_are_one_for_the_same_set_and_zero_for_far_apart_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 2048))
    same = compute_metrics(["prc"], _pool(real), Reference.from_features(real, np.zeros(40)), PRC_ONLY, CPU.device)
    assert same == {"precision": 1.0, "recall": 1.0, "f_score": pytest.approx(1.0)}
    far = compute_metrics(["prc"], _pool(real + 100), Reference.from_features(real, np.zeros(40)), PRC_ONLY,
                          CPU.device)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_precision_falls_when_half_the_samples_leave_the_real_manifold_and_recall_stays():
    # Features on a 4-dimensional manifold (in 2048 dimensions iid noise makes all distances alike).
    rng = np.random.default_rng(1)
    embed = rng.normal(size=(4, 2048))
    real, fake = rng.normal(size=(400, 4)) @ embed, rng.normal(size=(400, 4))
    fake[:200] += 20  # half the samples far from every real one: fidelity lost, not diversity
    fake = fake @ embed
    m = compute_metrics(["prc"], _pool(fake), Reference.from_features(real, np.zeros(400)), PRC_ONLY, CPU.device)
    assert m["precision"] == pytest.approx(0.5, abs=0.1) and m["recall"] > 0.8


def test_class_fid_is_torch_fidelity_fid_against_that_class_only():
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(48, 48))
    labels = np.repeat([0, 1, 2], 100)
    real = (rng.normal(size=(300, 48)) + labels[:, None]) @ mix
    generated = ((rng.normal(size=(60, 48)) + 1) @ mix).astype(np.float32)
    ref = Reference(real.astype(np.float32), labels, *[None] * 2)
    fid, count = class_fid(torch.from_numpy(generated), ref, 1)
    real_1 = torch.from_numpy(real[labels == 1].astype(np.float32))
    expected = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(generated)),
                                        fid_features_to_statistics(real_1), False)
    # Same machine, same float64 formula up to the eigensolver (see test_evaluation's FID test).
    assert count == 100 and fid == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    with pytest.raises(ValueError, match=r"class 5: 0 of the reference images .*eval\.reference_samples"):
        class_fid(torch.from_numpy(generated), ref, 5)


def test_evaluator_reports_finite_precision_recall_and_intra_class_fid(tmp_path, inception_weights):
    cfg = eval_config(tmp_path / "run", inception_weights, "eval.metrics=[fid,prc]", "eval.class_samples=4")
    shards = prepare_data(cfg, tmp_path / "run")
    evaluator = Evaluator(cfg, CPU, shards, tmp_path / "run")
    # Classes 1 and 2 have 3 images each among the first 12 of the demo shards.
    metrics = evaluator(tiny_generator(cfg), step=5, classes=[1, 2])
    assert set(metrics) == {"fid", "precision", "recall", "f_score", "fid_class/1", "fid_class/2"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["fid_class/1"] > 0 and evaluator.last_class_counts == {1: 3, 2: 3}


def test_prc_is_a_default_metric_and_counts_too_small_for_it_are_named():
    assert "prc" in config.load(["demo"]).eval.metrics
    with pytest.raises(ConfigError, match=r"eval\.num_samples.*>= 4"):
        config.load(["demo"], ["eval.num_samples=3", "eval.isc_splits=1"])
    assert config.load(["demo"], ["eval.num_samples=3", "eval.isc_splits=1", "eval.metrics=[fid]"])


@pytest.mark.parametrize("text, message", [("1,x", "comma-separated class indices"), ("10", "classes 0..9"),
                                           ("-1", "classes 0..9"), (",", "classes 0..9")])
def test_bad_classes_are_config_errors_naming_the_option(text, message):
    with pytest.raises(ConfigError, match=f"--classes {text!r}.*{message}"):
        parse_classes(text, 10)


def test_classes_are_parsed_sorted_and_deduplicated():
    assert parse_classes("3, 1,3", 10) == [1, 3] and parse_classes(None, 10) == []


def test_gpu_hours_come_from_the_snapshot_and_are_unknown_for_older_ones(tmp_path, capsys):
    assert gpu_hours({"process_seconds": 4 * 1800.0}) == pytest.approx(2.0)  # 4 processes x 30 min
    assert gpu_hours({"step": 3}) is None
    _report({"step": 3, "gpu_hours": None, "fid": 12.5}, tmp_path / "r.json")
    printed = capsys.readouterr().out
    assert "gpu_hours  unknown" in printed
    assert json.loads((tmp_path / "r.json").read_text())["gpu_hours"] is None


@pytest.mark.parametrize("in_class, fails", [(0, True), (1, True), (2, False)])
def test_class_fid_with_too_few_reference_images_is_a_config_error_naming_the_key(in_class, fails):
    rng = np.random.default_rng(0)
    labels = np.array([3] * in_class + [5] * (8 - in_class))
    reference = Reference.from_features(rng.normal(size=(8, 16)), labels)
    pool = torch.from_numpy(rng.normal(size=(6, 16)).astype(np.float32))
    if fails:
        with pytest.raises(ConfigError, match=f"class 3: {in_class} of the reference.*eval.reference_samples"):
            class_fid(pool, reference, 3)
    else:
        fid, n = class_fid(pool, reference, 3)
        assert n == 2 and math.isfinite(fid)

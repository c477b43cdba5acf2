"""Nothing the evaluation reads from shared storage can run code.

A pickle whose ``__reduce__`` opens a marker file for writing is planted as the Inception weights
and as every cache file (ours and the names torch-fidelity's own cache would use): the marker must
never appear, the weights are refused with an error naming the file, and a cache is named in a
warning and recomputed.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sagan_dist.data import prepare_data
from sagan_dist.evaluation import (Evaluator, InceptionWeightsError, Reference, load_reference,
                                   reference_key, save_reference)
from test_evaluation import CPU, SAMPLES, eval_config, inception_weights, tiny_generator  # noqa: F401 - fixture


class Payload:
    """Unpickling this opens (creates) the marker file: stands in for any code an attacker runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path, torch_format: bool) -> Path:
    """A payload at ``path``: as torch.save writes it (a zip with data.pkl) or as a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"features": Payload(marker)}))
    return path


@pytest.mark.parametrize("torch_format", [True, False])
def test_a_pickle_planted_as_the_inception_weights_is_refused_by_name_and_never_run(tmp_path, torch_format):
    marker = tmp_path / "pwned"
    weights = plant(tmp_path / "shared" / "weights-inception.pth", marker, torch_format)
    cfg = eval_config(tmp_path / "run", weights, "eval.every=10")
    with pytest.raises(InceptionWeightsError) as err:
        Evaluator(cfg, CPU, "unused-because-the-weights-fail-first", tmp_path / "run")
    assert str(weights) in str(err.value) and "refused" in str(err.value)
    assert "eval.inception_weights" in str(err.value)
    assert not marker.exists()


def _reference(n: int = 6) -> Reference:
    rng = np.random.default_rng(0)
    return Reference.from_features(rng.normal(size=(n, 2048)).astype(np.float32), np.arange(n) % 3)


def _key(tmp_path: Path, n: int = 6) -> dict:
    return reference_key(eval_config(tmp_path, "w.pth"), "s-{0..1}.tar", n, "sha")


def _object_array_npz(path: Path, marker: Path, key: dict) -> None:
    """A well-formed .npz of the right key whose 'features' is an object array: np.load would
    unpickle it if allowed."""
    np.savez(path, features=np.array([Payload(marker)], dtype=object), labels=np.zeros(6, dtype=np.int64),
             key=np.array(json.dumps(key, sort_keys=True)))


@pytest.mark.parametrize("damage", ["pickle", "torch-pickle", "object-array", "truncated", "other-key", "nan"])
def test_a_bad_reference_cache_is_named_with_its_reason_never_executed(tmp_path, caplog, damage):
    path, marker, key = tmp_path / "cache" / "reference.npz", tmp_path / "pwned", _key(tmp_path)
    if damage in ("pickle", "torch-pickle"):
        plant(path, marker, torch_format=damage == "torch-pickle")
    elif damage == "object-array":
        path.parent.mkdir()
        _object_array_npz(path, marker, key)
    else:
        ref = _reference()
        if damage == "nan":
            ref.features[0, 0] = np.nan
        save_reference(path, ref, key if damage != "other-key" else {**key, "count": 7})
        if damage == "truncated":  # a copy cut short, as by a full disk on another machine
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert load_reference(path, key) is None
    assert not marker.exists()
    assert f"reference cache {path} was not used" in caplog.text and "recomputing it" in caplog.text
    if damage in ("pickle", "object-array"):
        assert "pickled data, which could run code and was not loaded" in caplog.text


def test_a_saved_reference_reads_back_exactly(tmp_path):
    path, ref, key = tmp_path / "reference.npz", _reference(), _key(tmp_path)
    save_reference(path, ref, key)
    back = load_reference(path, key)
    assert zipfile.is_zipfile(path) and path.with_suffix(".json").is_file()
    for name in ("features", "labels", "mu", "sigma"):  # a file round trip: the same bytes
        assert np.array_equal(getattr(back, name), getattr(ref, name))


def test_planted_cache_files_are_recomputed_and_never_run(tmp_path, inception_weights, caplog):
    """End to end: payloads at our cache's name and at every name torch-fidelity's cache would use."""
    marker = tmp_path / "pwned"
    cfg = eval_config(tmp_path / "run", inception_weights, "eval.every=10")
    shards = prepare_data(cfg, tmp_path / "run")
    evaluator = Evaluator(cfg, CPU, shards, tmp_path / "run")
    cache = evaluator.cache_path
    plant(cache, marker, torch_format=False)
    fidelity_names = [f"{evaluator.cache_name}-inception-v3-compat-{kind}.pt" for kind in
                      ("features-2048", "features-logits_unbiased", "stat-fid-2048")]
    for name in fidelity_names:
        plant(cache.parent / name, marker, torch_format=True)

    with caplog.at_level(logging.WARNING):
        metrics = evaluator(tiny_generator(cfg), step=10)
    assert not marker.exists()
    assert f"reference cache {cache} was not used" in caplog.text and "pickled data" in caplog.text
    assert evaluator.reference_reads == 1 and evaluator.last_reference_computed
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["fid"] > 0
    assert load_reference(cache, evaluator.reference_key) is not None  # replaced by a good one

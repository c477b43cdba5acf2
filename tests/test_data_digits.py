"""The embedded digits source: written once as shards into <run_dir>/data, read back by the reader."""
from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from sagan_dist import config
from sagan_dist.data import build_loader, prepare_data
from sagan_dist.data.sources import DIGITS_SHARDS, digits_images


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory for the module: the digits are written once and shared."""
    return tmp_path_factory.mktemp("run")


def test_prepare_data_writes_the_digits_once_and_reuses_them(run_dir: Path) -> None:
    cfg = config.load(["demo"])
    pattern = prepare_data(cfg, run_dir)
    data = run_dir / "data"
    assert pattern == str(data / "digits-{000000..000015}.tar")
    shards = sorted(data.glob("digits-*.tar"))
    assert len(shards) == DIGITS_SHARDS
    index = json.loads((data / "digits-index.json").read_text())
    assert index["total"] == 1797 and index["num_classes"] == 10 and index["resolution"] == 32
    assert json.loads((data / "classes.json").read_text()) == {str(c): c for c in range(10)}
    mtimes = [p.stat().st_mtime_ns for p in shards]

    assert prepare_data(cfg, run_dir) == pattern
    assert [p.stat().st_mtime_ns for p in shards] == mtimes  # reused, not rewritten
    shards[3].unlink()  # an incomplete set is written again
    assert prepare_data(cfg, run_dir) == pattern and shards[3].is_file()
    assert not list(data.glob(".*partial"))


def test_digits_stream_gives_each_digit_once_per_pass_with_its_label(run_dir: Path) -> None:
    cfg = config.load(["demo"], ["train.batch_size=64"])
    stream = build_loader(cfg, prepare_data(cfg, run_dir), rank=0, world_size=1, seed=0)
    images, labels = digits_images(32)
    label_of = {img.tobytes(): int(y) for img, y in zip(images, labels)}
    seen: Counter = Counter()
    for x, y in islice(stream, 1797 // 64):  # all but the last 5 samples of the first pass
        assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1 and 0 <= y.min() and y.max() <= 9
        pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for img, label in zip(pixels, y.tolist()):
            assert label_of[img.tobytes()] == label  # the very digit, with its own label
            seen[img.tobytes()] += 1
    assert len(seen) == 1797 // 64 * 64 and max(seen.values()) == 1  # no digit twice in a pass

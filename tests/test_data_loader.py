"""The shard reader: disjoint passes over ranks and workers, uneven shards, bad samples, draft decode,
determinism. Real tar files, real DataLoader worker processes, two ranks built in one process."""
from __future__ import annotations

import io
import logging
import random
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sagan_dist import config
from sagan_dist.data import build_loader
from sagan_dist.data.loader import decode_image, draft
from sagan_dist.data.shards import shard_name, write_metadata, write_shard

RES = 32


def _png(value: int) -> bytes:
    """A uniform image whose red and green channels spell ``value`` (survives crop and resize)."""
    buf = io.BytesIO()
    Image.new("RGB", (RES + 8, RES), (value % 256, value // 256, 77)).save(buf, "PNG")
    return buf.getvalue()


def _ids(images: torch.Tensor) -> list[int]:
    pixels = ((images[:, :2, RES // 2, RES // 2] + 1) * 127.5).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def write_id_shards(folder: Path, counts: list[int], extra: dict[int, list[dict[str, Any]]] | None = None) -> str:
    """Shards of ``counts[i]`` id images each (ids 0..sum-1, label id % 10) plus ``extra`` samples."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, next_id = [], 0
    for i, n in enumerate(counts):
        samples = [{"__key__": f"s{next_id + j:05d}", "png": _png(next_id + j), "cls": (next_id + j) % 10}
                   for j in range(n)]
        samples += (extra or {}).get(i, [])
        count, size = write_shard(folder / shard_name("train", i), samples)
        shards.append({"name": shard_name("train", i), "samples": count, "bytes": size})
        next_id += n
    write_metadata(folder, "train", [str(c) for c in range(10)], shards)
    return str(folder / f"train-{{000000..{len(counts) - 1:06d}}}.tar")


def make_cfg(shards: str, batch: int, world: int, **data: Any):
    overrides = [f"data.{k}={v}" for k, v in {"source": "shards", "shards": shards, **data}.items()]
    return config.load(overrides=[*overrides, f"model.resolution={RES}", f"train.batch_size={batch}"],
                       world_size=world)


def take(stream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(stream, n))


def test_two_ranks_with_two_workers_read_every_sample_once_per_pass(tmp_path: Path) -> None:
    shards = write_id_shards(tmp_path, [12] * 8)  # 96 samples; each of 4 readers gets 2 shards
    cfg = make_cfg(shards, batch=8, world=2, workers=2, shuffle_buffer=50)  # micro-batch 4
    streams = [build_loader(cfg, shards, rank, 2, seed=3) for rank in (0, 1)]
    per_pass = 96 // (2 * 4)
    assert all(s.epoch_batches == per_pass for s in streams)
    passes = []
    for _ in range(2):
        seen = [i for s in streams for images, labels in take(s, per_pass) for i in _ids(images)]
        assert len(seen) == len(set(seen)) == 96 and set(seen) == set(range(96))
        passes.append(seen)
    assert passes[0] != passes[1]  # each pass has its own shard split and shuffle
    for s in streams:
        s.close()


def test_uneven_shards_every_rank_yields_batches_for_ever(tmp_path: Path) -> None:
    shards = write_id_shards(tmp_path, [40, 3, 3, 2])  # one rank gets far fewer samples per pass
    cfg = make_cfg(shards, batch=8, world=2, workers=1, shuffle_buffer=10)
    streams = [build_loader(cfg, shards, rank, 2, seed=0) for rank in (0, 1)]
    assert streams[0].epoch_batches == streams[1].epoch_batches == 48 // 8
    for s in streams:
        batches = take(s, 3 * s.epoch_batches)  # far beyond the small rank's own data
        assert len(batches) == 18
        assert all(images.shape == (4, 3, RES, RES) and labels.shape == (4,) for images, labels in batches)
        s.close()


def _bad_samples() -> dict[int, list[dict[str, Any]]]:
    return {0: [{"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 garbage", "cls": 1},
                {"__key__": "nolabel", "png": _png(900)}],
            1: [{"__key__": "badlabel", "png": _png(901), "cls": 10},
                {"__key__": "noimage", "cls": 2}]}


def test_bad_samples_are_skipped_counted_and_warned_about_a_few_times(tmp_path: Path, caplog) -> None:
    shards = write_id_shards(tmp_path, [6, 6], _bad_samples())
    cfg = make_cfg(shards, batch=4, world=1, workers=0, max_warnings=2)
    stream = build_loader(cfg, shards, 0, 1, seed=0)
    with caplog.at_level(logging.WARNING, logger="sagan_dist.data.loader"):
        seen = [i for images, labels in take(stream, 3) for i in _ids(images)]  # one pass: 12 good
        assert sorted(seen) == list(range(12))
        assert 4 <= stream.skipped <= 8 and stream.bad_shards == 0
        seen = [i for images, _ in take(stream, 3) for i in _ids(images)]
        assert sorted(seen) == list(range(12)) and 8 <= stream.skipped <= 12
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "train-00000" in warnings[0]  # names the shard ...
    assert any(key in warnings[0] for key in ("corrupt", "nolabel", "badlabel", "noimage"))  # ... and sample
    assert "only counted" in warnings[1]


def test_skipped_counts_come_back_from_worker_processes(tmp_path: Path) -> None:
    shards = write_id_shards(tmp_path, [6, 6], _bad_samples())
    cfg = make_cfg(shards, batch=4, world=1, workers=2)
    stream = build_loader(cfg, shards, 0, 1, seed=0)
    seen = [i for images, _ in take(stream, 6) for i in _ids(images)]  # 2 passes of 12 good samples
    assert sorted(seen) == sorted(list(range(12)) * 2)
    assert 8 <= stream.skipped <= 12
    stream.close()


def test_missing_and_truncated_shards_are_skipped_but_nothing_readable_fails(tmp_path: Path) -> None:
    shards = write_id_shards(tmp_path / "ok", [8, 8, 8])
    (tmp_path / "ok" / shard_name("train", 1)).unlink()
    truncated = tmp_path / "ok" / shard_name("train", 2)
    truncated.write_bytes(truncated.read_bytes()[:5000])  # cut inside its 3rd sample
    cfg = make_cfg(shards, batch=2, world=1, workers=0)
    stream = build_loader(cfg, shards, 0, 1, seed=0)
    seen = [i for images, _ in take(stream, 10) for i in _ids(images)]  # two passes of 8 + 2
    assert sorted(seen) == sorted(list(range(8)) * 2 + [16, 17] * 2)
    assert stream.bad_shards >= 3 and stream.skipped >= stream.bad_shards

    bad = write_id_shards(tmp_path / "bad", [0, 0], {0: _bad_samples()[0] * 3, 1: _bad_samples()[1] * 3})
    for workers in (0, 1):
        stream = build_loader(make_cfg(bad, batch=4, world=1, workers=workers), bad, 0, 1, seed=0)
        with pytest.raises(RuntimeError, match=r"nothing readable") as info:
            next(stream)
        assert bad in str(info.value)


def test_pipe_urls_read_like_local_files(tmp_path: Path) -> None:
    write_id_shards(tmp_path, [6, 6])
    pattern = f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar"
    stream = build_loader(make_cfg(pattern, batch=4, world=1), pattern, 0, 1, seed=0)
    assert sorted(i for images, _ in take(stream, 3) for i in _ids(images)) == list(range(12))


@pytest.mark.parametrize("pattern, message", [
    ("{missing}/train-{000000..000003}.tar", "none of its 4 shards exists"),
    ("s3://bucket/train-{000000..000003}.tar", "pipe:aws s3 cp"),
])
def test_unusable_shard_lists_fail_before_reading(tmp_path: Path, pattern: str, message: str) -> None:
    pattern = pattern.replace("{missing}", str(tmp_path / "nowhere"))
    cfg = make_cfg(pattern, batch=4, world=1)
    with pytest.raises(ValueError, match=message) as info:
        build_loader(cfg, pattern, 0, 1, seed=0)
    assert pattern in str(info.value)


def test_fewer_shards_than_readers_needs_resampling(tmp_path: Path) -> None:
    shards = write_id_shards(tmp_path, [5, 5, 5])
    cfg = make_cfg(shards, batch=8, world=2, workers=2)
    with pytest.raises(ValueError, match="data.resampled=true"):
        build_loader(cfg, shards, 0, 2, seed=0)
    cfg = make_cfg(shards, batch=8, world=2, workers=2, resampled=True)
    streams = [build_loader(cfg, shards, rank, 2, seed=0) for rank in (0, 1)]
    ids = {i for s in streams for images, _ in take(s, 8) for i in _ids(images)}
    assert len(ids) > 5  # drawn from more than one shard
    for s in streams:
        s.close()


def _photo(w: int, h: int, seed: int) -> bytes:
    """A smooth JPEG with edges: low-frequency noise plus a few rectangles."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.array(img)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        pixels[y:y + int(rng.integers(10, 40)), x:x + int(rng.integers(10, 40))] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_same_arguments_give_the_same_batches_with_workers(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        write_shard(folder / shard_name("train", i),
                    [{"__key__": f"{i}_{j}", "jpg": _photo(96, 72, 10 * i + j), "cls": j} for j in range(6)])
    shards = str(folder / "train-{000000..000003}.tar")
    for resampled in (False, True):
        cfg = make_cfg(shards, batch=4, world=1, workers=2, crop="random", flip=True, resampled=resampled)
        runs = [take(build_loader(cfg, shards, 0, 1, seed=s), 9) for s in (7, 7, 8)]
        for (a, la), (b, lb) in zip(runs[0], runs[1]):
            assert torch.equal(a, b) and torch.equal(la, lb)
        assert any(not torch.equal(a, c) for (a, _), (c, _) in zip(runs[0], runs[2]))


def test_draft_decode_matches_a_full_decode_at_a_fraction_of_the_pixels() -> None:
    data = _photo(500, 375, seed=1)
    with Image.open(io.BytesIO(data)) as img:
        box = draft(img, (62.5, 0.0, 437.5, 375.0), 128)
        assert img.size == (250, 188)  # the DCT-scaled decode: half the size, still >= 128 px crop
        assert box == pytest.approx((31.25, 0.0, 218.75, 187.5))
    for crop in ("center", "random"):
        fast = decode_image(data, 128, crop, 0.35, True, use_draft=True, rng=random.Random(4))
        full = decode_image(data, 128, crop, 0.35, True, use_draft=False, rng=random.Random(4))
        assert fast.shape == full.shape == (3, 128, 128) and fast.dtype == torch.uint8
        diff = (fast.float() - full.float()).abs().mean()
        assert 0 < diff < 3.0  # of 255: close, yet decoded differently (the DCT-scaled path ran)
    small = decode_image(data, 256, "center", use_draft=True)  # 375 px < 2 x 256: no draft
    assert torch.equal(small, decode_image(data, 256, "center", use_draft=False))

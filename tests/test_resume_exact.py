"""Resume is exact at ANY step, and passes over the data are real epochs.

A run stopped at a step that is not a multiple of train.checkpoint_every (by train.steps, or by a
stop request in the middle of a step's batch fetch) and resumed ends with the uninterrupted run's
weights, bitwise: the same kernels run twice on the same inputs, so nothing may differ. With
DataLoader workers, and with 2 torchrun ranks (gloo). The loader read on from a stored position
gives the batches the uninterrupted stream gives (real tars, real worker processes, random crops
and flips, a bad sample in the skipped part), and every sample is seen once per pass in an order
of its own, across snapshots and a resume.
"""
from __future__ import annotations

import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from sagan_dist import checkpoint
from sagan_dist.config import load
from sagan_dist.data import build_loader
from sagan_dist.data.position import StreamPosition, parse_saved, resume_position
from sagan_dist.data.stream import StopRequested
from sagan_dist.dist import DistInfo
from sagan_dist.train import Trainer
from test_data_loader import _ids, make_cfg, write_id_shards

ROOT = Path(__file__).resolve().parents[1]
INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=8",
        "train.log_every=2", "train.sample_every=100", "tracking.enabled=false", "train.samples_per_class=2",
        "data.crop=random", "data.flip=true", "data.min_scale=0.5"]


# ---------------------------------------------------------------------------------------- loader
def _batches(stream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(stream, n))


@pytest.mark.parametrize("workers, resampled", [(0, False), (2, False), (2, True)])
@pytest.mark.parametrize("consumed", [0, 3, 12, 17])  # none, mid-pass, a pass's end, into pass 2
def test_a_stream_started_at_a_position_reads_on_as_the_uninterrupted_one(tmp_path, workers, resampled, consumed):
    bad = {1: [{"__key__": "bad", "png": b"not an image", "cls": 3}]}  # read in pass 0 (skipped on resume)
    shards = write_id_shards(tmp_path, [12] * 4, extra=bad)  # 48 good samples: 12 batches of 4 per pass
    cfg = make_cfg(shards, batch=4, world=1, workers=workers, resampled=resampled, shuffle_buffer=20,
                   crop="random", min_scale=0.5, flip=True)
    whole = build_loader(cfg, shards, 0, 1, seed=5)
    first = _batches(whole, consumed)
    position = whole.position()
    rest = _batches(whole, 8)
    whole.close()
    resumed = build_loader(cfg, shards, 0, 1, seed=5, start=position)
    for (a, la), (b, lb) in zip(rest, _batches(resumed, 8), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    resumed.close()
    assert len(first) == consumed and position.next_reader == consumed % max(1, workers)


def test_a_position_of_another_reader_count_is_refused_naming_the_key(tmp_path):
    shards = write_id_shards(tmp_path, [4] * 4)
    with pytest.raises(ValueError, match="data.workers"):
        build_loader(make_cfg(shards, batch=4, world=1, workers=2), shards, 0, 1, seed=0,
                     start=StreamPosition.at_pass(1))


@pytest.mark.parametrize("saved", [
    {"world_size": 1, "ranks": [{"next": 1, "readers": [[0, 3]]}]},  # next reader out of range
    {"world_size": 2, "ranks": [{"next": 0, "readers": [[0, 3]]}]},  # world size != ranks
    {"world_size": 1, "ranks": [{"next": 0, "readers": [[0, -1]]}]},
    {"world_size": 1, "ranks": [{"next": 0, "readers": [[True, 1]]}]},
    {"world_size": 1, "ranks": [{"next": 0}]},
    "a string"])
def test_a_malformed_stored_position_is_refused_naming_the_key(saved):
    with pytest.raises(ValueError, match="'data'"):
        parse_saved(saved)


def test_on_another_layout_every_reader_starts_the_earliest_pass_in_progress():
    saved = parse_saved({"world_size": 2, "ranks": [{"next": 1, "readers": [[3, 5], [2, 9]]},
                                                    {"next": 0, "readers": [[4, 0], [3, 1]]}]})
    assert resume_position(saved, 1, 2, 2) == StreamPosition(0, ((4, 0), (3, 1)))  # same layout: its own
    assert resume_position(saved, 0, 1, 2) == StreamPosition(0, ((2, 0), (2, 0)))  # another world size
    assert resume_position(saved, 0, 2, 3) == StreamPosition(0, ((2, 0),) * 3)  # other data.workers
    assert resume_position(None, 0, 2, 2) is None


# ---------------------------------------------------------------------------------------- trainer
def _trainer(run_dir: Path, *overrides: str, batch_source=None) -> Trainer:
    return Trainer(load(["demo"], TINY + [f"train.run_dir={run_dir}", *overrides]), INFO, batch_source=batch_source)


def _weights(tr: Trainer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (tr.G.raw, tr.D.raw, tr.ema.model)]


def _assert_bitwise(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    for want, got in zip(a, b, strict=True):
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stop_at_a_step_between_snapshots_resumes_bitwise(tmp_path, workers):
    common = ["train.checkpoint_every=4", f"data.workers={workers}", "train.n_critic=2"]
    full = _trainer(tmp_path / "a", "train.steps=7", *common)
    full.fit()
    _trainer(tmp_path / "b", "train.steps=5", *common).fit()  # a final snapshot at 5, between 4 and 8
    resumed = _trainer(tmp_path / "b", "train.steps=7", *common)
    assert resumed.step == 5
    resumed.fit()
    _assert_bitwise(_weights(full), _weights(resumed))


class _StopsOnce:
    """A real batch stream that raises StopRequested (as a SIGTERM during a data wait does) once,
    at its ``at``-th batch: in the middle of a step's fetch when n_critic > 1."""

    def __init__(self, stream, at: int) -> None:
        self.stream, self.at, self.calls = stream, at, 0

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def next_batch(self, stop=lambda: False):
        self.calls += 1
        if self.calls == self.at:
            raise StopRequested("test")
        return self.stream.next_batch(stop)


@pytest.mark.slow
def test_a_stop_in_the_middle_of_a_steps_fetch_resumes_bitwise(tmp_path):
    common = ["train.checkpoint_every=4", "data.workers=2", "train.n_critic=2"]
    full = _trainer(tmp_path / "a", "train.steps=6", *common)
    full.fit()
    first = _trainer(tmp_path / "b", "train.steps=6", *common)
    source = first.batch_source
    first.batch_source = lambda seed, start: _StopsOnce(source(seed, start), at=2 * 3 + 2)  # step 4, 2nd batch
    first.fit()
    assert first.stopped and first.step == 3
    resumed = _trainer(tmp_path / "b", "train.steps=6", *common)
    assert resumed.step == 3
    resumed.fit()
    _assert_bitwise(_weights(full), _weights(resumed))


class _Recorder:
    """A real batch stream whose consumed sample ids are written down."""

    def __init__(self, stream, seen: list[int]) -> None:
        self.stream, self.seen = stream, seen

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def next_batch(self, stop=lambda: False):
        images, labels = self.stream.next_batch(stop)
        self.seen += _ids(images)
        return images, labels


@pytest.mark.slow
def test_every_sample_is_seen_once_per_pass_across_snapshots_and_a_resume(tmp_path):
    shards = write_id_shards(tmp_path / "shards", [12] * 8)  # 96 samples: 12 steps of 8 per pass
    data = ["data.source=shards", f"data.shards={shards}", "model.resolution=32", "data.workers=2",
            "data.shuffle_buffer=30", "data.crop=center", "data.flip=false", "train.checkpoint_every=1"]
    seen: list[int] = []

    def recorded(run_dir: Path, steps: int) -> Trainer:
        tr = _trainer(run_dir, f"train.steps={steps}", *data)
        cfg = tr.cfg
        tr.batch_source = lambda seed, start: _Recorder(build_loader(cfg, tr.shards, 0, 1, seed, None, start), seen)
        return tr

    recorded(tmp_path / "run", 7).fit()  # a snapshot at every step, then stop at 7: mid-pass
    recorded(tmp_path / "run", 36).fit()  # resumed: three passes in all
    assert len(seen) == 3 * 96
    passes = [seen[i * 96:(i + 1) * 96] for i in range(3)]
    for p in passes:
        assert sorted(p) == list(range(96)), "each sample exactly once per pass"
    assert passes[0] != passes[1] != passes[2] != passes[0], "each pass in its own order"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")][-1] == "step-00000036"


def test_a_snapshot_with_a_malformed_data_position_is_skipped_naming_it(tmp_path, caplog):
    _trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2").fit()
    newest = checkpoint.list_checkpoints(tmp_path)[-1] / "state.pt"
    state = torch.load(newest, weights_only=True)
    state["data"]["ranks"][0]["readers"] = [[0, -5]]
    torch.save(state, newest)
    with caplog.at_level("WARNING"):
        resumed = _trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    assert resumed.step == 2
    assert "step-00000004" in caplog.text and "'data'" in caplog.text


# ---------------------------------------------------------------------------------------- 2 ranks
def _torchrun(run_dir: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sagan_dist.cli", "train", "demo", *TINY, "data.workers=2", "train.checkpoint_every=3",
           f"train.run_dir={run_dir}", f"train.steps={steps}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _final(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    snapshot = checkpoint.list_checkpoints(run_dir)[-1]
    state = checkpoint.load_state(snapshot)
    return [torch.load(snapshot / f"{net}.pt", weights_only=True)["model"] for net in ("G", "D")] + [state["G_ema"]]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_with_workers_stopped_between_snapshots_resume_bitwise(tmp_path):
    _torchrun(tmp_path / "a", 6)
    _torchrun(tmp_path / "b", 4)  # snapshots at 3 and 4: the stop is not a multiple of 3
    saved = checkpoint.load_state(checkpoint.list_checkpoints(tmp_path / "b")[-1])["data"]
    assert saved["world_size"] == 2 and [len(r["readers"]) for r in saved["ranks"]] == [2, 2]
    _torchrun(tmp_path / "b", 6)
    _assert_bitwise(_final(tmp_path / "a"), _final(tmp_path / "b"))

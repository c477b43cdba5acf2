"""GPU-only paths checked on CPU (issue 21): what a CPU run can walk is walked for real; where a path
exists only on a GPU, a stand-in says so in the test's docstring.

* Adam's moments come back in their parameter's layout after a load, channels_last on -> off and
  off -> on, in the DDP engine and in DeepSpeed's ZeRO 0 (both real, on CPU);
* DeepSpeed's gamma broadcast runs on the engine's device ("meta" stands in for CUDA: every
  collective's tensor must be on the group's device type);
* the prefetch thread makes its copy stream's device current (``torch.cuda.set_device`` recorded);
* NCCL's watchdog is told to abort the communicator, not the process (the environment at
  ``init_process_group``);
* TF32 is set through one API, so reading the settings never raises; feature extraction for FID
  runs in full fp32 under any training setting, and the reference cache key says so;
* the EMA copy follows G's memory format; ``sample`` draws z on a CPU generator for any device.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import types

import pytest
import torch
from torch import nn

from sagan_dist import dist
from sagan_dist.config import load
from sagan_dist.data import stream
from sagan_dist.dist import DistInfo
from sagan_dist.ema import EMA
from sagan_dist.engines.ddp import DDPEngine
from sagan_dist.evaluation.metrics import extract
from sagan_dist.models.sagan import Generator
from sagan_dist.sample import class_interpolation, class_sheet, truncated_normal, z_interpolation

CPU = torch.device("cpu")


# ---- Adam's moments in their parameter's layout ---------------------------------------------
def _conv_engine(channels_last: bool) -> DDPEngine:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1))
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return DDPEngine(net, lr=0.1, betas=(0.0, 0.9), precision="fp32", grad_clip=0.0, device=CPU, is_main=True)


def _fixed_step(engine: DDPEngine, seed: int) -> None:
    """One update with gradients drawn from ``seed`` (no backward: the conv kernels of the two
    layouts would sum in other orders, and this test is about the optimizer alone)."""
    gen = torch.Generator().manual_seed(seed)
    for p in engine.raw.parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
    engine.step()


@pytest.mark.parametrize("saved_nhwc", [True, False], ids=["nhwc-to-nchw", "nchw-to-nhwc"])
def test_adam_moments_follow_the_parameter_layout_after_a_load(tmp_path, saved_nhwc):
    """A snapshot of one memory format resumed under the other continues as the saving run would.

    Fused Adam is elementwise, so once the moments are in the parameter's strides both runs do the
    same arithmetic per element: 1e-6 covers a vectorised vs. scalar tail at most. Before the fix
    the moments kept their saved strides and fused Adam paired the wrong elements (0.09 off at lr 0.1).
    """
    saving = _conv_engine(saved_nhwc)
    _fixed_step(saving, 1)
    saving.save(tmp_path / "G")
    resumed = _conv_engine(not saved_nhwc)
    resumed.load(tmp_path / "G")
    for p in resumed.raw.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed.optimizer.state[p][key].stride() == p.stride(), key
    _fixed_step(saving, 2), _fixed_step(resumed, 2)
    for a, b in zip(saving.raw.parameters(), resumed.raw.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("saved_nhwc", [True, False], ids=["nhwc-to-nchw", "nchw-to-nhwc"])
def test_deepspeed_zero0_moments_follow_the_parameter_layout_after_a_load(tmp_path, saved_nhwc):
    """The same through DeepSpeed's load_checkpoint (ZeRO 0, fp32: torch's fused Adam inside).
    Values equal exactly: the load copies the same numbers into other strides."""
    from sagan_dist.train import Trainer

    def trainer(run: str, nhwc: bool) -> Trainer:
        cfg = load(["demo"], ["model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "train.batch_size=4",
                              "tracking.enabled=false", "engine=deepspeed", "deepspeed.zero_stage=0",
                              f"model.channels_last={str(nhwc).lower()}", f"train.run_dir={tmp_path / run}"])
        return Trainer(cfg, DistInfo(0, 1, 0, CPU))

    saving = trainer("a", saved_nhwc)
    saving.start_segment()
    saving.train_step()
    saving.D.save(tmp_path / "snap" / "D")
    resumed = trainer("b", not saved_nhwc)
    resumed.D.load(tmp_path / "snap" / "D")
    saved_state, state = saving.D.engine.optimizer.state, resumed.D.engine.optimizer.state
    moved = 0
    for p, q in zip(saving.D.raw.parameters(), resumed.D.raw.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[q][key].stride() == q.stride(), key
            assert torch.equal(state[q][key], saved_state[p][key])
            moved += p.dim() == 4
    assert moved > 0  # some parameters really changed layout


# ---- DeepSpeed: collectives on the group's device -------------------------------------------
def test_deepspeed_broadcasts_gammas_on_the_engine_device(monkeypatch):
    """Stand-in: no CUDA here, so the "meta" device plays the GPU and the default group is taken to
    be of its type (as NCCL's is of CUDA's). Every collective before deepspeed.initialize must get
    tensors of that type; the gammas were broadcast from the CPU before the fix. channels_last (on
    by default on CUDA) weights go in the same broadcast: DeepSpeed cannot view them as bytes."""
    from sagan_dist.engines import deepspeed as ds_engine

    seen: list[torch.device] = []

    class Initialised(Exception):
        pass

    def initialize(**kwargs):
        raise Initialised

    monkeypatch.setattr(ds_engine, "ensure_process_group", lambda info: None)
    monkeypatch.setattr(ds_engine.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(ds_engine.tdist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(ds_engine.tdist, "broadcast", lambda t, src, group=None: seen.append(t.device))
    monkeypatch.setattr(ds_engine.deepspeed, "initialize", initialize)
    cfg = load(["demo"], ["engine=deepspeed", "tracking.enabled=false"])
    g = Generator(32, num_classes=10, z_dim=16, ch=8, attention=[16]).to(memory_format=torch.channels_last)
    with pytest.raises(Initialised):
        ds_engine.DeepSpeedEngine(g, 1e-4, (0.0, 0.9), cfg, DistInfo(0, 2, 0, torch.device("meta")), "G")
    assert seen and {d.type for d in seen} == {"meta"}
    flagged = [p for p in g.parameters() if hasattr(p, "ds_optim_param")]
    assert {p.dim() for p in flagged} == {0, 4} and all(p.dim() == 0 or p.stride(-1) != 1 for p in flagged)


# ---- the prefetch thread's device -----------------------------------------------------------
@pytest.mark.parametrize("stream_device", [torch.device("cuda", 3), None], ids=["cuda-stream", "no-stream"])
def test_prefetch_thread_makes_its_copy_streams_device_current(monkeypatch, stream_device):
    """Stand-in: ``torch.cuda.set_device`` is recorded (there is no CUDA here); the thread must call
    it for its copy stream's device, in that thread, and not at all without a copy stream."""
    calls: list[tuple[object, str]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((d, threading.current_thread().name)))
    copy_stream = types.SimpleNamespace(device=stream_device) if stream_device else None
    out = stream.queue.Queue(maxsize=2)
    thread = threading.Thread(target=stream._prefetch, name="prefetch-test",
                              args=(iter(()), out, threading.Event(), stream_device, copy_stream))
    thread.start()
    thread.join(timeout=10)
    assert isinstance(out.get_nowait(), stream._Failed)  # the empty reader ended the thread
    assert calls == ([(stream_device, "prefetch-test")] if stream_device else [])


# ---- NCCL's error handling ------------------------------------------------------------------
@pytest.mark.parametrize("exported, want", [(None, "2"), ("3", "3")], ids=["default", "user-value-kept"])
def test_nccl_watchdog_aborts_the_communicator_not_the_process(monkeypatch, exported, want):
    """Stand-in: init_process_group is recorded, not run (no NCCL here)."""
    seen = {}

    class Started(Exception):
        pass

    def init(backend, **kwargs):
        seen[backend] = dist.os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        raise Started

    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    if exported is None:
        monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    else:
        monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", exported)
    monkeypatch.setattr(dist.dist, "init_process_group", init)
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    with pytest.raises(Started):
        with dist.process_group(backend="nccl"):
            pass
    assert seen == {"nccl": want}


def test_a_nccl_timeout_message_is_the_gloo_one():
    """What NCCL raises once its communicator is aborted becomes the one-line CollectiveTimeout."""
    with pytest.raises(dist.CollectiveTimeout, match="a peer process or node is gone"):
        with dist.collective_failures(600):
            raise dist.dist.DistBackendError("NCCL communicator was aborted on rank 1. Original reason: "
                                             "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)")


# ---- TF32, and FID features in full fp32 ----------------------------------------------------
TF32_SCRIPT = """
import torch
from sagan_dist.acceleration import enable_tf32
from sagan_dist.evaluation.weights import full_fp32
enable_tf32()
print(torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
with full_fp32(torch.device("cpu")):
    print(torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
print(torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
"""


def test_tf32_settings_can_be_read_after_training_sets_them_and_evaluation_turns_them_off():
    """In a fresh process (the switches are global). Before the fix, reading them raised."""
    res = subprocess.run([sys.executable, "-c", TF32_SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:3] == ["high True True", "highest False False", "high True True"]


class _Recorder(nn.Module):
    """An extractor that records the precision settings its forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        self.seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
                          torch.is_autocast_enabled("cpu")))
        return (x.float().flatten(1) @ torch.ones(x[0].numel(), 4),)

    def convert_features_tuple_to_dict(self, out: tuple[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"2048": out[0]}


def test_features_are_extracted_in_full_fp32_whatever_training_set():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    rec = _Recorder()
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = extract(rec, torch.zeros(4, 3, 2, 2, dtype=torch.uint8), 2, CPU)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    assert rec.seen == [("highest", False, False)] * 2
    assert features["2048"].dtype == torch.float32


def test_the_reference_cache_key_names_the_feature_precision(tmp_path):
    from sagan_dist.evaluation.reference import reference_key

    cfg = load(["demo"], ["tracking.enabled=false", f"train.run_dir={tmp_path}"])
    assert reference_key(cfg, "a-{0..3}.tar", 10, "sha")["precision"] == "fp32, no TF32, no autocast"


# ---- EMA layout, and latents on a CPU generator ---------------------------------------------
def test_the_ema_copy_follows_gs_memory_format():
    torch.manual_seed(0)
    g = Generator(32, num_classes=10, z_dim=16, ch=8, attention=[16])
    ema = EMA(g)  # taken before channels_last, as the trainer does
    g.to(memory_format=torch.channels_last)
    ema.follow(g, CPU)
    pairs = list(zip(ema.model.parameters(), g.parameters()))
    assert any(p.dim() == 4 for p, _ in pairs)
    for mine, theirs in pairs:
        assert mine.stride() == theirs.stride() and torch.equal(mine, theirs)
    ema.update(g, 0.5)  # still an EMA of G: equal weights stay equal
    assert all(torch.equal(mine, theirs) for mine, theirs in pairs)


def test_sheets_draw_z_on_a_cpu_generator_whatever_gs_device():
    """Stand-in: G on "meta" plays a GPU (a CUDA generator draws other numbers than the CPU's,
    so one --seed gave other images on GPU). On CPU the z are those of the CPU generator."""
    torch.manual_seed(0)
    g = Generator(32, num_classes=10, z_dim=16, ch=8, attention=[16]).eval()
    want = truncated_normal((3, 16), 0.5, torch.Generator().manual_seed(7), CPU)
    assert torch.equal(class_sheet(g, [1, 2], 3, 0.5, 7)[0][:3], want)
    g.to("meta")
    for z in (z_interpolation(g, 2, 3, [1], 0.5, 7)[0], class_sheet(g, [1, 2], 3, 0.5, 7)[0],
              class_interpolation(g, 2, 3, 1, 2, 0.0, 7)[0]):
        assert z.device.type == "meta"

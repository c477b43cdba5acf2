"""DeepSpeed engine: G and D each in their own DeepSpeed engine (ZeRO 0/1/2, bf16/fp16, clipping).

The DeepSpeed config is generated from ours (`deepspeed_config`): micro-batch, gradient
accumulation, ZeRO stage, gradient clipping and precision, with ``deepspeed.extra`` merged on top
for any other DeepSpeed key. The optimizer is torch's Adam passed in as a client optimizer:
DeepSpeed's own Adam is a fused CUDA op, which does not exist on CPU.

Precision:
- bf16 uses DeepSpeed's ``torch_autocast`` section: the model, its gradients and BatchNorm /
  spectral-norm state stay fp32 and forwards run under torch.autocast, so the numerics are the
  DDP engine's (a bf16 run is bitwise the same under both engines on one process).
- fp16 uses DeepSpeed's ``fp16`` section: fp16 parameters, fp32 master weights in the optimizer
  and DeepSpeed's dynamic loss scaler. (torch_autocast with fp16 is not used: in DeepSpeed 0.19.8
  ZeRO 1/2 detect the overflow themselves and never let the GradScaler back off, so a run whose
  first steps overflow stays stuck.)
- ``deepspeed.extra={torch_autocast: {enabled: false}, bf16: {enabled: true}}`` switches bf16 to
  bf16 parameters as well (less memory for weights and gradients, coarser BatchNorm statistics
  on CPU).
With bf16/fp16 parameters DeepSpeed's forward switches an outer torch.autocast off, so a forward
pre-hook casts floating-point inputs to the parameters' dtype instead; it also covers calls to
``raw`` (the G loss runs through ``D.raw``).

Two engines in one loop: a backward must never reach one engine's forward output through the
other engine's ``backward`` (ZeRO 0 raises "Direct calls to tensor.backward() are not supported"),
which holds because the loop makes the D step's fakes under no_grad and runs the G loss through
``D.raw`` with D's requires_grad off.

Replicas: after every step rank 0's buffers (BatchNorm statistics) are broadcast, as in the DDP
engine, so G, D and the EMA generator are identical on all ranks. Checkpoints: DeepSpeed's
``save_checkpoint`` under the tag ``deepspeed`` (rank 0 writes the weights, every rank its ZeRO
shard, so ``train.run_dir`` must be storage all nodes share); ``load`` raises when files are
missing, on every rank alike, and a snapshot of another engine, ZeRO stage or ZeRO world size is a
ConfigError rather than a corrupt snapshot to fall back from.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
from pathlib import Path
from typing import Any, ContextManager, Mapping

import torch
import torch.distributed as tdist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sagan_dist.config import ConfigError
from sagan_dist.dist import DistInfo
from sagan_dist.engines.base import Engine, StepResult

if not torch.cuda.is_available():
    # Pick DeepSpeed's CPU accelerator up front instead of letting it probe (and warn).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402  (after DS_ACCELERATOR is set)

# On CPU, DeepSpeed's comm layer JIT-compiles a shared-memory all-reduce op when it starts (about
# two minutes, and a C++ toolchain); training never uses it (ZeRO goes through torch.distributed),
# so mark it unavailable. DeepSpeed keeps this dict for the process, so the edit sticks.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

TAG = "deepspeed"  # the checkpoint tag: one checkpoint per engine directory, no 'latest' file
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's name for the weights (and metadata)


def deepspeed_config(cfg: DictConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: ours, then ``deepspeed.extra`` merged on top.

    config.validate has already refused extra keys that would contradict ours (DEEPSPEED_DERIVED).
    """
    t = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // (world_size * t.accumulation),
        "gradient_accumulation_steps": t.accumulation,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 2**31 - 1,  # our loop logs progress; DeepSpeed's lines would be noise
    }
    if t.precision == "bf16":
        # No lower-precision gradient all-reduce: the DDP engine reduces in fp32 too, and the
        # layers DeepSpeed would pick (plain Linear/Conv) only hold biases here (SN weights live
        # in parametrization modules).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True}
    extra = cfg.deepspeed.extra
    ds = merge(ds, OmegaConf.to_container(extra, resolve=True) if isinstance(extra, DictConfig) else dict(extra))
    low = [k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled")]
    if low and device.type == "cpu":
        # Parameters in bf16/fp16 but BatchNorm statistics in fp32 need a mixed-dtype BatchNorm
        # kernel, which only CUDA has; on CPU the buffers follow the parameters.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", low[0])
    return ds


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, recursively for nested dicts."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def ensure_process_group(info: DistInfo) -> None:
    """DeepSpeed needs a process group even for one process: make a one-rank one if none exists."""
    # DeepSpeed also insists on LOCAL_RANK, which torchrun sets when there are several processes.
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if tdist.is_initialized():
        return
    if info.world_size > 1:
        raise RuntimeError("engine=deepspeed on several processes needs the process group first "
                           "(sagan_dist.dist.process_group)")
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    # A HashStore needs no port, so nothing can collide with another run on the machine.
    tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1,
                             timeout=datetime.timedelta(minutes=30))
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def _broadcast_scalars(model: nn.Module) -> None:
    """Broadcast rank 0's 0-dim parameters ourselves and have DeepSpeed skip them.

    DeepSpeed 0.19.8 makes the replicas identical by broadcasting every parameter as bytes
    (``p.data.view(torch.uint8)``), which raises for a 0-dim parameter such as SelfAttention's
    gamma. It skips parameters flagged ``ds_optim_param`` (its mark for per-rank weight shards,
    with no other effect outside OptimizedLinear), so we flag those and broadcast them here.
    """
    for p in model.parameters():
        if p.dim() == 0:
            if tdist.get_world_size() > 1:
                tdist.broadcast(p.data, src=0)
            p.ds_optim_param = True


def _agree(ok: bool, device: torch.device) -> bool:
    """True on every rank only if ``ok`` is true on every rank."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    if tdist.get_world_size() > 1:
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return flag.item() == 0.0


class DeepSpeedEngine(Engine):
    def __init__(self, model: nn.Module, lr: float, betas: tuple[float, float], cfg: DictConfig,
                 info: DistInfo, name: str) -> None:
        self.name, self.info, self.device, self.precision = name, info, info.device, cfg.train.precision
        ensure_process_group(info)
        _broadcast_scalars(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(float(betas[0]), float(betas[1])))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size, info.device))
        self.module = self.engine
        self.raw = self.engine.module
        self.dtype = next(self.raw.parameters()).dtype
        if self.dtype != torch.float32:
            self.raw.register_forward_pre_hook(self._cast_inputs)
        # ZeRO 1/2 and DeepSpeed's fp16/bf16 optimizers skip non-finite steps themselves; ZeRO 0
        # with fp32 parameters hands the gradients straight to Adam, so we check them first.
        self._check_finite_first = self.engine.zero_optimization_stage() == 0 and self.dtype == torch.float32

    # ---- precision ----------------------------------------------------------------------------
    def autocast(self) -> ContextManager:
        if self.dtype != torch.float32:
            return contextlib.nullcontext()  # DeepSpeed's forward would switch it off anyway
        return super().autocast()

    def _cast_inputs(self, module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    # ---- one update ---------------------------------------------------------------------------
    def accumulating(self, last: bool) -> ContextManager:
        # The loop calls step() once per accumulation round, so DeepSpeed's micro-step counter
        # cannot know which backward is the last; tell it (ZeRO 0/1 reduce gradients only then).
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divides by accumulation

    def step(self) -> StepResult:
        result = self._update()
        if self.info.world_size > 1:
            # Each rank's forwards updated BatchNorm statistics with its own batch: hand out rank
            # 0's, as the DDP engine does, so the replicas and the EMA generator (which copies G's
            # buffers) are the same everywhere and rank 0's checkpoint holds what every rank has.
            for b in self.raw.buffers():
                tdist.broadcast(b, src=0)
        return result

    def _update(self) -> StepResult:
        self.engine.set_gradient_accumulation_boundary(True)
        if self._check_finite_first:
            # Gradients were all-reduced at the boundary, so every rank sees the same norm.
            norm = float(torch.nn.utils.get_total_norm(
                [p.grad for p in self.raw.parameters() if p.grad is not None]))
            if not math.isfinite(norm):
                self.engine.zero_grad()
                return StepResult(False, norm)
            self.engine.step()
            return StepResult(True, norm)
        self.engine.step()
        applied = bool(self.engine.was_step_applied())  # False: overflow, already agreed on by ranks
        norm = self.engine.get_global_grad_norm()
        return StepResult(applied, math.nan if norm is None else float(norm))

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path) -> None:
        self._check_layout(path)
        # Every rank reaches the same verdict before DeepSpeed starts its collectives, so a missing
        # shard makes all ranks fall back to the previous snapshot instead of hanging.
        missing = self._missing_files(path)
        if not _agree(not missing, self.device):
            raise FileNotFoundError(f"DeepSpeed checkpoint of {self.name} at {path / TAG} is incomplete "
                                    f"(on this rank missing: {', '.join(missing) or 'nothing'})")
        load_path, _ = self.engine.load_checkpoint(str(path), tag=TAG)
        # DeepSpeed reports a checkpoint it cannot find with a warning and (None, None).
        if not _agree(load_path is not None, self.device):
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint of {self.name} at {path / TAG}")

    def _check_layout(self, path: Path) -> None:
        """A snapshot of another ZeRO stage or ZeRO world size is a config error, not a corrupt
        snapshot: falling back to older ones (all alike) would silently restart the run. (Another
        engine is refused earlier, by the trainer's config comparison.)"""
        folder = path / TAG
        if not (folder / MODEL_STATES).is_file():
            return  # missing: `load` says so
        # mmap: reads the metadata, not the weights.
        meta = torch.load(folder / MODEL_STATES, map_location="cpu", mmap=True, weights_only=True)
        saved_stage = meta["ds_config"].get("zero_optimization", {}).get("stage", 0)
        stage, world = self.engine.zero_optimization_stage(), self.info.world_size
        if (saved_stage == 0) != (stage == 0):
            raise ConfigError(f"{folder} was saved with deepspeed.zero_stage={saved_stage} but "
                              f"deepspeed.zero_stage is {stage}; resume with the stage it was trained with")
        if stage > 0 and meta["dp_world_size"] != world:
            raise ConfigError(f"{folder} holds ZeRO optimizer shards of {meta['dp_world_size']} ranks; "
                              f"DeepSpeed cannot re-split them over {world}: resume with "
                              f"{meta['dp_world_size']} processes in all")

    def _missing_files(self, path: Path) -> list[str]:
        """The files this rank needs from a checkpoint that are absent or empty."""
        folder = path / TAG
        wanted = [folder / MODEL_STATES]
        if self.engine.zero_optimization_stage() > 0:
            rank = self.engine.global_rank
            shards = sorted(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
            wanted.append(shards[0] if shards else folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        return [str(f) for f in wanted if not f.is_file() or f.stat().st_size == 0]

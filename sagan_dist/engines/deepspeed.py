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

Steps: `step` returns a StepResult of device tensors and adds no host reads of its own (DeepSpeed's
ZeRO 1/2 and fp16/bf16 optimizers read their overflow flag themselves). ZeRO 0 with fp32
parameters hands the gradients straight to Adam, so there the engine checks them on the device and
hands torch's fused Adam a ``found_inf`` flag, which skips the update inside the kernel.

Replicas: after every step rank 0's floating-point buffers (BatchNorm statistics, which each
rank's batch moves, and spectral-norm u/v, equal only where every rank runs the same kernels)
are broadcast in one coalesced collective per net, as in the DDP engine, so G, D and the EMA
generator are identical on all ranks.

Checkpoints: DeepSpeed's ``save_checkpoint`` under the tag ``deepspeed`` (rank 0 writes the weights,
every rank its ZeRO shard, so ``train.run_dir`` must be storage all nodes share). Everything is
read weights-only: DeepSpeed's checkpoint engine is replaced by `WeightsOnlyCheckpointEngine`, which
allows exactly the few plain-data DeepSpeed classes its files hold (SAFE_CHECKPOINT_GLOBALS), and
before DeepSpeed starts loading every rank scans the pickles it will read, so a planted file is
refused by all ranks alike (naming it) instead of leaving the others waiting in a collective.
``load`` raises when files are missing, on every rank alike, and a snapshot of another ZeRO stage
or ZeRO world size is a ConfigError rather than a corrupt snapshot to fall back from.
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
from sagan_dist.dist import DistInfo, broadcast_coalesced, replica_buffers
from sagan_dist.engines.base import Engine, StepResult, match_parameter_layout
from sagan_dist.fsio import UnsafeFileError, load_torch

if not torch.cuda.is_available():
    # Pick DeepSpeed's CPU accelerator up front instead of letting it probe (and warn).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402  (after DS_ACCELERATOR is set)

# On CPU, DeepSpeed's comm layer JIT-compiles a shared-memory all-reduce op when it starts (about
# two minutes, and a C++ toolchain); training never uses it (ZeRO goes through torch.distributed),
# so mark it unavailable. DeepSpeed keeps this dict for the process, so the edit sticks.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

TAG = "deepspeed"  # the checkpoint tag: one checkpoint per engine directory, no 'latest' file
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's name for the weights (and metadata)

# The non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoints, each plain data: loading one
# creates the object without calling its __init__ and sets its attributes (none of these defines
# __setstate__ or __reduce__; tests/test_deepspeed.py checks that), or looks an enum member up.
SAFE_CHECKPOINT_GLOBALS: list[type] = [
    LossScaler,  # ZeRO 1/2 shards (fp32/bf16): {cur_scale, dynamic}
    DynamicLossScaler,  # ZeRO 1/2 shards (fp16): scale, counters, hysteresis, and a torch.dtype
    ZeroStageEnum,  # ZeRO shards: the stage, an int enum (rebuilt by value lookup)
    fragment_address,  # ZeRO shards' parameter slice mappings: a dataclass (numel, start)
]
SAFE_GLOBAL_NAMES = frozenset(f"{c.__module__}.{c.__qualname__}" for c in SAFE_CHECKPOINT_GLOBALS)


def deepspeed_config(cfg: DictConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: ours, then ``deepspeed.extra`` merged on top.

    config_checks has already refused extra keys that would contradict ours (DEEPSPEED_DERIVED).
    """
    t = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // (world_size * t.accumulation),
        "gradient_accumulation_steps": t.accumulation,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 2**31 - 1,  # our loop logs progress; DeepSpeed's lines would be noise
        # DeepSpeed's throughput timer is on by default and synchronises the device around every
        # engine forward and step (a GPU would drain its queue twice a step); our loop measures
        # throughput itself. The breakdown timers synchronise too. Both can come back via extra.
        "timers": {"throughput": {"enabled": False}},
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # No lower-precision gradient all-reduce: the DDP engine reduces in fp32 too, and the
        # layers DeepSpeed would pick (plain Linear/Conv) only hold biases here (SN weights live
        # in parametrization modules).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True}
    extra = cfg.deepspeed.extra
    extra = OmegaConf.to_container(extra, resolve=True) if isinstance(extra, DictConfig) else dict(extra)
    if "bfloat16" in extra:  # DeepSpeed's older name for the bf16 section (config refuses both)
        extra["bf16"] = extra.pop("bfloat16")
    ds = merge(ds, extra)
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


def _broadcast_unviewable(model: nn.Module) -> None:
    """Broadcast rank 0's parameters that DeepSpeed cannot send, and have DeepSpeed skip them.

    DeepSpeed 0.19.8 makes the replicas identical by broadcasting every parameter as bytes
    (``p.data.view(torch.uint8)``), even on one rank. That raises for a 0-dim parameter such as
    SelfAttention's gamma, and for a channels_last conv weight (its last stride is not 1; channels_last
    is on by default on CUDA). It skips parameters flagged ``ds_optim_param`` (its mark for per-rank
    weight shards, with no other effect outside OptimizedLinear), so we flag those and broadcast
    them here, in one coalesced collective.
    """
    own = [p for p in model.parameters() if p.dim() == 0 or p.stride(-1) != 1]
    broadcast_coalesced([p.data for p in own])
    for p in own:
        p.ds_optim_param = True


def _agree(ok: bool, device: torch.device) -> bool:
    """True on every rank only if ``ok`` is true on every rank (load time only: it reads the flag)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    if tdist.get_world_size() > 1:
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return flag.item() == 0.0


def _low_precision_parameters(ds: Mapping[str, Any]) -> bool:
    """Whether DeepSpeed will cast the parameters to bf16/fp16 under this DeepSpeed config."""
    return any(ds.get(k, {}).get("enabled") for k in ("bf16", "fp16"))


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save/torch.load checkpoint engine, loading with ``weights_only=True``.

    DeepSpeed reads model states and ZeRO shards through ``engine.checkpoint_engine.load`` with
    ``weights_only=False``: a pickle planted on the shared run volume would run code in every job.
    Here a file asking for anything beyond tensors, containers, primitives and
    SAFE_CHECKPOINT_GLOBALS raises UnsafeFileError naming it.
    """

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return load_torch(path, map_location=map_location)


def unsafe_reason(path: Path) -> str | None:
    """Why ``path`` would be refused by a weights-only load (None if it would not), read from the
    pickle's opcodes without running any of it."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - not a torch zip file at all: say what was wrong
        return f"it is not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})"
    refused = sorted(set(needed) - SAFE_GLOBAL_NAMES)
    return f"it asks for {', '.join(refused)}, which would run code if loaded" if refused else None


def _require_precision_support(ds: Mapping[str, Any]) -> None:
    """A half-precision section the accelerator refuses is a config error, before DeepSpeed starts.

    DeepSpeed's CPU accelerator accepts fp16 only where oneDNN has fast fp16 kernels (AVX-512 FP16
    or AMX), and says so with a bare ValueError in the middle of initialize()."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for section, supported in (("fp16", accelerator.is_fp16_supported), ("bf16", accelerator.is_bf16_supported)):
        if (ds.get(section) or {}).get("enabled") and not supported():
            raise ConfigError(
                f"config key 'train.precision': DeepSpeed's {section} section is not supported by its "
                f"{accelerator.device_name()} accelerator on this machine; use train.precision=fp32 or "
                f"{'bf16' if section == 'fp16' else 'fp32'}, or engine=ddp (torch autocast runs {section} anywhere)")


class DeepSpeedEngine(Engine):
    def __init__(self, model: nn.Module, lr: float, betas: tuple[float, float], cfg: DictConfig,
                 info: DistInfo, name: str) -> None:
        self.name, self.info, self.device, self.precision = name, info, info.device, cfg.train.precision
        ensure_process_group(info)
        # On the device before any collective: on GPUs the default group is NCCL, which has no CPU
        # tensors ("No backend type associated with device type cpu"). initialize() would move it anyway.
        model.to(info.device)
        _broadcast_unviewable(model)
        ds = deepspeed_config(cfg, info.world_size, info.device)
        # ZeRO 1/2 and DeepSpeed's fp16/bf16 optimizers skip non-finite steps themselves; ZeRO 0
        # with fp32 parameters hands the gradients straight to Adam, so we check them first and
        # use fused Adam, whose kernel skips the update when told `found_inf` (a device flag).
        self._mask_non_finite = cfg.deepspeed.zero_stage == 0 and not _low_precision_parameters(ds)
        _require_precision_support(ds)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(float(betas[0]), float(betas[1])),
                                     fused=self._mask_non_finite or None)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        self.configured = {"lr": float(lr), "betas": (float(betas[0]), float(betas[1]))}
        if self._mask_non_finite and self.engine.optimizer is not optimizer:
            # found_inf must reach the Adam that steps; a wrapper would silently apply NaN updates.
            raise RuntimeError(f"DeepSpeed wrapped the ZeRO 0 fp32 optimizer of {name} "
                               f"({type(self.engine.optimizer).__name__}); non-finite steps could not be skipped")
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine(self.engine._config)
        self.module = self.engine
        self.raw = self.engine.module
        self.dtype = next(self.raw.parameters()).dtype
        if self.dtype != torch.float32:
            self.raw.register_forward_pre_hook(self._cast_inputs)
        self._stats = replica_buffers(self.raw)

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
        result = self._update_masked() if self._mask_non_finite else self._update()
        # Each rank's forwards updated BatchNorm statistics with its own batch: hand out rank 0's,
        # as the DDP engine does, so the replicas and the EMA generator (which copies G's buffers)
        # are the same everywhere and rank 0's checkpoint holds what every rank has.
        broadcast_coalesced(self._stats)
        return result

    def _update_masked(self) -> StepResult:
        """ZeRO 0, fp32: the finiteness check stays on the device and gates fused Adam's kernel."""
        self.engine.set_gradient_accumulation_boundary(True)
        # Gradients were all-reduced at the boundary, so every rank sees the same norm.
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.raw.parameters() if p.grad is not None])
        finite = torch.isfinite(norm)
        self.engine.optimizer.found_inf = (~finite).float()
        self.engine.step()  # clips (non-finite gradients stay so) and steps Adam, which skips on found_inf
        return StepResult(finite, norm.float())

    def _update(self) -> StepResult:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        # DeepSpeed's optimizers have already read their overflow flag (agreed on by all ranks) and
        # hold the norm as a tensor or a float; filling a device scalar launches no host copy.
        applied = torch.full((), bool(self.engine.was_step_applied()), dtype=torch.bool, device=self.device)
        norm = self.engine.get_global_grad_norm()
        if torch.is_tensor(norm):
            return StepResult(applied, norm.detach().to(torch.float32).reshape(()))
        value = math.nan if norm is None else float(norm)
        return StepResult(applied, torch.full((), value, dtype=torch.float32, device=self.device))

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path) -> dict[str, tuple[Any, Any]]:
        self._check_layout(path)
        # Every rank reaches the same verdict before DeepSpeed starts its collectives, so a missing
        # or planted shard makes all ranks refuse (and fall back to the previous snapshot) instead
        # of some hanging in a collective the others never join.
        needed = self._needed_files(path)
        missing = [str(f) for f in needed if not f.is_file() or f.stat().st_size == 0]
        if not _agree(not missing, self.device):
            raise FileNotFoundError(f"DeepSpeed checkpoint of {self.name} at {path / TAG} is incomplete "
                                    f"(on this rank missing: {', '.join(missing) or 'nothing'})")
        unsafe = [f"{f} was refused: {reason}" for f in needed if (reason := unsafe_reason(f))]
        if not _agree(not unsafe, self.device):
            raise UnsafeFileError("; ".join(unsafe) or f"another rank refused a file of {path / TAG} "
                                  "(it would run code if loaded); see that rank's error")
        load_path, _ = self.engine.load_checkpoint(str(path), tag=TAG)  # weights-only, see above
        # DeepSpeed reports a checkpoint it cannot find with a warning and (None, None).
        if not _agree(load_path is not None, self.device):
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint of {self.name} at {path / TAG}")
        if isinstance(self.engine.optimizer, torch.optim.Optimizer):  # ZeRO 0, fp32: torch's Adam itself
            match_parameter_layout(self.engine.optimizer)  # the saving run may have had another memory format
        # The groups get_lr() reads and Adam steps with (ZeRO's wrapper hands out its inner Adam's).
        return self.apply_configured(self.engine.optimizer.param_groups)

    def _check_layout(self, path: Path) -> None:
        """A snapshot of another ZeRO stage or ZeRO world size is a config error, not a corrupt
        snapshot: falling back to older ones (all alike) would silently restart the run. (Another
        engine is refused earlier, by the trainer's config comparison.)"""
        folder = path / TAG
        if not (folder / MODEL_STATES).is_file():
            return  # missing: `load` says so
        # mmap: reads the metadata, not the weights; every rank reads this same file, so a planted
        # one raises UnsafeFileError on all of them alike.
        meta = load_torch(folder / MODEL_STATES, mmap=True)
        saved_stage = meta["ds_config"].get("zero_optimization", {}).get("stage", 0)
        stage, world = self.engine.zero_optimization_stage(), self.info.world_size
        if (saved_stage == 0) != (stage == 0):
            raise ConfigError(f"{folder} was saved with deepspeed.zero_stage={saved_stage} but "
                              f"deepspeed.zero_stage is {stage}; resume with the stage it was trained with")
        if stage > 0 and meta["dp_world_size"] != world:
            saved = meta["dp_world_size"]
            raise ConfigError(
                f"{folder} holds ZeRO {stage} optimizer shards of {saved} ranks, but this job has {world}: "
                f"DeepSpeed cannot re-split them. Resume with {saved} processes in all (nodes x "
                f"processes per node = {saved}), or start a new run (another train.run_dir) to train "
                f"on {world}")

    def _needed_files(self, path: Path) -> list[Path]:
        """The files this rank reads from a checkpoint: the weights, and its own ZeRO shard."""
        folder = path / TAG
        wanted = [folder / MODEL_STATES]
        if self.engine.zero_optimization_stage() > 0:
            rank = self.engine.global_rank
            shards = sorted(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
            wanted.append(shards[0] if shards else folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        return wanted

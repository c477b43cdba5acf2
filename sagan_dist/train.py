"""The training loop: n_critic D steps, one G step, EMA, logging, samples, snapshots, evaluation.

Randomness is a function of (train.seed, rank, step of the last snapshot): the latent generator
and the data stream are re-seeded whenever a snapshot is written, so a resumed run draws exactly
what the uninterrupted run would have drawn, with no per-rank RNG state to gather. (A DDP run can
resume on another world size; DeepSpeed ZeRO 1/2 cannot re-split its optimizer shards.)
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from sagan_dist import checkpoint, config, dist
from sagan_dist.activation_checkpointing import apply_activation_checkpointing
from sagan_dist.data import build_loader, prepare_data
from sagan_dist.dist import DistInfo
from sagan_dist.ema import EMA, ema_beta
from sagan_dist.engines import Engine, build_engines
from sagan_dist.losses import get_losses
from sagan_dist.models.sagan import attention_layers, build_models
from sagan_dist.sample import grid_latents, latents, save_grid
from sagan_dist.tracking import Tracker

log = logging.getLogger("sagan_dist.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had non-finite losses or gradients."""


class Trainer:
    def __init__(self, cfg: DictConfig, info: DistInfo) -> None:
        self.cfg, self.info, t = cfg, info, cfg.train
        self.run_dir = Path(t.run_dir)
        self.micro_batch = t.batch_size // (info.world_size * t.accumulation)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        g, d = build_models(cfg)
        self.ema = EMA(g)  # before checkpointing wraps G's forwards: the EMA copy stays plain
        for net in (g, d):
            apply_activation_checkpointing(net, cfg.model.checkpoint_from, cfg.model.checkpoint_blocks)
        self.G, self.D = build_engines(cfg, g, d, info)
        self.ema.model.to(info.device)
        self.d_loss, self.g_loss = get_losses(t.loss)
        self.step, self.images_seen, self.skipped_steps, self.bad_streak = 0, 0, 0, 0
        self.best_fid = math.inf
        self.grid_z, self.grid_y = grid_latents(cfg, info.device)
        self.stop_requested = False
        run_id = self._resume()
        self.shards = dist.broadcast_object(prepare_data(cfg, self.run_dir) if info.is_main else None)
        self.evaluator = None
        if cfg.eval.every > 0:
            from sagan_dist.evaluation import Evaluator

            self.evaluator = Evaluator(cfg, info, self.shards, self.run_dir)
        # Last: whatever can fail above must not leave an MLflow run open as RUNNING.
        self.tracker = Tracker.open(cfg, self.run_dir, run_id, info)

    # ---- the algorithm ------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """n_critic discriminator updates, then one generator update and the EMA."""
        t = self.cfg.train
        stats: dict[str, float] = {}
        for _ in range(t.n_critic):
            stats.update(self._d_step())
        stats.update(self._g_step())
        self.images_seen += t.batch_size * t.n_critic
        beta = 0.0 if self.step < t.ema_start else ema_beta(t.batch_size, self.images_seen, t.ema_kimg, t.ema_rampup)
        self.ema.update(self.G.raw, beta)
        return stats

    def _d_step(self) -> dict[str, float]:
        accum = self.cfg.train.accumulation
        self.D.zero_grad()
        totals = torch.zeros(3, device=self.info.device)
        for i in range(accum):
            x, y = (t.to(self.info.device, non_blocking=True) for t in next(self.data))
            z, y_fake = self._latents()
            with torch.no_grad(), self.G.autocast():
                fake = self.G.module(z, y_fake)
            with self.D.accumulating(last=i == accum - 1):
                with self.D.autocast():
                    logits = self.D.module(torch.cat([x, fake.to(x.dtype)]), torch.cat([y, y_fake]))
                real_logits, fake_logits = logits.float().split([len(x), len(fake)])
                loss = self.d_loss(real_logits, fake_logits)
                self.D.backward(loss / accum)
            totals += torch.stack([loss.detach(), real_logits.detach().mean(), fake_logits.detach().mean()])
        result = self.D.step()
        self._count_bad(result.applied, "D", float(totals[0]) / accum)
        d_loss, d_real, d_fake = (totals / accum).tolist()
        return {"loss_d": d_loss, "d_real": d_real, "d_fake": d_fake, "grad_norm_d": result.grad_norm}

    def _g_step(self) -> dict[str, float]:
        accum = self.cfg.train.accumulation
        self.G.zero_grad()
        self.D.set_requires_grad(False)  # G's loss flows through D, but D is not updated here
        total = 0.0
        for i in range(accum):
            z, y = self._latents()
            with self.G.accumulating(last=i == accum - 1):
                with self.G.autocast():
                    logits = self.D.raw(self.G.module(z, y), y)
                loss = self.g_loss(logits.float())
                self.G.backward(loss / accum)
            total += float(loss.detach())
        self.D.set_requires_grad(True)
        result = self.G.step()
        self._count_bad(result.applied, "G", total / accum)
        return {"loss_g": total / accum, "grad_norm_g": result.grad_norm}

    def _latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        return latents(self.micro_batch, self.cfg.model.z_dim, self.cfg.data.num_classes,
                       self.latent_gen, self.info.device)

    def _count_bad(self, applied: bool, net: str, loss: float) -> None:
        if applied:
            self.bad_streak = 0
            return
        self.skipped_steps += 1
        self.bad_streak += 1
        log.warning("step %d: non-finite %s gradients (loss %s); update skipped", self.step, net, loss)
        if self.bad_streak >= self.cfg.train.max_bad_steps:
            raise NonFiniteError(
                f"{self.bad_streak} consecutive updates had non-finite losses or gradients (last: {net}, "
                f"loss {loss}); stopping instead of training on NaNs (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}). Try lower train.lr_d/lr_g, train.grad_clip, or "
                "train.precision=bf16 instead of fp16.")

    # ---- the run ------------------------------------------------------------------------------
    def fit(self) -> None:
        t, started = self.cfg.train, self.step
        self._start_segment()
        self._install_sigterm()
        meter = _Meter(self.info.device)
        log.info("training from step %d to %d on %d process(es), engine %s, precision %s, micro-batch %d",
                 self.step, t.steps, self.info.world_size, self.cfg.engine, t.precision, self.micro_batch)
        if self.info.is_main and self.step == 0:
            self.tracker.log_config(self.cfg, self.info)
        try:
            if self.step >= t.steps:
                log.info("already at step %d of %d: nothing to train", self.step, t.steps)
            while self.step < t.steps:
                meter.add(self.train_step())
                self.step += 1
                self._periodic(meter, started)
                if self._stop_agreed():
                    log.warning("SIGTERM: writing a snapshot at step %d and exiting", self.step)
                    self.save()
                    break
                if self.step == t.steps:
                    self.save()
            self.tracker.close("KILLED" if self.stop_requested else "FINISHED")
        except BaseException:
            self.tracker.close("FAILED")
            raise

    def _periodic(self, meter: "_Meter", started: int) -> None:
        t, s = self.cfg.train, self.step
        if s % t.log_every == 0 or s == t.steps:
            self._log_progress(meter, started)
        if s % t.sample_every == 0 or s == t.steps:
            self.sample_grid()
        if self.evaluator is not None and (s % self.cfg.eval.every == 0 or s == t.steps):
            self.evaluate()
        if s % t.checkpoint_every == 0 and s != t.steps:
            self.save()

    def _log_progress(self, meter: "_Meter", started: int) -> None:
        t = self.cfg.train
        means, rate = meter.reduce(), 0.0
        if meter.seconds > 0:
            rate = meter.steps * t.batch_size * t.n_critic / meter.seconds
        eta = (t.steps - self.step) * meter.seconds / max(meter.steps, 1)
        means.update(images_per_s=rate, skipped_steps=float(self.skipped_steps),
                     skipped_samples=float(dist.all_reduce_max(float(getattr(self.data_stream, "skipped", 0)), self.info.device)),
                     lr_g=self.G.lr(), lr_d=self.D.lr(), kimg=self.images_seen / 1000)
        for side, engine in (("G", self.G), ("D", self.D)):
            for name, layer in attention_layers(engine.raw).items():
                means[f"gamma/{side}.{name}"] = float(layer.gamma.detach())
        if self.info.is_main:
            log.info("step %d/%d  kimg %.1f  loss_d %.3f  loss_g %.3f  D(x) %.2f  D(G(z)) %.2f  "
                     "img/s %.1f  eta %s", self.step, t.steps, self.images_seen / 1000, means["loss_d"],
                     means["loss_g"], means["d_real"], means["d_fake"], rate, _duration(eta))
            self.tracker.log_metrics(means, self.step)
        meter.reset()

    def sample_grid(self) -> None:
        if not self.info.is_main:
            return
        self.ema.model.eval()
        with torch.no_grad():
            images = self.ema.model(self.grid_z, self.grid_y)
        path = save_grid(images, self.run_dir / "samples" / f"step-{self.step:08d}.png",
                         nrow=self.cfg.train.samples_per_class)
        self.tracker.log_image(path, self.step)

    def evaluate(self) -> None:
        """IS/FID/KID of the EMA generator; a better FID than ever before is kept as ``best``."""
        metrics = self.evaluator(self.ema.model, self.step)
        if self.info.is_main and metrics:
            self.tracker.log_metrics(metrics, self.step)
        fid = dist.broadcast_object((metrics or {}).get("fid") if self.info.is_main else None)
        if fid is not None and fid < self.best_fid:
            self.best_fid = fid
            self.save(name="best")

    def save(self, name: str | None = None) -> Path:
        state = {"step": self.step, "images_seen": self.images_seen, "skipped_steps": self.skipped_steps,
                 "best_fid": self.best_fid, "G_ema": self.ema.state_dict(),
                 "config": config.to_container(self.cfg), "tracking_run_id": self.tracker.run_id,
                 "rng": {"torch": torch.get_rng_state()}}
        path = checkpoint.save(self.run_dir, self.step, state, {"G": self.G, "D": self.D},
                               self.cfg.train.keep_checkpoints, self.info.is_main, name)
        if self.info.is_main:
            if self.cfg.tracking.log_checkpoints:
                self.tracker.log_artifact(path, f"checkpoints/{path.name}")
            log.info("snapshot %s", path)
        self._start_segment()
        return path

    def _start_segment(self) -> None:
        """Re-seed latents and data from (seed, rank, step): see the module docstring."""
        t, rank = self.cfg.train, self.info.rank
        self.latent_gen = torch.Generator(self.info.device).manual_seed(dist.rank_seed(t.seed, rank, self.step))
        torch.manual_seed(dist.rank_seed(t.seed + 1, rank, self.step))
        self.data_stream = build_loader(self.cfg, self.shards, rank, self.info.world_size,
                                        dist.rank_seed(t.seed, 0, self.step))
        self.data: Iterator = iter(self.data_stream)

    def _resume(self) -> str | None:
        """Restore the newest valid snapshot (``train.resume``); returns its tracking run id."""
        mode = self.cfg.train.resume
        if mode == "never":
            return None
        if mode == "auto":
            found = checkpoint.load_latest(self.run_dir, self._restore)
            if found is None:
                return None
            snapshot, state = found
        else:
            snapshot = checkpoint.resolve_snapshot(mode)
            state = self._restore(snapshot)
        log.info("resumed from %s at step %d", snapshot, self.step)
        return state.get("tracking_run_id")

    def _restore(self, snapshot: Path) -> dict[str, Any]:
        state = checkpoint.load_state(snapshot, self.info.device)
        _check_compatible(state["config"], self.cfg, snapshot)
        self.G.load(snapshot / "G")
        self.D.load(snapshot / "D")
        self.ema.load_state_dict(state["G_ema"])
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.skipped_steps, self.best_fid = int(state["skipped_steps"]), float(state["best_fid"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        return state

    # ---- preemption ---------------------------------------------------------------------------
    def _install_sigterm(self) -> None:
        def request_stop(signum: int, frame: Any) -> None:
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)

    def _stop_agreed(self) -> bool:
        """Every rank stops at the same step once any rank got SIGTERM."""
        return dist.all_reduce_max(float(self.stop_requested), self.info.device) > 0


def _check_compatible(saved: dict[str, Any], cfg: DictConfig, snapshot: Path) -> None:
    """The saved run's architecture must match; other differences are reported and allowed."""
    current = config.to_container(cfg)
    if saved.get("engine", "ddp") != cfg.engine:
        raise config.ConfigError(f"config key 'engine' is {cfg.engine!r} but the snapshot {snapshot} "
                                 f"was written by {saved.get('engine')!r}; resume with the same engine")
    for section in ("model", "data"):
        for key, value in saved.get(section, {}).items():
            now = current[section].get(key)
            if now == value:
                continue
            full = f"{section}.{key}"
            if section == "model" and key not in ("checkpoint_from", "checkpoint_blocks", "sync_bn") \
                    or full == "data.num_classes":
                raise config.ConfigError(f"config key {full!r} is {now!r} but the snapshot {snapshot} "
                                         f"was trained with {value!r}; resume needs the same value")
            log.warning("config key %s changed since %s: %r -> %r", full, snapshot, value, now)


class _Meter:
    """Means of step statistics over a logging interval, reduced over ranks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.t0 = 0, time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def reduce(self) -> dict[str, float]:
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] / max(self.steps, 1) for k in keys], dtype=torch.float64, device=self.device)
        if dist.is_distributed():
            torch.distributed.all_reduce(t)
            t /= torch.distributed.get_world_size()
        return dict(zip(keys, t.tolist()))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def setup_logging(info: DistInfo, run_dir: Path | None = None) -> None:
    fmt = f"%(asctime)s [rank {info.rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format=fmt,
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    if info.is_main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
        logging.getLogger().addHandler(handler)


def split_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """CONFIG files and key=value overrides, in any order."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def main(items: Sequence[str]) -> int:
    yamls, overrides = split_args(items)
    if not yamls:
        raise config.ConfigError("no CONFIG given: name a YAML file or a shipped config such as 'demo'")
    cfg = config.load(yamls, overrides, world_size=dist.env_world_size())
    with dist.process_group() as info:
        setup_logging(info, Path(cfg.train.run_dir))
        if info.is_main:
            log.info("config:\n%s", OmegaConf.to_yaml(cfg))
        trainer = Trainer(cfg, info)
        trainer.fit()
        preempted = trainer.stop_requested
        # Free the engines (DeepSpeed's hold reference cycles) while the process group lives:
        # a gloo teardown abort at exit was seen otherwise.
        del trainer
        gc.collect()
    # 128 + SIGTERM after a preemption snapshot: a Job must see "interrupted", not "completed".
    return 143 if preempted else 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="+", metavar="CONFIG_OR_OVERRIDE",
                        help="YAML config files (paths, or shipped names: demo, imagenet128, imagenet256) "
                             "followed by key=value overrides, e.g. train.steps=1000 engine=deepspeed")


def run(args: argparse.Namespace) -> int:
    return main(args.items)

"""The training loop: n_critic D steps, one G step, EMA, logging, samples, snapshots, evaluation.

A snapshot at any step resumes exactly: the latent generator is re-seeded from (train.seed, rank,
step) at every step, on a schedule that does not depend on when snapshots happen, and the data
stream is opened once per run and its position (every rank's, data/position.py) is stored in each
snapshot; a resumed stream reads on from there. A DDP run can resume on another world size with
the same global batch (the data and latents are then drawn for the new ranks, so that run is
equivalent, not identical); DeepSpeed ZeRO 1/2 cannot re-split its optimizer shards and refuses.

A step reads nothing from the device: statistics stay there (step_stats.py) until a logging step,
and stopping is agreed by an asynchronous all-reduce read a step later (stopping.StopAgreement).
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from sagan_dist import checkpoint, config, dist, fsio, memory, run_lock
from sagan_dist.activation_checkpointing import apply_activation_checkpointing
from sagan_dist.data import build_loader, prepare_data
from sagan_dist.data.position import StreamPosition, parse_saved, resume_position
from sagan_dist.data.stream import StopRequested
from sagan_dist.dist import DistInfo
from sagan_dist.errors import Reported
from sagan_dist.ema import EMA, ema_beta
from sagan_dist.acceleration import configure_backends, prepare_models
from sagan_dist.attention_maps import attention_summary
from sagan_dist.engines import build_engines
from sagan_dist.engines.base import PRECISION_DTYPES
from sagan_dist.losses import get_losses
from sagan_dist.models.sagan import attention_layers, build_models
from sagan_dist.sample import grid_latents, latents, save_grid
from sagan_dist.step_stats import StepStats
from sagan_dist.stopping import StopAgreement, StopSignals
from sagan_dist.tracking import Tracker, redacted_config

log = logging.getLogger("sagan_dist.train")
Batch = tuple[torch.Tensor, torch.Tensor]
# In a multi-process run a stop aborts a data wait only after this long: the other ranks are then
# most likely stalled too (shared storage), while a rank that simply waits a little would
# otherwise leave its peers alone in the step's collectives.
STOP_ABORTS_DATA_WAIT_AFTER_S = 20.0


class NonFiniteError(RuntimeError, Reported):
    """Too many consecutive steps had non-finite losses or gradients."""


class BatchStreamLike(Protocol):
    wait_s: float
    skipped: int

    def next_batch(self, stop: Callable[[], bool] = ...) -> Batch: ...

    def position(self) -> Optional[StreamPosition]: ...

    def close(self) -> None: ...


# (seed, where to start or None) -> this rank's batch stream
BatchSource = Callable[[int, Optional[StreamPosition]], BatchStreamLike]


class Trainer:
    def __init__(self, cfg: DictConfig, info: DistInfo, batch_source: Optional[BatchSource] = None,
                 stop: Optional[StopSignals] = None) -> None:
        self.cfg, self.info, t = cfg, info, cfg.train
        self.run_dir = Path(t.run_dir)
        self.stop = stop or StopSignals()
        configure_backends(info.device)  # cuDNN autotuning, TF32 on CUDA; nothing on CPU
        self.micro_batch = t.batch_size // (info.world_size * t.accumulation)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        g, d = build_models(cfg)
        self.ema = EMA(g)  # before checkpointing wraps G's forwards: the EMA copy stays plain
        for net in (g, d):
            apply_activation_checkpointing(net, cfg.model.checkpoint_from, cfg.model.checkpoint_blocks)
        self.micro_batch_fits(g, d)  # before compile: the probe forward must not add a graph
        prepare_models(g, d, cfg, info.device)  # channels_last, torch.compile (auto: on for CUDA)
        self.G, self.D = build_engines(cfg, g, d, info)
        self.ema.follow(self.G.raw, info.device)  # on the device, in G's memory format
        self.d_loss, self.g_loss = get_losses(t.loss)
        self.step, self.images_seen, self.skipped_steps, self.process_seconds = 0, 0, 0, 0.0
        self.stopped, self._clock = False, time.monotonic()
        self._saved_step = -1  # the step of the last step-N snapshot this process wrote
        self.best_fid = math.inf
        self.changed_on_resume: dict[str, Any] = {}
        self._saved_data: Optional[dict[str, Any]] = None  # the resumed snapshot's stream positions
        self._data_position: Optional[StreamPosition] = None  # this rank's, at the last step boundary
        self.stats = StepStats(info.device)
        self.agreement = StopAgreement()
        self.grid_z, self.grid_y = grid_latents(cfg, info.device)
        if info.is_main:
            checkpoint.clean_stale(self.run_dir)
        dist.barrier()
        run_id = self._resume()
        self.shards = dist.broadcast_object(prepare_data(cfg, self.run_dir) if info.is_main and batch_source is None
                                            else None)
        self.batch_source = batch_source or (lambda seed, start: build_loader(
            cfg, self.shards, info.rank, info.world_size, seed, info.device, start))
        self.data_stream: Optional[BatchStreamLike] = None
        self.evaluator = None
        if cfg.eval.every > 0:
            from sagan_dist.evaluation import Evaluator

            self.evaluator = Evaluator(cfg, info, self.shards, self.run_dir)
        # Last: whatever can fail above must not leave an MLflow run open as RUNNING.
        self.tracker = Tracker.open(cfg, self.run_dir, run_id, info)

    # ---- the algorithm ------------------------------------------------------------------------
    def train_step(self, batches: Optional[list[Batch]] = None) -> None:
        """n_critic discriminator updates, then one generator update and the EMA."""
        t = self.cfg.train
        batches = batches if batches is not None else self.next_batches()
        # Every step's latents from (seed, rank, step): a resume at any step draws the same.
        self.latent_gen.manual_seed(dist.rank_seed(t.seed, self.info.rank, self.step))
        d_stats = torch.stack([self._d_step(batches[i * t.accumulation:(i + 1) * t.accumulation])
                               for i in range(t.n_critic)]).mean(0)
        self.stats.add(torch.cat([d_stats, self._g_step()]))
        self.images_seen += t.batch_size * t.n_critic
        beta = 0.0 if self.step < t.ema_start else ema_beta(t.batch_size, self.images_seen, t.ema_kimg, t.ema_rampup)
        self.ema.update(self.G.raw, beta)

    def _d_step(self, batches: list[Batch]) -> torch.Tensor:
        accum = len(batches)
        self.D.zero_grad()
        totals = torch.zeros(3, device=self.info.device)
        for i, (x, y) in enumerate(batches):
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
        self.stats.update_applied(result, "D")
        return torch.cat([totals / accum, result.grad_norm.reshape(1).to(totals)])

    def _g_step(self) -> torch.Tensor:
        accum = self.cfg.train.accumulation
        self.G.zero_grad()
        self.D.set_requires_grad(False)  # G's loss flows through D, but D is not updated here
        total = torch.zeros((), device=self.info.device)
        for i in range(accum):
            z, y = self._latents()
            with self.G.accumulating(last=i == accum - 1):
                with self.G.autocast():
                    logits = self.D.raw(self.G.module(z, y), y)
                loss = self.g_loss(logits.float())
                self.G.backward(loss / accum)
            total += loss.detach()
        self.D.set_requires_grad(True)
        result = self.G.step()
        self.stats.update_applied(result, "G")
        return torch.stack([total / accum, result.grad_norm.to(total)])

    def _latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        return latents(self.micro_batch, self.cfg.model.z_dim, self.cfg.data.num_classes,
                       self.latent_gen, self.info.device)

    def next_batches(self) -> list[Batch]:
        """All of a step's batches, fetched before its first update: a stop that interrupts the
        wait (StopRequested) then leaves the weights at a step boundary, so the snapshot is exact."""
        t = self.cfg.train
        assert self.data_stream is not None
        try:
            batches = [self.data_stream.next_batch(self._stop_aborts_wait) for _ in range(t.n_critic * t.accumulation)]
            # Only a whole step's batches move the snapshot's position: a stop in the middle of
            # fetching them leaves it where the weights are.
            self._data_position = self.data_stream.position()
            return batches
        except StopRequested:
            raise
        except Exception as e:
            if self.stop.requested:  # e.g. a loader worker that died of the same signal
                log.warning("the data stream failed while stopping (%s: %s); stopping anyway",
                            type(e).__name__, str(e)[:200])
                raise StopRequested(str(e)) from e
            raise

    def _stop_aborts_wait(self) -> bool:
        if self.stop.requested_at is None:
            return False
        return self.info.world_size == 1 or time.monotonic() - self.stop.requested_at > STOP_ABORTS_DATA_WAIT_AFTER_S

    # ---- the run ------------------------------------------------------------------------------
    def fit(self) -> None:
        t, started = self.cfg.train, self.step
        self.start_segment()
        self._clock = time.monotonic()
        log.info("training from step %d to %d on %d process(es), engine %s, precision %s, micro-batch %d",
                 self.step, t.steps, self.info.world_size, self.cfg.engine, t.precision, self.micro_batch)
        if self.info.is_main and self.step == 0:
            self.tracker.log_config(self.cfg, self.info)
        if self.info.is_main and self.changed_on_resume:  # params cannot change in MLflow: metrics
            self.tracker.log_metrics(_changed_metrics(self.changed_on_resume), self.step)
        try:
            if self.step >= t.steps:
                log.info("already at step %d of %d: nothing to train", self.step, t.steps)
            stopping = self._loop(started)
            if stopping and self.step > started:
                log.warning("stop requested: wrote the snapshot of step %d, exiting", self.step)
            if not stopping and self.step > started and self.info.is_main:  # the final model, registered
                self.tracker.log_model(self.ema.model, self.cfg, self.step, self.images_seen / 1000,
                                       snapshot=checkpoint.checkpoints_dir(self.run_dir) / f"step-{self.step:08d}",
                                       aliases=("final",))
            self.tracker.close("KILLED" if stopping else "FINISHED")
            self.stopped = stopping
        except BaseException:
            self.tracker.close("FAILED")
            raise
        finally:
            if self.data_stream is not None:
                self.data_stream.close()

    def _loop(self, started: int) -> bool:
        """Train until train.steps or an agreed stop; returns whether it stopped early."""
        t, stopping = self.cfg.train, False
        while self.step < t.steps and not stopping:
            try:
                batches = self.next_batches()
            except StopRequested:
                stopping = self.agreement.now(True)
                break
            self.train_step(batches)
            self.step += 1
            self._periodic()
            stopping = self.agreement.poll(self.stop.requested)
            if (self.step == t.steps or stopping) and self._unsaved():
                self.save()
        self.agreement.now(stopping)  # settles the last asynchronous round on every rank
        if stopping and self.step > started and self._unsaved():
            self.save()
        return stopping

    def _unsaved(self) -> bool:
        """Whether the current step has no snapshot yet (one written by _periodic just now counts)."""
        return self._saved_step != self.step

    def _periodic(self) -> None:
        t, s = self.cfg.train, self.step
        if s % t.log_every == 0 or s == t.steps:
            self._log_progress()
        if s % t.sample_every == 0 or s == t.steps:
            self.sample_grid()
        if self.evaluator is not None and (s % self.cfg.eval.every == 0 or s == t.steps):
            self.evaluate()
        if s % t.checkpoint_every == 0 and s != t.steps:
            self.save()

    def gpu_hours(self) -> float:
        """Processes x wall hours of training so far, over all resumes (process-hours on CPU)."""
        return (self.process_seconds + self.info.world_size * (time.monotonic() - self._clock)) / 3600

    def _log_progress(self) -> None:
        t, stats = self.cfg.train, self.stats
        means, skipped, streaks = stats.read()
        self.skipped_steps += skipped
        seconds, steps = stats.seconds, stats.steps
        rate = steps * t.batch_size * t.n_critic / seconds if seconds > 0 else 0.0
        wait = self.data_stream.wait_s if self.data_stream is not None else 0.0
        means.update(images_per_s=rate, skipped_steps=float(self.skipped_steps), kimg=self.images_seen / 1000,
                     data_wait_share=min(1.0, (wait - self._wait_mark) / seconds) if seconds > 0 else 0.0,
                     skipped_samples=float(dist.all_reduce_max(
                         float(getattr(self.data_stream, "skipped", 0)), self.info.device)),
                     lr_g=self.G.lr(), lr_d=self.D.lr(), gpu_hours=self.gpu_hours())
        self._wait_mark = wait
        for side, engine in (("G", self.G), ("D", self.D)):
            for name, layer in attention_layers(engine.raw).items():
                means[f"gamma/{side}.{name}"] = float(layer.gamma.detach())
        if skipped:
            log.warning("steps %d..%d: %d update(s) skipped for non-finite gradients", self.step - steps + 1,
                        self.step, skipped)
        if self.info.is_main:
            log.info("step %d/%d  kimg %.1f  loss_d %.3f  loss_g %.3f  D(x) %.2f  D(G(z)) %.2f  "
                     "img/s %.1f  data wait %.0f%%  eta %s", self.step, t.steps, self.images_seen / 1000,
                     means["loss_d"], means["loss_g"], means["d_real"], means["d_fake"], rate,
                     100 * means["data_wait_share"], _duration((t.steps - self.step) * seconds / max(steps, 1)))
            self.tracker.log_metrics(means, self.step)
        stats.reset()
        net, streak = max(streaks.items(), key=lambda item: item[1])
        if streak >= t.max_bad_steps:
            raise NonFiniteError(
                f"{streak} consecutive {net} updates had non-finite losses or gradients (checked every "
                f"train.log_every={t.log_every} steps); stopping instead of training on NaNs "
                f"(train.max_bad_steps={t.max_bad_steps}). Try a lower train.lr_{net.lower()}, train.grad_clip, "
                "or train.precision=bf16 instead of fp16.")

    def sample_grid(self) -> None:
        if not self.info.is_main:
            return
        self.ema.model.eval()
        with torch.no_grad():
            images = self.ema.model(self.grid_z, self.grid_y)
        path = save_grid(images, fsio.own_dir(self.run_dir / "samples") / f"step-{self.step:08d}.png",
                         nrow=self.cfg.train.samples_per_class)
        self.tracker.log_image(path, self.step)
        if self.cfg.train.attention_points and attention_layers(self.ema.model):
            folder = fsio.own_dir(self.run_dir / "attention")  # a link planted mid-run is refused
            sheets, metrics = attention_summary(self.ema.model, self.grid_z, self.grid_y,
                                                self.cfg.train.attention_points, folder, self.step)
            for layer, sheet in sheets.items():
                self.tracker.log_image(sheet, self.step, key=f"attention/{layer}")
            self.tracker.log_metrics(metrics, self.step)

    def evaluate(self) -> None:
        """IS/FID/KID of the EMA generator; a better FID than ever before is kept as ``best``."""
        metrics = self.evaluator(self.ema.model, self.step)
        if self.info.is_main and metrics:
            self.tracker.log_metrics({**metrics, "gpu_hours": self.gpu_hours()}, self.step)
        fid = dist.broadcast_object((metrics or {}).get("fid") if self.info.is_main else None)
        best = fid is not None and fid < self.best_fid
        if best:
            self.best_fid = fid
            snapshot = self.save(name="best")
        if self.info.is_main and metrics:  # the evaluated G as an MLflow model, the metrics linked to it
            self.tracker.log_model(self.ema.model, self.cfg, self.step, self.images_seen / 1000, list(metrics),
                                   snapshot if best else None, ("best",) if best else ())

    def save(self, name: str | None = None) -> Path:
        state = {"step": self.step, "images_seen": self.images_seen, "skipped_steps": self.skipped_steps,
                 "best_fid": self.best_fid, "G_ema": self.ema.state_dict(),
                 "process_seconds": self.gpu_hours() * 3600,
                 "config": redacted_config(config.to_container(self.cfg)), "tracking_run_id": self.tracker.run_id,
                 "rng": {"torch": torch.get_rng_state()}, "data": self._gathered_data_position()}
        path = checkpoint.save(self.run_dir, self.step, state, {"G": self.G, "D": self.D},
                               self.cfg.train.keep_checkpoints, self.info.is_main, name)
        if name is None:
            self._saved_step = self.step
        if self.info.is_main:
            if self.cfg.tracking.log_checkpoints:
                self.tracker.log_artifact(path, f"checkpoints/{path.name}")
            log.info("snapshot %s", path)
        return path

    def _gathered_data_position(self) -> Optional[dict[str, Any]]:
        """Every rank's stream position (collective), as plain data for state.pt; None if a
        batch source keeps none."""
        ranks = dist.all_gather_objects(self._data_position.to_state() if self._data_position else None)
        return None if None in ranks else {"world_size": self.info.world_size, "ranks": ranks}

    def start_segment(self) -> None:
        """Open the batch stream where the resumed snapshot left it (or at the start) and create
        the latent generator: see the module docstring. fit() calls it; a caller driving
        train_step() itself (a benchmark) calls it once first."""
        t, rank = self.cfg.train, self.info.rank
        self.latent_gen = torch.Generator(self.info.device)  # seeded at every step
        torch.manual_seed(dist.rank_seed(t.seed + 1, rank, self.step))  # a step draws nothing from it
        if self.data_stream is not None:
            self.data_stream.close()
        start = resume_position(self._saved_data, rank, self.info.world_size, max(1, self.cfg.data.workers))
        self.data_stream = self.batch_source(dist.rank_seed(t.seed, 0, 0), start)
        self._data_position = start
        self._wait_mark = self.data_stream.wait_s

    def _resume(self) -> str | None:
        """Restore the newest valid snapshot (``train.resume``); returns its tracking run id."""
        mode = self.cfg.train.resume
        if mode == "never":
            if self.info.is_main:
                checkpoint.set_aside(self.run_dir)
            dist.barrier()
            return None
        if mode == "auto":
            found = checkpoint.load_latest(self.run_dir, self._restore_finite)
            if found is None:
                return None
            snapshot, state = found
        else:
            snapshot = checkpoint.resolve_snapshot(mode)
            state = checkpoint.load_chosen(snapshot, self._restore_finite)  # every rank, rank 0's choice
            if self.info.is_main:  # the later snapshots are another timeline now: never resumed by auto
                checkpoint.set_aside_later(self.run_dir, self.step)
            dist.barrier()
        log.info("resumed from %s at step %d", snapshot, self.step)
        return state.get("tracking_run_id")

    def _restore_finite(self, snapshot: Path) -> dict[str, Any]:
        """_restore, refusing (naming it) a snapshot with inf/nan weights, so auto takes the one before."""
        state = self._restore(snapshot)
        checkpoint.require_finite(snapshot, {"G": self.G.raw, "D": self.D.raw, "EMA generator": self.ema.model})
        return state

    def _restore(self, snapshot: Path) -> dict[str, Any]:
        state = checkpoint.load_state(snapshot, self.info.device)
        checkpoint.check_compatible(state["config"], self.cfg, snapshot)
        self._saved_data = parse_saved(state.get("data"))  # malformed: a damaged snapshot, before any load
        self.changed_on_resume = {}  # config key -> value now, where it differs from the snapshot's
        for net, engine in (("G", self.G), ("D", self.D)):
            for key, (saved, now) in engine.load(snapshot / net).items():
                name = f"train.lr_{net.lower()}" if key == "lr" else f"train.{key}"
                self.changed_on_resume[name] = now
                if self.info.is_main:
                    log.warning("%s of %s changed since %s: %s there, %s now (applied)", name, net, snapshot.name,
                                saved, now)
        self.ema.load_state_dict(state["G_ema"])
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.best_fid, self.skipped_steps = float(state["best_fid"]), int(state.get("skipped_steps", 0))
        self.process_seconds = float(state.get("process_seconds", 0.0))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        return state

    def micro_batch_fits(self, g: torch.nn.Module, d: torch.nn.Module) -> None:
        """Refuse, before any step, a micro-batch whose largest activation alone cannot fit."""
        precision = self.cfg.train.precision
        autocast = (torch.autocast("cpu", dtype=PRECISION_DTYPES[precision]) if precision != "fp32" else None)
        per_sample = memory.largest_activation_per_sample(g, d, self.cfg.model.z_dim, autocast)
        memory.check_batch_fits(self.micro_batch, per_sample, self.info.device, self.cfg.train.batch_size)


def _changed_metrics(changed: dict[str, Any]) -> dict[str, float]:
    """{"train.betas": (0.5, 0.99)} -> {"resume_changed/train.betas.0": 0.5, ...}: one metric per number."""
    out = {}
    for name, value in changed.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        suffixes = [f".{i}" for i in range(len(values))] if len(values) > 1 else [""]
        out.update({f"resume_changed/{name}{sfx}": float(v) for sfx, v in zip(suffixes, values)})
    return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(items: Sequence[str]) -> int:
    stop = StopSignals().install()  # first: a signal during set-up is a stop request too
    cfg = config.load_items(items, world_size=dist.env_world_size())
    dist.configure_threads()
    from sagan_dist.logs import setup_logging

    with dist.process_group(timeout_s=cfg.train.collective_timeout_s) as info:
        setup_logging(info, Path(cfg.train.run_dir))
        if info.is_main:
            log.info("config:\n%s", OmegaConf.to_yaml(redacted_config(config.to_container(cfg))))
        with dist.collective_failures(cfg.train.collective_timeout_s), run_lock.hold(Path(cfg.train.run_dir), info):
            trainer = Trainer(cfg, info, stop=stop)
            trainer.fit()
        stopped = trainer.stopped
        # Free the engines (DeepSpeed's hold reference cycles) while the process group lives:
        # a gloo teardown abort at exit was seen otherwise.
        del trainer
        gc.collect()
    # 128 + the signal after a stop snapshot (143 SIGTERM, 130 Ctrl-C): a Job must see "interrupted",
    # not "completed"; a stop agreed from another rank's signal counts as SIGTERM.
    return 128 + int(stop.signum) if stopped else 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="+", metavar="CONFIG_OR_OVERRIDE",
                        help="YAML config files (paths, or shipped names: demo, imagenet128, imagenet256) "
                             "followed by key=value overrides, e.g. train.steps=1000 engine=deepspeed")


def run(args: argparse.Namespace) -> int:
    return main(args.items)

"""The trainer: one code path for diffusion models and the discriminative baseline.

``train(cfg, out_dir, components=factory)`` receives what it trains (model, objective, dataset,
sampler, validator: :class:`Components`, built by ``factory`` after the process group exists; the
real factory is :func:`medsegdiff.stages.train.build_components`) and runs optimizer steps with:

* gradient accumulation that equals the large batch: each micro-batch loss is scaled by
  ``micro / per_rank_batch`` so gradients AVERAGE (upstream improved-diffusion sums them, guided
  #111), with DDP's ``no_sync()`` on every micro-step but the last;
* a GLOBAL ``train.batch_size`` (per-rank micro-batch = batch_size / world_size / grad_accum);
* bf16 autocast, or fp16 autocast + ``torch.amp.GradScaler`` on CUDA;
* AdamW/Adam/SGD, linear warm-up + cosine/constant LR, gradient clipping;
* EMA weights (``torch._foreach_lerp_``) used for validation, best-checkpoint choice and inference;
* a non-finite guard: a step whose loss (or, without a scaler, gradient norm) is NaN/inf on ANY rank
  is skipped on EVERY rank (the flag is all-reduced, so no rank waits at a collective the others
  skipped), logged and counted; ``train.max_bad_steps`` in a row stop the run with
  :class:`~medsegdiff.errors.TrainingError`;
* a step budget and an optional time budget; samples/s and memory in the logs;
* atomic checkpoints holding everything needed for a BIT-IDENTICAL resume on the CPU: model, EMA,
  optimizer, scheduler, scaler, objective, step, every RNG, the data-sampler position, best metric.

The trainer is split into small hook-like methods (:meth:`Trainer.setup`, :meth:`run_step`,
:meth:`forward_backward`, :meth:`optimize`, :meth:`log`, :meth:`validate`, :meth:`save`). It knows
nothing about caches, splits or run directories: ``out_dir`` receives ``config.yaml``,
``checkpoints/`` (:mod:`.checkpoint`) and, with the default tracker, ``metrics.jsonl``. The resume
cursor is :mod:`.cursor`, the process-group helpers are :mod:`.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from medsegdiff.config import ExperimentConfig, save_config
from medsegdiff.errors import CheckpointError, TrainingError
from medsegdiff.tracking import make_tracker
from medsegdiff.tracking.base import NullTracker
from medsegdiff.tracking.jsonl import truncate_metrics
from medsegdiff.training import checkpoint as ckpt_mod
from medsegdiff.training.cursor import BatchCursor
from medsegdiff.training.distributed import (
    DistContext,
    all_reduce_max_flag,
    all_reduce_max_flags,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    micro_batch_size,
    wrap_ddp,
)
from medsegdiff.training.ema import EMA
from medsegdiff.training.optim import build_optimizer, build_scheduler
from medsegdiff.training.validation import TABLE_COLUMNS, table_rows
from medsegdiff.utils.console import say
from medsegdiff.utils.runtime import autocast, seed_everything

logger = logging.getLogger("medsegdiff.training")


@dataclass
class Components:
    """What the trainer trains and feeds.

    Attributes:
        model: the network (unwrapped); diffusion models follow the model contract, the baseline
            has ``is_diffusion = False``.
        objective: ``objective(model, batch, step) -> ObjectiveOutput(loss, terms)``; an
            ``nn.Module`` whose parameters (learned loss weights) are optimised too.
        dataset: indexed by the sampler's items (``(index, seed)`` tuples); items are dicts.
        sampler: iterable of dataset keys for THIS rank, with ``state_dict()`` /
            ``load_state_dict()`` (exact position) and optionally ``set_epoch(e)``.
        validator: optional object with ``__call__(model, step) -> dict`` (mean metrics; key
            ``dice`` drives the best checkpoint) and ``baseline() -> dict``.
        collate_fn: batches a list of items (default ``torch.utils.data.default_collate``).
    """

    model: nn.Module
    objective: nn.Module
    dataset: Any
    sampler: Any
    validator: Any = None
    collate_fn: Callable[[list[Any]], Any] | None = None


ComponentsFn = Callable[[ExperimentConfig, Path, DistContext], Components]


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    best_checkpoint: Path | None
    last_checkpoint: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_steps: int = 0
    stopped_by: str = "steps"
    run_dir: Path | None = None


class _StepModule(nn.Module):
    """Model + objective as one module, so DDP sees every parameter used by the objective.

    The objective may call ``model.encode_image`` / ``model.anchor_logits`` (not reachable through a
    DDP wrapper); running the whole objective inside ``forward`` keeps gradient hooks intact.
    """

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Any, step: int) -> Any:
        return self.objective(self.model, batch, step)


class Trainer:
    """One training run (see the module docstring).

    Args:
        cfg: the resolved experiment config.
        run_dir: the output folder (created; ``config.yaml``, ``checkpoints/``, ``metrics.jsonl``).
        components: ``(cfg, run_dir, dist_ctx) -> Components``, called once the process group
            exists and the global RNG is seeded with ``cfg.seed`` (identical weights on every rank).
        resume: continue from the newest checkpoint in ``run_dir`` (error if there is none).
        tracker: where metrics go (rank 0); default ``medsegdiff.tracking.make_tracker``.
        stop_at: stop (with a checkpoint) after this optimizer step although ``train.steps`` is
            larger; the LR schedule still follows ``train.steps`` (used to test resuming).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | os.PathLike[str],
        *,
        components: ComponentsFn,
        resume: bool = False,
        tracker: Any = None,
        stop_at: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.tracker = tracker
        self._own_tracker = tracker is None
        self.components_fn = components
        self.stop_at = stop_at
        self.step = 0
        self.best: dict[str, Any] = {"metric": "val/dice", "value": None, "step": None}
        self.bad_in_row = 0
        self.bad_total = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._det_prev: tuple[bool, bool] | None = None
        self.dist: DistContext | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Process group, seeds, components, optimiser, schedule, scaler, EMA, DDP, resume."""
        cfg, tc = self.cfg, self.cfg.train
        self.dist = init_distributed(cfg.device)
        self.device = self.dist.device
        self.micro = micro_batch_size(tc.batch_size, self.dist.world_size, tc.grad_accum)
        if tc.precision == "fp16":
            autocast(self.device, "fp16")  # raises the ConfigError on the CPU
        if tc.deterministic and self.device.type == "cpu":
            self._det_prev = (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled())
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not (self.run_dir / "config.yaml").exists():  # the run-directory helpers may have written it
                save_config(cfg, self.run_dir / "config.yaml")
        barrier(self.dist)
        comps = self.components_fn(cfg, self.run_dir, self.dist)
        self.comps = comps
        # Per-rank seeds from here on: diffusion noise and timesteps must differ between ranks.
        seed_everything(cfg.seed + 1_000_003 * self.dist.rank)
        self.model = comps.model.to(self.device)
        if cfg.model.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.objective = comps.objective.to(self.device)
        self.ema = EMA(self.model, tc.ema_rate)
        params = list(self.model.parameters()) + list(self.objective.parameters())
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.steps)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=tc.precision == "fp16" and self.device.type == "cuda"
        )
        # torch.compile wraps the network only (the objective draws timesteps with numpy, which would
        # break graphs); the unwrapped model keeps plain state_dict keys for EMA and checkpoints.
        net = torch.compile(self.model) if cfg.model.compile else self.model
        step_module: nn.Module = _StepModule(net, self.objective)
        if self.dist.distributed:
            step_module = wrap_ddp(step_module, self.dist)
        self.ddp = step_module if self.dist.distributed else None
        self.step_module = step_module
        self.cursor = BatchCursor(comps.sampler, self.micro)
        if self.resume:
            self.load_latest()
        self.loader = self._make_loader()
        self.batches = iter(self.loader)
        if self.tracker is None:
            self.tracker = self._make_tracker()

    def _make_loader(self) -> DataLoader:
        workers = self.cfg.data.num_workers
        # A dedicated generator: creating the iterator never touches the global torch RNG, so a
        # resumed run draws the same noise as an uninterrupted one.
        gen = torch.Generator().manual_seed(self.cfg.seed + 7919 * self.dist.rank + self.step)
        return DataLoader(
            self.comps.dataset,
            batch_sampler=self.cursor,
            num_workers=workers,
            collate_fn=self.comps.collate_fn or default_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            generator=gen,
        )

    def _make_tracker(self) -> Any:
        return make_tracker(self.cfg, self.run_dir) if self.dist.is_main else NullTracker()

    # ------------------------------------------------------------------ resume
    def load_latest(self) -> None:
        """Restore the newest READABLE step checkpoint; a corrupt newer one is skipped with a warning.

        ``metrics.jsonl`` is cut back to the restored step, so the steps between that checkpoint and
        the interruption are not logged twice.

        Raises:
            CheckpointError: no step checkpoint, or none of them is readable.
        """
        found = ckpt_mod.list_step_checkpoints(self.run_dir)
        if not found:
            raise CheckpointError(
                f"{self.run_dir}: --resume given but there is no checkpoints/step_*.pt; start without --resume"
            )
        state, bad = None, []
        for _, path in reversed(found):
            try:
                state = ckpt_mod.load_checkpoint(path, map_location=self.device)
                break
            except CheckpointError as err:
                bad.append(path)
                if self.dist.is_main:
                    logger.warning("%s; trying the previous checkpoint", err)
        if state is None:
            raise CheckpointError(
                f"{ckpt_mod.checkpoint_dir(self.run_dir)}: no readable step checkpoint "
                f"({', '.join(p.name for p in bad)} are truncated or corrupt); start without --resume"
            )
        ckpt_mod.restore_training_state(self, state)
        if self.dist.is_main:
            dropped = truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            skipped = f" (skipped unreadable {', '.join(p.name for p in bad)})" if bad else ""
            say(f"[train] resumed from {path.name} at step {self.step} of {self.cfg.train.steps}{skipped}"
                + (f"; dropped {dropped} metrics.jsonl line(s) logged after it" if dropped else ""))

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        """Train until ``train.steps`` (or the time budget / ``stop_at``) and return the result."""
        try:
            self.setup()
            return self._loop()
        finally:
            self.close()

    def close(self) -> None:
        """Finish an own tracker, restore the deterministic-algorithms flags, leave the process group."""
        if self._own_tracker and self.tracker is not None:
            self.tracker.finish()
        if self._det_prev is not None:
            torch.use_deterministic_algorithms(self._det_prev[0], warn_only=self._det_prev[1])
            self._det_prev = None
        if self.dist is not None:
            self.ddp = self.step_module = self.batches = None  # before the group goes: see cleanup()
            cleanup(self.dist)
            self.dist = None

    def _loop(self) -> TrainResult:
        tc = self.cfg.train
        start = time.perf_counter()
        stopped_by = "steps"
        if self.comps.validator is not None and self.dist.is_main and self.step == 0:
            base = self.comps.validator.baseline()
            if base:
                self.tracker.log({f"baseline/{k}": v for k, v in base.items()}, step=0)
                self._log_cases("baseline/cases", getattr(self.comps.validator, "baseline_rows", None), 0)
        while self.step < tc.steps:
            logs = self.run_step()
            every_val = tc.validation.every
            done = self.step >= tc.steps
            over_time = tc.time_budget_s > 0 and all_reduce_max_flag(  # every rank stops at the same step
                self.dist, time.perf_counter() - start >= tc.time_budget_s)
            at_stop = self.stop_at is not None and self.step >= self.stop_at
            if self.step % tc.log_every == 0 or done or over_time or at_stop:
                self.log(logs)
            validated = False
            if every_val and self.step % every_val == 0 and not done:
                self.validate()
                validated = True
            if done or over_time or at_stop:
                if not validated and (done or over_time):
                    self.validate()
                self.save()
                stopped_by = "steps" if done else ("time" if over_time else "stop_at")
                break
            if self.step % tc.checkpoint_every == 0:
                self.save()
        best = ckpt_mod.best_path(self.run_dir)
        return TrainResult(
            best_checkpoint=best if best.exists() else None, last_checkpoint=self.last_checkpoint,
            steps=self.step, history=self.history, bad_steps=self.bad_total, stopped_by=stopped_by,
            run_dir=self.run_dir,
        )

    def run_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns values to log.

        Values may be 0-d tensors: they are turned into floats only when logged, so a GPU step
        synchronises once (for the non-finite decision), not once per logged term.
        """
        t0 = time.perf_counter()
        self.model.train()
        self.objective.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        loss_sum, terms, nonfinite = self.forward_backward()
        logs = self.optimize(loss_sum, nonfinite)
        logs.update({f"train/{k}": v for k, v in terms.items()})
        dt = time.perf_counter() - t0
        logs["train/step_time_s"] = dt
        logs["train/samples_per_s"] = self.cfg.train.batch_size / max(dt, 1e-9)
        if self.device.type == "cuda":
            logs["train/max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            logs["train/max_rss_gb"] = _max_rss_gb()
        return logs

    def forward_backward(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Accumulate gradients over the micro-batches (losses scaled so gradients AVERAGE).

        Returns:
            ``(mean loss, mean terms, non-finite flag)``, all 0-d tensors on the device.
        """
        tc = self.cfg.train
        accum = tc.grad_accum
        scale = 1.0 / accum  # micro / per-rank batch; DDP averages over ranks -> global mean
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        terms_sum: dict[str, torch.Tensor] = {}
        for i in range(accum):
            batch = next(self.batches)
            self.cursor.consumed()
            batch = _to_device(batch, self.device)
            sync = self.ddp is None or i == accum - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with autocast(self.device, tc.precision):
                    out = self.step_module(batch, self.step)
                loss = out.loss.float()
                nonfinite = nonfinite | ~torch.isfinite(loss.detach())
                # Backward runs even on a NaN loss: under DDP every rank must reach the gradient
                # all-reduce; the step is dropped afterwards on all ranks together.
                self.scaler.scale(loss * scale).backward()
            loss_sum = loss_sum + loss.detach() * scale
            for k, v in (out.terms or {}).items():
                v = v.detach().float().mean() if torch.is_tensor(v) else torch.tensor(float(v))
                terms_sum[k] = terms_sum.get(k, 0.0) + v * scale
        return loss_sum, terms_sum, nonfinite

    def optimize(self, loss: torch.Tensor, nonfinite: torch.Tensor) -> dict[str, Any]:
        """Clip, agree on skipping non-finite steps across ranks, step optimizer/scheduler/EMA."""
        tc = self.cfg.train
        scaled = self.scaler.is_enabled()
        if scaled:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # With a GradScaler, inf gradients of a finite loss are its normal overflow handling.
        flags = torch.stack([nonfinite, ~torch.isfinite(grad_norm.detach()) & ~nonfinite & (not scaled)])
        flags = all_reduce_max_flags(self.dist, flags)
        bad_loss, bad_grad = (bool(f) for f in flags.tolist())  # the one host sync of the step
        bad = bad_loss or bad_grad
        logs: dict[str, Any] = {}
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if scaled:
                self.scaler.update(self.scaler.get_scale() * 0.5)
            self.bad_in_row += 1
            self.bad_total += 1
            logs["train/skipped_step"] = 1.0
            logger.warning("step %d: non-finite %s; step skipped (%d in a row)", self.step + 1,
                           "loss" if bad_loss else "gradients", self.bad_in_row)
            if self.dist.is_main and self.tracker is not None:
                self.tracker.log({"train/non_finite_steps": self.bad_total}, step=self.step + 1)
            if self.bad_in_row >= tc.max_bad_steps:
                raise TrainingError(
                    f"{self.bad_in_row} non-finite losses in a row at step {self.step + 1}; lower optim.lr "
                    f"(now {self.cfg.optim.lr:g}) or use precision=fp32/bf16 (now {tc.precision}), "
                    "and check the data for NaN"
                )
        else:
            if scaled:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.ema.update(self.model)
            self.bad_in_row = 0
        with warnings.catch_warnings():  # a skipped step has no optimizer.step(); that is intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.step += 1
        logs.update({
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/non_finite_steps": float(self.bad_total),
        })
        if scaled:
            logs["train/loss_scale"] = float(self.scaler.get_scale())
        return logs

    # ------------------------------------------------------------------ logging / validation
    def log(self, logs: dict[str, float]) -> None:
        """Mean over ranks, then rank 0 sends the scalars to the tracker."""
        scalars = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float, torch.Tensor))}
        reduced = all_reduce_mean(self.dist, scalars)
        if self.dist.is_main:
            record = {"step": self.step, **reduced}
            self.history.append(record)
            self.tracker.log(reduced, step=self.step)
            logger.info("step %d/%d: %s", self.step, self.cfg.train.steps, _log_line(reduced))

    def validate(self) -> dict[str, float] | None:
        """Validate with the EMA weights (if configured) and keep ``best.pt`` by validation Dice."""
        val = self.comps.validator
        if val is None:
            return None
        self.model.eval()
        use_ema = self.cfg.train.validation.use_ema
        ctx = self.ema.swapped_in(self.model) if use_ema else contextlib.nullcontext(self.model)
        with ctx, torch.no_grad():
            metrics = val(self.model, self.step)
        self.model.train()
        if not metrics:
            return metrics
        if self.dist.is_main:
            logger.info("validation at step %d: %s", self.step,
                        ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
            self.tracker.log({f"val/{k}": v for k, v in metrics.items()}, step=self.step)
            self._log_cases("val/cases", getattr(val, "last_rows", None), self.step)
            if self.cfg.tracking.log_images and getattr(val, "last_panels", None):
                self.tracker.log_images("val/panels", val.last_panels, step=self.step)
            self.history.append({"step": self.step, **{f"val/{k}": v for k, v in metrics.items()}})
        dice = metrics.get("dice")
        if dice is not None and math.isfinite(dice) and (self.best["value"] is None or dice > self.best["value"]):
            self.best = {"metric": "val/dice", "value": float(dice), "step": self.step}
            self.save(best=True)
        return metrics

    def _log_cases(self, name: str, rows: Any, step: int) -> None:
        if rows:
            self.tracker.log_table(name, list(TABLE_COLUMNS), table_rows(rows), step=step)

    # ------------------------------------------------------------------ checkpoints
    def save(self, best: bool = False) -> Path | None:
        """Write ``step_{step}.pt`` (and prune to ``keep_last``) or ``best.pt``; rank 0 writes, all wait."""
        state = ckpt_mod.training_state(self)  # collective under DDP: every rank calls it
        path = None
        if self.dist.is_main:
            if best:
                path = ckpt_mod.save_checkpoint(ckpt_mod.best_path(self.run_dir), state)
                logger.info("step %d: new best %s %.4g -> %s", self.step, self.best["metric"], self.best["value"],
                            path)
            else:
                path = ckpt_mod.save_checkpoint(ckpt_mod.step_path(self.run_dir, self.step), state)
                removed = ckpt_mod.prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
                logger.info("step %d: checkpoint %s%s", self.step, path,
                            f" (removed {', '.join(p.name for p in removed)})" if removed else "")
        if not best:
            self.last_checkpoint = ckpt_mod.step_path(self.run_dir, self.step)
        barrier(self.dist)
        return path


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


#: scalars shown in the per-step log line, in this order (when logged)
LOG_LINE_KEYS = ("train/loss", "train/grad_norm", "train/lr", "train/samples_per_s", "train/non_finite_steps")


def _log_line(scalars: dict[str, float]) -> str:
    """``"loss 0.1234, grad_norm 1.2, lr 0.0001, samples_per_s 45.6"`` from the logged scalars."""
    parts = [f"{k.split('/', 1)[1]} {scalars[k]:.4g}" for k in LOG_LINE_KEYS if k in scalars]
    return ", ".join(parts)


def _max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def train(
    cfg: ExperimentConfig, run_dir: str | os.PathLike[str], *, components: ComponentsFn, **options: Any
) -> TrainResult:
    """Train the parts built by ``components`` into ``run_dir`` (see :class:`Trainer`).

    ``options`` are the other keyword arguments of :class:`Trainer` (``resume`` continues the newest
    checkpoint in ``run_dir``; ``tracker``, ``stop_at``). The experiment's train stage is
    :func:`medsegdiff.stages.train.train` (it prepares the data and builds the real parts).

    Raises:
        ConfigError: batch size not divisible by world size x grad_accum, fp16 on the CPU, ...
        CheckpointError: ``resume`` without a checkpoint, or a corrupt checkpoint.
        TrainingError: ``train.max_bad_steps`` non-finite steps in a row.
    """
    return Trainer(cfg, run_dir, components=components, **options).run()

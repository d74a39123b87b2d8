"""The train stage: the real trained parts (cache, split, data, model, objective, validator) and the run.

:func:`train` is what ``medsegdiff train`` and ``medsegdiff run --stages train`` both call. It
builds the parts through :func:`build_components`, which the :class:`~medsegdiff.training.trainer.Trainer`
calls once the process group exists: rank 0 prepares the cache and the split
(:func:`medsegdiff.stages.prepare.prepare`), the other ranks wait and open the same cache.

Rank 0 records the training status in ``meta.json`` (:func:`medsegdiff.stages.meta.record_training`):
unfinished when training starts, finished when it reaches ``train.steps`` or its time budget.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.config import ExperimentConfig
from medsegdiff.data.cache import Manifest
from medsegdiff.data.datasets import LesionOversamplingSampler, PatchDataset, SliceDataset
from medsegdiff.data.splits import Splits
from medsegdiff.diffusion.factory import build_diffusion
from medsegdiff.diffusion.objective import SegmentationObjective
from medsegdiff.errors import DataError
from medsegdiff.nets.registry import build_model
from medsegdiff.stages.layout import RunDir, as_run_dir
from medsegdiff.stages.meta import record_training
from medsegdiff.stages.prepare import prepare
from medsegdiff.tracking.progress import ProgressTracker
from medsegdiff.training import trainer
from medsegdiff.training.checkpoint import find_latest, list_step_checkpoints
from medsegdiff.training.distributed import DistContext, barrier, broadcast_object
from medsegdiff.training.trainer import Components, TrainResult
from medsegdiff.training.validation import Validator
from medsegdiff.utils.console import env_rank, say

logger = logging.getLogger("medsegdiff.stages")


def prepare_training_data(cfg: ExperimentConfig, run_dir: Path, dist_ctx: DistContext) -> tuple[Manifest, Splits]:
    """``(Manifest, Splits)`` on every rank (rank 0 prepares the cache and writes ``splits.json``).

    Raises:
        ConfigError: neither ``data.root`` nor ``data.cache_dir`` is set.
        DataError: unreadable data, stale cache without ``data.root``, bad split file.
    """
    payload = None
    if dist_ctx.is_main:
        prepared = prepare(cfg, run_dir / "splits.json", progress=True)
        payload = (str(prepared.cache_dir), prepared.splits.to_dict())
    barrier(dist_ctx)
    cache_dir, split_dict = broadcast_object(dist_ctx, payload)
    manifest = Manifest.open(cache_dir)
    splits = Splits(split_dict["train"], split_dict["val"], split_dict["test"], dict(split_dict.get("meta") or {}))
    return manifest, splits


def build_components(cfg: ExperimentConfig, run_dir: Path, dist_ctx: DistContext) -> Components:
    """Model (:func:`medsegdiff.nets.registry.build_model`), objective on the FULL schedule, data, validator.

    Raises:
        DataError: the training split is empty (and as :func:`prepare_training_data`).
    """
    manifest, splits = prepare_training_data(cfg, run_dir, dist_ctx)
    if not splits.train:
        raise DataError(f"{run_dir / 'splits.json'}: the training split is empty; use more cases or lower "
                        "data.split.test_fraction / val_fraction")
    if cfg.data.dims == 2:
        dataset = SliceDataset(manifest, splits.train, context_slices=cfg.data.context_slices,
                               augment=cfg.data.augment, seed=cfg.seed)
        flags = dataset.lesion_flags
    else:
        dataset = PatchDataset(manifest, splits.train, patch_size=cfg.data.patch_size,
                               lesion_rate=cfg.data.lesion_oversample, augment=cfg.data.augment, seed=cfg.seed,
                               samples_per_epoch=cfg.data.samples_per_epoch)
        flags = np.zeros(len(dataset), dtype=bool)
    sampler = LesionOversamplingSampler(
        flags, rate=cfg.data.lesion_oversample if cfg.data.dims == 2 else 0.0,
        num_samples=cfg.data.samples_per_epoch, seed=cfg.seed,
        rank=dist_ctx.rank, world_size=dist_ctx.world_size,
    )
    # The trainer seeded the global RNG with cfg.seed: identical initial weights on every rank.
    model = build_model(cfg)
    diffusion = build_diffusion(cfg.diffusion, respacing="")  # training ALWAYS uses the full schedule
    objective = SegmentationObjective(cfg, diffusion)
    validator = None
    if splits.val:  # 2-D slices or 3-D sliding windows (training/validation.py)
        validator = Validator(cfg, manifest, splits.val, dist_ctx)
    return Components(model=model, objective=objective, dataset=dataset, sampler=sampler, validator=validator)


def train(
    cfg: ExperimentConfig,
    run: RunDir | str | os.PathLike[str],
    *,
    resume: bool = False,
    tracker: Any = None,
    progress: bool = False,
    stop_at: int | None = None,
) -> TrainResult:
    """Train ``cfg`` into the run directory ``run`` (every rank of a torchrun launch calls it).

    Args:
        cfg: the resolved experiment config (``data.root`` or ``data.cache_dir`` set).
        run: the run directory (``splits.json``, ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``).
        resume: continue from the newest checkpoint; a run without one yet starts from step 0.
        tracker: where metrics go (rank 0); default :func:`medsegdiff.tracking.make_tracker`.
        progress: a progress bar over the steps (needs ``tracker``).
        stop_at: stop after this step although ``train.steps`` is larger (tests of resuming).

    Returns:
        The :class:`~medsegdiff.training.trainer.TrainResult` (``run_dir`` set).

    Raises:
        ConfigError, DataError: bad config or data (see :func:`prepare_training_data`).
        CheckpointError: a corrupt checkpoint.
        TrainingError: ``train.max_bad_steps`` non-finite steps in a row.
    """
    rd = as_run_dir(run)
    run_dir = rd.root
    has_ckpt = find_latest(run_dir) is not None
    if resume and not has_ckpt:
        say(f"[train] {run_dir} has no checkpoint yet: training from step 0")
    main = env_rank() == 0
    if main:
        found = list_step_checkpoints(run_dir) if resume else []
        record_training(rd, finished=False, step=found[-1][0] if found else 0, steps=cfg.train.steps)
    bar = ProgressTracker(tracker, cfg.train.steps, enabled=progress and tracker is not None)
    try:
        result = trainer.train(cfg, run_dir, components=build_components, resume=resume and has_ckpt,
                               tracker=bar if tracker is not None else None, stop_at=stop_at)
    finally:
        bar.close()
    if main:
        record_training(rd, finished=result.stopped_by in ("steps", "time"), step=result.steps,
                        steps=cfg.train.steps, stopped_by=result.stopped_by)
        say(f"[train] {result.steps} of {cfg.train.steps} steps done (stopped by {result.stopped_by}); "
            f"last checkpoint {result.last_checkpoint}")
    return result

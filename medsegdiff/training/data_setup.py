"""The real trained parts for :func:`medsegdiff.training.trainer.train`: cache, split, data, model.

``prepare_training_data`` makes sure the preprocessed cache exists and is current (it calls
:func:`medsegdiff.data.preprocess.prepare_dataset`, which reuses an up-to-date cache, rebuilds a
stale one and resumes an interrupted one) and fixes the split in ``<run_dir>/splits.json``. Under
torchrun only rank 0 prepares; the others wait and open the same cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsegdiff.config import ExperimentConfig
from medsegdiff.errors import ConfigError
from medsegdiff.training.distributed import DistContext, barrier, broadcast_object


def _prepare_on_main(cfg: ExperimentConfig, run_dir: Path, progress: bool) -> tuple[str, dict[str, Any]]:
    from medsegdiff.data.cache import Manifest
    from medsegdiff.data.splits import Splits, make_splits

    if cfg.data.root:
        from medsegdiff.data.preprocess import prepare_dataset
        from medsegdiff.experiments.pipeline import cache_dir_for, ensure_dataset

        root = ensure_dataset(cfg, progress=progress)
        cache_dir = cache_dir_for(cfg, root)
        manifest = prepare_dataset(root, cache_dir, cfg.data, workers=cfg.data.prepare_workers, progress=progress)
    elif cfg.data.cache_dir:
        cache_dir = Path(cfg.data.cache_dir)
        manifest = Manifest.open(cache_dir, data_cfg=cfg.data)
    else:
        raise ConfigError(
            "config keys 'data.root' and 'data.cache_dir' are both empty; set data.root to the ISLES24 "
            "folder (or data.cache_dir to a prepared cache)"
        )
    splits_file = run_dir / "splits.json"
    if cfg.data.split.file and Path(cfg.data.split.file).resolve() != splits_file.resolve():
        splits = Splits.load(cfg.data.split.file, manifest.case_ids)
    elif splits_file.is_file():
        splits = Splits.load(splits_file, manifest.case_ids)  # resume: keep the run's split
    else:
        splits = make_splits(manifest.case_ids, cfg.data.split)
    splits.save(splits_file)
    return str(cache_dir), splits.to_dict()


def prepare_training_data(cfg: ExperimentConfig, run_dir: Path, dist_ctx: DistContext) -> tuple[Any, Any]:
    """``(Manifest, Splits)`` on every rank (rank 0 prepares the cache and writes ``splits.json``).

    Raises:
        ConfigError: neither ``data.root`` nor ``data.cache_dir`` is set.
        DataError: unreadable data, stale cache without ``data.root``, bad split file.
    """
    from medsegdiff.data.cache import Manifest
    from medsegdiff.data.splits import Splits

    payload = _prepare_on_main(cfg, run_dir, progress=True) if dist_ctx.is_main else None
    barrier(dist_ctx)
    cache_dir, split_dict = broadcast_object(dist_ctx, payload)
    manifest = Manifest.open(cache_dir)
    splits = Splits(split_dict["train"], split_dict["val"], split_dict["test"], dict(split_dict.get("meta") or {}))
    return manifest, splits


def build_real_components(cfg: ExperimentConfig, run_dir: Path, dist_ctx: DistContext) -> Any:
    """Model (:func:`medsegdiff.nets.registry.build_model`), objective on the FULL schedule, data, validator."""
    from medsegdiff.data.datasets import LesionOversamplingSampler, PatchDataset, SliceDataset
    from medsegdiff.diffusion.factory import build_diffusion
    from medsegdiff.diffusion.objective import SegmentationObjective
    from medsegdiff.errors import DataError
    from medsegdiff.nets.registry import build_model
    from medsegdiff.training.trainer import Components
    from medsegdiff.training.validation import Validator

    manifest, splits = prepare_training_data(cfg, run_dir, dist_ctx)
    if not splits.train:
        raise DataError(f"{run_dir / 'splits.json'}: the training split is empty; use more cases or lower "
                        "data.split.test_fraction / val_fraction")
    import numpy as np

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

"""The prepare stage: the dataset (synthetic if asked), the preprocessed cache and the subject split.

:func:`prepare` is the one place where a cache is built or reused and a split is made or reused;
``medsegdiff run`` (stage ``prepare``) and the train stage (on rank 0, before training) both call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medsegdiff.config import ExperimentConfig
from medsegdiff.data.cache import Manifest, cache_dir_name
from medsegdiff.data.grid import ceiling_message
from medsegdiff.data.preprocess import prepare_dataset
from medsegdiff.data.splits import Splits, make_splits
from medsegdiff.data.synthetic import generate_dataset
from medsegdiff.errors import ConfigError, DataError
from medsegdiff.utils.console import say

logger = logging.getLogger("medsegdiff.stages")


@dataclass
class PreparedData:
    """What :func:`prepare` produced: the opened cache, the split and where both are."""

    manifest: Manifest
    splits: Splits
    cache_dir: Path
    splits_file: Path


def check_data_root(cfg: ExperimentConfig) -> Path:
    """``data.root`` if it exists or will be generated (``data.synthetic.generate``).

    Raises:
        ConfigError: ``data.root`` is empty.
        DataError: ``data.root`` does not exist and ``data.synthetic.generate`` is false.
    """
    if not cfg.data.root:
        raise ConfigError(
            "config key 'data.root' is empty; point it at the extracted ISLES24 release "
            "(e.g. data.root=/data/isles24/train) or use experiments/quickstart.yaml for synthetic data"
        )
    root = Path(cfg.data.root).expanduser()
    if not root.exists() and not cfg.data.synthetic.generate:
        raise DataError(
            f"{root}: data.root does not exist; fix data.root (e.g. data.root=/data/isles24/train), "
            "or set data.synthetic.generate=true to create a synthetic dataset there"
        )
    return root


def ensure_dataset(cfg: ExperimentConfig, *, progress: bool = True) -> Path:
    """The data root, generating the synthetic dataset first when the config asks for it.

    Raises:
        ConfigError: ``data.root`` is empty.
        DataError: ``data.root`` does not exist and ``data.synthetic.generate`` is false.
    """
    root = check_data_root(cfg)
    if root.exists():
        return root
    syn = cfg.data.synthetic
    logger.info("generating %d synthetic cases (%s, %s layout) in %s", syn.cases, syn.shape, syn.layout, root)
    say(f"[prepare] generating a synthetic ISLES24-like dataset ({syn.cases} cases) in {root}")
    generate_dataset(root, cases=syn.cases, seed=syn.seed, layout=syn.layout, shape=syn.shape, progress=progress)
    return root


def cache_dir_for(cfg: ExperimentConfig, data_root: Path) -> Path:
    """``data.cache_dir`` or ``<run_root>/cache/<cache_dir_name(data settings, data root)>``."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return Path(cfg.run_root) / "cache" / cache_dir_name(cfg.data, data_root)


def prepare(cfg: ExperimentConfig, splits_file: Path, *, progress: bool = True, verbose: bool = False) -> PreparedData:
    """Build or reuse the cache, then fix the split in ``splits_file``.

    The cache: with ``data.root`` it is prepared into :func:`cache_dir_for` (an up-to-date cache is
    reused, a stale one rebuilt, an interrupted one resumed); with only ``data.cache_dir`` that cache
    is opened and must match the preprocessing settings.

    The split (one rule): ``data.split.file`` when it names another file, else the existing
    ``splits_file`` (a run keeps its split when resumed or continued), else a new split from
    ``data.split``. It is saved to ``splits_file``.

    ``verbose`` prints the cache folder and the split sizes (``medsegdiff run``).

    Raises:
        ConfigError: neither ``data.root`` nor ``data.cache_dir`` is set.
        DataError: missing/unreadable data, stale cache without ``data.root``, bad split file.
    """
    if cfg.data.root:
        root = ensure_dataset(cfg, progress=progress)
        cache_dir = cache_dir_for(cfg, root)
        if verbose:
            say(f"[prepare] cache {cache_dir}")
        manifest = prepare_dataset(root, cache_dir, cfg.data, workers=cfg.data.prepare_workers, progress=progress)
    elif cfg.data.cache_dir:
        cache_dir = Path(cfg.data.cache_dir).expanduser()
        manifest = Manifest.open(cache_dir, data_cfg=cfg.data)
    else:
        raise ConfigError(
            "config keys 'data.root' and 'data.cache_dir' are both empty; set data.root to the ISLES24 "
            "folder (or data.cache_dir to a prepared cache)"
        )
    splits_file = Path(splits_file)
    if cfg.data.split.file and Path(cfg.data.split.file).resolve() != splits_file.resolve():
        splits = Splits.load(cfg.data.split.file, manifest.case_ids)
    elif splits_file.is_file():
        splits = Splits.load(splits_file, manifest.case_ids)
    else:
        splits = make_splits(manifest.case_ids, cfg.data.split)
    splits.save(splits_file)
    if verbose:
        say(f"[prepare] {len(manifest.case_ids)} cases: {len(splits.train)} train, {len(splits.val)} val, "
            f"{len(splits.test)} test")
        last = manifest.last_run  # filled when this call prepared or reused the cache (not for a bare cache_dir)
        if "resolution_ceiling" in last:
            say(f"[prepare] {ceiling_message(last['resolution_ceiling'])}")
        for line in last.get("warnings", []):
            say(f"[prepare] WARNING: {line}")
    return PreparedData(manifest=manifest, splits=splits, cache_dir=Path(cache_dir), splits_file=splits_file)

"""The predict stage: the run's best checkpoint on its held-out (test split) cases."""

from __future__ import annotations

from pathlib import Path

from medsegdiff.config import ExperimentConfig
from medsegdiff.data.splits import Splits
from medsegdiff.errors import CheckpointError, DataError
from medsegdiff.inference.predict import predict as predict_cases
from medsegdiff.stages.calibrate import inference_overrides
from medsegdiff.stages.layout import RunDir
from medsegdiff.training.checkpoint import best_path, checkpoint_dir, find_latest
from medsegdiff.utils.console import say


def best_checkpoint(run: RunDir) -> Path:
    """``checkpoints/best.pt`` if it exists, else the newest ``step_*.pt``.

    Raises:
        CheckpointError: no checkpoint at all.
    """
    best = best_path(run.root)
    if best.is_file():
        return best
    latest = find_latest(run.root)
    if latest is None:
        raise CheckpointError(f"{checkpoint_dir(run.root)}: no checkpoint; run the train stage first (--stages train)")
    return Path(latest)


def test_cases(splits_file: Path) -> list[str]:
    """The test-split case ids saved in ``splits_file``.

    Raises:
        DataError: no split yet, or an empty test split.
    """
    if not splits_file.is_file():
        raise DataError(f"{splits_file}: no split yet; run the prepare stage first (--stages prepare)")
    splits = Splits.load(splits_file)
    if not splits.test:
        raise DataError(f"{splits_file}: the test split is empty; set data.split.test_fraction > 0")
    return list(splits.test)


test_cases.__test__ = False  # not a pytest test despite the name


def predict(cfg: ExperimentConfig, run: RunDir, checkpoint: Path, *, progress: bool = True) -> list[Path]:
    """Predict the test cases of the run's split from ``data.cache_dir`` into ``run.predictions``.

    The run's current inference settings apply (they may differ from the checkpoint's).

    Returns:
        The written prediction files.

    Raises:
        CheckpointError, ConfigError, DataError: as :func:`medsegdiff.inference.predict.predict`.
    """
    cases = test_cases(run.splits)
    say(f"[predict] {len(cases)} held-out cases with {checkpoint.name} "
        f"({cfg.inference.respacing or cfg.diffusion.respacing}, {cfg.inference.ensemble} members)")
    return predict_cases(checkpoint, Path(cfg.data.cache_dir), run.predictions, overrides=inference_overrides(cfg),
                         cases=cases, progress=progress)

"""``medsegdiff run``: from data to scored predictions in one command.

Stages, in order (each can be run alone with ``stages=``), each one function of :mod:`medsegdiff.stages`:

1. ``prepare``  - :func:`medsegdiff.stages.prepare.prepare`: the synthetic dataset if asked
   (``data.synthetic.generate`` and a missing ``data.root``), the preprocessed cache, the subject split;
2. ``train``    - :func:`medsegdiff.stages.train.train` into the run directory;
3. ``predict``  - :func:`medsegdiff.stages.calibrate.calibrate` on the validation cases (when
   ``inference.calibrate``), then :func:`medsegdiff.stages.predict.predict` on the held-out cases;
4. ``evaluate`` - :func:`medsegdiff.stages.evaluate.evaluate`: the model AND the official Tmax > 9 s
   baseline on the same cases; the comparison is printed, saved (``results.json``) and logged.

Under torchrun every rank calls :func:`run_experiment`; rank 0 prepares the data, creates the run
directory and holds its lock (:mod:`medsegdiff.pipeline.lock`), all ranks train, rank 0 predicts and
evaluates. ``predict`` and ``evaluate`` refuse a run whose training did not finish
(:func:`medsegdiff.stages.meta.require_finished`) unless ``allow_unfinished``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medsegdiff.config import ExperimentConfig, save_config
from medsegdiff.errors import ConfigError, DataError
from medsegdiff.pipeline.report import format_table, log_results, print_locations
from medsegdiff.pipeline.rundir import finish_meta, init_shared_run_dir, release_run_dir, resolve_run_dir
from medsegdiff.stages.calibrate import calibrate
from medsegdiff.stages.evaluate import evaluate
from medsegdiff.stages.layout import RunDir
from medsegdiff.stages.meta import require_finished
from medsegdiff.stages.predict import best_checkpoint, predict
from medsegdiff.stages.prepare import cache_dir_for, check_data_root, prepare
from medsegdiff.stages.train import train
from medsegdiff.tracking import make_tracker
from medsegdiff.utils.console import env_rank, log_to_file, say

STAGES = ("prepare", "train", "predict", "evaluate")


@dataclasses.dataclass
class PipelineResult:
    """What :func:`run_experiment` did."""

    run_dir: Path
    stages: list[str]
    results: dict[str, Any] | None = None
    train: Any = None
    cfg: ExperimentConfig | None = None


def parse_stages(text: str | Sequence[str] | None) -> list[str]:
    """``"prepare,train"`` -> ``["prepare", "train"]`` in pipeline order.

    Raises:
        ConfigError: an unknown stage name.
    """
    if text is None:
        return list(STAGES)
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    for s in items:
        if s not in STAGES:
            raise ConfigError(f"--stages: unknown stage '{s}'; allowed: {', '.join(STAGES)} (comma-separated)")
    if not items:
        raise ConfigError(f"--stages: empty; allowed: {', '.join(STAGES)} (comma-separated)")
    return [s for s in STAGES if s in items]


def with_data_paths(cfg: ExperimentConfig, cache_dir: Path, splits_file: Path) -> ExperimentConfig:
    """The config the later stages see: the resolved cache folder and the saved split."""
    data = dataclasses.replace(
        cfg.data,
        cache_dir=str(cache_dir),
        split=dataclasses.replace(cfg.data.split, file=str(splits_file)),
    )
    return dataclasses.replace(cfg, data=data)


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    """Block a non-zero rank until rank 0 has written ``path`` (the split)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(f"{path}: rank {env_rank()} waited {timeout_s:.0f} s for rank 0 to prepare the data")
        time.sleep(1.0)


def _prepare_stage(cfg: ExperimentConfig, rd: RunDir, rank: int, progress: bool) -> ExperimentConfig:
    if rank == 0:
        prepared = prepare(cfg, rd.splits, progress=progress, verbose=True)
        cfg = with_data_paths(cfg, prepared.cache_dir, rd.splits)
        save_config(cfg, rd.config)
        return cfg
    _wait_for(rd.splits)
    return with_data_paths(cfg, cache_dir_for(cfg, Path(cfg.data.root)), rd.splits)


def _scoring(stages: Sequence[str]) -> str:
    """``"predict/evaluate"``: the stages that need a finished training (for the refusal message)."""
    return "/".join(s for s in stages if s in ("predict", "evaluate"))


def run_experiment(
    cfg: ExperimentConfig,
    reference: ExperimentConfig | None = None,
    *,
    stages: Sequence[str] | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_unfinished: bool = False,
    command: Sequence[str] | None = None,
    progress: bool = True,
    tracker_factory: Callable[[ExperimentConfig, Path], Any] | None = None,
) -> PipelineResult:
    """Run the pipeline for one experiment (see the module docstring).

    Args:
        cfg: the resolved config (experiment file + overrides).
        reference: the experiment file without overrides (for the run-directory name).
        stages: subset of :data:`STAGES`; a run without ``train`` reuses the existing run directory.
        resume: continue the newest run directory of this config from its latest checkpoint.
        overwrite: start anew in the folder a run would reuse; the old one is moved aside
            (:func:`medsegdiff.pipeline.rundir.init_run_dir`).
        allow_unfinished: predict/evaluate a run whose training did not finish.
        command: the command line recorded in ``meta.json``.
        progress: progress bars.
        tracker_factory: ``(cfg, run_dir) -> Tracker``; default :func:`medsegdiff.tracking.make_tracker`.

    Raises:
        MedSegDiffError: for expected problems (bad config, missing data, missing checkpoint).
    """
    stages = parse_stages(stages)
    reuse = resume or "prepare" not in stages or "train" not in stages
    rank = env_rank()
    if "prepare" in stages and rank == 0:
        check_data_root(cfg)  # before a run directory is made for nothing
    if "train" not in stages and rank == 0 and ("predict" in stages or "evaluate" in stages):
        # refuse an unfinished run before its meta.json and config.yaml are touched
        require_finished(resolve_run_dir(cfg, reference, resume=True), allow_unfinished=allow_unfinished,
                         what=_scoring(stages))
    rd, cfg = init_shared_run_dir(cfg, reference, resume=reuse, overwrite=overwrite, command=command)
    try:
        return _run_stages(cfg, rd, stages, resume=resume, allow_unfinished=allow_unfinished, progress=progress,
                           tracker_factory=tracker_factory or make_tracker)
    finally:
        release_run_dir(rd)


def _run_stages(cfg: ExperimentConfig, rd: RunDir, stages: list[str], *, resume: bool, allow_unfinished: bool,
                progress: bool, tracker_factory: Callable[[ExperimentConfig, Path], Any]) -> PipelineResult:
    rank = env_rank()
    result = PipelineResult(run_dir=rd.root, stages=stages, cfg=cfg)
    say(f"[run] {rd.root}")
    status = "failed"
    with log_to_file(rd.logs / ("run.log" if rank == 0 else f"run.rank{rank}.log")):
        tracker = tracker_factory(cfg, rd.root)
        try:
            # ---- prepare (rank 0), the other ranks wait for the split
            if "prepare" in stages:
                cfg = _prepare_stage(cfg, rd, rank, progress)
            elif not cfg.data.cache_dir:
                raise DataError(f"{rd.root}: no prepared data for this run; include the prepare stage")
            result.cfg = cfg
            # ---- train (every rank)
            if "train" in stages:
                say(f"[train] {cfg.model.name} ({cfg.model.preset or 'custom'}) for {cfg.train.steps} steps"
                    + (f" or {cfg.train.time_budget_s:.0f} s" if cfg.train.time_budget_s else ""))
                result.train = train(cfg, rd, resume=resume, tracker=tracker if rank == 0 else None,
                                     progress=progress)
            if rank != 0:
                status = "done"
                return result
            # ---- calibrate + predict, evaluate (rank 0), only with a finished training
            if "predict" in stages or "evaluate" in stages:
                require_finished(rd, allow_unfinished=allow_unfinished, what=_scoring(stages))
            if "predict" in stages:
                ckpt = best_checkpoint(rd)
                if cfg.inference.calibrate:
                    calibrate(cfg, rd, ckpt, progress=progress)
                predict(cfg, rd, ckpt, progress=progress)
            if "evaluate" in stages:
                results = evaluate(cfg, rd, progress=progress)
                step = int(getattr(result.train, "steps", 0) or cfg.train.steps)
                log_results(tracker, results, step)
                result.results = results
                print("\n" + format_table(results), flush=True)
                print_locations(rd, tracker)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            tracker.finish()
            if rank == 0:
                finish_meta(rd, status=status, stages=stages)
    return result

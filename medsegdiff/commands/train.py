"""``medsegdiff train``: train one model into a run directory (resumable, torchrun-ready).

Like ``medsegdiff run --stages prepare,train``: the run directory is created (or reopened with
``--resume``) and locked, a progress bar shows the steps (``--no-progress`` hides it), ``-v`` adds the
per-step log lines on the console, and ``logs/run.log`` records them with the checkpoint events.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from medsegdiff.config import ExperimentConfig, load_config
from medsegdiff.errors import CheckpointError, ConfigError
from medsegdiff.pipeline.rundir import init_shared_run_dir, release_run_dir
from medsegdiff.stages.layout import RunDir
from medsegdiff.stages.train import train
from medsegdiff.tracking import make_tracker
from medsegdiff.utils.console import env_rank, log_to_file, say, setup_console_logging

_LATEST = "__latest__"
logger = logging.getLogger("medsegdiff.commands")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML or a run's config.yaml (optional with --resume RUN_DIR)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. train.steps=100 optim.lr=3e-4)")
    p.add_argument("--run-dir", default=None, help="run directory (default: run_dir / <run_root>/<derived name>)")
    p.add_argument("--resume", nargs="?", const=_LATEST, default=None, metavar="RUN_DIR",
                   help="continue from the latest checkpoint of RUN_DIR (or of this config's newest run)")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew in an existing run directory; the old one is moved aside to <dir>.old-<time>")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show INFO log messages (per-step losses, checkpoints) on the console")


def resolve_run(
    config: str | None,
    overrides: list[str],
    *,
    run_dir: str | None = None,
    resume: bool = False,
    resume_dir: str | None = None,
    overwrite: bool = False,
    command: list[str] | None = None,
) -> tuple[RunDir, ExperimentConfig]:
    """The config and the (created or reopened) run directory of a ``medsegdiff train`` command line.

    ``config`` may be omitted with ``resume_dir`` (its ``config.yaml`` is used). An override given
    where the config belongs (``medsegdiff train --resume DIR k=v``) is treated as an override.
    Every rank of a torchrun launch gets the same run directory.

    Raises:
        ConfigError: no config and no run directory to resume.
        CheckpointError: ``resume_dir`` is not a run directory, resuming with changed
            model/data/diffusion settings, or the run directory is in use / holds a run (see
            :func:`medsegdiff.pipeline.rundir.init_run_dir`).
    """
    if config is not None and "=" in config and not Path(config).is_file():
        overrides, config = [config, *overrides], None
    if config is None:
        if resume_dir is None:
            raise ConfigError("medsegdiff train needs a config file (e.g. experiments/quickstart.yaml) "
                              "or --resume RUN_DIR")
        config = str(Path(resume_dir) / "config.yaml")
        if not Path(config).is_file():
            raise CheckpointError(f"{config}: not a run directory (no config.yaml); check the --resume path")
    reference = load_config(config)
    cfg = load_config(config, overrides)
    target = run_dir or resume_dir
    if target:
        cfg = dataclasses.replace(cfg, run_dir=str(target))
        reference = dataclasses.replace(reference, run_dir=str(target))
    return init_shared_run_dir(cfg, reference, resume=resume, overwrite=overwrite, command=command)


def run(args: argparse.Namespace) -> int:
    setup_console_logging(args.verbose)
    resume_dir = None if args.resume in (None, _LATEST) else args.resume
    rd, cfg = resolve_run(args.config, list(args.overrides), run_dir=args.run_dir, resume=args.resume is not None,
                          resume_dir=resume_dir, overwrite=args.overwrite, command=["medsegdiff", *sys.argv[1:]])
    rank = env_rank()
    try:
        with log_to_file(rd.logs / ("run.log" if rank == 0 else f"run.rank{rank}.log")):
            say(f"[train] {rd.root}: {cfg.model.name} ({cfg.model.preset or 'custom'}) for {cfg.train.steps} steps"
                + (f" or {cfg.train.time_budget_s:.0f} s" if cfg.train.time_budget_s else ""))
            tracker = make_tracker(cfg, rd.root) if rank == 0 else None
            try:
                result = train(cfg, rd, resume=args.resume is not None, tracker=tracker,
                               progress=not args.no_progress)
            finally:
                if tracker is not None:
                    tracker.finish()
    finally:
        release_run_dir(rd)
    if rank == 0:
        print(json.dumps({
            "run_dir": str(result.run_dir), "steps": result.steps, "stopped_by": result.stopped_by,
            "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
            "non_finite_steps": result.bad_steps,
        }, indent=2))
    return 0

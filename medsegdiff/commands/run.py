"""``medsegdiff run``: prepare, train, predict and evaluate an experiment in one command."""

from __future__ import annotations

import argparse
import sys

from medsegdiff.config import load_config
from medsegdiff.pipeline.run import parse_stages, run_experiment
from medsegdiff.utils.console import setup_console_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment YAML (e.g. experiments/quickstart.yaml) or a run's config.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. train.steps=100 optim.lr=3e-4)")
    p.add_argument(
        "--stages", default=None,
        help="comma-separated subset of prepare,train,predict,evaluate (default: all); "
             "a run without train reuses the newest run directory of this config",
    )
    p.add_argument("--resume", action="store_true",
                   help="continue the newest run directory of this config from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew in the run directory this run would reuse; the old one is moved aside to "
                        "<dir>.old-<time> (never deleted)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="predict/evaluate even if the run's training did not finish (meta.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="show INFO log messages on the console")


def run(args: argparse.Namespace) -> int:
    setup_console_logging(args.verbose)
    stages = parse_stages(args.stages)
    reference = load_config(args.experiment)
    cfg = load_config(args.experiment, args.overrides)
    run_experiment(cfg, reference, stages=stages, resume=args.resume, overwrite=args.overwrite,
                   allow_unfinished=args.allow_unfinished,
                   command=["medsegdiff", *sys.argv[1:]], progress=not args.no_progress)
    return 0

"""``medsegdiff train``: train one model into a run directory (resumable, torchrun-ready)."""

from __future__ import annotations

import argparse

HELP = "train a model (prepares the data cache if needed); --resume continues a killed run exactly"

_LATEST = "__latest__"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML or a run's config.yaml (optional with --resume RUN_DIR)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. train.steps=100 optim.lr=3e-4)")
    p.add_argument("--run-dir", default=None, help="run directory (default: run_dir / <run_root>/<derived name>)")
    p.add_argument("--resume", nargs="?", const=_LATEST, default=None, metavar="RUN_DIR",
                   help="continue from the latest checkpoint of RUN_DIR (or of this config's newest run)")
    p.add_argument("-v", "--verbose", action="store_true", help="show INFO log messages on the console")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from medsegdiff.commands.run import setup_console_logging
    from medsegdiff.training.trainer import train_from_cli

    setup_console_logging(args.verbose)
    resume_dir = None if args.resume in (None, _LATEST) else args.resume
    result = train_from_cli(
        args.config, list(args.overrides), run_dir=args.run_dir, resume=args.resume is not None,
        resume_dir=resume_dir, command=["medsegdiff", *sys.argv[1:]],
    )
    if result is not None:
        print(json.dumps({
            "run_dir": str(result.run_dir), "steps": result.steps, "stopped_by": result.stopped_by,
            "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
            "non_finite_steps": result.bad_steps,
        }, indent=2))
    return 0

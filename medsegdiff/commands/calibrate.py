"""``medsegdiff calibrate``: sweep the probability threshold on validation cases, store it in the run."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsegdiff.commands import add_checkpoint_arguments, add_sampling_options, data_argument, split_case_ids
from medsegdiff.pipeline.lock import writing_into
from medsegdiff.stages.calibrate import calibrate_checkpoint, validation_cases
from medsegdiff.stages.meta import require_finished, run_of_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Samples the cases with the checkpoint's settings, sweeps thresholds 0.05..0.95 on the native grid, "
                "and adds the threshold to <run>/calibration.json with those settings (sampler, respacing, ensemble, "
                "combination...); `medsegdiff predict` applies it only with the same settings (unless "
                "inference.use_calibrated_threshold=false). Calibrations under other settings are kept.")
    add_checkpoint_arguments(p, data_help="prepared cache or raw dataset root (cases need reference masks)")
    p.add_argument("--cases", default="",
                   help="comma-separated case ids; default: the checkpoint run's validation split "
                        "(splits.json), else all cases")
    p.add_argument("--run-dir", default=None, help="where calibration.json goes (default: the checkpoint's run)")
    add_sampling_options(
        p, unfinished_help="calibrate a checkpoint of a run whose training did not finish (meta.json)",
        overrides_help="prediction-time overrides as for `predict` (e.g. inference.ensemble=3)",
    )


def run(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    ckpt_run = ckpt if ckpt.is_dir() else ckpt.parent.parent
    run_dir = Path(args.run_dir) if args.run_dir else ckpt_run
    cases = split_case_ids(args.cases) or validation_cases(ckpt_run)
    data = data_argument(args)
    require_finished(run_of_checkpoint(ckpt), allow_unfinished=args.allow_unfinished, what="calibrate")
    with writing_into(run_dir):  # the only writer of a run directory it writes into
        best, table, path = calibrate_checkpoint(ckpt, data, cases, overrides=args.overrides, run_dir=run_dir,
                                                 progress=not args.no_progress)
    row = next(r for r in table if abs(r["threshold"] - best) < 1e-12)
    dice, n = row["mean_dice"], len(cases) if cases else "all"
    print(f"best threshold {best:.2f} (mean Dice {dice:.3f} on {n} cases); "
          f"wrote {path}")
    return 0

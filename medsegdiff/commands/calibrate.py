"""``medsegdiff calibrate``: sweep the probability threshold on validation cases, store it in the run."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsegdiff.commands import split_case_ids
from medsegdiff.stages.calibrate import calibrate_checkpoint, validation_cases


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Samples the cases with the checkpoint's settings, sweeps thresholds 0.05..0.95 on the native grid, "
                "and writes <run>/calibration.json, which `medsegdiff predict` then applies "
                "(unless inference.use_calibrated_threshold=false).")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/*.pt file or a run directory (its best.pt)")
    p.add_argument("--data", required=True, action="append", metavar="PATH",
                   help="prepared cache or raw dataset root (cases need reference masks)")
    p.add_argument("--cases", default="",
                   help="comma-separated case ids; default: the checkpoint run's validation split "
                        "(splits.json), else all cases")
    p.add_argument("--run-dir", default=None, help="where calibration.json goes (default: the checkpoint's run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="prediction-time overrides as for `predict` (e.g. inference.ensemble=3)")


def run(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    ckpt_run = ckpt if ckpt.is_dir() else ckpt.parent.parent
    run_dir = Path(args.run_dir) if args.run_dir else ckpt_run
    cases = split_case_ids(args.cases) or validation_cases(ckpt_run)
    data = args.data[0] if len(args.data) == 1 else args.data
    best, table, path = calibrate_checkpoint(ckpt, data, cases, overrides=args.overrides, run_dir=run_dir,
                                             progress=not args.no_progress)
    row = next(r for r in table if abs(r["threshold"] - best) < 1e-12)
    dice, n = row["mean_dice"], len(cases) if cases else "all"
    print(f"best threshold {best:.2f} (mean Dice {dice:.3f} on {n} cases); "
          f"wrote {path}")
    return 0

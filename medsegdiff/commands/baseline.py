"""``medsegdiff baseline``: official simple baselines, written like model predictions."""

from __future__ import annotations

import argparse

from medsegdiff.baselines.tmax import tmax_baseline
from medsegdiff.commands import split_case_ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    t = sub.add_parser("tmax", help="lesion = space-ncct Tmax > threshold seconds (ISLES24 organisers)")
    t.add_argument("data", help="ISLES24 data root (either release layout) or a case folder")
    t.add_argument("--out", required=True, metavar="DIR", help="folder for the predicted masks")
    t.add_argument("--threshold", type=float, default=9.0, help="Tmax cut-off in seconds (default 9, official)")
    t.add_argument("--cases", nargs="*", default=None, metavar="ID", help="only these case ids (space- or comma-separated)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    written = tmax_baseline(
        args.data, args.out, threshold=args.threshold, cases=split_case_ids(args.cases), progress=not args.no_progress
    )
    print(f"wrote {len(written)} mask(s) (Tmax > {args.threshold:g} s) to {args.out}; "
          f"score them with: medsegdiff evaluate --pred {args.out} --gt {args.data} --out EVAL_DIR")
    return 0

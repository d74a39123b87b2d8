"""``medsegdiff evaluate``: official ISLES'24 metrics for a folder of predicted masks."""

from __future__ import annotations

import argparse
import json

from medsegdiff.commands import split_case_ids
from medsegdiff.evaluation.evaluate import evaluate, format_table
from medsegdiff.pipeline.lock import writing_into
from medsegdiff.stages.meta import require_finished, run_of_predictions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predictions sub-strokeNNNN.nii.gz")
    p.add_argument(
        "--gt", required=True, metavar="PATH",
        help="ISLES24 data root (either layout) or a folder of reference masks sub-strokeNNNN.nii.gz",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics.csv, summary.json)")
    p.add_argument(
        "--iou-threshold", type=float, default=0.5,
        help="lesion-matching IoU for lesion-wise F1, inclusive (default 0.5; organisers' latest code: 0.2)",
    )
    p.add_argument(
        "--connectivity", type=int, default=0, choices=(0, 4, 8, 6, 18, 26),
        help="lesion components: 0 = official (26 in 3-D, 4 in 2-D)",
    )
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="score predictions as value > T (probability maps); default: predictions must be binary masks")
    p.add_argument("--cases", nargs="*", default=None, metavar="ID", help="score only these case ids (space- or comma-separated)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="score predictions made with a checkpoint of a run whose training did not finish")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    require_finished(run_of_predictions(args.pred), allow_unfinished=args.allow_unfinished, what="evaluate")
    with writing_into(args.out):  # the only writer of a run directory it writes into
        summary = evaluate(
            args.pred, args.gt, args.out,
            iou_threshold=args.iou_threshold,
            hd95=not args.no_hd95,
            connectivity=args.connectivity,
            cases=split_case_ids(args.cases),
            progress=not args.no_progress,
            threshold=args.threshold,
        )
    print(format_table(summary))
    if summary["missing_predictions"]:
        print("missing predictions (scored as empty): " + json.dumps(summary["missing_predictions"]))
    print(f"wrote {args.out}/metrics.csv, summary.json, volume_scatter.png")
    return 0

"""``medsegdiff predict``: sample ensembles with a checkpoint and write NIfTI on the native grid."""

from __future__ import annotations

import argparse

from medsegdiff.commands import add_checkpoint_arguments, add_sampling_options, data_argument, split_case_ids
from medsegdiff.inference.predict import predict
from medsegdiff.pipeline.lock import writing_into
from medsegdiff.stages.meta import require_finished, run_of_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Model, respacing and preprocessing come from the checkpoint. Threshold: the run's calibration.json "
                "when present (set inference.use_calibrated_threshold=false to use inference.threshold). Raw data is "
                "prepared into OUT/_cache. Writes <case>.nii.gz (mask), <case>_prob.nii.gz, "
                "<case>_uncertainty.nii.gz, <case>_overlay.png, predictions.csv, predict.json.")
    add_checkpoint_arguments(
        p, data_help="raw dataset root, a case folder, or a prepared cache; repeat for more case folders"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", nargs="*", default=None, metavar="ID",
                   help="case ids, space- or comma-separated; 'all' = every case (default: the checkpoint's "
                        "test split when the data holds it, else every case)")
    add_sampling_options(
        p, unfinished_help="use a checkpoint of a run whose training did not finish (meta.json)",
        overrides_help="inference.* / diffusion.respacing|sampler|eta / device overrides, "
                       "e.g. inference.ensemble=3 diffusion.respacing=ddim50",
    )


def run(args: argparse.Namespace) -> int:
    # `--cases a b key=value`: argparse gives the trailing overrides to --cases; hand them back
    given = args.cases or []
    overrides = [*args.overrides, *(c for c in given if "=" in c)]
    cases = split_case_ids([c for c in given if "=" not in c]) if args.cases is not None else None
    data = data_argument(args)
    require_finished(run_of_checkpoint(args.checkpoint), allow_unfinished=args.allow_unfinished, what="predict")
    with writing_into(args.out):  # the only writer of a run directory it writes into
        written = predict(args.checkpoint, data, args.out, overrides=overrides, cases=cases,
                          progress=not args.no_progress)
    print(f"wrote {len(written)} case(s) to {args.out} (predictions.csv, predict.json)")
    return 0

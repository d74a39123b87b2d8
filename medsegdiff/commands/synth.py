"""``medsegdiff synth``: write a synthetic ISLES24 look-alike dataset."""

from __future__ import annotations

import argparse

from medsegdiff.data.synthetic import generate_dataset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="dataset root to create (absent or empty folder)")
    p.add_argument("--cases", type=int, default=8, help="number of cases (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--layout", choices=("zenodo", "challenge2024"), default="zenodo",
                   help="on-disk layout: zenodo (2025 release) or challenge2024 (batch_*/ folders)")
    p.add_argument("--shape", default="tiny",
                   help="tiny (48 x 48-60 x 10-14), full (512 x 512-686 x 34-89) or XxYxZ (default tiny)")
    p.add_argument("--ctp", action="store_true", help="also write a 4-D CTP series per case")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    ids = generate_dataset(args.out, cases=args.cases, seed=args.seed, layout=args.layout, shape=args.shape,
                           ctp=args.ctp, progress=not args.no_progress)
    print(f"wrote {len(ids)} synthetic cases ({args.layout} layout) to {args.out}: {', '.join(ids)}")
    return 0

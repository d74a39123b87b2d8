"""``medsegdiff prepare``: preprocess an ISLES24 data root into the training cache."""

from __future__ import annotations

import argparse

from medsegdiff.config import load_config
from medsegdiff.data.grid import ceiling_message
from medsegdiff.data.preprocess import prepare_dataset
from medsegdiff.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_root", metavar="DATA_ROOT", help="ISLES24 root (Zenodo train/ or the 2024 batch layout)")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache folder to create or update")
    p.add_argument("--config", metavar="EXP.yaml", help="experiment YAML whose data section is used")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.image_size=128")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: data.prepare_workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: got {args.workers}; allowed: an integer >= 1")
    cfg = load_config(args.config, args.overrides)
    manifest = prepare_dataset(args.data_root, args.out, cfg.data, workers=args.workers,
                               progress=not args.no_progress)
    timing = manifest.last_run
    print(f"cache {manifest.cache_dir}: {len(manifest)} cases (settings {manifest.hash}; "
          f"{timing.get('prepared', 0)} prepared, {timing.get('reused', 0)} reused), "
          f"{len(manifest.skipped)} skipped")
    for s in manifest.skipped:
        print(f"  skipped: {s['reason']}")
    print(ceiling_message(timing["resolution_ceiling"]))
    for line in timing["warnings"]:
        print(f"WARNING: {line}")
    return 0

"""``medsegdiff config``: compose, override, validate and print a config."""

from __future__ import annotations

import argparse

from medsegdiff.config import ExperimentConfig, describe, dump_config, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (omit for the defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--keys", action="store_true", help="list every key with its type, default and help")


def run(args: argparse.Namespace) -> int:
    if args.keys:
        for key, tp, default, doc in describe(ExperimentConfig):
            print(f"{key:40s} {tp:35s} {default!r:25s} {doc}")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    return 0

"""``medsegdiff config``: compose, override, validate and print a config.

Validation is the same as ``train``'s before it touches data: the typed schema with every
section's cross-field checks (:func:`~medsegdiff.config.load_config`), then the network is built
on PyTorch's ``meta`` device (no memory, no weights) by the same
:func:`~medsegdiff.nets.registry.build_model` that training uses, so an impossible geometry
(``data.image_size`` not a multiple of the model's downsampling, bad heads, ...) fails here with
the same message.
"""

from __future__ import annotations

import argparse

import torch

from medsegdiff.config import ExperimentConfig, describe, dump_config, load_config
from medsegdiff.nets.registry import build_model


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
    check_model_builds(cfg)
    print(dump_config(cfg), end="")
    return 0


def check_model_builds(cfg) -> None:
    """Build ``cfg``'s network on the ``meta`` device (the geometry checks of training, no weights).

    Raises:
        ConfigError: the model cannot be built for this data geometry.
    """
    with torch.device("meta"):
        build_model(cfg)

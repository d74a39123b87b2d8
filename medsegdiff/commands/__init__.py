"""CLI sub-commands; see :mod:`medsegdiff.cli` for the contract.

Each ``medsegdiff/commands/<name>.py`` provides ``add_arguments(parser)`` and ``run(args) -> int``;
its one-line help is in :data:`COMMANDS` here, so that ``medsegdiff --help`` lists every command
without importing any (the command modules import torch and the rest of the library at the top).
"""

from __future__ import annotations

import argparse
import re

# name -> one-line help, in the order shown by ``medsegdiff --help``
COMMANDS: dict[str, str] = {
    "run": "run an experiment end to end: prepare data, train, predict held-out cases, evaluate vs Tmax baseline",
    "synth": "write a synthetic ISLES24 look-alike dataset (real .nii.gz tree in either release layout)",
    "prepare": "preprocess ISLES24 cases (windows, normalisation, resampling) into a memory-mapped cache",
    "train": "train a model (prepares the data cache if needed); --resume continues a killed run exactly",
    "predict": "predict lesion masks (+ probability, uncertainty, overlays) for cases with a checkpoint",
    "calibrate": "calibrate the probability threshold on validation cases (best mean Dice) and store it in the run",
    "evaluate": "score predicted masks with the official ISLES24 metrics (per-case CSV + summary)",
    "baseline": "official simple baseline (tmax: lesion = Tmax > 9 s) written as sub-strokeNNNN.nii.gz masks",
    "sweep": "expand a sweep (base experiment + grid) and run it locally or write torchrun/SLURM scripts",
    "bench": "benchmarks (JSON): data, model, train, sample, learn",
    "config": "validate a config (blocks + overrides) and print the resolved YAML",
}


def split_case_ids(values: list[str] | str | None) -> list[str] | None:
    """Case ids given as ``a b``, ``a,b``, ``"a b"`` or a mix (None or nothing -> None = all cases)."""
    if values is None:
        return None
    items = [values] if isinstance(values, str) else values
    ids = [c for item in items for c in re.split(r"[\s,]+", item) if c]
    return ids or None


def add_checkpoint_arguments(p: argparse.ArgumentParser, *, data_help: str) -> None:
    """``--checkpoint`` and the repeatable ``--data`` of the commands that sample with a checkpoint."""
    p.add_argument("--checkpoint", required=True, help="a checkpoints/*.pt file or a run directory (its best.pt)")
    p.add_argument("--data", required=True, action="append", metavar="PATH", help=data_help)


def add_sampling_options(p: argparse.ArgumentParser, *, unfinished_help: str, overrides_help: str) -> None:
    """``--allow-unfinished``, ``--no-progress`` and the ``KEY=VALUE`` overrides of those commands."""
    p.add_argument("--allow-unfinished", action="store_true", help=unfinished_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)


def data_argument(args: argparse.Namespace) -> str | list[str]:
    """The ``--data`` paths as the library takes them: one path, or the list of several."""
    return args.data[0] if len(args.data) == 1 else args.data

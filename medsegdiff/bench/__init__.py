"""Benchmarks behind ``medsegdiff bench <part>``: each module has ``add_arguments(p)`` and ``run(args) -> dict``."""

from __future__ import annotations

import argparse


def add_network_arguments(p: argparse.ArgumentParser, *, model_help: str) -> None:
    """``--preset``, ``--model`` and ``--channels``: the one network a benchmark builds."""
    p.add_argument("--preset", default="tiny", help="model block configs/model/<preset>.yaml (tiny, small, base, large)")
    p.add_argument("--model", default="", help=model_help)
    p.add_argument("--channels", type=int, default=5, help="input modalities")


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``: where a benchmark runs."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")

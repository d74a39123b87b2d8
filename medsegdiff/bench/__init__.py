"""Benchmarks behind ``medsegdiff bench <part>``: each module has ``add_arguments(p)`` and ``run(args) -> dict``."""

from __future__ import annotations

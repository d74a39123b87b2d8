"""``medsegdiff bench <part>``: micro-benchmarks that print JSON (throughput, peak memory, naive baseline).

Each part is a module ``medsegdiff/bench/<part>.py`` with ``add_arguments(p)`` and
``run(args) -> dict``; parts without a module are not listed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json

from medsegdiff.utils.io import atomic_write_json

PARTS = ("data", "model", "train", "sample", "learn")
NOT_IN_ALL = ("learn",)  # the learning benchmark trains models for many minutes: run it on its own


def available_parts() -> list[str]:
    return [p for p in PARTS if importlib.util.find_spec(f"medsegdiff.bench.{p}") is not None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="part", metavar="PART")
    for name in available_parts():
        module = importlib.import_module(f"medsegdiff.bench.{name}")
        doc = (module.__doc__ or name).strip().splitlines()[0]
        sp = sub.add_parser(name, help=doc, description=doc)
        module.add_arguments(sp)
        sp.set_defaults(_bench=module.run)
    if available_parts():
        sp = sub.add_parser("all", help="run every part with its defaults (not learn)")
        sp.set_defaults(_bench=None)
    p.add_argument("--output", metavar="FILE.json", help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "part", None):
        print("medsegdiff bench: choose a part: " + ", ".join(available_parts()))
        return 1
    if args.part == "all":
        result = {}
        for name in [p for p in available_parts() if p not in NOT_IN_ALL]:
            module = importlib.import_module(f"medsegdiff.bench.{name}")
            sp = argparse.ArgumentParser()
            module.add_arguments(sp)
            result[name] = module.run(sp.parse_args([]))
    else:
        result = args._bench(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if getattr(args, "output", None):
        atomic_write_json(args.output, result)
    return 0

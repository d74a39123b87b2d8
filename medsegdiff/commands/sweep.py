"""``medsegdiff sweep``: expand a grid of overrides into runs; run them or write launch scripts."""

from __future__ import annotations

import argparse

from medsegdiff.pipeline.sweep import (
    describe_runs,
    expand_sweep,
    index_entries,
    run_local,
    write_index,
    write_scripts,
)
from medsegdiff.utils.console import setup_console_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML (base: EXPERIMENT.yaml, grid: {key: [values]})")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    p.add_argument("--dry-run", action="store_true", help="list the runs (and write scripts/index) without running")
    p.add_argument("--launcher", choices=("local", "torchrun", "slurm"), default=None,
                   help="local = run one after another here; torchrun/slurm = write one launch script per run "
                        "(default: the sweep file's 'launcher', else local)")
    p.add_argument("--out", default=None, help="folder for scripts and index.json (default: <run_root>/sweeps/<name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    setup_console_logging(False)
    sweep = expand_sweep(args.sweep, out=args.out, extra=args.overrides)
    launcher = args.launcher or sweep.spec.launcher
    print(describe_runs(sweep))
    if launcher in ("torchrun", "slurm"):
        scripts = write_scripts(sweep, launcher)
        index = write_index(sweep, index_entries(sweep, scripts), launcher)
        note = "  (submits each script with sbatch)" if launcher == "slurm" else "  (one run after another)"
        print(f"\nwrote {len(scripts)} {launcher} scripts in {scripts[0].parent}")
        print(f"index: {index}\nlaunch all: bash {scripts[0].parent / 'run_all.sh'}{note}")
        return 0
    if args.dry_run:
        index = write_index(sweep, index_entries(sweep), "local")
        print(f"\ndry run: nothing started; index: {index}")
        return 0
    entries = run_local(sweep, progress=not args.no_progress)
    failed = [e for e in entries if e["status"] != "done"]
    print(f"\n[sweep] {len(entries) - len(failed)}/{len(entries)} runs done; index: {sweep.out / 'index.json'}")
    for e in entries:
        res = (e.get("results") or {}).get("model") or {}
        dice = res.get("dice")
        print(f"  {e['status']:7s} {'' if dice is None else f'Dice {dice:.3f}  '}{e['run_dir']}")
    return 1 if failed else 0

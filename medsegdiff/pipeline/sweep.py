"""Sweeps: a grid of overrides over one experiment, run locally or as torchrun / SLURM scripts.

A sweep file::

    base: quickstart.yaml          # experiment file, relative to the sweep file
    overrides: [train.steps=500]   # applied to every run (optional)
    grid:                          # every combination becomes one run (file order = nesting order)
      optim.lr: [1.0e-4, 3.0e-4]
      model.name: [medsegdiff_v1, medsegdiff_v2]
    torchrun: {nproc_per_node: 4}
    slurm: {partition: gpu, time: "24:00:00", gpus_per_node: 4}

:func:`expand_sweep` validates every run's config up front (a typo fails before anything runs).
:func:`write_scripts` writes one executable launch script per run (atomically) plus ``run_all.sh``
and ``index.json``; each script pins the run directory and passes ``--resume``, so re-submitting a
preempted job continues it.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medsegdiff.config import ExperimentConfig, from_dict, load_config, option
from medsegdiff.config.loader import read_yaml, yaml_load
from medsegdiff.errors import ConfigError, MedSegDiffError
from medsegdiff.pipeline.run import run_experiment
from medsegdiff.pipeline.rundir import run_name, safe_name
from medsegdiff.utils.io import atomic_write_json, atomic_write_with

LAUNCHERS = ("local", "torchrun", "slurm")


@dataclass
class TorchrunConfig:
    nproc_per_node: int = option(1, ge=1, doc="processes (GPUs) per node")
    nnodes: int = option(1, ge=1, doc="nodes; > 1 uses c10d rendezvous at $MASTER_ADDR:$MASTER_PORT")
    master_port: int = option(29500, ge=1, le=65535)


@dataclass
class SlurmConfig:
    partition: str = option("", doc="#SBATCH --partition (empty = cluster default)")
    account: str = option("", doc="#SBATCH --account")
    time: str = option("24:00:00", doc="#SBATCH --time")
    nodes: int = option(1, ge=1)
    gpus_per_node: int = option(1, ge=0)
    cpus_per_task: int = option(8, ge=1)
    mem: str = option("", doc="#SBATCH --mem (e.g. 64G; empty = default)")
    extra: list[str] = option([], doc="extra '#SBATCH ...' option lines, e.g. '--qos=high'")
    setup: list[str] = option([], doc="shell lines run before training (module load, source venv)")


@dataclass
class SweepConfig:
    base: str = option(doc="experiment YAML, relative to the sweep file")
    name: str = option("", doc="sweep name (W&B group, output folder); empty = the file name")
    overrides: list[str] = option([], doc="key=value applied to every run")
    grid: dict[str, list[Any]] = option({}, doc="key -> list of values; the runs are the product")
    launcher: Literal["local", "torchrun", "slurm"] = option("local")
    out: str = option("", doc="where scripts and index.json go; empty = <run_root>/sweeps/<name>")
    torchrun: TorchrunConfig = option(default_factory=TorchrunConfig)
    slurm: SlurmConfig = option(default_factory=SlurmConfig)

    def validate(self, prefix: str) -> None:
        for key, values in self.grid.items():
            if not values:
                raise ConfigError(f"sweep key 'grid.{key}': empty list; give at least one value")


@dataclass
class SweepRun:
    """One point of the grid."""

    index: int
    name: str
    overrides: list[str]
    cfg: ExperimentConfig
    run_dir: Path
    values: dict[str, Any]


@dataclass
class Sweep:
    path: Path
    spec: SweepConfig
    base: Path
    name: str
    runs: list[SweepRun]
    out: Path
    reference: ExperimentConfig


def format_override_value(value: Any) -> str:
    """YAML text that reads back as ``value`` (plain when possible: ``medsegdiff_v2``, ``0.0003``)."""
    if isinstance(value, str):
        try:
            if yaml_load(value) == value and value.strip() == value and value:
                return value
        except Exception:  # noqa: BLE001 - fall back to a quoted form
            pass
    return json.dumps(value)


def load_sweep(path: str | os.PathLike[str]) -> SweepConfig:
    path = Path(path)
    data = read_yaml(path)
    try:
        return from_dict(SweepConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def expand_sweep(
    path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None, extra: Sequence[str] = ()
) -> Sweep:
    """Read a sweep file and build (and validate) the config of every run in the grid.

    Args:
        path: the sweep YAML.
        out: output folder for scripts and the index (default: ``spec.out`` or
            ``<run_root>/sweeps/<name>``).
        extra: more overrides applied to every run (command line).

    Raises:
        ConfigError: a bad sweep file, a missing base experiment, or a grid value that does not
            validate (the message names the run).
    """
    path = Path(path)
    spec = load_sweep(path)
    base = (path.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
    if not base.is_file():
        raise ConfigError(f"{path}: sweep key 'base': {base} not found; give the experiment file relative to the sweep file")
    name = safe_name(spec.name or path.stem)
    common = [*spec.overrides, *extra]
    reference = load_config(base, common)
    if not reference.tracking.group:
        common.append(f"tracking.group={name}")
        reference = load_config(base, common)
    keys = list(spec.grid)
    combos = list(itertools.product(*(spec.grid[k] for k in keys))) if keys else [()]
    runs = []
    for i, combo in enumerate(combos):
        values = dict(zip(keys, combo))
        ovr = [*common, *(f"{k}={format_override_value(v)}" for k, v in values.items())]
        try:
            cfg = load_config(base, ovr)
        except ConfigError as err:
            desc = ", ".join(f"{k}={v}" for k, v in values.items())
            raise ConfigError(f"{path}: run {i} ({desc}): {err}") from None
        rname = run_name(cfg, reference, always=keys)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.run_root) / rname
        runs.append(SweepRun(i, rname, ovr, cfg, run_dir, values))
    out_dir = Path(out) if out else Path(spec.out) if spec.out else Path(reference.run_root) / "sweeps" / name
    return Sweep(path=path, spec=spec, base=base, name=name, runs=runs, out=out_dir, reference=reference)


# --------------------------------------------------------------------------- scripts
def _write_executable(path: Path, text: str) -> None:
    def writer(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")
        mode = os.stat(tmp).st_mode
        os.chmod(tmp, mode | (mode & 0o444) >> 2)  # like `chmod +x`: executable where readable (umask kept)

    atomic_write_with(path, writer)


def run_command(sweep: Sweep, run: SweepRun) -> list[str]:
    """``medsegdiff run`` arguments for one run (absolute paths, pinned run dir, --resume)."""
    run_dir = run.run_dir if run.run_dir.is_absolute() else Path.cwd() / run.run_dir
    return ["run", str(sweep.base.resolve()), *run.overrides, f"run_dir={run_dir}", "--resume", "--no-progress"]


def torchrun_script(sweep: Sweep, run: SweepRun) -> str:
    t = sweep.spec.torchrun
    args = " ".join(shlex.quote(a) for a in run_command(sweep, run))
    if t.nnodes > 1:
        launch = (f'"$PYTHON" -m torch.distributed.run --nnodes={t.nnodes} --nproc_per_node="$NPROC" '
                  f'--node_rank="${{NODE_RANK:?set NODE_RANK (0..{t.nnodes - 1}) on each node}}" '
                  f'--rdzv_id={shlex.quote(run.name[:60])} --rdzv_backend=c10d '
                  f'--rdzv_endpoint="${{MASTER_ADDR:?set MASTER_ADDR to node 0}}:${{MASTER_PORT:-{t.master_port}}}"')
    else:
        launch = '"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC"'
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# medsegdiff sweep {sweep.name}: run {run.index + 1}/{len(sweep.runs)} {run.name}",
        "# Re-running this script resumes the run from its latest checkpoint.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
        f"NPROC=${{NPROC_PER_NODE:-{t.nproc_per_node}}}",
        f"exec {launch} -m medsegdiff.cli {args}",
        "",
    ])


def slurm_script(sweep: Sweep, run: SweepRun) -> str:
    s = sweep.spec.slurm
    logs = (sweep.out if sweep.out.is_absolute() else Path.cwd() / sweep.out) / "logs"
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={shlex.quote(('msd-' + run.name)[:64])}",
        f"#SBATCH --nodes={s.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        f"#SBATCH --time={s.time}",
        f"#SBATCH --output={logs}/%x-%j.out",
        "#SBATCH --requeue",
    ]
    if s.gpus_per_node:
        header.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    if s.partition:
        header.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        header.append(f"#SBATCH --account={s.account}")
    if s.mem:
        header.append(f"#SBATCH --mem={s.mem}")
    header += [f"#SBATCH {e}" for e in s.extra]
    args = " ".join(shlex.quote(a) for a in run_command(sweep, run))
    nproc = max(1, s.gpus_per_node)
    body = [
        f"# medsegdiff sweep {sweep.name}: run {run.index + 1}/{len(sweep.runs)} {run.name}",
        "# Submit with sbatch; a requeued or re-submitted job resumes from the latest checkpoint.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        *s.setup,
        f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_PORT=${MASTER_PORT:-29500}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((SLURM_CPUS_PER_TASK / " + str(nproc) + " > 0 ? SLURM_CPUS_PER_TASK / " + str(nproc) + " : 1))}",
        f'srun "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node={nproc} '
        '--rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" '
        f"-m medsegdiff.cli {args}",
        "",
    ]
    return "\n".join(header + body)


def write_scripts(sweep: Sweep, launcher: str) -> list[Path]:
    """One executable script per run (``<out>/<launcher>/NNN_<name>.sh``) plus ``run_all.sh``."""
    if launcher not in ("torchrun", "slurm"):
        raise ConfigError(f"--launcher: got {launcher!r}; scripts exist for torchrun and slurm")
    folder = sweep.out / launcher
    make = torchrun_script if launcher == "torchrun" else slurm_script
    paths = []
    for run in sweep.runs:
        p = folder / f"{run.index:03d}_{run.name[:80]}.sh"
        _write_executable(p, make(sweep, run))
        paths.append(p)
    runner = "sbatch" if launcher == "slurm" else "bash"
    lines = ["#!/usr/bin/env bash", f"# all {len(paths)} runs of sweep {sweep.name} ({launcher})",
             "set -euo pipefail", 'cd "$(dirname "$0")"']
    lines += [f"{runner} {shlex.quote(p.name)}" for p in paths]
    _write_executable(folder / "run_all.sh", "\n".join(lines) + "\n")
    if launcher == "slurm":
        (sweep.out / "logs").mkdir(parents=True, exist_ok=True)
    return paths


def index_entries(sweep: Sweep, scripts: Sequence[Path] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "index": r.index,
            "name": r.name,
            "values": r.values,
            "overrides": r.overrides,
            "run_dir": str(r.run_dir),
            "script": str(scripts[r.index]) if scripts else None,
            "status": "pending",
        }
        for r in sweep.runs
    ]


def write_index(sweep: Sweep, entries: list[dict[str, Any]], launcher: str) -> Path:
    path = sweep.out / "index.json"
    atomic_write_json(path, {
        "sweep": sweep.name,
        "file": str(sweep.path),
        "base": str(sweep.base),
        "launcher": launcher,
        "grid": sweep.spec.grid,
        "runs": entries,
    })
    return path


def run_local(
    sweep: Sweep,
    *,
    runner: Callable[[SweepRun], Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every point one after another in this process; a failing run is recorded, not fatal."""
    entries = index_entries(sweep)
    write_index(sweep, entries, "local")
    for run, entry in zip(sweep.runs, entries):
        print(f"[sweep] run {run.index + 1}/{len(sweep.runs)}: {run.name}", flush=True)
        entry["status"] = "running"
        write_index(sweep, entries, "local")
        try:
            if runner is not None:
                res = runner(run)
            else:
                res = run_experiment(run.cfg, sweep.reference, command=["medsegdiff", "sweep", str(sweep.path)],
                                     progress=progress)
        except (MedSegDiffError, Exception) as err:  # noqa: BLE001 - one failed run must not end the sweep
            entry["status"] = "failed"
            entry["error"] = f"{type(err).__name__}: {err}"
            print(f"[sweep] run {run.index + 1} failed: {entry['error']}", flush=True)
        else:
            entry["status"] = "done"
            if res is not None and getattr(res, "run_dir", None) is not None:
                entry["run_dir"] = str(res.run_dir)
            results = getattr(res, "results", None)
            if results:
                entry["results"] = {"model": results.get("model"), "baseline_tmax": results.get("baseline_tmax")}
        write_index(sweep, entries, "local")
    return entries


def describe_runs(sweep: Sweep) -> str:
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} runs of {sweep.base}"]
    for r in sweep.runs:
        vals = " ".join(f"{k}={format_override_value(v)}" for k, v in r.values.items())
        lines.append(f"  {r.index:3d}  {vals:50s}  {r.run_dir}")
    return "\n".join(lines)


__all__ = [
    "LAUNCHERS",
    "SlurmConfig",
    "Sweep",
    "SweepConfig",
    "SweepRun",
    "TorchrunConfig",
    "describe_runs",
    "expand_sweep",
    "format_override_value",
    "load_sweep",
    "run_local",
    "slurm_script",
    "torchrun_script",
    "write_index",
    "write_scripts",
]

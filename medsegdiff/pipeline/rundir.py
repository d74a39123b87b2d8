"""Run directories: one readable, unique, self-describing folder per run.

Layout (``<run_root>/<name>/``)::

    config.yaml        resolved config (reloadable with load_config; run_dir points here)
    meta.json          git commit + dirty flag, package versions, python, platform, command, times
    splits.json        the subject-level data split used
    metrics.jsonl      every logged value (always written)
    logs/run.log       the run's log
    checkpoints/       step_XXXXXXXX.pt (last K) and best.pt
    predictions/       model predictions on the held-out cases (+ overlays)
    evaluation/        per-case CSV + summary of the model
    baseline/          Tmax > 9 s predictions (baseline/predictions) and evaluation (baseline/evaluation)
    results.json       the final comparison table (model vs baseline)
    wandb/             the W&B run (offline-run-* until ``wandb sync``)

The name is ``<experiment name>-<settings that differ from the experiment file>-<hash>``, e.g.
``quickstart-model.name=medsegdiff_v2-optim.lr=0.0003-3f9a1c``. It is deterministic for the same
resolved config; an existing folder gets a ``-2``, ``-3``... suffix unless the run is resumed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from medsegdiff.config import ExperimentConfig, load_config, save_config, to_dict
from medsegdiff.errors import CheckpointError
from medsegdiff.stages.layout import RunDir
from medsegdiff.utils.console import env_rank
from medsegdiff.utils.io import atomic_write_json

# Keys that do not change what a run computes: left out of the name and of the hash.
NON_RESULT_KEYS = ("name", "run_root", "run_dir", "device", "tracking", "data.num_workers",
                   "data.prepare_workers", "data.cache_dir", "inference.batch_size")
PACKAGES = ("medsegdiff", "torch", "monai", "SimpleITK", "numpy", "scipy", "wandb")
RESUME_BREAKING = ("model", "diffusion", "data")
MAX_NAME = 96
HASH_LEN = 6
logger = logging.getLogger("medsegdiff.pipeline")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


# --------------------------------------------------------------------------- naming
def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def changed_settings(cfg: ExperimentConfig, reference: ExperimentConfig | None) -> list[tuple[str, Any]]:
    """Leaf keys whose value in ``cfg`` differs from ``reference`` (default: all defaults), in order."""
    ref = flatten(to_dict(reference if reference is not None else ExperimentConfig()))
    cur = flatten(to_dict(cfg))
    return [(k, v) for k, v in cur.items() if not _excluded(k) and ref.get(k, object()) != v]


def config_hash(cfg: ExperimentConfig, length: int = HASH_LEN) -> str:
    """Short hash of every setting that affects the result (see :data:`NON_RESULT_KEYS`)."""
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if not _excluded(k)}
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:length]


def format_value(value: Any) -> str:
    """Compact, filesystem-safe text for a setting value (``0.0003`` -> ``3e-04`` stays readable)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ",".join(format_value(v) for v in value)
    else:
        text = str(value)
    return text


def safe_name(text: str) -> str:
    """Keep ``A-Z a-z 0-9 . _ = + -``; everything else becomes ``_``; no leading dot or dash."""
    text = _UNSAFE.sub("_", text).strip("._-")
    return text or "run"


def run_name(
    cfg: ExperimentConfig,
    reference: ExperimentConfig | None = None,
    *,
    always: Sequence[str] = (),
    max_len: int = MAX_NAME,
) -> str:
    """Readable deterministic name: experiment name, changed settings, short config hash.

    Args:
        cfg: the resolved config of the run.
        reference: what "changed" is measured against (the experiment file without overrides);
            None = the schema defaults.
        always: keys shown even when equal to the reference (the swept keys of a sweep).
        max_len: the name is shortened (settings dropped from the end) to at most this length.
    """
    digest = config_hash(cfg)
    head = safe_name(cfg.name)[:40]
    flat = flatten(to_dict(cfg))
    shown = [(k, flat[k]) for k in always if k in flat]
    shown += [(k, v) for k, v in changed_settings(cfg, reference) if k not in always]
    parts = [safe_name(f"{k}={format_value(v)}")[:40] for k, v in shown]
    budget = max_len - len(head) - len(digest) - 2
    kept: list[str] = []
    for p in parts:
        if sum(len(x) + 1 for x in kept) + len(p) + 1 > budget:
            break
        kept.append(p)
    return "-".join([head, *kept, digest])


# --------------------------------------------------------------------------- creation
def _candidates(root: Path, name: str) -> Iterable[Path]:
    yield root / name
    i = 2
    while True:
        yield root / f"{name}-{i}"
        i += 1


def latest_existing(run_root: Path, name: str) -> Path | None:
    """The newest existing folder among ``name``, ``name-2``, ``name-3``... (None if none)."""
    found = None
    for cand in _candidates(run_root, name):
        if not cand.exists():
            return found
        found = cand


def resolve_run_dir(
    cfg: ExperimentConfig, reference: ExperimentConfig | None = None, *, resume: bool = False
) -> Path:
    """Where the run lives: ``cfg.run_dir`` if set, else ``<run_root>/<run_name>`` (made unique).

    With ``resume`` the newest existing folder of that name is reused (a fresh one if none).
    Nothing is created.
    """
    if cfg.run_dir:
        return Path(cfg.run_dir)
    root = Path(cfg.run_root)
    name = run_name(cfg, reference)
    if resume:
        existing = latest_existing(root, name)
        if existing is not None:
            return existing
    for cand in _candidates(root, name):
        if not cand.exists():
            return cand
    raise AssertionError("unreachable")


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the source tree (None without git)."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def collect_meta(command: Sequence[str] | None = None) -> dict[str, Any]:
    """Provenance of a run: git, packages, python, platform, command line, start time."""
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "command": shlex.join(command if command is not None else sys.argv),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "start_time": time.time(),
        "resumed": [],
    }


def init_run_dir(
    cfg: ExperimentConfig,
    reference: ExperimentConfig | None = None,
    *,
    resume: bool = False,
    command: Sequence[str] | None = None,
) -> tuple[RunDir, ExperimentConfig]:
    """Create (or reopen) the run directory and write ``config.yaml`` and ``meta.json``.

    The saved config has ``run_dir`` set to the folder, so ``medsegdiff run <dir>/config.yaml
    --resume`` continues that exact run.

    Returns:
        The :class:`RunDir` and the config with ``run_dir`` filled in.

    Raises:
        CheckpointError: when resuming a folder whose saved config differs in a setting that
            affects the result.
    """
    path = resolve_run_dir(cfg, reference, resume=resume)
    cfg = dataclasses.replace(cfg, run_dir=str(path))
    rd = RunDir(path)
    existing_meta = None
    if rd.meta.is_file():
        try:
            existing_meta = json.loads(rd.meta.read_text())
        except (OSError, json.JSONDecodeError):
            existing_meta = None
    if rd.config.is_file() and resume:
        old = load_config(rd.config)
        if old.data.split.file == str(rd.splits) and not cfg.data.split.file:
            # the pipeline pins the split it saved; that is not a change of settings
            old = dataclasses.replace(old, data=dataclasses.replace(
                old.data, split=dataclasses.replace(old.data.split, file="")))
        changed = changed_settings(cfg, old)
        breaking = [(k, v) for k, v in changed if k.split(".")[0] in RESUME_BREAKING]
        if breaking:
            diff = ", ".join(f"{k}={format_value(v)}" for k, v in breaking[:5])
            raise CheckpointError(
                f"{rd.config}: cannot resume, the model/data/diffusion settings differ ({diff}); "
                "drop --resume to start a new run or use the saved settings"
            )
        # keep the data the run was prepared with (cache folder, saved split)
        saved = load_config(rd.config).data
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data,
            cache_dir=cfg.data.cache_dir or saved.cache_dir,
            split=dataclasses.replace(cfg.data.split, file=cfg.data.split.file or saved.split.file),
        ))
        if changed:
            logger.warning("resuming %s with changed settings: %s", path,
                           ", ".join(f"{k}={format_value(v)}" for k, v in changed[:8]))
    rd.make()
    save_config(cfg, rd.config)
    meta = collect_meta(command)
    if existing_meta is not None:
        existing_meta.setdefault("resumed", []).append(
            {"started": meta["started"], "command": meta["command"], "git": meta["git"]}
        )
        meta = existing_meta
    atomic_write_json(rd.meta, meta)
    return rd, cfg


def finish_meta(rd: RunDir, **fields: Any) -> None:
    """Add end-of-run fields (``finished`` time, ``status``...) to ``meta.json``."""
    try:
        meta = json.loads(rd.meta.read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if "start_time" in meta:
        meta["duration_s"] = round(time.time() - float(meta["start_time"]), 1)
    meta.update(fields)
    atomic_write_json(rd.meta, meta)


# --------------------------------------------------------------------------- distributed
LAUNCH_FILE = ".launch"


def launch_id(env: Mapping[str, str] | None = None) -> str | None:
    """An id shared by every process of one torchrun/SLURM launch (None when not distributed)."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        val = env.get(key)
        if val and val != "none":
            return f"{key}={val}:{env.get('SLURM_STEP_ID', '')}"
    return f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def init_shared_run_dir(
    cfg: ExperimentConfig,
    reference: ExperimentConfig | None = None,
    *,
    resume: bool = False,
    command: Sequence[str] | None = None,
    timeout_s: float = 600.0,
) -> tuple[RunDir, ExperimentConfig]:
    """:func:`init_run_dir` that gives every rank of a distributed launch the same folder.

    Rank 0 creates the folder and marks it with the launch id; the other ranks wait for the
    folder carrying their launch id (so the uniqueness suffix cannot differ between ranks).

    Raises:
        CheckpointError: when a non-zero rank does not see rank 0's folder within ``timeout_s``.
    """
    lid = launch_id()
    rank = env_rank()
    if lid is None or cfg.run_dir:
        if rank == 0 or lid is None:
            return init_run_dir(cfg, reference, resume=resume, command=command)
        return RunDir(Path(cfg.run_dir)), cfg
    if rank == 0:
        rd, cfg = init_run_dir(cfg, reference, resume=resume, command=command)
        atomic_write_json(rd.root / LAUNCH_FILE, {"launch": lid})
        return rd, cfg
    root, name = Path(cfg.run_root), run_name(cfg, reference)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for cand in _candidates(root, name):
            if not cand.exists():
                break
            try:
                if json.loads((cand / LAUNCH_FILE).read_text()).get("launch") == lid:
                    return RunDir(cand), dataclasses.replace(cfg, run_dir=str(cand))
            except (OSError, json.JSONDecodeError):
                pass
        time.sleep(0.5)
    raise CheckpointError(
        f"{root / name}: rank {rank} did not find the run directory made by rank 0 within "
        f"{timeout_s:.0f} s; check that all ranks share the file system holding run_root"
    )

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
resolved config.

Nothing is clobbered (:func:`init_run_dir`):

* a new run never reuses a folder that holds something: a derived name gets the next free ``-2``,
  ``-3``... suffix; a ``run_dir`` named explicitly is refused (exit 2) unless the run is resumed;
* ``overwrite`` (``--overwrite``) moves the old folder aside to ``<folder>.old-<UTC time>`` (never
  deletes it) and starts afresh in its place;
* the writing process holds the folder's exclusive lock (:mod:`medsegdiff.pipeline.lock`) until
  :func:`release_run_dir`; a second writer stops with one line naming the holder.
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
from medsegdiff.data.splits import Splits
from medsegdiff.errors import CheckpointError, ConfigError, DataError
from medsegdiff.pipeline import lock
from medsegdiff.stages.layout import RunDir
from medsegdiff.stages.meta import now_iso, read_meta, update_meta
from medsegdiff.utils.console import env_rank, say
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


def has_content(path: Path) -> bool:
    """True when ``path`` is a folder holding anything but its lock file (a run lives there)."""
    if not path.is_dir():
        return path.exists()
    return any(p.name != lock.LOCK_FILE for p in path.iterdir())


def _refuse_reuse(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: run directory already holds a run; add --resume to continue it, --overwrite to move it "
        f"aside (to {path.name}.old-<time>) and start a new run there, or choose another run_dir"
    )


def resolve_run_dir(
    cfg: ExperimentConfig, reference: ExperimentConfig | None = None, *, resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Where the run lives: ``cfg.run_dir`` if set, else ``<run_root>/<run_name>`` (made unique).

    With ``resume`` the newest existing folder of that name is reused (a fresh one if none); with
    ``overwrite`` it is the folder to replace. Without either, a derived name skips every folder that
    holds something. Nothing is created.

    Raises:
        CheckpointError: an explicit ``run_dir`` that already holds a run, without resume/overwrite.
    """
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if not resume and not overwrite and has_content(path):
            raise _refuse_reuse(path)
        return path
    root = Path(cfg.run_root)
    name = run_name(cfg, reference)
    if resume or overwrite:
        existing = latest_existing(root, name)
        if existing is not None:
            return existing
    for cand in _candidates(root, name):
        if not has_content(cand):
            return cand
    raise AssertionError("unreachable")


def move_aside(path: Path, command: Sequence[str] | None = None) -> Path:
    """Rename run directory ``path`` to ``<path>.old-<UTC time>`` (``-2``... if taken), under its lock.

    Raises:
        CheckpointError: another process holds the folder's lock.
    """
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.old-{stamp}")
    i = 2
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{i}")
        i += 1
    lock.acquire(path, command)  # nobody may be writing the folder we move
    try:
        path.rename(target)
    finally:
        lock.release(path)
    return target


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


def _open_new(cfg: ExperimentConfig, reference: ExperimentConfig | None, command: Sequence[str] | None) -> Path:
    """Lock a folder for a new run: ``cfg.run_dir`` (must hold nothing) or the first free derived name."""
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if has_content(path):
            raise _refuse_reuse(path)
        lock.acquire(path, command)
        if has_content(path):  # filled by someone between the check and the lock
            lock.release(path)
            raise _refuse_reuse(path)
        return path
    root, name = Path(cfg.run_root), run_name(cfg, reference)
    for cand in _candidates(root, name):
        if has_content(cand):
            continue
        try:
            lock.acquire(cand, command)
        except CheckpointError:  # another new run is just starting there: take the next name
            continue
        if not has_content(cand):
            return cand
        lock.release(cand)
    raise AssertionError("unreachable")


def init_run_dir(
    cfg: ExperimentConfig,
    reference: ExperimentConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    command: Sequence[str] | None = None,
) -> tuple[RunDir, ExperimentConfig]:
    """Create (or reopen) the run directory, take its lock, and write ``config.yaml`` and ``meta.json``.

    The saved config has ``run_dir`` set to the folder, so ``medsegdiff run <dir>/config.yaml
    --resume`` continues that exact run. The lock is held until :func:`release_run_dir` (or the
    process ends).

    Args:
        cfg, reference: the resolved config and the experiment file without overrides (for the name).
        resume: reuse the folder (``cfg.run_dir`` or the newest of the derived name).
        overwrite: replace the folder a run would reuse; the old one is moved aside, never deleted.
        command: the command line recorded in ``meta.json`` and the lock.

    Returns:
        The :class:`RunDir` and the config with ``run_dir`` filled in.

    Raises:
        CheckpointError: the folder is locked by another process; an explicit ``run_dir`` holds a run
            and neither ``resume`` nor ``overwrite`` is given; resuming a folder whose saved config
            differs in a setting that affects the result.
        ConfigError: ``resume`` and ``overwrite`` together.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if overwrite:
        target = resolve_run_dir(cfg, reference, overwrite=True)
        if has_content(target):
            moved = move_aside(target, command)
            say(f"[run] --overwrite: moved the old {target} aside to {moved}")
        cfg = dataclasses.replace(cfg, run_dir=str(target))
    if resume:
        path = resolve_run_dir(cfg, reference, resume=True)
        lock.acquire(path, command)
    else:
        path = _open_new(cfg, reference, command)
    try:
        return _write_run_dir(cfg, path, resume=resume, command=command)
    except BaseException:
        lock.release(path)
        raise


def _same_split(named: str, saved: Path) -> bool:
    """True when the split file ``named`` holds the same train/val/test subjects as ``saved``."""
    try:
        a, b = Splits.load(named), Splits.load(saved)
    except (OSError, DataError):
        return False
    return (a.train, a.val, a.test) == (b.train, b.val, b.test)


def _write_run_dir(
    cfg: ExperimentConfig, path: Path, *, resume: bool, command: Sequence[str] | None
) -> tuple[RunDir, ExperimentConfig]:
    cfg = dataclasses.replace(cfg, run_dir=str(path))
    rd = RunDir(path)
    existing_meta = read_meta(rd) if rd.meta.is_file() else None
    if rd.config.is_file() and resume:
        old = load_config(rd.config)
        own_split = old.data.split.file in (str(rd.splits), str(Path(old.run_dir or path) / "splits.json"))
        if own_split:
            # the pipeline pins the split it saved (in this folder, or where the folder was before it
            # was moved); that is not a change of settings
            old = dataclasses.replace(old, data=dataclasses.replace(
                old.data, split=dataclasses.replace(old.data.split, file=str(rd.splits))))
        if own_split and (not cfg.data.split.file or _same_split(cfg.data.split.file, rd.splits)):
            # no split named, or one with the same subjects as the saved copy (a benchmark that hands
            # every method its shared split file): the run keeps its own copy
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, split=dataclasses.replace(cfg.data.split, file=str(rd.splits))))
        changed = changed_settings(cfg, old)
        breaking = [(k, v) for k, v in changed if k.split(".")[0] in RESUME_BREAKING]
        if breaking:
            diff = ", ".join(f"{k}={format_value(v)}" for k, v in breaking[:5])
            raise CheckpointError(
                f"{rd.config}: cannot resume, the model/data/diffusion settings differ ({diff}); "
                "drop --resume to start a new run or use the saved settings"
            )
        # keep the data the run was prepared with (cache folder, saved split)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data,
            cache_dir=cfg.data.cache_dir or old.data.cache_dir,
            split=dataclasses.replace(cfg.data.split, file=cfg.data.split.file or old.data.split.file),
        ))
        if changed:
            logger.warning("resuming %s with changed settings: %s", path,
                           ", ".join(f"{k}={format_value(v)}" for k, v in changed[:8]))
    rd.make()
    save_config(cfg, rd.config)
    meta = collect_meta(command)
    if existing_meta:
        existing_meta.setdefault("resumed", []).append(
            {"started": meta["started"], "command": meta["command"], "git": meta["git"]}
        )
        meta = existing_meta
    atomic_write_json(rd.meta, meta)
    return rd, cfg


def release_run_dir(rd: RunDir) -> None:
    """Give back the run directory's lock taken by :func:`init_run_dir` (no-op when not held)."""
    lock.release(rd.root)


def finish_meta(rd: RunDir, **fields: Any) -> None:
    """Add end-of-run fields (``finished`` time, ``status``...) to ``meta.json``."""
    meta = read_meta(rd)
    extra: dict[str, Any] = {"finished": now_iso()}
    if "start_time" in meta:
        extra["duration_s"] = round(time.time() - float(meta["start_time"]), 1)
    update_meta(rd, **extra, **fields)


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
    cfg: ExperimentConfig, reference: ExperimentConfig | None = None, *, timeout_s: float = 600.0, **options: Any
) -> tuple[RunDir, ExperimentConfig]:
    """:func:`init_run_dir` that gives every rank of a distributed launch the same folder.

    ``options`` are :func:`init_run_dir`'s keyword arguments (``resume``, ``overwrite``, ``command``).

    Rank 0 creates the folder, holds its lock and marks it with the launch id; the other ranks take
    no lock and wait for the folder carrying their launch id (so the uniqueness suffix, or a folder
    replaced by ``overwrite``, cannot differ between ranks).

    Raises:
        CheckpointError: when a non-zero rank does not see rank 0's folder within ``timeout_s``
            (and as :func:`init_run_dir` on rank 0).
    """
    lid = launch_id()
    rank = env_rank()
    if lid is None:
        return init_run_dir(cfg, reference, **options)
    if rank == 0:
        rd, cfg = init_run_dir(cfg, reference, **options)
        atomic_write_json(rd.root / LAUNCH_FILE, {"launch": lid})
        return rd, cfg
    root, name = Path(cfg.run_root), run_name(cfg, reference)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cands = [Path(cfg.run_dir)] if cfg.run_dir else _candidates(root, name)
        for cand in cands:
            if not cand.exists():
                break
            try:
                if json.loads((cand / LAUNCH_FILE).read_text()).get("launch") == lid:
                    return RunDir(cand), dataclasses.replace(cfg, run_dir=str(cand))
            except (OSError, json.JSONDecodeError):
                pass
        time.sleep(0.5)
    where = Path(cfg.run_dir) if cfg.run_dir else root / name
    raise CheckpointError(
        f"{where}: rank {rank} did not find the run directory made by rank 0 within "
        f"{timeout_s:.0f} s; check that all ranks share the file system holding run_root"
    )

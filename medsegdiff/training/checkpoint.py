"""Checkpoints that lose nothing, written atomically.

A checkpoint is one ``torch.save`` dict (see ARCHITECTURE.md, "Checkpoints and run directories")
with keys ``model``, ``ema``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``objective``, ``step``,
``rng`` (python, numpy, torch cpu, cuda), ``sampler``, ``best``, ``config``, ``calibration``,
``format_version``. It is written to a temporary file in the same folder and moved into place with
``os.replace`` (:mod:`medsegdiff.utils.io`), so a process killed mid-save leaves the previous
checkpoint intact. Files: ``checkpoints/step_{step:08d}.pt`` (last K kept) and ``checkpoints/best.pt``.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsegdiff.config import config_from_dict, to_dict
from medsegdiff.errors import CheckpointError, ConfigError
from medsegdiff.nets.registry import build_model
from medsegdiff.training.distributed import all_gather_objects
from medsegdiff.utils.io import atomic_write_bytes

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "step", "config", "format_version")
_STEP_RE = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "checkpoints"


def step_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def best_path(run_dir: str | os.PathLike[str]) -> Path:
    return checkpoint_dir(run_dir) / "best.pt"


def capture_rng() -> dict[str, Any]:
    """States of every generator the training loop touches (python, numpy, torch CPU, CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]  # a checkpoint loaded with map_location=cuda moved them
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Serialise ``state`` (``format_version`` added) and write it atomically to ``path``."""
    state = dict(state)
    state.setdefault("format_version", FORMAT_VERSION)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a medsegdiff checkpoint.

    Raises:
        CheckpointError: missing file, truncated/corrupt file, or not a medsegdiff checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass a checkpoints/*.pt file of a run directory")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {first}); use an earlier checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path}: not a medsegdiff checkpoint (expected keys {', '.join(REQUIRED_KEYS)}); "
            "pass a file written by `medsegdiff train`"
        )
    if int(ckpt["format_version"]) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {ckpt['format_version']} is newer than this medsegdiff "
            f"({FORMAT_VERSION}); upgrade medsegdiff"
        )
    return ckpt


def list_step_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*.pt`` in the run, ascending."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest ``checkpoints/step_*.pt`` of ``run_dir`` (None if there is none)."""
    found = list_step_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (``best.pt`` is never touched)."""
    found = list_step_checkpoints(run_dir)
    removed = []
    for _, p in found[: max(0, len(found) - keep_last)]:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def load_for_inference(
    path: str | os.PathLike[str], *, use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the network from the checkpoint's embedded config and load its (EMA) weights.

    Args:
        path: a ``.pt`` checkpoint or a run directory (its ``best.pt``, else the latest step).
        use_ema: load the EMA weights when present (recommended).
        device: where to put the model.

    Returns:
        ``(model in eval mode, ExperimentConfig, checkpoint dict)``.

    Raises:
        CheckpointError: not a medsegdiff checkpoint, truncated, or incompatible with the model.
    """
    path = Path(path)
    if path.is_dir():
        cand = best_path(path)
        latest = find_latest(path)
        if cand.is_file():
            path = cand
        elif latest is not None:
            path = latest
        else:
            raise CheckpointError(f"{path}: no checkpoints/best.pt or checkpoints/step_*.pt in this run directory")
    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: embedded config is not valid for this medsegdiff: {err}") from None
    model = build_model(cfg)
    weights = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model built from its config ({first})") from None
    model.to(torch.device(device)).eval()
    return model, cfg, ckpt


def training_state(trainer: Any) -> dict[str, Any]:
    """The checkpoint dict of a running :class:`~medsegdiff.training.trainer.Trainer` (keys above).

    A collective under DDP (the RNG states of every rank are gathered): every rank calls it.
    """
    rng = capture_rng()
    if trainer.dist.distributed:
        rng = {"per_rank": all_gather_objects(trainer.dist, rng)}
    return {
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
        "objective": trainer.objective.state_dict(),
        "step": trainer.step,
        "rng": rng,
        "sampler": trainer.cursor.state,
        "best": dict(trainer.best),
        "bad_total": trainer.bad_total,
        "config": to_dict(trainer.cfg),
        "calibration": None,
        "world_size": trainer.dist.world_size,
    }


def restore_training_state(trainer: Any, state: dict[str, Any]) -> None:
    """Put a :func:`training_state` dict back into a set-up trainer (weights, optimiser, RNG, data position)."""
    trainer.model.load_state_dict(state["model"])
    if state.get("ema") is not None:
        trainer.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    if state.get("objective"):
        trainer.objective.load_state_dict(state["objective"])
    trainer.step = int(state["step"])
    trainer.best = dict(state.get("best") or trainer.best)
    trainer.bad_total = int(state.get("bad_total", 0))
    sampler_state = state.get("sampler")
    if sampler_state is not None:
        trainer.cursor.load_state_dict(sampler_state)
    rng = state.get("rng") or {}
    per_rank = rng.get("per_rank")
    if per_rank is not None:
        rng = per_rank[trainer.dist.rank] if trainer.dist.rank < len(per_rank) else None
    if rng:
        restore_rng(rng)

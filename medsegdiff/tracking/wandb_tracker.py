"""Weights & Biases tracker: offline by default, inside the run directory.

Offline runs need no network and no account: they are written to ``<run_dir>/wandb/offline-run-*``
and uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``. The standard W&B variables
are honoured and never silently: ``WANDB_MODE`` wins over ``tracking.mode`` and ``WANDB_DIR``
moves the W&B files, each with a console warning saying so (:func:`environment_notes`). ``wandb`` is imported only
when a tracker is created, never at module import. Starting W&B is bounded by
``tracking.init_timeout``; code saving, git probing, system statistics and console capture are off
so that an offline start takes well under a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import netrc
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from medsegdiff.config import ExperimentConfig, to_dict
from medsegdiff.tracking.base import finite_or_none, to_scalar
from medsegdiff.tracking.png import to_uint8

logger = logging.getLogger("medsegdiff.tracking")

RUN_ID_FILE = "run_id"


def is_logged_in(env: Mapping[str, str] | None = None) -> bool:
    """True when a W&B API key is available (``WANDB_API_KEY`` or an entry in ``~/.netrc``)."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


WANDB_MODES = ("online", "offline", "disabled")
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def resolve_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """``offline``/``online`` as given; ``auto`` = online when logged in, else offline.

    ``WANDB_MODE`` in the environment (``online``, ``offline``, ``disabled``; the old ``dryrun``
    and ``run`` too) wins over the config, as everywhere in W&B; :func:`environment_notes` says
    so on the console. An unknown ``WANDB_MODE`` is ignored (and reported there).
    """
    env = os.environ if env is None else env
    forced = env.get("WANDB_MODE", "").strip().lower()
    forced = _MODE_ALIASES.get(forced, forced)
    if forced in WANDB_MODES:
        return forced
    if mode == "auto":
        return "online" if is_logged_in(env) else "offline"
    return mode


def resolve_dir(run_dir: Path, env: Mapping[str, str] | None = None) -> Path:
    """Where W&B writes its files: ``$WANDB_DIR`` when set (honoured, as W&B does), else ``run_dir``."""
    env = os.environ if env is None else env
    custom = env.get("WANDB_DIR", "").strip()
    return Path(custom) if custom else run_dir


def environment_notes(mode: str, run_dir: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """One line per W&B environment variable that changes what the config says (for the console)."""
    env = os.environ if env is None else env
    notes = []
    raw = env.get("WANDB_MODE", "").strip()
    if raw:
        resolved = resolve_mode(mode, env)
        wanted = resolve_mode(mode, {k: v for k, v in env.items() if k != "WANDB_MODE"})
        if _MODE_ALIASES.get(raw.lower(), raw.lower()) not in WANDB_MODES:
            notes.append(f"WANDB_MODE={raw!r} is not a W&B mode ({', '.join(WANDB_MODES)}); it is ignored "
                         f"and tracking.mode={mode} gives {resolved}")
        elif resolved != wanted:
            notes.append(f"WANDB_MODE={raw} in the environment overrides tracking.mode={mode} ({wanted}): "
                         f"W&B runs {resolved} (unset WANDB_MODE to follow the config)")
    where = resolve_dir(run_dir, env)
    if where != run_dir:
        notes.append(f"WANDB_DIR={where} in the environment: the W&B files go to {where / 'wandb'} instead of "
                     f"{run_dir / 'wandb'} (unset WANDB_DIR to keep them in the run directory)")
    return notes


def _settings(wandb: Any, init_timeout: float) -> Any:
    wanted = {
        "init_timeout": init_timeout,
        "save_code": False,
        "disable_git": True,
        "x_disable_stats": True,
        "x_disable_meta": True,
        "x_disable_machine_info": True,
        "x_save_requirements": False,
        "disable_job_creation": True,
        "console": "off",
        "silent": True,
        "quiet": True,
        "show_info": False,
        "show_warnings": False,
    }
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is not None:  # pydantic settings (wandb >= 0.19): keep the fields this version knows
        wanted = {k: v for k, v in wanted.items() if k in fields}
    return wandb.Settings(**wanted)


class WandbTracker:
    """Logs to a W&B run whose files live in ``<run_dir>/wandb``.

    Raises:
        ImportError, Exception: when wandb is missing or cannot start (``make_tracker`` catches
            this, warns once and goes on without W&B).
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | os.PathLike[str], *, module: Any = None) -> None:
        tcfg = cfg.tracking
        self.run_dir = Path(run_dir)
        self.mode = resolve_mode(tcfg.mode)
        for note in environment_notes(tcfg.mode, self.run_dir):
            logger.warning("%s", note)
        wandb = module if module is not None else importlib.import_module("wandb")
        self._wandb = wandb
        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = wandb_dir / RUN_ID_FILE
        if id_file.is_file():  # resuming the same run directory continues the same W&B run
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        self.run_id = run_id
        kwargs = dict(
            project=tcfg.project or "medsegdiff",
            entity=tcfg.entity or None,
            group=tcfg.group or None,
            tags=list(tcfg.tags) or None,
            name=tcfg.name or self.run_dir.name,
            config=to_dict(cfg),
            dir=str(resolve_dir(self.run_dir)),
            id=run_id,
            resume="allow",
            settings=_settings(wandb, tcfg.init_timeout),
        )
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as err:
            if tcfg.mode != "auto" or self.mode != "online":
                raise
            logger.warning("W&B online start failed (%s); logging offline instead", err)
            self.mode = "offline"
            self.run = wandb.init(mode="offline", **kwargs)
        self._finished = False
        self._pil: bool | None = None

    @property
    def offline_dir(self) -> Path | None:
        """The offline run folder (``<run_dir>/wandb/offline-run-*``) or None when online."""
        d = getattr(self.run, "dir", None)  # .../offline-run-*/files
        return Path(d).parent if d and self.mode == "offline" else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log({k: finite_or_none(to_scalar(v)) for k, v in metrics.items()}, step=int(step))

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self.run.log({name: table}, step=int(step))

    def log_images(self, name: str, images: Mapping[str, np.ndarray], step: int) -> None:
        if self._pil is None:
            self._pil = importlib.util.find_spec("PIL") is not None
            if not self._pil:
                logger.info("W&B images need Pillow (pip install pillow); images stay in <run_dir>/images")
        if not self._pil:
            return
        imgs = [self._wandb.Image(to_uint8(img), caption=key) for key, img in images.items()]
        self.run.log({name: imgs}, step=int(step))

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()

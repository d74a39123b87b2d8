"""Console and log-file output shared by the stages, the pipeline and the commands."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("medsegdiff")
PRINTED = "medsegdiff_printed"  # log-record attribute: the message was already printed by say()


def _not_printed(record: logging.LogRecord) -> bool:
    return not getattr(record, PRINTED, False)


def env_rank() -> int:
    """This process's rank in a torchrun/SLURM launch (``RANK``; 0 when not distributed)."""
    return int(os.environ.get("RANK", "0") or 0)


def say(message: str) -> None:
    """A progress line on stdout (rank 0 only) that also goes to the log (``logs/run.log`` in a run)."""
    printed = env_rank() == 0
    if printed:
        print(message, flush=True)
    logger.info(message, extra={PRINTED: printed})  # the console handler skips it when printed


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy ``medsegdiff`` log records into ``path`` (``logs/run.log``) for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("medsegdiff")
    old_level = root.level
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def setup_console_logging(verbose: bool) -> None:
    """Log records on stderr: INFO and above with ``verbose``, else warnings only."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for h in root.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.INFO if verbose else logging.WARNING)
            if _not_printed not in h.filters:  # say() lines once on the console, not again with -v
                h.addFilter(_not_printed)

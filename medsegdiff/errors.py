"""User-facing error types.

Anything derived from :class:`MedSegDiffError` is an *expected* mistake (bad config, missing file,
corrupt input). The CLI prints its message on one line and exits with status 2, without a traceback.
Messages say which file or key, what is wrong, and what to do.
"""

from __future__ import annotations


class MedSegDiffError(Exception):
    """Base class for expected, user-facing errors."""


class ConfigError(MedSegDiffError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(MedSegDiffError, ValueError):
    """Input data is missing, unreadable or inconsistent."""


class CheckpointError(MedSegDiffError, ValueError):
    """A checkpoint or run directory is missing, incomplete or incompatible."""


class TrainingError(MedSegDiffError, RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""

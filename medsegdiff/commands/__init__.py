"""CLI sub-commands; see :mod:`medsegdiff.cli` for the contract."""

from __future__ import annotations

import re


def split_case_ids(values: list[str] | str | None) -> list[str] | None:
    """Case ids given as ``a b``, ``a,b``, ``"a b"`` or a mix (None or nothing -> None = all cases)."""
    if values is None:
        return None
    items = [values] if isinstance(values, str) else values
    ids = [c for item in items for c in re.split(r"[\s,]+", item) if c]
    return ids or None

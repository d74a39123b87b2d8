"""Strict-JSON values: NaN and infinity become ``null`` (``json`` would write non-standard ``NaN``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (mappings and sequences recursively).

    Mapping keys become strings and tuples become lists, as ``json.dumps`` would write them.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj

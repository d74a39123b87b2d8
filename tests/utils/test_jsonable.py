"""Strict JSON: NaN and infinity become null, recursively."""

from __future__ import annotations

import json
import math

from medsegdiff.utils.jsonable import json_safe


def test_non_finite_floats_become_null_at_any_depth():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf, 3: (2.5, math.nan)}], "d": "x", "e": 7}
    safe = json_safe(value)
    assert safe == {"a": None, "b": [1.0, None, {"c": None, "3": [2.5, None]}], "d": "x", "e": 7}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe  # strict JSON round trip

"""Strict, typed config mechanism: dataclass sections <-> YAML.

Every section is a ``@dataclass`` whose fields carry type hints. :func:`from_dict` builds a section
from plain data (as produced by ``yaml.safe_load``) and rejects:

* unknown keys, suggesting the nearest valid key (``difflib``),
* values of the wrong type (``int`` accepts only integers, ``float`` accepts integers too,
  ``Literal`` accepts only its listed values, lists/tuples/dicts are checked element-wise),
* out-of-range values declared with :func:`option` (``ge``/``gt``/``le``/``lt``),
* violations found by a section's own ``validate()`` method (which raises :class:`ConfigError`
  through :func:`bad_value`).

Each message names the full dotted key, the value received and what is allowed.
:func:`to_dict` turns a section back into plain data; ``from_dict(cls, to_dict(x)) == x``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from medsegdiff.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with optional numeric bounds and a one-line description.

    Mutable defaults (lists, dicts) may be passed directly as ``default``: they are copied per
    instance.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if default is not _MISSING and isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: _deepcopy(value), metadata=meta)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _deepcopy(value: Any) -> Any:
    return copy.deepcopy(value)


def bad_value(key: str, value: Any, allowed: str) -> ConfigError:
    """Build the standard error for a bad value: ``key: got VALUE; allowed: ALLOWED``."""
    return ConfigError(f"config key '{key}': got {value!r}; {allowed}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin is dict:
        k, v = get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=False)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and return the converted value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise bad_value(key, value, f"expected {_type_name(tp)}")
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        allowed = get_args(tp)
        # bool is an int subclass: `True` must not match Literal[1].
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise bad_value(key, value, "allowed: " + ", ".join(repr(a) for a in allowed))
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as err:
                errors.append(err)
        raise bad_value(key, value, f"expected {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad_value(key, value, f"expected {_type_name(tp)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad_value(key, value, f"expected a list of exactly {len(args)} items")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad_value(key, value, f"expected {_type_name(tp)}")
        kt, vt = get_args(tp)
        return {_convert(kt, k, f"{key}.<key>"): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad_value(key, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad_value(key, value, "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad_value(key, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad_value(key, value, "expected a string")
    if tp is type(None):
        if value is None:
            return None
        raise bad_value(key, value, "expected null")
    raise TypeError(f"unsupported config type {tp!r} for key '{key}'")  # programming error


def _check_bounds(field: dataclasses.Field, value: Any, key: str) -> None:
    meta = field.metadata
    if not meta or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    checks = [
        ("ge", lambda b: value >= b, ">="),
        ("gt", lambda b: value > b, ">"),
        ("le", lambda b: value <= b, "<="),
        ("lt", lambda b: value < b, "<"),
    ]
    parts, ok = [], True
    for name, test, sym in checks:
        bound = meta.get(name)
        if bound is not None:
            parts.append(f"{sym} {bound}")
            ok = ok and test(bound)
    if not ok:
        raise bad_value(key, value, "allowed: a value " + " and ".join(parts))


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` with strict checking (see module docstring)."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise bad_value(prefix or "<root>", data, f"expected a mapping ({cls.__name__})")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if raw_key not in fields:
            valid = sorted(fields)
            close = difflib.get_close_matches(str(raw_key), valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(
                f"unknown config key '{key}'.{hint} Valid keys in {where}: {', '.join(valid)}"
            )
        f = fields[raw_key]
        converted = _convert(hints[raw_key], value, key)
        _check_bounds(f, converted, key)
        kwargs[raw_key] = converted
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is _MISSING
                   and f.default_factory is _MISSING]
        if missing:
            where = f"{prefix}." if prefix else ""
            raise ConfigError(f"config key '{where}{missing[0]}' is required but missing") from err
        raise
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML-safe) view of a config object."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = _deepcopy(v)
    return out


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every leaf key of a section, for help output and docs."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", "") if f.metadata else ""))
    return rows


__all__ = [
    "ConfigError",
    "bad_value",
    "deep_merge",
    "describe",
    "field_names",
    "from_dict",
    "option",
    "to_dict",
]

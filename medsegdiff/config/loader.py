"""Load, compose, override, validate and save experiment configs.

An experiment YAML may start with ``defaults:``, a list of building blocks from ``configs/``
named ``group/name`` (``configs/group/name.yaml``), merged in order; the file's own keys come next,
then command-line overrides ``key.sub=value`` (values parsed as YAML). The merged mapping is then
validated against :class:`~medsegdiff.config.schema.ExperimentConfig`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from medsegdiff.config.base import deep_merge, from_dict, to_dict
from medsegdiff.config.schema import ExperimentConfig
from medsegdiff.errors import ConfigError
from medsegdiff.utils.io import atomic_write_text

DEFAULTS_KEY = "defaults"


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``1e-4`` / ``3E5`` as floats (PyYAML's YAML 1.1 needs a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that also accepts exponent floats without a dot (``3e-4``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def configs_dir() -> Path:
    """The folder of reusable blocks: ``$MEDSEGDIFF_CONFIGS`` or the repository's ``configs/``."""
    env = os.environ.get("MEDSEGDIFF_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_block(name: str, search: Iterable[Path]) -> Path:
    """Find block ``group/name`` (``.yaml`` optional) in the search folders."""
    rel = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    tried = []
    for folder in search:
        cand = folder / rel
        tried.append(str(cand))
        if cand.is_file():
            return cand
    raise ConfigError(f"config block '{name}' not found; looked in: {', '.join(tried)}")


def compose(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and merge its ``defaults`` blocks (recursively) under its own keys."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config blocks include each other in a cycle: {chain}")
    data = read_yaml(path)
    blocks = data.pop(DEFAULTS_KEY, []) or []
    if isinstance(blocks, str):
        blocks = [blocks]
    if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
        raise ConfigError(f"{path}: 'defaults' must be a list of block names like 'model/tiny', got {blocks!r}")
    search = [path.parent, configs_dir(), path.parent.parent / "configs"]
    merged: dict[str, Any] = {}
    for block in blocks:
        merged = deep_merge(merged, compose(resolve_block(block, search), (*_seen, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key; expected key.sub=value")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def config_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    return from_dict(ExperimentConfig, data)


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> ExperimentConfig:
    """Compose ``path`` (or start from defaults), apply overrides, validate."""
    data = compose(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        if path is None:
            raise
        raise ConfigError(f"{path}: {err}") from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: ExperimentConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config atomically; ``load_config(path) == cfg``."""
    path = Path(path)
    atomic_write_text(path, dump_config(cfg))
    return path

"""Load, compose, override, validate and save experiment configs.

An experiment YAML may start with ``defaults:``, a list of building blocks named ``group/name``
(``<folder>/group/name.yaml``), merged in order; the file's own keys come next, then command-line
overrides ``key.sub=value`` (values parsed as YAML). The merged mapping is then validated against
:class:`~medsegdiff.config.schema.ExperimentConfig`.

Blocks are looked up, first match wins, (1) next to the file that names them, (2) in each folder of
``$MEDSEGDIFF_CONFIGS`` (``os.pathsep``-separated), (3) in the blocks shipped inside the package
(``medsegdiff/configs``, found through :mod:`importlib.resources`, so an installed wheel works
without the repository), (4) in ``configs/`` beside the file's folder (a project laid out like this
repository).

A command-line override ``group=name`` without a dot, where ``group`` is a block group
(``train=debug``, ``model=small``), selects a block instead of setting a key: it replaces the
experiment's ``defaults`` entry of that group (``train/full`` -> ``train/debug``) in place, or is
appended after the other blocks when the experiment has none; the file's own keys and the other
overrides still come after it.
"""

from __future__ import annotations

import importlib.resources
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


def packaged_configs_dir() -> Path:
    """The blocks shipped inside the package (``medsegdiff/configs``)."""
    return Path(os.fspath(importlib.resources.files("medsegdiff") / "configs"))


def env_configs_dirs() -> list[Path]:
    """The folders of ``$MEDSEGDIFF_CONFIGS`` (``os.pathsep``-separated; empty when unset)."""
    return [Path(p) for p in os.environ.get("MEDSEGDIFF_CONFIGS", "").split(os.pathsep) if p]


def configs_dir() -> Path:
    """The main folder of reusable blocks: the first of ``$MEDSEGDIFF_CONFIGS``, else the packaged one."""
    env = env_configs_dirs()
    return env[0] if env else packaged_configs_dir()


def block_search_path(near: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where blocks are looked up, in order, for a file in folder ``near`` (see the module docstring)."""
    here = [] if near is None else [Path(near)]
    tail = [] if near is None else [Path(near).parent / "configs"]
    out: list[Path] = []
    for folder in [*here, *env_configs_dirs(), packaged_configs_dir(), *tail]:
        if folder not in out:
            out.append(folder)
    return out


def find_block(name: str, near: str | os.PathLike[str] | None = None) -> Path:
    """The file of block ``group/name`` on :func:`block_search_path`.

    Raises:
        ConfigError: not found (the message lists every place looked at).
    """
    return resolve_block(name, block_search_path(near))


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


def _defaults_list(path: Path, data: dict[str, Any]) -> list[str]:
    blocks = data.pop(DEFAULTS_KEY, []) or []
    if isinstance(blocks, str):
        blocks = [blocks]
    if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
        raise ConfigError(f"{path}: 'defaults' must be a list of block names like 'model/tiny', got {blocks!r}")
    return blocks


def _group(block: str) -> str:
    return block.split("/", 1)[0] if "/" in block else ""


def select_blocks(blocks: list[str], selections: Mapping[str, str]) -> list[str]:
    """``blocks`` with the entry of each selected group replaced (or the selection appended).

    Example: ``select_blocks(["model/tiny", "train/full"], {"train": "debug"})`` is
    ``["model/tiny", "train/debug"]``.

    Raises:
        ConfigError: the list holds several blocks of a selected group (which one to replace
            would be a guess).
    """
    out = list(blocks)
    for group, name in selections.items():
        idx = [i for i, b in enumerate(out) if _group(b) == group]
        if len(idx) > 1:
            listed = ", ".join(out[i] for i in idx)
            raise ConfigError(
                f"block selection '{group}={name}': the experiment's defaults list several {group} blocks "
                f"({listed}), so which one to replace is ambiguous; edit its defaults list or set the keys directly"
            )
        if idx:
            out[idx[0]] = f"{group}/{name}"
        else:
            out.append(f"{group}/{name}")
    return out


def compose(
    path: str | os.PathLike[str] | None,
    _seen: tuple[Path, ...] = (),
    *,
    selections: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Read ``path`` and merge its ``defaults`` blocks (recursively) under its own keys.

    Args:
        path: the experiment (or block) file; None = no file, only ``selections``.
        selections: ``{group: name}`` block choices applied to this file's ``defaults``
            (:func:`select_blocks`; nested blocks keep theirs).

    Raises:
        ConfigError: a missing block or file, invalid YAML, a cycle of blocks.
    """
    if path is None:
        data: dict[str, Any] = {}
        blocks: list[str] = []
        near = None
    else:
        path = Path(path).resolve()
        if path in _seen:
            chain = " -> ".join(str(p) for p in (*_seen, path))
            raise ConfigError(f"config blocks include each other in a cycle: {chain}")
        data = read_yaml(path)
        blocks = _defaults_list(path, data)
        near = path.parent
    if selections:
        blocks = select_blocks(blocks, selections)
    search = block_search_path(near)
    merged: dict[str, Any] = {}
    chain = _seen if path is None else (*_seen, path)
    for block in blocks:
        merged = deep_merge(merged, compose(resolve_block(block, search), chain))
    return deep_merge(merged, data)


def block_groups(near: str | os.PathLike[str] | None = None) -> set[str]:
    """Every block group (sub-folder holding ``*.yaml``) on the search path for a file in ``near``."""
    groups: set[str] = set()
    for folder in block_search_path(near):
        if folder.is_dir():
            groups.update(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.y*ml")))
    return groups


def split_block_selections(
    overrides: Iterable[str], near: str | os.PathLike[str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """Separate ``group=name`` block selections from ``key.sub=value`` overrides.

    An override is a selection when its key has no dot, names a block group on the search path
    (:func:`block_groups`) and its value is a plain name (``train=debug``; not a YAML mapping).

    Returns:
        ``({group: name}, remaining overrides in order)``.
    """
    groups: set[str] | None = None
    selections: dict[str, str] = {}
    rest: list[str] = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        key, raw = key.strip(), raw.strip()
        if sep and key and "." not in key and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*", raw):
            if groups is None:
                groups = block_groups(near)
            if key in groups:
                selections[key] = raw[:-5] if raw.endswith(".yaml") else raw
                continue
        rest.append(text)
    return selections, rest


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
    """Compose ``path`` (or start from defaults), apply overrides, validate.

    ``overrides`` are ``key.sub=value`` settings and ``group=name`` block selections
    (``train=debug``; see the module docstring).

    Raises:
        ConfigError: unknown key, wrong type, bad value, missing block (naming file and key).
    """
    near = None if path is None else Path(path).resolve().parent
    selections, overrides = split_block_selections(overrides, near)
    data = compose(path, selections=selections) if (path is not None or selections) else {}
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

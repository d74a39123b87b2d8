"""The learning benchmark's methods: the defaults, and methods files that add or select methods.

A method is a name and a list of config overrides on top of the benchmark's base experiment
(:mod:`medsegdiff.bench.learn`); a methods file (YAML) adds methods, selects some, and names the
references of the paired differences (:func:`load_methods_file`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from medsegdiff.errors import ConfigError

# The objectives, spelled out so that a method means the same whatever the base experiment says
X0 = ["diffusion.predict_xstart=true", "diffusion.predict_v=false", "diffusion.self_condition=false"]
EPS = ["diffusion.predict_xstart=false", "diffusion.predict_v=false", "diffusion.self_condition=false"]
# the epsilon family made to learn (docs/objectives.md): v-prediction + self-conditioning
V_SC = ["diffusion.predict_xstart=false", "diffusion.predict_v=true", "diffusion.self_condition=true"]

# Epsilon networks need several steps (their x0 estimate at t = T - 1 is noise): DDIM 25, the
# sampling of the benchmark before issue 13's measurements, for prediction and validation
MULTI_STEP = ["inference.sampler=ddim", "inference.respacing=ddim25", "train.validation.respacing=ddim25"]

# name -> overrides on top of the base experiment (the quickstart: tiny V1) and the bench's own
# (one-call sampling, bench/learn.py SAMPLING)
DEFAULT_METHODS: dict[str, list[str]] = {
    "v1_x0": [*X0],
    "v1_eps": [*EPS, "loss.timestep_weighting=snr", *MULTI_STEP],  # the paper's objective, DDIM sampling
    "v1_v_sc": [*V_SC],
    "v2_x0": ["model.name=medsegdiff_v2", *X0],
    "dynunet": ["model.name=dynunet", "loss.diffusion_weight=0.0", "inference.ensemble=1", *X0],
}
DEFAULT_REFERENCES = ("cbf_rule", "v1_x0")
METHODS_FILE_KEYS = ("methods", "only", "reference", "overrides")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _as_overrides(value: Any, where: str) -> list[str]:
    """A method's overrides from YAML: a list of ``key=value`` strings or a ``{key: value}`` mapping."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{k}={json.dumps(v)}" for k, v in value.items()]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where}: expected a list of 'key=value' overrides or a mapping key: value, "
                          f"got {value!r}")
    return [v.strip() for v in value]


def load_methods_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a methods file.

    Format (every key optional except ``methods``)::

        methods:                        # added to (or replacing) the defaults, in this order
          v1_lr3: [optim.lr=3.0e-4]     # a list of key=value overrides ...
          v2_big: {model.name: medsegdiff_v2, train.batch_size: 32}   # ... or a mapping
        only: [v1_x0, v1_lr3]           # run just these (default: the defaults + the file's)
        reference: [cbf_rule, v1_x0]    # paired differences against these
        overrides: [data.image_size=64] # applied to every method

    Returns:
        ``{"methods": {name: overrides}, "only": list | None, "reference": list | None,
        "overrides": list}``.

    Raises:
        ConfigError: unreadable file, unknown keys, bad names or overrides (one line naming the
            file and the key).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"methods file {path}: cannot be read ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or "methods" not in data:
        raise ConfigError(f"methods file {path}: expected a mapping with a 'methods' key "
                          "(methods: {name: [key=value, ...]})")
    unknown = sorted(set(data) - set(METHODS_FILE_KEYS))
    if unknown:
        raise ConfigError(f"methods file {path}: unknown key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(METHODS_FILE_KEYS)}")
    if not isinstance(data["methods"], dict) or not data["methods"]:
        raise ConfigError(f"methods file {path}: 'methods' must be a non-empty mapping name: [key=value, ...]")
    methods = {}
    for name, value in data["methods"].items():
        name = str(name)
        if not NAME.match(name):
            raise ConfigError(f"methods file {path}: method name {name!r} is not allowed; use letters, digits, "
                              "and _ . + - (it names a folder)")
        methods[name] = _as_overrides(value, f"methods file {path}: methods.{name}")

    def names(key: str) -> list[str] | None:
        value = data.get(key)
        if value is None:
            return None
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
            raise ConfigError(f"methods file {path}: '{key}' must be a name or a list of names, got {value!r}")
        return list(value)

    return {"methods": methods, "only": names("only"), "reference": names("reference"),
            "overrides": _as_overrides(data.get("overrides"), f"methods file {path}: overrides")}


def select_methods(defaults: Mapping[str, list[str]], extra: Mapping[str, list[str]] | None,
                   only: Sequence[str] | None) -> dict[str, list[str]]:
    """The defaults plus ``extra`` (an extra method of the same name replaces a default), filtered by ``only``.

    Raises:
        ConfigError: ``only`` names an unknown method.
    """
    methods = {**defaults, **(extra or {})}
    if only:
        unknown = [n for n in only if n not in methods]
        if unknown:
            raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown)}; known: {', '.join(methods)}")
        methods = {n: methods[n] for n in only}
    return methods


__all__ = ["DEFAULT_METHODS", "DEFAULT_REFERENCES", "EPS", "MULTI_STEP", "V_SC", "X0", "load_methods_file", "select_methods"]

"""Respacing options: integers mean N evenly spaced steps, every respacing is checked against diffusion.steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsegdiff.config import load_config, save_config
from medsegdiff.errors import ConfigError

QUICKSTART = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"
KEYS = ("diffusion.respacing", "inference.respacing", "train.validation.respacing")


def _get(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", ["1", "10", "ddim1", "trailing1", "ddim25"])
def test_every_respacing_takes_integers_and_one_step(key, value):
    assert _get(load_config(QUICKSTART, [f"{key}={value}"]), key) == value  # an integer becomes its string


@pytest.mark.parametrize("key", KEYS)
def test_an_integer_in_yaml_is_a_respacing_and_survives_the_saved_config(key, tmp_path):
    cfg = load_config(QUICKSTART, [f"{key}=5"])
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    assert _get(load_config(saved), key) == "5"
    assert "respacing: '5'" in saved.read_text()  # saved as the string the core takes


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("value", "why"), [("0", "every section count must be a positive integer"),
                                            ("2000", "2000"), ("ddimx", "ddimx")])
def test_a_bad_respacing_names_the_key_and_the_value(key, value, why):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [f"{key}={value}"])
    msg = str(err.value)
    assert f"config key '{key}'" in msg and why in msg
    assert "\n" not in msg

"""The diffusion config section refuses impossible parametrisation/schedule combinations."""

from __future__ import annotations

import pytest

from medsegdiff.config.loader import config_from_dict
from medsegdiff.errors import ConfigError


def test_zero_terminal_snr_with_epsilon_names_the_key_and_suggests_v():
    with pytest.raises(ConfigError, match=r"'diffusion.zero_terminal_snr'.*set diffusion.predict_v=true"):
        config_from_dict({"diffusion": {"zero_terminal_snr": True}})
    cfg = config_from_dict({"diffusion": {"zero_terminal_snr": True, "predict_v": True}})
    assert cfg.diffusion.zero_terminal_snr and cfg.diffusion.predict_v
    assert config_from_dict({"diffusion": {"zero_terminal_snr": True, "predict_xstart": True}})


def test_v_and_x0_prediction_are_exclusive():
    with pytest.raises(ConfigError, match=r"'diffusion.predict_v'.*one parametrisation"):
        config_from_dict({"diffusion": {"predict_v": True, "predict_xstart": True}})


def test_loss_keys_have_bounds():
    with pytest.raises(ConfigError, match="loss.anchor_every"):
        config_from_dict({"loss": {"anchor_every": 0}})
    with pytest.raises(ConfigError, match="loss.min_snr_gamma"):
        config_from_dict({"loss": {"min_snr_gamma": 0}})
    with pytest.raises(ConfigError, match="loss.diffusion_weighting"):
        config_from_dict({"loss": {"diffusion_weighting": "p2"}})

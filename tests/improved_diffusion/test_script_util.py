"""script_util: defaults round-trip through argparse and build a model + diffusion."""

from __future__ import annotations

import argparse

import pytest
import torch

from improved_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    str2bool,
)


def test_defaults_through_argparse_build_model_and_diffusion():
    defaults = model_and_diffusion_defaults()
    assert defaults["rescale_timesteps"] is True and defaults["rescale_learned_sigmas"] is True
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1",
                              "--learn_sigma", "true", "--timestep_respacing", "ddim5",
                              "--attention_resolutions", "8"])
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, defaults.keys()))
    assert diffusion.num_timesteps == 5 and model.out_channels == 6
    assert model.channel_mult == (1, 2, 2, 2) and model.attention_resolutions == (4,)
    out = diffusion.ddim_sample_loop(model, (1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_create_model_unknown_size_and_str2bool():
    with pytest.raises(ValueError, match="unsupported image size: 48"):
        create_model(48, 8, 1, False, False, False, "", 1, -1, False, 0.0)
    assert create_model(48, 8, 1, False, False, False, "", 1, -1, False, 0.0, channel_mult=(1, 2)).out_channels == 3
    assert str2bool("Yes") is True and str2bool("0") is False
    with pytest.raises(argparse.ArgumentTypeError, match="boolean value expected, got 'maybe'"):
        str2bool("maybe")

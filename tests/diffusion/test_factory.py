"""build_diffusion: config mapping, full-T training vs respaced sampling, original-scale timesteps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from improved_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType
from improved_diffusion.respace import SpacedDiffusion
from medsegdiff.config.base import from_dict
from medsegdiff.config.diffusion import DiffusionConfig
from medsegdiff.diffusion.factory import build_diffusion
from medsegdiff.errors import ConfigError


def test_defaults_map_to_epsilon_fixed_large_mse():
    d = build_diffusion(DiffusionConfig())
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 1000
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE, LossType.MSE
    )
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)


def test_flags_map_like_upstream():
    cfg = DiffusionConfig(steps=100, noise_schedule="cosine", predict_xstart=True, learn_sigma=True,
                          rescale_learned_sigmas=True, rescale_timesteps=True)
    d = build_diffusion(cfg)
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.START_X, ModelVarType.LEARNED_RANGE, LossType.RESCALED_MSE
    )
    assert d.rescale_timesteps
    assert build_diffusion(DiffusionConfig(use_kl=True)).loss_type == LossType.RESCALED_KL
    assert build_diffusion(DiffusionConfig(sigma_small=True)).model_var_type == ModelVarType.FIXED_SMALL


def test_training_full_T_sampling_respaced_same_alpha_bar():
    cfg = DiffusionConfig(steps=200, respacing="ddim20")
    train = build_diffusion(cfg, respacing="")
    sample = build_diffusion(cfg, respacing=cfg.respacing)
    assert train.num_timesteps == 200 and sample.num_timesteps == 20
    np.testing.assert_allclose(sample.alphas_cumprod, train.alphas_cumprod[::10], rtol=1e-12)


@pytest.mark.parametrize("rescale", [False, True])
def test_network_sees_original_scale_timesteps_in_training_and_sampling(rescale):
    cfg = DiffusionConfig(steps=200, respacing="ddim4", rescale_timesteps=rescale)
    seen = []

    def model(x, t, **kw):
        seen.append(t.clone())
        return torch.zeros_like(x)

    train = build_diffusion(cfg, "")
    train.training_losses(model, torch.zeros(1, 1, 2, 2), torch.tensor([150]))
    build_diffusion(cfg, cfg.respacing).ddim_sample_loop(model, (1, 1, 2, 2))
    got = [t.item() for t in seen]
    expected = [150, 150, 100, 50, 0]
    assert got == pytest.approx([e * 1000 / 200 for e in expected] if rescale else expected)


def test_bad_respacing_is_a_config_error():
    with pytest.raises(ConfigError, match=r"respacing 'ddim37' .*diffusion.steps=1000.*exactly 37 DDIM steps"):
        build_diffusion(DiffusionConfig(), "ddim37")


def test_config_validation():
    with pytest.raises(ConfigError, match=r"'diffusion.respacing': got 'ddim37'; cannot make exactly 37"):
        from_dict(DiffusionConfig, {"respacing": "ddim37"}, prefix="diffusion")
    with pytest.raises(ConfigError, match=r"'diffusion.steps': got 10; allowed: more than 20 with the linear"):
        from_dict(DiffusionConfig, {"steps": 10}, prefix="diffusion")
    with pytest.raises(ConfigError, match=r"'diffusion.eta': got 1.5"):
        from_dict(DiffusionConfig, {"eta": 1.5}, prefix="diffusion")
    cfg = from_dict(DiffusionConfig, {"steps": 10, "noise_schedule": "cosine", "respacing": "5"}, prefix="diffusion")
    assert build_diffusion(cfg, cfg.respacing).num_timesteps == 5


def test_config_validation_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from medsegdiff.config.base import from_dict; "
            "from medsegdiff.config.diffusion import DiffusionConfig; "
            "from_dict(DiffusionConfig, {'respacing': 'ddim50'}, prefix='diffusion'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Gaussian KL and discretised likelihood against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from improved_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)


def test_normal_kl_closed_form():
    # KL(N(0, 1) || N(1, e^2)) = log(e) + (1 + 1) / (2 e^2) - 1/2
    kl = normal_kl(torch.tensor(0.0), 0.0, 1.0, 2.0)
    assert kl.item() == pytest.approx(1 + 2 / (2 * math.e**2) - 0.5, rel=1e-6)
    assert normal_kl(torch.zeros(3), torch.zeros(3), 0.0, 0.0).abs().max().item() == 0
    with pytest.raises(TypeError, match="at least one argument must be a tensor"):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def test_approx_cdf_close_to_erf():
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max().item() < 2e-3


def test_discretized_likelihood_bins():
    sigma = 0.05
    x = torch.tensor([-1.0, 0.2, 1.0])
    means = torch.tensor([-1.0, 0.2, 1.0])
    ll = discretized_gaussian_log_likelihood(x, means=means, log_scales=torch.full((3,), math.log(sigma)))
    half = (1 / 255) / sigma

    def cdf(v):
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    assert ll[0].item() == pytest.approx(math.log(cdf(half)), rel=1e-5)  # left edge bin
    assert ll[1].item() == pytest.approx(math.log(cdf(half) - cdf(-half)), rel=1e-5)
    assert ll[2].item() == pytest.approx(math.log(1 - cdf(-half)), rel=1e-5)  # right edge bin
    with pytest.raises(ValueError, match="shapes differ"):
        discretized_gaussian_log_likelihood(x, means=means[:2], log_scales=means)

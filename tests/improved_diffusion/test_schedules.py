"""Beta schedules against closed-form values (iDDPM Sec. 3.2, Eq. 17)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from improved_diffusion.gaussian_diffusion import betas_for_alpha_bar, get_named_beta_schedule


def f(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def test_linear_end_points_scale_with_T():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, rel=1e-12)
    assert b[-1] == pytest.approx(0.02, rel=1e-12)
    b = get_named_beta_schedule("linear", 100)
    assert b[0] == pytest.approx(1e-3, rel=1e-12)
    assert b[-1] == pytest.approx(0.2, rel=1e-12)


def test_linear_refuses_too_few_steps():
    with pytest.raises(ValueError, match=r"more than 20 steps \(T=20 gives a final beta of 1"):
        get_named_beta_schedule("linear", 20)


@pytest.mark.parametrize("i", [0, 10, 500, 900, 998])
def test_cosine_alpha_bar_telescopes_to_closed_form(i):
    # Unclipped betas telescope: alpha_bar_i = f((i + 1) / T) / f(0).
    T = 1000
    abar = np.cumprod(1.0 - get_named_beta_schedule("cosine", T))
    assert abar[i] == pytest.approx(f((i + 1) / T) / f(0), rel=1e-9)


@pytest.mark.parametrize("T, approx", [(1000, 2.4e-9), (100, 2.4e-7)])
def test_cosine_final_alpha_bar_is_not_clamped(T, approx):
    betas = get_named_beta_schedule("cosine", T)
    abar_T = np.prod(1.0 - betas)
    # Only the very last beta hits the 0.999 cap: alpha_bar_T = f((T-1)/T) / f(0) * 0.001.
    assert betas[-1] == 0.999
    assert abar_T == pytest.approx(f((T - 1) / T) / f(0) * 0.001, rel=1e-9)
    assert abar_T == pytest.approx(approx, rel=0.05)
    # A schedule clamped to [1e-4, 0.02] would give 3.2e-3 (T=1000) or 0.19 (T=100).
    assert abar_T < 1e-6
    assert betas.max() > 0.02


def test_cosine_T1000_shape_of_betas():
    betas = get_named_beta_schedule("cosine", 1000)
    assert betas[0] == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-12)
    assert betas[0] == pytest.approx(4.1e-5, rel=0.02)
    assert int((betas < 1e-4).sum()) == 13
    assert int((betas > 0.02).sum()) == 98
    assert int(np.argmax(betas > 0.02)) == 902


def test_betas_for_alpha_bar_caps_at_max_beta():
    betas = betas_for_alpha_bar(4, lambda s: 1 - s, max_beta=0.5)
    # ratios: (3/4)/1, (2/4)/(3/4), (1/4)/(2/4), 0/(1/4) -> betas 1/4, 1/3, 1/2, 1 -> capped 0.5
    np.testing.assert_allclose(betas, [0.25, 1 / 3, 0.5, 0.5])


def test_unknown_schedule():
    with pytest.raises(NotImplementedError, match="unknown beta schedule: 'quadratic'"):
        get_named_beta_schedule("quadratic", 10)

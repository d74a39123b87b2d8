"""The samplers of improved_diffusion.solvers against closed forms and the core's DDIM step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from improved_diffusion import solvers
from improved_diffusion.gaussian_diffusion import (
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

T = 100
SAMPLE_FNS = {
    "ddim": solvers.sample_ddim,
    "dpmpp_2m": solvers.sample_dpmpp_2m,
    "dpmpp_3m": solvers.sample_dpmpp_3m,
    "x0": solvers.sample_x0,
}


def zero_snr_betas(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(abar) so that its last value is 0."""
    s = np.sqrt(np.cumprod(1.0 - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    abar = s**2
    return 1.0 - np.append(abar[0], abar[1:] / abar[:-1])


def make(respacing: str, kind: str = "eps", zero_snr: bool = False, var: ModelVarType = ModelVarType.FIXED_SMALL):
    betas = get_named_beta_schedule("linear", T)
    if zero_snr:
        betas = zero_snr_betas(betas)
    mean = {"x0": ModelMeanType.START_X, "v": ModelMeanType.VELOCITY}.get(kind, ModelMeanType.EPSILON)
    base = np.cumprod(1.0 - betas)
    d = SpacedDiffusion(space_timesteps(T, respacing), betas=betas, model_mean_type=mean, model_var_type=var,
            loss_type=LossType.MSE)
    return d, base


class Oracle:
    """Knows x0: returns the exact eps, x0 or v = a eps - s x0 for (x_t, original-scale t)."""

    def __init__(self, x0: torch.Tensor, base_abar: np.ndarray, kind: str) -> None:
        self.x0, self.abar, self.kind = x0, torch.tensor(base_abar, dtype=torch.float64), kind
        self.calls = 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        ab = self.abar[t.long()].reshape(-1, *([1] * (x.ndim - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.kind == "x0":
            return self.x0.clone()
        if self.kind == "v":
            # eps is undefined where s = 0; here s > 0 at every step. x = a x0 + s eps.
            eps = (x.double() - a * self.x0.double()) / s
            return (a * eps - s * self.x0.double()).float()
        return ((x.double() - a * self.x0.double()) / s).float()


def _x0(shape=(2, 1, 6, 6)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("name,nfe", [(n, k) for n in SAMPLE_FNS for k in (1, 2, 5, 10) if n != "x0" or k == 1])
@pytest.mark.parametrize("spacing", ["trailing", "ddim"])
def test_oracle_returns_x0_at_every_nfe(kind, name, spacing, nfe):
    respacing = f"{spacing}{nfe}" if name != "x0" else f"{spacing}10"  # x0: one call out of a 10-step chain
    diffusion, base = make(respacing, kind)
    x0 = _x0()
    oracle = Oracle(x0, base, kind)
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    out = SAMPLE_FNS[name](solvers.Denoiser(diffusion, oracle), x_T, solvers.chain_timesteps(diffusion))
    # eps -> x0 divides by a = sqrt(abar) (~0.006 at t = T - 1): float32 rounding grows by 1 / a
    torch.testing.assert_close(out, x0, atol=1e-4 if kind == "eps" else 2e-5, rtol=0)
    assert oracle.calls == (1 if name == "x0" else nfe)


@pytest.mark.parametrize("kind", ["x0", "v"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_3m", "x0", "ddpm"])
def test_zero_terminal_snr_schedule_gives_no_nan(kind, name):
    diffusion, base = make("trailing5", kind, zero_snr=True)
    assert base[-1] == 0.0 and solvers.half_log_snr(float(diffusion.alphas_cumprod[-1])) == -math.inf
    x0 = _x0()
    fns = {**SAMPLE_FNS, "ddpm": solvers.sample_ddpm}
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    out = fns[name](solvers.Denoiser(diffusion, Oracle(x0, base, kind)), x_T, solvers.chain_timesteps(diffusion))
    assert torch.isfinite(out).all()
    if name != "ddpm":  # ancestral noise does not cancel for an oracle of x0 at every step, but ends at x0
        torch.testing.assert_close(out, x0, atol=2e-5, rtol=0)


def test_ddpm_with_oracle_ends_at_x0():
    diffusion, base = make("10", "x0")
    x0 = _x0()
    out = solvers.sample_ddpm(solvers.Denoiser(diffusion, Oracle(x0, base, "x0")), torch.randn(x0.shape),
                              solvers.chain_timesteps(diffusion))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_dpmpp_first_order_equals_core_ddim_step_by_step(smooth_model):
    diffusion, _ = make("ddim10", "eps")
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    den = solvers.Denoiser(diffusion, smooth_model)
    abars = list(diffusion.alphas_cumprod) + [1.0]
    for k in solvers.chain_timesteps(diffusion):
        t = torch.full((3,), k, dtype=torch.long)
        ref = diffusion.ddim_sample(smooth_model, x, t, eta=0.0)["sample"]
        d = den(x, k)["pred_xstart"]
        if k > 0:
            got = solvers.dpmpp_update(x, [d], [solvers.half_log_snr(float(abars[k]))], float(abars[k]),
                                       float(abars[k - 1]))
        else:
            got = d  # the step to abar = 1 is x = D
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        x = ref


def test_sample_ddim_with_eta_equals_core_ddim_sample_loop(smooth_model):
    diffusion, _ = make("7", "eps")
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    noises = {k: torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(10 + k)) for k in range(7)}
    got = solvers.sample_ddim(solvers.Denoiser(diffusion, smooth_model), x_T, solvers.chain_timesteps(diffusion),
                              eta=0.7, noise_sampler=lambda k: noises[k])
    x = x_T
    for k in range(6, -1, -1):
        x = diffusion.ddim_sample(smooth_model, x, torch.full((2,), k), eta=0.7, noise=noises[k])["sample"]
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)


def test_one_step_sampler_is_the_models_x0(smooth_model):
    diffusion, _ = make("trailing4", "eps")
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    got = solvers.sample_x0(solvers.Denoiser(diffusion, smooth_model), x_T, solvers.chain_timesteps(diffusion))
    ref = diffusion.p_mean_variance(smooth_model, x_T, torch.full((2,), 3))["pred_xstart"]
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def _exact_step(d_of_lam, lam0, lam_n, x):
    ab0, abn = 1 / (1 + math.exp(-2 * lam0)), 1 / (1 + math.exp(-2 * lam_n))
    s0, sn = math.sqrt(1 - ab0), math.sqrt(1 - abn)
    return sn / s0 * x + sn * quad(lambda lam: math.exp(lam) * d_of_lam(lam), lam0, lam_n, epsabs=1e-13)[0], ab0, abn


@pytest.mark.parametrize("order,coefs", [(1, [0.4]), (3, [0.3, -0.7, 0.25])])
def test_dpmpp_update_exact_for_polynomial_data_prediction(order, coefs):
    """Order 1 is exact for constant D(lambda), order 3 for quadratic D (Taylor expansion in lambda)."""
    lams = [0.1, -0.4, -1.0][:order]  # newest first
    d_of = lambda lam: sum(c * lam**j for j, c in enumerate(coefs))  # noqa: E731
    exact, ab0, abn = _exact_step(d_of, lams[0], 0.9, 0.5)
    hist = [torch.tensor([d_of(lam)], dtype=torch.float64) for lam in lams]
    got = solvers.dpmpp_update(torch.tensor([0.5], dtype=torch.float64), hist, lams, ab0, abn)
    assert float(got) == pytest.approx(exact, abs=1e-12)


def test_dpmpp_2m_is_second_order():
    """Halving the step size divides the local error of 2M by about 2^3 (Lu et al. 2022, Sec. 4.2)."""
    d_of = math.cos
    errors = []
    for h in (0.4, 0.2, 0.1):
        lam0 = 0.0
        exact, ab0, abn = _exact_step(d_of, lam0, lam0 + h, 0.3)
        hist = [torch.tensor([d_of(lam0)], dtype=torch.float64), torch.tensor([d_of(lam0 - h)], dtype=torch.float64)]
        got = solvers.dpmpp_update(torch.tensor([0.3], dtype=torch.float64), hist, [lam0, lam0 - h], ab0, abn)
        errors.append(abs(float(got) - exact))
    assert 6.0 < errors[0] / errors[1] < 10.0 and 6.0 < errors[1] / errors[2] < 10.0


def test_self_conditioning_feeds_the_previous_estimate():
    diffusion, _ = make("trailing3", "x0")
    seen = []

    def model(x, t, x0_prev=None, **kw):
        seen.append(None if x0_prev is None else x0_prev.clone())
        return torch.tanh(x + 0.1 * t.float().reshape(-1, 1, 1, 1))

    den = solvers.Denoiser(diffusion, model, self_condition=True)
    estimates = []
    solvers.sample_dpmpp_2m(den, torch.randn(1, 1, 3, 3), solvers.chain_timesteps(diffusion),
                            callback=lambda info: estimates.append(info["denoised"].clamp(-1, 1)))
    assert seen[0] is None and len(seen) == 3
    for prev, got in zip(estimates[:-1], seen[1:]):
        torch.testing.assert_close(got, prev)


def test_bad_timesteps_raise():
    diffusion, base = make("ddim10", "x0")
    den = solvers.Denoiser(diffusion, Oracle(_x0(), base, "x0"))
    with pytest.raises(ValueError, match="strictly decreasing"):
        solvers.sample_ddim(den, torch.zeros(2, 1, 6, 6), [3, 5])
    with pytest.raises(ValueError, match="one index at a time"):
        solvers.sample_ddpm(den, torch.zeros(2, 1, 6, 6), [9, 5, 0])
    with pytest.raises(ValueError, match="needs noise"):
        solvers.ddim_step(torch.zeros(1), torch.zeros(1), 0.5, 0.9, eta=1.0)

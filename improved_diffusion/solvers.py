"""Reverse-process samplers as plain functions with one signature (DDIM, DDPM, DPM-Solver++, one step).

Provenance: an extension of ``openai/improved-diffusion@1bc7bbb`` (MIT, Copyright (c) 2021
OpenAI; see ``improved_diffusion/LICENSE``); upstream has only the ``p_sample_loop`` /
``ddim_sample_loop`` methods of ``GaussianDiffusion``. Written anew from the papers cited per
function; the calling convention follows k-diffusion's ``sample_*`` functions
(``crowsonkb/k-diffusion``, ``sampling.py``), no code taken from it.

Every sampler is::

    sample_x(model, x, timesteps, extra_args=None, callback=None, disable=None, **options) -> Tensor

* ``model``: a :class:`Denoiser` (a respaced diffusion + its network). Its output is the core's
  ``p_mean_variance`` dict, so ``pred_xstart`` is the data prediction ``D(x, t)`` for epsilon,
  x0 and v networks alike (no parametrisation-specific code here).
* ``x``: ``x_T``, ``(B, C, *S)`` float32 (pure noise).
* ``timesteps``: decreasing indices ``k_0 > k_1 > ... > k_{M-1}`` of the respaced chain (usually
  all of them, :func:`chain_timesteps`); **one network call per entry** (NFE = M). After the last
  entry the sampler steps to the clean sample (``abar = 1``), so the return value is the model's
  final ``x0`` estimate ``(B, C, *S)``.
* ``extra_args``: keyword arguments for the network (conditioning such as image features).
* ``callback``: called after every network call with ``{"x", "i", "t", "denoised"}``.
* ``disable``: disable the tqdm bar (None = tqdm's own default, True = no bar).
* ``noise_sampler(k) -> Tensor`` (stochastic samplers): the standard normal noise added after the
  step at index ``k``; default ``torch.randn_like``.

Self-conditioning (Chen et al. 2022, Analog Bits, arXiv:2208.04202, Algorithm 2): when the
:class:`Denoiser` has ``self_condition=True`` every sampler passes the previous call's ``x0``
estimate (clamped to [-1, 1]; ``None`` at the first call) to the network as the keyword argument
``x0_prev``; the network adapter decides how to feed it (MedSegDiff concatenates it as a channel).

Schedules whose last ``abar`` is 0 (zero terminal SNR, Lin et al. 2023, arXiv:2305.08891) give
``lambda = -inf`` at the first step. All coefficients are written with ``a = sqrt(abar)`` and
``s = sqrt(1 - abar)`` so that no ``inf`` or ``0 / 0`` arises in the solvers (the data prediction
of an *epsilon* network is itself undefined at ``abar = 0``; use x0 or v there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import trange

__all__ = [
    "Denoiser",
    "chain_timesteps",
    "ddim_step",
    "dpmpp_update",
    "half_log_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_x0",
]

Callback = Callable[[dict[str, Any]], None]
NoiseSampler = Callable[[int], Tensor]


class Denoiser:
    """A respaced diffusion and its network as the data-prediction model ``D(x, t)``.

    Args:
        diffusion: a :class:`~improved_diffusion.gaussian_diffusion.GaussianDiffusion` (usually a
            respaced :class:`~improved_diffusion.respace.SpacedDiffusion`).
        model: ``model(x, timesteps, **kwargs) -> Tensor`` (the network, or an adapter around it).
        clip_denoised: clamp ``pred_xstart`` to [-1, 1] (the core's ``clip_denoised``).
        self_condition: pass ``x0_prev`` (the previous estimate) to ``model``.
    """

    def __init__(self, diffusion: Any, model: Callable[..., Tensor], *, clip_denoised: bool = True,
                 self_condition: bool = False) -> None:
        self.diffusion = diffusion
        self.model = model
        self.clip_denoised = clip_denoised
        self.self_condition = self_condition

    def _kwargs(self, x0_prev: Tensor | None, extra_args: dict[str, Any]) -> dict[str, Any]:
        if not self.self_condition:
            return dict(extra_args)
        return {**extra_args, "x0_prev": x0_prev}

    def __call__(self, x: Tensor, k: int, x0_prev: Tensor | None = None, **extra_args: Any) -> dict[str, Tensor]:
        """The core's ``p_mean_variance`` at respaced step ``k``: ``mean``, ``log_variance``, ``pred_xstart``."""
        t = torch.full((x.shape[0],), int(k), device=x.device, dtype=torch.long)
        return self.diffusion.p_mean_variance(
            self.model, x, t, clip_denoised=self.clip_denoised, model_kwargs=self._kwargs(x0_prev, extra_args)
        )

    def p_sample(self, x: Tensor, k: int, noise: Tensor, x0_prev: Tensor | None = None,
                 **extra_args: Any) -> dict[str, Tensor]:
        """The core's ancestral ``p_sample`` at respaced step ``k`` with explicit ``noise``."""
        t = torch.full((x.shape[0],), int(k), device=x.device, dtype=torch.long)
        return self.diffusion.p_sample(
            self.model, x, t, clip_denoised=self.clip_denoised, model_kwargs=self._kwargs(x0_prev, extra_args),
            noise=noise,
        )


def chain_timesteps(diffusion: Any) -> list[int]:
    """All respaced indices of ``diffusion`` in sampling order: ``[T' - 1, ..., 1, 0]``."""
    return list(range(int(diffusion.num_timesteps) - 1, -1, -1))


def half_log_snr(alpha_bar: float) -> float:
    """``lambda = log(a / s)`` with ``a = sqrt(abar)``, ``s = sqrt(1 - abar)`` (-inf at abar 0, +inf at 1)."""
    if alpha_bar <= 0.0:
        return -math.inf
    if alpha_bar >= 1.0:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def _check_timesteps(timesteps: Sequence[int], diffusion: Any, *, consecutive: bool = False) -> list[int]:
    ks = [int(k) for k in timesteps]
    n = int(diffusion.num_timesteps)
    if not ks:
        raise ValueError("timesteps must not be empty (one network call per entry)")
    if any(not 0 <= k < n for k in ks) or any(a <= b for a, b in zip(ks, ks[1:])):
        raise ValueError(f"timesteps must be strictly decreasing indices in [0, {n}), got {ks[:5]}...")
    if consecutive and ks != list(range(ks[0], -1, -1)):
        raise ValueError("this sampler steps through the respaced chain one index at a time: "
                         "pass chain_timesteps(diffusion) (choose the steps by respacing)")
    return ks


def _alpha_bars(diffusion: Any, ks: Sequence[int]) -> list[float]:
    """``abar`` at each of ``ks`` followed by 1.0 (the clean end point), as Python floats."""
    table = diffusion.alphas_cumprod
    return [float(table[k]) for k in ks] + [1.0]


def _steps(n: int, disable: bool | None) -> Any:
    return trange(n, disable=disable, leave=False)


def _x0_for_next(out: dict[str, Tensor]) -> Tensor:
    return out["pred_xstart"].clamp(-1.0, 1.0)


def ddim_step(x: Tensor, x0: Tensor, alpha_bar: float, alpha_bar_next: float, eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """One DDIM step from ``abar`` to ``abar_next`` (Song et al. 2021, arXiv:2010.02502, Eq. 12, 16).

    ``eps = (x - a x0) / s`` (the noise re-derived from the possibly clipped ``x0``, as the core's
    ``ddim_sample``), ``sigma = eta sqrt((1 - abar_next) / (1 - abar)) sqrt(1 - abar / abar_next)``,
    ``x_next = a_next x0 + sqrt(1 - abar_next - sigma^2) eps + sigma z``. Finite for ``abar = 0``.

    Args:
        x: ``(B, C, *S)`` sample at ``abar``.
        x0: ``(B, C, *S)`` data prediction at ``x``.
        alpha_bar, alpha_bar_next: ``abar`` now and at the next (less noisy) point; 1.0 = clean.
        eta: 0 = deterministic (the probability-flow ODE's first-order solver); 1 = DDPM-like.
        noise: ``z`` (standard normal); required when ``sigma > 0``.

    Raises:
        ValueError: ``sigma > 0`` without ``noise``.
    """
    s = math.sqrt(1.0 - alpha_bar)
    a, a_next = math.sqrt(alpha_bar), math.sqrt(alpha_bar_next)
    sigma = 0.0
    if eta > 0.0 and alpha_bar_next < 1.0:
        sigma = eta * math.sqrt((1.0 - alpha_bar_next) / (1.0 - alpha_bar)) * math.sqrt(1.0 - alpha_bar / alpha_bar_next)
    eps = (x - a * x0) / s
    out = a_next * x0 + math.sqrt(max(1.0 - alpha_bar_next - sigma**2, 0.0)) * eps
    if sigma > 0.0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + sigma * noise
    return out


def dpmpp_update(x: Tensor, denoised: Sequence[Tensor], lambdas: Sequence[float], alpha_bar: float,
                 alpha_bar_next: float) -> Tensor:
    """One multistep DPM-Solver++ update with data predictions (Lu et al. 2022, arXiv:2211.01095).

    With ``h = lambda_next - lambda_0`` the exact solution of the probability-flow ODE in data
    prediction form is ``x_next = (s_next / s) x + s_next int_{lambda_0}^{lambda_next} e^lambda
    D(lambda) d lambda`` (Lu et al., Eq. 8). The order is ``len(denoised)`` (1-3); ``D`` is
    expanded in a Taylor series in ``lambda`` around ``lambda_0``:

    * order 1 (DPM-Solver++1, = DDIM with eta = 0, Sec. 4.1):
      ``x_next = (s_next / s) x - a_next (e^{-h} - 1) D_0``;
    * order 2 (DPM-Solver++(2M), Algorithm 2): ``r = h_1 / h`` with ``h_1 = lambda_0 - lambda_1``,
      ``D = (1 + 1 / (2 r)) D_0 - 1 / (2 r) D_1`` in the first-order formula;
    * order 3 (3M, the same expansion one term further; the paper gives 2M only): with the divided
      differences in ``lambda``, ``hD' ~ D1`` and ``h^2 D'' ~ 2 D2`` below, ``x_next = (s_next / s) x
      - a_next phi_1 D_0 + a_next phi_2 D1 - 2 a_next phi_3 D2``, ``phi_1 = e^{-h} - 1``,
      ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 1/2`` (the exact integrals of ``e^lambda``
      times 1, ``(lambda - lambda_0)`` and ``(lambda - lambda_0)^2 / 2``). Written down here: it is
      exact when ``D`` is quadratic in ``lambda`` (tested).

    ``e^{-h} = a s_next / (s a_next)`` is used in that form, so ``abar = 0`` (``lambda = -inf``)
    gives the finite first-order step ``x_next = s_next x + a_next D_0``.

    Args:
        x: ``(B, C, *S)`` sample at ``lambdas[0]``.
        denoised: data predictions, newest first (``D_0`` at ``x``, then at earlier points).
        lambdas: the half log-SNR of each prediction's point, newest first (all finite when the
            order is above 1).
        alpha_bar, alpha_bar_next: ``abar`` at ``x`` and at the target (must be < 1).

    Raises:
        ValueError: an order outside 1-3, or a target at ``abar = 1`` (step there with ``x = D``).
    """
    order = len(denoised)
    if not 1 <= order <= 3 or len(lambdas) != order:
        raise ValueError(f"dpmpp_update: need 1-3 predictions with one lambda each, got {order}, {len(lambdas)}")
    if alpha_bar_next >= 1.0:
        raise ValueError("dpmpp_update: the step to the clean end point is x = D (first order)")
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    a_n, s_n = math.sqrt(alpha_bar_next), math.sqrt(1.0 - alpha_bar_next)
    ratio = s_n / s
    # -a_next (e^{-h} - 1) = a_next - a s_next / s   (finite at a = 0)
    first = (a_n - a * ratio) * denoised[0]
    if order == 1:
        return ratio * x + first
    lam_n = half_log_snr(alpha_bar_next)
    h = lam_n - lambdas[0]
    h1 = lambdas[0] - lambdas[1]
    phi_1 = math.expm1(-h)
    if order == 2:
        r = h1 / h
        d = (1.0 + 1.0 / (2.0 * r)) * denoised[0] - (1.0 / (2.0 * r)) * denoised[1]
        return ratio * x - a_n * phi_1 * d
    h2 = lambdas[1] - lambdas[2]
    r0, r1 = h1 / h, h2 / h
    d1_0 = (denoised[0] - denoised[1]) / r0
    d1_1 = (denoised[1] - denoised[2]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # ~ h D'
    d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 D'' / 2
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return ratio * x - a_n * phi_1 * denoised[0] + a_n * phi_2 * d1 - 2.0 * a_n * phi_3 * d2


def _report(callback: Callback | None, x: Tensor, i: int, k: int, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "t": k, "denoised": denoised})


@torch.no_grad()
def sample_ddim(model: Denoiser, x: Tensor, timesteps: Sequence[int], extra_args: dict[str, Any] | None = None,
                callback: Callback | None = None, disable: bool | None = None, eta: float = 0.0,
                noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DDIM (Song et al. 2021, arXiv:2010.02502, Eq. 12) over ``timesteps``; see :func:`ddim_step`.

    Step ``i`` goes from ``abar`` at ``timesteps[i]`` to ``abar`` at ``timesteps[i + 1]`` (1.0
    after the last), so over :func:`chain_timesteps` it is the core's ``ddim_sample_loop``.
    """
    extra_args = {} if extra_args is None else extra_args
    ks = _check_timesteps(timesteps, model.diffusion)
    abars = _alpha_bars(model.diffusion, ks)
    x0_prev = None
    for i in _steps(len(ks), disable):
        out = model(x, ks[i], x0_prev, **extra_args)
        x0 = out["pred_xstart"]
        noise = None
        if eta > 0.0 and i < len(ks) - 1:
            noise = noise_sampler(ks[i]) if noise_sampler is not None else torch.randn_like(x)
        x = ddim_step(x, x0, abars[i], abars[i + 1], eta, noise)
        x0_prev = _x0_for_next(out)
        _report(callback, x, i, ks[i], x0)
    return x


@torch.no_grad()
def sample_ddpm(model: Denoiser, x: Tensor, timesteps: Sequence[int], extra_args: dict[str, Any] | None = None,
                callback: Callback | None = None, disable: bool | None = None,
                noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, arXiv:2006.11239, Algorithm 2) of the respaced chain.

    Each step is the core's ``p_sample`` (posterior mean of the predicted ``x0``, the diffusion's
    fixed or learned variance; no noise at index 0), so ``timesteps`` must be the whole chain
    (:func:`chain_timesteps`); fewer network calls come from respacing.

    Raises:
        ValueError: ``timesteps`` that skip indices of the chain.
    """
    extra_args = {} if extra_args is None else extra_args
    ks = _check_timesteps(timesteps, model.diffusion, consecutive=True)
    x0_prev = None
    for i in _steps(len(ks), disable):
        k = ks[i]
        if k > 0:
            noise = noise_sampler(k) if noise_sampler is not None else torch.randn_like(x)
        else:
            noise = torch.zeros_like(x)
        out = model.p_sample(x, k, noise, x0_prev, **extra_args)
        x = out["sample"]
        x0_prev = _x0_for_next(out)
        _report(callback, x, i, k, out["pred_xstart"])
    return x


def _sample_dpmpp(model: Denoiser, x: Tensor, timesteps: Sequence[int], extra_args: dict[str, Any] | None,
                  callback: Callback | None, disable: bool | None, max_order: int) -> Tensor:
    extra_args = {} if extra_args is None else extra_args
    ks = _check_timesteps(timesteps, model.diffusion)
    abars = _alpha_bars(model.diffusion, ks)
    lambdas = [half_log_snr(ab) for ab in abars]
    history: list[Tensor] = []  # newest first
    x0_prev = None
    for i in _steps(len(ks), disable):
        out = model(x, ks[i], x0_prev, **extra_args)
        d = out["pred_xstart"]
        history = [d, *history][:max_order]
        if abars[i + 1] >= 1.0:
            x = d  # the step to the clean end point (s = 0) is first order: x = D (Lu et al. Sec. 4.2)
        else:
            # Use as many previous predictions as have finite lambda (a zero-SNR start has -inf).
            order = 1
            while order < len(history) and math.isfinite(lambdas[i - order]):
                order += 1
            x = dpmpp_update(x, history[:order], [lambdas[i - j] for j in range(order)], abars[i], abars[i + 1])
        x0_prev = _x0_for_next(out)
        _report(callback, x, i, ks[i], d)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: Tensor, timesteps: Sequence[int], extra_args: dict[str, Any] | None = None,
                    callback: Callback | None = None, disable: bool | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2); see :func:`dpmpp_update`.

    First order at the first step (no history) and at the last (to ``abar = 1``, ``x = D``); one
    network call per timestep. Works for any decreasing ``timesteps`` (any respacing).
    """
    return _sample_dpmpp(model, x, timesteps, extra_args, callback, disable, max_order=2)


@torch.no_grad()
def sample_dpmpp_3m(model: Denoiser, x: Tensor, timesteps: Sequence[int], extra_args: dict[str, Any] | None = None,
                    callback: Callback | None = None, disable: bool | None = None) -> Tensor:
    """Third-order multistep DPM-Solver++ (order 3 of :func:`dpmpp_update`), lower orders while warming up."""
    return _sample_dpmpp(model, x, timesteps, extra_args, callback, disable, max_order=3)


@torch.no_grad()
def sample_x0(model: Denoiser, x: Tensor, timesteps: Sequence[int], extra_args: dict[str, Any] | None = None,
              callback: Callback | None = None, disable: bool | None = None) -> Tensor:
    """One network call: the data prediction ``D(x_T, timesteps[0])`` (NFE = 1 whatever the respacing).

    Only the first (noisiest) timestep is used; with leading spacing (``"ddimN"``) that is not
    ``T - 1``, so pair it with ``"trailingN"`` (Lin et al. 2023), whose first step is ``T - 1``.
    """
    extra_args = {} if extra_args is None else extra_args
    ks = _check_timesteps(timesteps, model.diffusion)
    out = model(x, ks[0], None, **extra_args)
    _report(callback, out["pred_xstart"], 0, ks[0], out["pred_xstart"])
    return out["pred_xstart"]

"""Gaussian diffusion: noise schedules, forward process, DDPM/DDIM samplers and training losses.

Provenance: API of ``improved_diffusion/gaussian_diffusion.py`` in
``openai/improved-diffusion@1bc7bbb`` (MIT, Copyright (c) 2021 OpenAI; see
``improved_diffusion/LICENSE``). Written anew from Ho et al. 2020 (arXiv:2006.11239),
Nichol & Dhariwal 2021 (iDDPM, arXiv:2102.09672) and Song et al. 2021 (DDIM, arXiv:2010.02502).

Local changes:

* the schedule tables are float64 numpy arrays (as upstream, for inspection) *and* torch tensors
  cached once per device (float64 where the device supports it); :func:`_extract_into_tensor`
  indexes the cached tensor and casts to float32 like upstream, so the numbers are identical but
  no table is copied from the host per step;
* sampling loops build timesteps on the device (no ``.item()``/``.cpu()``), accept an optional
  ``torch.Generator`` and show a tqdm bar with ``progress=True``; the DDPM and DDIM loops share one
  private loop (``_loop_progressive``), while their public signatures repeat upstream's argument
  lists on purpose (each marked ``# Same as``);
* every shape check raises ``ValueError`` instead of ``assert``; tensors of any rank (2-D and
  3-D images) are supported;
* the linear schedule refuses step counts for which ``beta_T = 0.02 * 1000 / T`` reaches 1;
* **v-prediction** (an extension): ``ModelMeanType.VELOCITY``, the network predicts
  ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022, "Progressive Distillation
  for Fast Sampling of Diffusion Models", arXiv:2202.00512, Sec. 4 and Appendix D). It works
  through ``p_mean_variance``, ``training_losses`` (target v), the DDPM/DDIM samplers and
  ``SpacedDiffusion``;
* :meth:`GaussianDiffusion.predict_xstart_from_output`: one public helper that turns a raw model
  output into ``x_0`` for every mean type (what samplers and auxiliary losses use);
* the noise implied by an ``x_0`` estimate is computed as ``(x_t - sqrt(abar) x_0) / sqrt(1 - abar)``
  (algebraically equal to upstream's form, and finite where ``abar_t = 0``);
* **zero terminal SNR** (an extension): :func:`rescale_zero_terminal_snr` (Lin et al. 2023,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891, Algorithm 1);
  a process whose last ``abar`` is 0 refuses epsilon prediction (``x_0`` is undefined there).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from improved_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from improved_diffusion.nn import mean_flat

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "betas_for_alpha_bar",
    "get_named_beta_schedule",
    "rescale_zero_terminal_snr",
]

Model = Callable[..., torch.Tensor]


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Beta schedule by name (iDDPM Sec. 3.2).

    * ``"linear"``: Ho et al.'s 1e-4 .. 0.02 over 1000 steps, scaled by ``1000 / T`` so that any
      ``T`` reaches a similar final ``alpha_bar`` (T=100: 1e-3 .. 0.2).
    * ``"cosine"``: ``alpha_bar(t) = cos^2(((t + 0.008) / 1.008) * pi / 2)``, betas capped at 0.999
      only (never clamped to 0.02).

    Args:
        schedule_name: ``"linear"`` or ``"cosine"``.
        num_diffusion_timesteps: ``T``.

    Returns:
        ``(T,)`` float64 betas.

    Raises:
        NotImplementedError: unknown name.
        ValueError: ``T < 1``, or a linear schedule with ``T <= 20`` (final beta would reach 1).
    """
    T = int(num_diffusion_timesteps)
    if T < 1:
        raise ValueError(f"number of diffusion steps must be positive, got {T}")
    if schedule_name == "linear":
        scale = 1000.0 / T
        beta_start, beta_end = scale * 1e-4, scale * 0.02
        if beta_end >= 1.0:
            raise ValueError(
                f"linear beta schedule needs more than 20 steps (T={T} gives a final beta of "
                f"{beta_end:g} >= 1); use more steps or the 'cosine' schedule"
            )
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(T, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name!r} (expected 'linear' or 'cosine')")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas that reproduce a continuous ``alpha_bar`` on ``t in [0, 1]``.

    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``; the cap avoids the
    singularity at ``t = 1`` where ``alpha_bar`` is 0.

    Returns:
        ``(T,)`` float64 betas.
    """
    T = int(num_diffusion_timesteps)
    out = []
    for i in range(T):
        ratio = alpha_bar((i + 1) / T) / alpha_bar(i / T)
        out.append(min(1.0 - ratio, max_beta))
    return np.array(out, dtype=np.float64)


def rescale_zero_terminal_snr(betas: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rescale a schedule so that its last step has zero SNR (Lin et al. 2023, Algorithm 1).

    With ``s_t = sqrt(abar_t)``: ``s <- (s - s_T) * s_1 / (s_1 - s_T)``, so ``s_T = 0`` exactly and
    the first value ``s_1`` is unchanged (``s_1``/``s_T`` are the paper's first/last steps, indices
    0 and T-1 here); then ``abar = s^2`` and ``beta_t = 1 - abar_t / abar_{t-1}`` (``abar_0 = 1``),
    so the last beta is exactly 1. Lin et al. pair it with v-prediction and with sampling that
    starts at the last step.

    Args:
        betas: ``(T,)`` betas of the original schedule (T >= 2).

    Returns:
        ``(T,)`` float64 betas with ``alphas_cumprod[-1] == 0`` and ``alphas_cumprod[0]`` as before.

    Raises:
        ValueError: fewer than 2 steps, or a schedule whose ``abar`` is already constant.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"zero terminal SNR needs a 1-D schedule of at least 2 steps, got shape {betas.shape}")
    s = np.sqrt(np.cumprod(1.0 - betas))
    s_first, s_last = s[0], s[-1]
    if not s_first > s_last:
        raise ValueError("zero terminal SNR: alphas_cumprod does not decrease over the schedule")
    s = (s - s_last) * s_first / (s_first - s_last)
    abar = s**2
    abar[-1] = 0.0  # exact, not a rounding residue
    prev = np.append(1.0, abar[:-1])
    return 1.0 - abar / prev


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise
    # Extension: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, Appendix D).
    VELOCITY = enum.auto()


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen (iDDPM Sec. 3.1)."""

    LEARNED = enum.auto()  # the network outputs log-variance directly
    FIXED_SMALL = enum.auto()  # posterior variance beta_tilde_t
    FIXED_LARGE = enum.auto()  # beta_t (beta_tilde_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # log-space interpolation between beta_tilde_t and beta_t


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean target (+ VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, VB term scaled by T / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times T

    def is_vb(self) -> bool:
        """True for the pure variational-bound losses (KL, RESCALED_KL)."""
        return self in (LossType.KL, LossType.RESCALED_KL)


def _table_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _extract_into_tensor(
    arr: np.ndarray | torch.Tensor, timesteps: torch.Tensor, broadcast_shape: Sequence[int]
) -> torch.Tensor:
    """Gather ``arr[timesteps]`` as float32 and broadcast it to ``broadcast_shape``.

    Args:
        arr: ``(T,)`` table; a tensor already on ``timesteps.device`` is indexed without any copy
            (a numpy array is copied, as upstream did on every call).
        timesteps: ``(B,)`` integer indices.
        broadcast_shape: target shape ``(B, ...)`` of any rank.

    Returns:
        float32 tensor of ``broadcast_shape`` (an expanded view).
    """
    if isinstance(arr, np.ndarray):
        arr = torch.from_numpy(arr)
    if arr.device != timesteps.device:
        arr = arr.to(timesteps.device)
    res = arr[timesteps].float()
    res = res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim))
    return res.expand(*broadcast_shape)


def _default_device(model: Any, noise: torch.Tensor | None) -> torch.device:
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _split_learned_variance(
    model_output: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a learned-variance output ``(B, 2C, ...)`` into its mean and variance halves.

    Raises:
        ValueError: the output does not have twice the channels of ``x`` ``(B, C, ...)``.
    """
    B, C = x.shape[:2]
    expected = (B, 2 * C, *x.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(
            f"learned variance needs a model output of shape {expected} "
            f"(2 x {C} channels), got {tuple(model_output.shape)}"
        )
    mean_part, var_values = torch.split(model_output, C, dim=1)
    return mean_part, var_values


def _last_sample(outputs: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Run a progressive sampling loop to the end and return its final ``sample``."""
    final: dict[str, torch.Tensor] = {}
    for out in outputs:
        final = out
    return final["sample"]


def _nonzero_mask(t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    return (t != 0).to(dtype).reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """Utilities for training and sampling diffusion models (Ho et al. 2020; iDDPM; DDIM).

    Args:
        betas: ``(T,)`` betas in (0, 1].
        model_mean_type: what the network predicts.
        model_var_type: how the variance is obtained.
        loss_type: training loss.
        rescale_timesteps: feed the network ``t * 1000 / T`` (floats) instead of integer ``t``.

    Raises:
        ValueError: betas not 1-D or outside (0, 1]; epsilon prediction with a zero terminal SNR.
    """

    _TABLE_NAMES = (
        "betas",
        "log_betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "alphas_cumprod_next",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "recip_posterior_mean_coef1",
        "posterior_mean_coef2_over_coef1",
        "fixed_large_variance",
        "fixed_large_log_variance",
    )

    def __init__(
        self,
        *,
        betas: Sequence[float] | np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ) -> None:
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        if model_mean_type == ModelMeanType.EPSILON and self.alphas_cumprod[-1] == 0.0:
            raise ValueError(
                "epsilon prediction is undefined where alphas_cumprod = 0 (x_0 = (x_t - eps) / 0 at the "
                "last step of a zero-terminal-SNR schedule); predict v (ModelMeanType.VELOCITY) or x_0"
            )
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        with np.errstate(divide="ignore"):  # inf where abar = 0 (zero terminal SNR); unused there
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: use beta_tilde_1 there so the log stays finite.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Derived tables used by the samplers (kept here so they are cached per device too).
        self.log_betas = np.log(betas)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self.fixed_large_variance = np.append(first, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ tables

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """All schedule tables as tensors on ``device`` (built once per device)."""
        device = torch.device(device)
        tables = self._device_tables.get(device)
        if tables is None:
            dtype = _table_dtype(device)
            tables = {
                name: torch.as_tensor(getattr(self, name), dtype=dtype, device=device)
                for name in self._TABLE_NAMES
            }
            self._device_tables[device] = tables
        return tables

    def _extract(self, name: str, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return _extract_into_tensor(self._tables(t.device)[name], t, shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # --------------------------------------------------------- forward process

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of ``q(x_t | x_0)``, each shaped like ``x_start``."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

        Raises:
            ValueError: ``noise`` has a different shape from ``x_start``.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``.

        Raises:
            ValueError: ``x_start`` and ``x_t`` differ in shape.
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # --------------------------------------------------------- reverse process

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model to get ``p(x_{t-1} | x_t)`` and the predicted ``x_0``.

        Args:
            model: ``model(x, timesteps, **model_kwargs) -> (B, C or 2C, ...)``.
            x: ``(B, C, ...)`` samples at step ``t``.
            t: ``(B,)`` integer timesteps.
            clip_denoised: clamp the predicted ``x_0`` to [-1, 1].
            denoised_fn: applied to the predicted ``x_0`` before clamping.
            model_kwargs: extra keyword arguments for the model (conditioning).

        Returns:
            dict with ``mean``, ``variance``, ``log_variance`` and ``pred_xstart``.

        Raises:
            ValueError: bad ``t`` shape, or a model output with the wrong number of channels.
        """
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"timesteps must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = _split_learned_variance(model_output, x)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            expected = (B, C, *x.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(f"model output must have shape {expected}, got {tuple(model_output.shape)}")
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                model_variance = self._extract("fixed_large_variance", t, x.shape)
                model_log_variance = self._extract("fixed_large_log_variance", t, x.shape)
            else:
                model_variance = self._extract("posterior_variance", t, x.shape)
                model_log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            if clip_denoised:
                return x0.clamp(-1, 1)
            return x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON, ModelMeanType.VELOCITY):
            pred_xstart = process_xstart(self.predict_xstart_from_output(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:  # pragma: no cover - exhaustive enum
            raise NotImplementedError(self.model_mean_type)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def predict_xstart_from_output(
        self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor
    ) -> torch.Tensor:
        """The ``x_0`` implied by a raw model output, for every :class:`ModelMeanType` (unclipped).

        * ``START_X``: the output itself;
        * ``EPSILON``: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Ho et al. 2020, Eq. 15);
        * ``VELOCITY``: ``sqrt(abar_t) x_t - sqrt(1 - abar_t) v`` (Salimans & Ho 2022, Appendix D);
        * ``PREVIOUS_X``: the posterior mean inverted for ``x_0``.

        Args:
            x_t: ``(B, C, ...)`` noisy samples at step ``t`` (indices of this object's schedule).
            t: ``(B,)`` integer timesteps.
            model_output: ``(B, C, ...)``, or ``(B, 2C, ...)`` with a learned variance (the variance
                channels are dropped).

        Returns:
            ``(B, C, ...)`` predicted ``x_0`` (no clipping, no ``denoised_fn``).

        Raises:
            ValueError: the output does not have ``C`` (or ``2C`` with learned variance) channels.
        """
        C = x_t.shape[1]
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        if learned and model_output.shape[1] == 2 * C:
            model_output = model_output[:, :C]
        if model_output.shape != x_t.shape:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} does not fit x_t {tuple(x_t.shape)}"
                + (" (2C channels with learned variance)" if learned else "")
            )
        if self.model_mean_type == ModelMeanType.START_X:
            return model_output
        if self.model_mean_type == ModelMeanType.EPSILON:
            return self._predict_xstart_from_eps(x_t=x_t, t=t, eps=model_output)
        if self.model_mean_type == ModelMeanType.VELOCITY:
            return self._predict_xstart_from_v(x_t=x_t, t=t, v=model_output)
        return self._predict_xstart_from_xprev(x_t=x_t, t=t, xprev=model_output)

    def _signal_minus_noise(self, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) a - sqrt(1 - abar_t) b``: v from (eps, x_0), and x_0 from (x_t, v)."""
        return (
            self._extract("sqrt_alphas_cumprod", t, a.shape) * a
            - self._extract("sqrt_one_minus_alphas_cumprod", t, a.shape) * b
        )

    def _predict_v(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022, Appendix D)."""
        return self._signal_minus_noise(t, noise, x_start)

    def _predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v`` (finite at every step, also where abar = 0)."""
        if x_t.shape != v.shape:
            raise ValueError(f"x_t shape {tuple(x_t.shape)} != v shape {tuple(v.shape)}")
        return self._signal_minus_noise(t, x_t, v)

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps``."""
        if x_t.shape != eps.shape:
            raise ValueError(f"x_t shape {tuple(x_t.shape)} != eps shape {tuple(eps.shape)}")
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor
    ) -> torch.Tensor:
        """Invert the posterior mean: ``x_0 = (mu - coef2 x_t) / coef1``."""
        if x_t.shape != xprev.shape:
            raise ValueError(f"x_t shape {tuple(x_t.shape)} != xprev shape {tuple(xprev.shape)}")
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        """``eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)``.

        Upstream writes ``(sqrt(1 / abar) x_t - x_0) / sqrt(1 / abar - 1)``; this is the same value
        multiplied through by ``sqrt(abar)``, and stays finite where ``abar_t = 0``.
        """
        return (
            x_t - self._extract("sqrt_alphas_cumprod", t, x_t.shape) * pred_xstart
        ) / self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape)

    # ------------------------------------------------------------ DDPM sampler

    # Same as improved_diffusion/gaussian_diffusion.py:GaussianDiffusion.p_mean_variance: upstream's
    # public per-step signature (model, x, t, clip_denoised, denoised_fn, model_kwargs), repeated
    # argument for argument so that callers written for openai/improved-diffusion keep working.
    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step ``x_t -> x_{t-1}`` (no noise at ``t == 0``).

        ``noise`` (an addition to the upstream signature) supplies the step's standard normal
        noise explicitly, e.g. counter-based noise that must not depend on the batching.

        Returns:
            dict with ``sample`` and ``pred_xstart``.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if noise is None:
            noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        mask = _nonzero_mask(t, x.ndim, x.dtype)
        sample = out["mean"] + mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling over all ``num_timesteps`` of this object.

        Args:
            model: the network (see :meth:`p_mean_variance`).
            shape: ``(B, C, ...)`` of the samples.
            noise: optional ``x_T``; drawn from N(0, I) otherwise.
            device: where to sample (default: the noise's or the model's device).
            progress: show a tqdm progress bar.
            generator: random generator for ``x_T`` and the per-step noise.

        Returns:
            ``(B, C, ...)`` final samples.
        """
        return _last_sample(self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, generator=generator,
        ))

    # Same as improved_diffusion/gaussian_diffusion.py:GaussianDiffusion.p_sample_loop: upstream's
    # public loop signature, repeated argument for argument for callers written for
    # openai/improved-diffusion; the loop itself is shared in _loop_progressive.
    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like :meth:`p_sample_loop` but yields the output dict of every step."""
        def step(img: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.p_sample(
                model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                model_kwargs=model_kwargs, generator=generator,
            )

        yield from self._loop_progressive(step, model, shape, noise, device, progress, generator)

    def _loop_progressive(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None,
        device: torch.device | str | None,
        progress: bool,
        generator: torch.Generator | None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The reverse loop shared by the DDPM and DDIM samplers.

        Starts from ``noise`` (or N(0, I) drawn with ``generator``), then applies ``step(x, t)``
        for ``t = T-1 .. 0`` under ``no_grad`` and yields each step's output dict.
        """
        shape = tuple(shape)
        if device is None:
            device = _default_device(model, noise)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {shape}")
            img = noise.to(device)
        else:
            img = torch.randn(shape, device=device, generator=generator)
        indices: Sequence[int] = list(range(self.num_timesteps))[::-1]
        if progress:
            indices = tqdm(indices, desc="sampling", leave=False)
        for i in indices:
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = step(img, t)
            yield out
            img = out["sample"]

    # ------------------------------------------------------------ DDIM sampler

    # Same as improved_diffusion/gaussian_diffusion.py:GaussianDiffusion.p_mean_variance: upstream's
    # public per-step signature (model, x, t, clip_denoised, denoised_fn, model_kwargs), repeated
    # argument for argument so that callers written for openai/improved-diffusion keep working.
    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step ``x_t -> x_{t-1}`` (DDIM Eq. 12; ``eta = 0`` is deterministic).

        The noise estimate is re-derived from the (clipped) predicted ``x_0``; a learned variance
        is ignored. ``noise`` (an addition to the upstream signature) supplies the step's noise
        explicitly when ``eta > 0``.

        Returns:
            dict with ``sample`` and ``pred_xstart``.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(
            1 - alpha_bar_prev - sigma**2
        ) * eps
        if eta != 0:
            if noise is None:
                noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            sample = mean_pred + _nonzero_mask(t, x.ndim, x.dtype) * sigma * noise
        else:
            sample = mean_pred
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # Same as improved_diffusion/gaussian_diffusion.py:GaussianDiffusion.p_mean_variance: upstream's
    # public per-step signature (model, x, t, clip_denoised, denoised_fn, model_kwargs), repeated
    # argument for argument so that callers written for openai/improved-diffusion keep working.
    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Deterministic DDIM inversion step ``x_t -> x_{t+1}``.

        Raises:
            ValueError: ``eta != 0`` (the reverse ODE is only defined for ``eta = 0``).
        """
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample needs eta == 0 (got {eta})")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # Same as improved_diffusion/gaussian_diffusion.py:GaussianDiffusion.p_sample_loop: upstream's
    # public loop signature, repeated argument for argument for callers written for
    # openai/improved-diffusion; the loop itself is shared in _loop_progressive.
    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling over all ``num_timesteps`` of this object (speed comes from respacing).

        Returns:
            ``(B, C, ...)`` final samples.
        """
        return _last_sample(self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
        ))

    # Same as improved_diffusion/gaussian_diffusion.py:GaussianDiffusion.p_sample_loop: upstream's
    # public loop signature, repeated argument for argument for callers written for
    # openai/improved-diffusion; the loop itself is shared in _loop_progressive.
    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like :meth:`ddim_sample_loop` but yields the output dict of every step."""
        def step(img: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.ddim_sample(
                model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                model_kwargs=model_kwargs, eta=eta, generator=generator,
            )

        yield from self._loop_progressive(step, model, shape, noise, device, progress, generator)

    # ---------------------------------------------------------------- losses

    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound in bits per dimension.

        ``t > 0``: ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))``; ``t == 0``: the discretised
        decoder NLL ``-log p(x_0 | x_1)``.

        Returns:
            dict with ``output`` ``(B,)`` and ``pred_xstart``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses for one batch at timesteps ``t``.

        * KL / RESCALED_KL: the variational-bound term (times ``T`` when rescaled).
        * MSE / RESCALED_MSE: mean squared error on the mean target (epsilon, x_0, v or the
          posterior mean); with a learned variance, plus the VB term computed from a frozen mean
          so that it trains only the variance channels (iDDPM hybrid loss, lambda = 0.001 via the
          ``T / 1000`` rescale).

        Args:
            model: the network.
            x_start: ``(B, C, ...)`` clean data in [-1, 1].
            t: ``(B,)`` timestep indices.
            model_kwargs: conditioning for the model.
            noise: optional ``eps`` used to build ``x_t``.

        Returns:
            dict with ``loss`` ``(B,)`` and, for the MSE losses, ``mse`` (and ``vb`` if learned).
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):  # pragma: no cover
            raise NotImplementedError(self.loss_type)
        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = _split_learned_variance(model_output, x_t)
            # The VB term must not move the mean: feed it a detached mean and the live variance.
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Divide by 1000 for equivalence with the lambda of iDDPM Sec. 3.1.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            target = self._predict_v(x_start, t, noise)
        else:
            target = noise
        if model_output.shape != target.shape:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} != target shape {tuple(target.shape)}"
            )
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """``KL(q(x_T | x_0) || N(0, I))`` in bits per dimension, ``(B,)``."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Full variational bound (one model call per timestep) in bits per dimension.

        Returns:
            dict with ``total_bpd`` ``(B,)``, ``prior_bpd`` ``(B,)``, and per-step ``vb``,
            ``xstart_mse``, ``mse`` ``(B, T)``.
        """
        B = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps)[::-1]:
            t = torch.full((B,), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }

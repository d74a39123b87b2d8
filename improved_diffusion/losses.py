"""Gaussian KL divergence and discretised Gaussian likelihood, in nats.

Provenance: API of ``improved_diffusion/losses.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``), itself a port of
``hojonathanho/diffusion``. Written anew from the formulas in Ho et al. 2020 (arXiv:2006.11239,
Sec. 3.3) and Nichol & Dhariwal 2021 (arXiv:2102.09672, Sec. 3.1).
Local changes: shape mismatches raise ``ValueError`` instead of ``assert``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "normal_kl"]

# Half width of one bin of 8-bit data rescaled to [-1, 1].
_BIN_HALF_WIDTH = 1.0 / 255.0


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    ``0.5 * (logvar2 - logvar1 - 1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 * exp(-logvar2))``.
    Scalars broadcast; at least one argument must be a tensor.

    Raises:
        TypeError: none of the arguments is a tensor.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl: at least one argument must be a tensor")

    def as_tensor(v: torch.Tensor | float) -> torch.Tensor:
        return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=ref.dtype, device=ref.device)

    m1, lv1, m2, lv2 = (as_tensor(v) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (lv2 - lv1 - 1.0 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast approximation of the standard normal CDF (Page 1977, tanh form)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of data discretised to 256 bins in [-1, 1] under a Gaussian, in nats.

    Each value ``x`` owns the bin ``[x - 1/255, x + 1/255]``; the outermost bins extend to
    infinity (Ho et al. 2020, Eq. 13). Assumes 8-bit data: for masks or float data this is a
    decoder term, not a true likelihood.

    Args:
        x: ``(B, C, ...)`` targets in [-1, 1].
        means: Gaussian means, same shape.
        log_scales: Gaussian log standard deviations, same shape.

    Returns:
        Elementwise log probabilities, same shape as ``x``.

    Raises:
        ValueError: the shapes differ.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"discretized_gaussian_log_likelihood: shapes differ: x {tuple(x.shape)}, "
            f"means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _BIN_HALF_WIDTH))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _BIN_HALF_WIDTH))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_survival_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin))

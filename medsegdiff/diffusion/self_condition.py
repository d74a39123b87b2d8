"""Self-conditioning input (Chen et al. 2022, Analog Bits, arXiv:2208.04202, Sec. 3 and Algorithms 1-2).

The network of a self-conditioned model (``diffusion.self_condition: true``, ``model.self_condition``
True, ``mask_channels = 2``) sees ``torch.cat([x_t, x0_prev], dim=1)``: the noisy mask and the
previous estimate of the clean mask in [-1, 1], zeros when there is none (the first sampling step,
and half of the training steps). Training and every sampler build that input here only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["concat_self_cond"]


def concat_self_cond(x_t: Tensor, x0_prev: Tensor | None) -> Tensor:
    """``cat([x_t, x0_prev], dim=1)`` with zeros for a missing ``x0_prev``.

    Args:
        x_t: ``(B, C, *S)`` noisy mask.
        x0_prev: ``(B, C, *S)`` previous clean-mask estimate in [-1, 1], or None.

    Returns:
        ``(B, 2C, *S)``.

    Raises:
        ValueError: ``x0_prev`` with a shape other than ``x_t``'s.
    """
    if x0_prev is None:
        x0_prev = torch.zeros_like(x_t)
    elif x0_prev.shape != x_t.shape:
        raise ValueError(f"x0_prev shape {tuple(x0_prev.shape)} != x_t shape {tuple(x_t.shape)}")
    return torch.cat([x_t, x0_prev.to(x_t.dtype)], dim=1)

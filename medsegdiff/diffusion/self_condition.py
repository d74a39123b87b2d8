"""Self-conditioning input of the diffusion network (Chen, Zhang & Hinton 2022, "Analog Bits",
arXiv:2208.04202, Sec. 3 and Algorithms 1-2).

A self-conditioned network gets its own previous estimate of the clean mask as an extra input
channel: ``net(cat([x_t, x0_prev]), t)``. ``x0_prev`` is in [-1, 1] (the mask scale, ARCHITECTURE.md)
and zeros where there is no estimate (the first sampling step, and half of the training batches).
The network is built with ``mask_channels = 2`` when ``diffusion.self_condition`` is true and carries
a plain attribute ``model.self_condition``; this module is the one place that builds its input.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["concat_self_cond"]


def concat_self_cond(x_t: Tensor, x0_prev: Tensor | None) -> Tensor:
    """The input of a self-conditioned network: ``torch.cat([x_t, x0_prev], dim=1)``.

    Args:
        x_t: ``(B, C, *S)`` noisy mask.
        x0_prev: ``(B, C, *S)`` previous ``x0`` estimate in [-1, 1], or None for zeros.

    Returns:
        ``(B, 2C, *S)`` tensor (the estimate cast to ``x_t``'s dtype and device).

    Raises:
        ValueError: ``x0_prev`` has a different shape from ``x_t``.
    """
    if x0_prev is None:
        return torch.cat([x_t, torch.zeros_like(x_t)], dim=1)
    if x0_prev.shape != x_t.shape:
        raise ValueError(
            f"self-conditioning estimate {tuple(x0_prev.shape)} must have the shape of x_t {tuple(x_t.shape)}"
        )
    return torch.cat([x_t, x0_prev.to(dtype=x_t.dtype, device=x_t.device)], dim=1)

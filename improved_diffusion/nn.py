"""Small neural-network helpers shared by the diffusion networks.

Provenance: API of ``improved_diffusion/nn.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``). Written anew.
Local changes: ``checkpoint`` uses ``torch.utils.checkpoint`` with ``use_reentrant=False``
(``params`` is accepted for API compatibility and ignored); ``update_ema`` is a fused in-place
``torch._foreach_lerp_``; ``normalization`` takes an optional maximum group count and picks the
largest divisor of ``channels`` not above it; ``timestep_embedding`` zero-pads odd sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

__all__ = [
    "GroupNorm32",
    "SiLU",
    "avg_pool_nd",
    "checkpoint",
    "conv_nd",
    "linear",
    "mean_flat",
    "normalization",
    "scale_module",
    "timestep_embedding",
    "update_ema",
    "zero_module",
]


class SiLU(nn.SiLU):
    """Sigmoid-weighted linear unit ``x * sigmoid(x)`` (kept as a name for API compatibility)."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 and returns the input dtype.

    Useful under fp16/bf16 autocast, where the statistics of low-precision activations are noisy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _layer_nd(classes: dict[int, type[nn.Module]], dims: int) -> type[nn.Module]:
    """The class for ``dims`` of a 1-D/2-D/3-D layer family (what :func:`conv_nd` and :func:`avg_pool_nd` build)."""
    try:
        return classes[dims]
    except KeyError:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)") from None


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution; the remaining arguments go to ``nn.ConvNd``.

    Raises:
        ValueError: ``dims`` is not 1, 2 or 3.
    """
    return _layer_nd(_CONVS, dims)(*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """A fully connected layer (``nn.Linear``)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling; the remaining arguments go to ``nn.AvgPoolNd``.

    Raises:
        ValueError: ``dims`` is not 1, 2 or 3.
    """
    return _layer_nd(_AVG_POOLS, dims)(*args, **kwargs)


@torch.no_grad()
def update_ema(
    target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor], rate: float = 0.99
) -> None:
    """Exponential moving average, in place: ``target <- rate * target + (1 - rate) * source``.

    Implemented as one fused ``torch._foreach_lerp_`` per (device, dtype) group, with no Python
    arithmetic per parameter.

    Args:
        target_params: the averaged parameters (modified in place).
        source_params: the live parameters, in the same order.
        rate: EMA decay in [0, 1].

    Raises:
        ValueError: the two sequences differ in length.
    """
    targets = [p.data if isinstance(p, nn.Parameter) else p for p in target_params]
    sources = [p.data if isinstance(p, nn.Parameter) else p for p in source_params]
    if len(targets) != len(sources):
        raise ValueError(f"update_ema: {len(targets)} target tensors but {len(sources)} source tensors")
    if not targets:
        return
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for t, s in zip(targets, sources):
        tl, sl = groups.setdefault((t.device, t.dtype), ([], []))
        tl.append(t)
        sl.append(s.to(device=t.device, dtype=t.dtype))
    weight = 1.0 - float(rate)
    for tl, sl in groups.values():
        torch._foreach_lerp_(tl, sl, weight)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply every parameter of ``module`` by ``scale`` and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the first: ``(B, ...) -> (B,)``."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for g in range(min(n, limit), 0, -1):
        if n % g == 0:
            return g
    return 1


def normalization(channels: int, groups: int = 32) -> nn.Module:
    """A float32 GroupNorm layer for ``channels`` channels.

    Upstream always uses 32 groups; here the number of groups is the largest divisor of
    ``channels`` that does not exceed ``groups`` (so 32 whenever ``channels`` is a multiple of 32,
    exactly as upstream).

    Raises:
        ValueError: ``channels`` or ``groups`` is not positive.
    """
    if channels < 1 or groups < 1:
        raise ValueError(f"normalization: channels ({channels}) and groups ({groups}) must be positive")
    return GroupNorm32(_largest_divisor_at_most(channels, groups), channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal timestep embedding (Vaswani et al. 2017), laid out as ``[cos | sin]``.

    Frequencies are ``max_period ** (-k / half)`` for ``k = 0 .. half-1`` with ``half = dim // 2``;
    an odd ``dim`` gets one zero column at the end.

    Args:
        timesteps: ``(B,)`` integer or fractional timesteps.
        dim: embedding size.
        max_period: controls the lowest frequency.

    Returns:
        ``(B, dim)`` float32 embedding.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    angles = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def checkpoint(
    func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool
) -> Any:
    """Evaluate ``func(*inputs)``, recomputing activations in the backward pass when ``flag``.

    Uses ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, which tracks the parameters
    used inside ``func`` by itself; ``params`` is accepted for API compatibility only. Checkpointing
    is skipped when gradients are disabled (inference) since there is nothing to save.
    """
    del params
    if flag and torch.is_grad_enabled():
        return torch_checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)

"""Discriminative baseline: MONAI ``DynUNet`` (nnU-Net style, Isensee et al. 2021).

Same inputs as the diffusion models, ``forward(image) -> logits (B, 1, *S)``,
``is_diffusion = False``. Kernel sizes and strides are derived from the input size the way
nnU-Net does: a side is halved at a level only while it is even and stays >= 4, so any size works
(sides that cannot be halved keep stride 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import DynUNet

from medsegdiff.errors import ConfigError

__all__ = ["DynUNetBaseline", "dynunet_strides"]


def dynunet_strides(size: Sequence[int], levels: int) -> list[list[int]]:
    """Per-level strides ``[[1, ...], [s, ...], ...]`` (``levels`` entries) for ``size``."""
    cur = list(size)
    strides = [[1] * len(size)]
    for _ in range(levels - 1):
        s = [2 if c % 2 == 0 and c // 2 >= 4 else 1 for c in cur]
        cur = [c // k for c, k in zip(cur, s)]
        strides.append(s)
    return strides


class DynUNetBaseline(nn.Module):
    """MONAI DynUNet wrapped to the project's model contract.

    Args:
        in_channels: image channels ``C_in``.
        size: spatial size ``(H, W)`` or ``(D, H, W)``.
        filters: channels per level (levels = ``len(filters)``).
        res_block: residual blocks instead of plain conv blocks.
        name: used in messages.

    Shapes: ``image (B, C_in, *S) -> logits (B, 1, *S)``.

    Raises:
        ConfigError: bad channel count or dims; at forward, a size not divisible by the strides.
    """

    is_diffusion = False

    def __init__(
        self, in_channels: int, size: Sequence[int], filters: Sequence[int], *, res_block: bool = False,
        name: str = "dynunet",
    ) -> None:
        super().__init__()
        self.name = name
        self.size = tuple(int(s) for s in size)
        self.dims = len(self.size)
        if self.dims not in (2, 3):
            raise ConfigError(f"{name}: data.dims {self.dims} is not supported; allowed: 2 or 3")
        if in_channels < 1:
            raise ConfigError(f"{name}: {in_channels} image channels; need >= 1")
        if len(filters) < 2:
            raise ConfigError(f"config key 'model.dynunet_filters': got {list(filters)}; allowed: two or more levels")
        self.in_channels = in_channels
        self.out_channels = 1
        self.strides = dynunet_strides(self.size, len(filters))
        self.divisor = [1] * self.dims
        for s in self.strides:
            self.divisor = [a * b for a, b in zip(self.divisor, s)]
        self.net = DynUNet(
            spatial_dims=self.dims,
            in_channels=in_channels,
            out_channels=1,
            kernel_size=[[3] * self.dims] * len(filters),
            strides=self.strides,
            upsample_kernel_size=self.strides[1:],
            filters=list(filters),
            res_block=res_block,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != self.dims + 2 or image.shape[1] != self.in_channels:
            raise ConfigError(
                f"{self.name}: image has shape {tuple(image.shape)}; expected (B, {self.in_channels}, "
                f"{'D, ' if self.dims == 3 else ''}H, W) (data.in_channels = modalities x (1 + 2 x context_slices))"
            )
        bad = [s for s, k in zip(image.shape[2:], self.divisor) if s % k]
        if bad:
            raise ConfigError(
                f"{self.name}: image size {tuple(image.shape[2:])} is not divisible by the DynUNet strides "
                f"{tuple(self.divisor)} derived from the build size {self.size}; use multiples of them"
            )
        return self.net(image)

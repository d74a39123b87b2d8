"""Shared building blocks of the MedSegDiff networks (2-D and 3-D through one code path).

Everything here works for ``dims`` 2 or 3: convolutions come from
:func:`improved_diffusion.nn.conv_nd`, down-sampling halves every spatial dimension, Fourier
transforms run over all spatial dimensions (``rfftn``) in float32 even under autocast.

Contents:

* :func:`repeat_features` - repeat cached image features for an ensemble (the model contract).
* :class:`ResBlock` - ADM residual block with the time embedding as GroupNorm scale/shift
  (``emb_channels=None`` gives a time-free block for the image encoder, so its output can be cached).
* :class:`AttentionBlock` - multi-head self-attention with ``scaled_dot_product_attention``.
* :class:`Downsample` / :class:`Upsample` - stride-2 convolution / nearest x2 + convolution.
* :class:`FFParser` - MedSegDiff-V1's Fourier-space feature filter (Wu et al., MIDL 2023, sec. 2.2).
* :func:`check_spatial_size` - the one place where "size must be a multiple of 2^k" is explained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from improved_diffusion.nn import checkpoint, conv_nd, normalization, zero_module
from improved_diffusion.unet import TimestepBlock, TimestepEmbedSequential
from medsegdiff.errors import ConfigError

__all__ = [
    "AttentionBlock",
    "Downsample",
    "FFParser",
    "ResBlock",
    "TimestepBlock",
    "TimestepSequential",
    "Upsample",
    "check_spatial_size",
    "fft_spatial",
    "ifft_spatial",
    "repeat_features",
]


def repeat_features(feats: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Repeat every cached image feature ``n`` times along the batch for an ensemble.

    Args:
        feats: the output of ``model.encode_image``; each tensor has the batch first ``(B, ...)``.
        n: ensemble members per image.

    Returns:
        The list with each tensor ``(B * n, ...)``, members of one image adjacent
        (``repeat_interleave`` on dim 0), matching ``images.repeat_interleave(n, 0)``.

    Raises:
        ValueError: ``n`` is below 1.
    """
    if n < 1:
        raise ValueError(f"repeat_features: n must be >= 1, got {n}")
    if n == 1:
        return list(feats)
    return [f.repeat_interleave(n, dim=0) for f in feats]


def check_spatial_size(size: Sequence[int], levels: int, what: str = "model", mult: Sequence[int] = ()) -> None:
    """Check that every spatial side is a positive multiple of ``2^(levels-1)``.

    Args:
        size: spatial size ``(H, W)`` or ``(D, H, W)``.
        levels: number of resolution levels (``len(channel_mult)``).
        what: prefix of the message.
        mult: the channel multipliers, quoted in the message.

    Raises:
        ConfigError: a side is not a multiple, with the two nearest valid sizes.
    """
    factor = 2 ** (levels - 1)
    for s in size:
        if s < 1 or s % factor:
            lo = max(factor, (s // factor) * factor)
            suggestion = f"use {lo} or {lo + factor}"
            by = f"channel_mult {list(mult)}" if mult else f"{levels} levels"
            raise ConfigError(
                f"{what}: image size {s} (in {tuple(size)}) is not a multiple of 2^{levels - 1} = {factor} "
                f"required by {by}; {suggestion} (or use fewer levels)"
            )


def _expand(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append singleton dims to ``t`` until it has ``ndim`` dimensions."""
    while t.ndim < ndim:
        t = t[..., None]
    return t


# The time-embedding container is the core's (improved_diffusion.unet); the old name stays.
TimestepSequential = TimestepEmbedSequential


class Downsample(nn.Module):
    """Stride-2 convolution halving every spatial dimension: ``(B, C, *S) -> (B, C_out, *S/2)``."""

    def __init__(self, channels: int, dims: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.op = conv_nd(dims, channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 in every spatial dimension followed by a 3-wide convolution."""

    def __init__(self, channels: int, dims: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = conv_nd(dims, channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(TimestepBlock):
    """ADM residual block (Dhariwal & Nichol 2021) for 2-D or 3-D maps.

    ``h = conv(SiLU(GN(x)))``; with a time embedding ``h = GN(h) * (1 + scale) + shift``
    (``use_scale_shift_norm``) or ``GN(h + emb)``; then SiLU, dropout and a zero-initialised
    convolution; the skip is identity or a 1x1 convolution when the width changes.

    Args:
        channels: input channels.
        emb_channels: time-embedding width, or ``None`` for a time-free block (image encoder).
        dropout: dropout probability.
        out_channels: output channels (default ``channels``).
        dims: 2 or 3.
        use_scale_shift_norm: FiLM-style conditioning.
        norm_groups: maximum GroupNorm groups (the largest divisor of the width is used).
        use_checkpoint: recompute activations in the backward pass.

    Shapes: ``x (B, channels, *S)``, ``emb (B, emb_channels)`` -> ``(B, out_channels, *S)``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int | None,
        dropout: float = 0.0,
        out_channels: int | None = None,
        *,
        dims: int = 2,
        use_scale_shift_norm: bool = True,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm and emb_channels is not None
        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1)
        )
        if emb_channels is not None:
            self.emb_layers: nn.Module | None = nn.Sequential(
                nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if self.use_scale_shift_norm else out_channels)
            )
        else:
            self.emb_layers = None
        self.out_norm = normalization(out_channels, norm_groups)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if out_channels == channels else conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if self.use_checkpoint and emb is not None:
            return checkpoint(self._forward, (x, emb), (), True)
        if self.use_checkpoint:
            return checkpoint(self._forward, (x,), (), True)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_layers(x)
        if self.emb_layers is not None:
            if emb is None:
                raise ValueError("ResBlock built with a time embedding was called without one")
            e = _expand(self.emb_layers(emb).to(h.dtype), h.ndim)
            if self.use_scale_shift_norm:
                scale, shift = e.chunk(2, dim=1)
                h = self.out_norm(h) * (1 + scale) + shift
            else:
                h = self.out_norm(h + e)
        else:
            h = self.out_norm(h)
        return self.skip(x) + self.out_layers(h)


def _heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads for ``channels`` (``num_head_channels`` wins when not -1)."""
    if num_head_channels != -1:
        if channels % num_head_channels:
            raise ConfigError(
                f"model.num_head_channels: {num_head_channels} does not divide the attention width "
                f"{channels}; use a divisor of {channels} or -1 (then num_heads is used)"
            )
        return channels // num_head_channels
    if channels % num_heads:
        raise ConfigError(
            f"model.num_heads: {num_heads} does not divide the attention width {channels}; "
            f"use a divisor of {channels}"
        )
    return num_heads


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions (SDPA kernel).

    Shapes: ``(B, C, *S) -> (B, C, *S)``; the output projection is zero-initialised (ADM).

    Raises:
        ConfigError: the head layout does not divide ``channels``.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        num_head_channels: int = -1,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.heads = _heads_for(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), (), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        h = self.norm(x).reshape(b, c, -1)
        q, k, v = self.qkv(h).reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        a = a.transpose(-1, -2).reshape(b, c, -1)
        return x + self.proj(a).reshape(x.shape)


def fft_spatial(x: torch.Tensor) -> torch.Tensor:
    """Real FFT over every spatial dim of ``(B, C, *S)`` in float32 (``norm='ortho'``)."""
    dims = tuple(range(2, x.ndim))
    return torch.fft.rfftn(x.float(), dim=dims, norm="ortho")


def ifft_spatial(xf: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`fft_spatial` back to spatial size ``size``."""
    dims = tuple(range(2, xf.ndim))
    return torch.fft.irfftn(xf, s=tuple(size), dim=dims, norm="ortho")


def complex_mul(xf: torch.Tensor, wr: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
    """``xf * (wr + i wi)`` computed on real views (kernel-friendly for ``torch.compile``)."""
    xr = torch.view_as_real(xf)
    re, im = xr[..., 0], xr[..., 1]
    out = torch.stack((re * wr - im * wi, re * wi + im * wr), dim=-1)
    return torch.view_as_complex(out)


class FFParser(nn.Module):
    """MedSegDiff-V1 FF-Parser (Wu et al., MIDL 2023, sec. 2.2, eq. 4-5).

    ``y = irfftn(A * rfftn(x))`` with ``A`` a learnable complex map of shape
    ``(C, *S[:-1], S[-1] // 2 + 1)`` (one weight per channel and frequency), initialised to 1
    (identity). The transforms are computed in float32 with autocast disabled and the result is cast
    back to the input dtype. The map is sized from the feature-map size given at build time;
    calling with another size raises a clear error.

    Args:
        channels: feature channels ``C``.
        size: spatial size ``S`` of the features this parser sees, ``(H, W)`` or ``(D, H, W)``.

    Shapes: ``(B, C, *S) -> (B, C, *S)``.
    """

    def __init__(self, channels: int, size: Sequence[int]) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)
        freq = (*self.size[:-1], self.size[-1] // 2 + 1)
        # real and imaginary parts as separate parameters: no complex parameters (optimisers, DDP,
        # EMA and channels_last all handle real tensors) and no strided view_as_complex on weights.
        self.weight_real = nn.Parameter(torch.ones(channels, *freq))
        self.weight_imag = nn.Parameter(torch.zeros(channels, *freq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.size:
            raise ValueError(
                f"FFParser: features of spatial size {tuple(x.shape[2:])} but the parser was built for "
                f"{self.size}; build the model for the input size you use (data.image_size / data.patch_size)"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = fft_spatial(x)
            xf = complex_mul(xf, self.weight_real.float(), self.weight_imag.float())
            y = ifft_spatial(xf, self.size)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.weight_real.shape[0]}, size={self.size}"

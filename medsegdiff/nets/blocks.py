"""MedSegDiff-specific building blocks (the generic ones are the core's, :mod:`improved_diffusion.unet`).

The residual blocks, attention, resampling and the UNet skeleton of every MedSegDiff network are
:mod:`improved_diffusion.unet`'s (``ResBlock`` with ``emb_channels=None`` for the time-free image
encoder, ``norm_groups``, ``num_head_channels``, ``out_channels`` and ``resample_depth``). Here:

* :func:`repeat_features` - repeat cached image features for an ensemble (the model contract).
* :func:`check_spatial_size` - the one place where "size must be a multiple of 2^k" is explained.
* :func:`fft_spatial` / :func:`ifft_spatial` / :func:`complex_mul` - float32 FFTs over every
  spatial dimension (``rfftn``), used by the FF-Parser.
* :class:`FFParser` - MedSegDiff-V1's Fourier-space feature filter (Wu et al., MIDL 2023, sec. 2.2),
  defined for any input size (its weights are resampled in normalised frequency).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medsegdiff.errors import ConfigError

__all__ = [
    "FFParser",
    "check_spatial_size",
    "complex_mul",
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


def check_spatial_size(
    size: Sequence[int], levels: int, what: str = "model", mult: Sequence[int] = (), resample_depth: bool = True
) -> None:
    """Check that every resampled spatial side is a positive multiple of ``2^(levels-1)``.

    Args:
        size: spatial size ``(H, W)`` or ``(D, H, W)``.
        levels: number of resolution levels (``len(channel_mult)``).
        what: prefix of the message.
        mult: the channel multipliers, quoted in the message.
        resample_depth: in 3-D, whether the depth ``D`` is resampled too (else only ``D >= 1``).

    Raises:
        ConfigError: a side is not a multiple, with the two nearest valid sizes.
    """
    factor = 2 ** (levels - 1)
    for axis, s in enumerate(size):
        if len(size) == 3 and axis == 0 and not resample_depth:
            if s < 1:
                raise ConfigError(f"{what}: depth {s} (in {tuple(size)}) must be at least 1")
            continue
        if s < 1 or s % factor:
            lo = max(factor, (s // factor) * factor)
            suggestion = f"use {lo} or {lo + factor}"
            by = f"channel_mult {list(mult)}" if mult else f"{levels} levels"
            raise ConfigError(
                f"{what}: image size {s} (in {tuple(size)}) is not a multiple of 2^{levels - 1} = {factor} "
                f"required by {by}; {suggestion} (or use fewer levels)"
            )


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


def _frequency_grid(size: Sequence[int], ref: Sequence[int], device: torch.device) -> torch.Tensor:
    """``grid_sample`` coordinates of the ``rfftn`` frequencies of ``size`` on the ``rfftn`` grid of ``ref``.

    Full axes are looked up in the ``fftshift``-ed reference (frequencies increasing), the last
    (half) axis directly. Returns ``(1, *F, d)`` with the coordinates in ``grid_sample`` order
    (last axis first), ``align_corners=True``.
    """
    coords = []
    for axis, (n, n0) in enumerate(zip(size, ref)):
        last = axis == len(size) - 1
        f = torch.fft.rfftfreq(n, device=device) if last else torch.fft.fftfreq(n, device=device)
        idx = f * n0 if last else f * n0 + n0 // 2
        length = n0 // 2 + 1 if last else n0
        coords.append(2 * idx / (length - 1) - 1 if length > 1 else torch.zeros_like(idx))
    grids = torch.meshgrid(*coords, indexing="ij")
    return torch.stack(grids[::-1], dim=-1)[None]


class FFParser(nn.Module):
    """MedSegDiff-V1 FF-Parser (Wu et al., MIDL 2023, sec. 2.2, eq. 4-5), for any input size.

    ``y = irfftn(A * rfftn(x))`` with ``A`` a learnable complex map of shape
    ``(C, *S0[:-1], S0[-1] // 2 + 1)`` (one weight per channel and frequency of the reference size
    ``S0``), initialised to 1 (identity). The transforms are computed in float32 with autocast
    disabled and the result is cast back to the input dtype.

    Other sizes (paper-silent; issue "V1 at any size"): the map is a function of the *normalised*
    frequency. For an input of size ``S`` each of its frequencies ``k / S`` is looked up in the
    reference map by (bi/tri)linear interpolation (``grid_sample`` on the ``fftshift``-ed map,
    border values beyond the reference's highest frequency), so one trained parser filters every
    size; at ``S0`` the weights are used as they are.

    Args:
        channels: feature channels ``C``.
        size: reference spatial size ``S0``, ``(H, W)`` or ``(D, H, W)``.

    Shapes: ``(B, C, *S) -> (B, C, *S)`` for any ``S`` of the same rank.
    """

    def __init__(self, channels: int, size: Sequence[int]) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)
        freq = (*self.size[:-1], self.size[-1] // 2 + 1)
        # real and imaginary parts as separate parameters: no complex parameters (optimisers, DDP,
        # EMA and channels_last all handle real tensors) and no strided view_as_complex on weights.
        self.weight_real = nn.Parameter(torch.ones(channels, *freq))
        self.weight_imag = nn.Parameter(torch.zeros(channels, *freq))

    def weights(self, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 ``(real, imaginary)`` maps ``(C, *size[:-1], size[-1] // 2 + 1)`` for ``size``.

        Raises:
            ValueError: ``size`` has another rank than the reference size.
        """
        size = tuple(int(s) for s in size)
        wr, wi = self.weight_real.float(), self.weight_imag.float()
        if size == self.size:
            return wr, wi
        if len(size) != len(self.size):
            raise ValueError(f"FFParser: {len(size)}-D input but the parser is {len(self.size)}-D ({self.size})")
        full_axes = tuple(range(1, len(size)))  # every axis of (C, *F) but channels and the half axis
        w = torch.fft.fftshift(torch.cat([wr, wi]), dim=full_axes)[None]  # (1, 2C, *F0)
        grid = _frequency_grid(size, self.size, w.device)
        out = F.grid_sample(w, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        return out.chunk(2, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        with torch.autocast(device_type=x.device.type, enabled=False):
            wr, wi = self.weights(size)
            y = ifft_spatial(complex_mul(fft_spatial(x), wr, wi), size)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.weight_real.shape[0]}, reference size={self.size}"

"""MedSegDiff-V1 (Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic
Model", MIDL 2023, arXiv:2211.00611).

A diffusion UNet on the noisy mask whose encoder is conditioned at every level on an image encoder
through **dynamic conditional encoding** (paper sec. 2.1), with the **FF-Parser** (sec. 2.2)
filtering the noisy-mask features in Fourier space before the fusion.

Choices where the paper leaves freedom (all documented, see :class:`DynamicConditionalEncoding`):

* The fusion updates the *noisy-mask* path, and the image encoder stays free of the timestep and of
  the mask. The paper (fig. 1) feeds the fused map back into the condition path; we keep the
  condition path image-only so it is computed once per image and cached across all sampling steps
  and ensemble members (``encode_image``), which makes sampling several times cheaper.
* The attentive fusion is ``A = GN(FF(h)) * GN(P c)`` and ``h <- h + Conv(SiLU(GN(A * P c)))``
  (``P`` a registered 1x1 projection of the image features to the mask width), i.e. the paper's
  ``LN(m_I) (x) LN(m_x)`` affinity applied to the condition features (as in lucidrains'
  ``Conditioning``). GroupNorm plays the role of LayerNorm so that it is defined for any spatial
  size and for 3-D.
* The official code adds the image bottleneck through a 1x1 convolution *created inside forward*
  (random, never trained); here :attr:`MedSegDiffV1.cond_mid_proj` is registered and trained.
* Any input size (paper-silent): the FF-Parser weights are sized for ``data.image_size`` /
  ``data.patch_size`` and resampled in normalised frequency for other sizes
  (:class:`~medsegdiff.nets.blocks.FFParser`), so a V1 trained at one size samples at any size its
  levels allow (a multiple of ``2^(levels-1)``).
* Both UNets are :class:`improved_diffusion.unet.UNetModel` (see :mod:`medsegdiff.nets.unet`); the
  image encoder is the time-free encoder half of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from improved_diffusion.nn import conv_nd, normalization
from medsegdiff.nets.blocks import FFParser
from medsegdiff.nets.unet import DiffusionUNet, NetSpec

__all__ = ["DynamicConditionalEncoding", "MedSegDiffV1"]


class DynamicConditionalEncoding(nn.Module):
    """Fuse image features ``c`` into noisy-mask features ``h`` at one scale (V1 sec. 2.1-2.2).

    ``c' = P c``; ``A = GN(FFParser(h)) * GN(c')``; ``h + Conv3(SiLU(GN(A * c')))``.

    Args:
        channels: width of ``h``.
        cond_channels: width of ``c``.
        dims: 2 or 3.
        size: reference spatial size of ``h`` (the FF-Parser's reference grid; other sizes work).
        ff_parser: use the FF-Parser (else identity).
        norm_groups: maximum GroupNorm groups.

    Shapes: ``h (B, channels, *S)``, ``c (B, cond_channels, *S)`` -> ``(B, channels, *S)``.
    """

    def __init__(
        self, channels: int, cond_channels: int, dims: int, size: Sequence[int], ff_parser: bool, norm_groups: int
    ) -> None:
        super().__init__()
        self.ff_parser = FFParser(channels, size) if ff_parser else nn.Identity()
        self.cond_proj = conv_nd(dims, cond_channels, channels, 1)
        self.norm_h = normalization(channels, norm_groups)
        self.norm_c = normalization(channels, norm_groups)
        self.out = nn.Sequential(
            normalization(channels, norm_groups), nn.SiLU(), conv_nd(dims, channels, channels, 3, padding=1)
        )

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = self.cond_proj(c)
        a = self.norm_h(self.ff_parser(h)) * self.norm_c(c)
        return h + self.out(a * c)


class MedSegDiffV1(DiffusionUNet):
    """MedSegDiff-V1 conditional UNet (see the module docstring).

    Args:
        spec: geometry and widths (:class:`~medsegdiff.nets.unet.NetSpec`).
        ff_parser: FF-Parser in every fusion (the paper's model); False is the ablation.

    Raises:
        ConfigError: an impossible geometry (size not a multiple of ``2^(levels-1)``, heads, ...).
    """

    def __init__(self, spec: NetSpec, *, ff_parser: bool = True) -> None:
        super().__init__(spec)
        self.fusions = nn.ModuleList(
            DynamicConditionalEncoding(
                spec.width(lv), spec.cond_width(lv), spec.dims, spec.level_size(lv), ff_parser, spec.norm_groups
            )
            for lv in range(spec.levels)
        )
        last = spec.levels - 1
        self.cond_mid_proj = conv_nd(spec.dims, spec.cond_width(last), spec.width(last), 1)

    def _fuse(self, level: int, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.fusions[level](h, feats[level])

    def _condition_bottleneck(
        self, h: torch.Tensor, feats: list[torch.Tensor], emb: torch.Tensor
    ) -> torch.Tensor:
        return h + self.cond_mid_proj(feats[self.spec.levels])

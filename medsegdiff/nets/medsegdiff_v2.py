"""MedSegDiff-V2 (Wu et al., "MedSegDiff-V2: Diffusion-Based Medical Image Segmentation with
Transformer", AAAI 2024, arXiv:2301.11798).

Two conditions on top of the shared diffusion UNet (:mod:`medsegdiff.nets.unet`):

* **Anchor condition** (paper sec. 3.2): a segmentation head on the image (condition) encoder
  predicts the lesion (``anchor_logits``, supervised by the trainer); its probability is smoothed
  by the **uncertain spatial attention** (U-SA) ``U = max(G_sigma * sigmoid(a), sigmoid(a))``
  (a Gaussian blur, then the element-wise max with the original, as in the paper's equation) and
  injected into the first stage of the diffusion encoder.
* **Semantic condition** (sec. 3.3): the spectrum-space transformer (**SS-Former**) aligns the
  noisy-mask bottleneck features with the image bottleneck features; each block first filters both
  with a **neural band-pass filter** (NBP-Filter) in frequency space and then cross-attends
  between the two token sets.

Choices where the paper leaves details open (configurable in :class:`~medsegdiff.config.model.ModelConfig`):

* Anchor head (sec. 3.2): an FPN-style head over every image-encoder level (1x1 lateral
  convolutions, nearest up-sampling to full size, sum, GN-SiLU-Conv3-GN-SiLU-Conv1 -> 1 logit),
  width ``anchor_channels``. The paper uses the condition model's decoder output; ours is cheaper
  and depends on the image only, so the anchor is computed once per image in ``encode_image``.
* U-SA (sec. 3.2): the Gaussian width is learnable (``usa_learnable``) with initial
  ``sigma = (usa_kernel - 1) / 4``; kernel size ``usa_kernel``; separable, zero padded, fp32.
* Anchor injection (sec. 3.2, "integrated into the first stage"): ``h <- h + W (h * U)`` right
  after the first convolution of the diffusion encoder (``W`` a 1x1 convolution).
  ``anchor_detach`` stops the diffusion gradient into the anchor head (the official code detaches).
* NBP-Filter (sec. 3.3): ``nbp_bands`` soft radial frequency bands (hat functions forming a
  partition of unity over the normalised radius) with one learnable gain per channel and band
  (initialised to 1, i.e. identity). Defined for any feature size and for 3-D (``rfftn``, fp32).
* SS-Former block (sec. 3.3): ``c <- c + XAttn(c, h); c <- c + MLP(c); h <- h + XAttn(h, c);
  h <- h + MLP(h)`` on NBP-filtered tokens (pre-LayerNorm, SDPA), ``ssformer_depth`` blocks;
  the image bottleneck is projected to the mask width by a registered 1x1 convolution. With depth 0
  the projection is added (V1-style).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from improved_diffusion.nn import conv_nd, normalization
from medsegdiff.nets.blocks import _heads_for, fft_spatial, ifft_spatial
from medsegdiff.nets.unet import DiffusionUNet, NetSpec

__all__ = [
    "AnchorHead",
    "CrossAttention",
    "MedSegDiffV2",
    "NBPFilter",
    "SSFormerBlock",
    "UncertainSpatialAttention",
]


class AnchorHead(nn.Module):
    """FPN-style segmentation head over the image-encoder features (V2 anchor, sec. 3.2).

    Shapes: the ``levels + 1`` encoder maps -> logits ``(B, 1, *S)``.
    """

    def __init__(self, spec: NetSpec, channels: int) -> None:
        super().__init__()
        d, g = spec.dims, spec.norm_groups
        widths = [spec.cond_width(lv) for lv in range(spec.levels)] + [spec.cond_width(spec.levels - 1)]
        self.factors = [2**lv for lv in range(spec.levels)] + [2 ** (spec.levels - 1)]
        self.laterals = nn.ModuleList(conv_nd(d, w, channels, 1) for w in widths)
        self.head = nn.Sequential(
            normalization(channels, g), nn.SiLU(), conv_nd(d, channels, channels, 3, padding=1),
            normalization(channels, g), nn.SiLU(), conv_nd(d, channels, 1, 1),
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        y = None
        for f, lat, factor in zip(feats, self.laterals, self.factors):
            z = lat(f)
            if factor > 1:
                z = F.interpolate(z, scale_factor=float(factor), mode="nearest")
            y = z if y is None else y + z
        return self.head(y)


class UncertainSpatialAttention(nn.Module):
    """U-SA (V2 sec. 3.2): ``max(GaussianBlur_sigma(p), p)`` for a probability map ``p``.

    Args:
        dims: 2 or 3.
        kernel: odd kernel size (1 = no blur).
        learnable: learn ``log sigma`` (else a fixed buffer).

    Shapes: ``(B, 1, *S) -> (B, 1, *S)`` in float32.
    """

    def __init__(self, dims: int, kernel: int = 5, learnable: bool = True) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"U-SA kernel must be a positive odd integer, got {kernel}")
        self.dims, self.kernel = dims, kernel
        log_sigma = torch.tensor(math.log(max(0.5, (kernel - 1) / 4)))
        if kernel > 1 and learnable:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def gaussian(self) -> torch.Tensor:
        """The normalised 1-D kernel ``(kernel,)`` for the current sigma."""
        x = torch.arange(self.kernel, dtype=torch.float32, device=self.log_sigma.device) - self.kernel // 2
        g = torch.exp(-(x**2) / (2 * torch.exp(self.log_sigma.float()) ** 2))
        return g / g.sum()

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        p = p.float()
        if self.kernel == 1:
            return p
        g = self.gaussian()
        conv = F.conv2d if self.dims == 2 else F.conv3d
        y = p
        for axis in range(self.dims):
            shape = [1, 1] + [1] * self.dims
            shape[2 + axis] = self.kernel
            pad = [0] * self.dims
            pad[axis] = self.kernel // 2
            y = conv(y, g.reshape(shape), padding=tuple(pad))
        return torch.maximum(y, p)


def _band_partition(size: Sequence[int], bands: int, device: torch.device) -> torch.Tensor:
    """Soft radial bands ``(bands, *S[:-1], S[-1]//2+1)`` summing to 1 at every frequency."""
    axes = [torch.fft.fftfreq(n, device=device) for n in size[:-1]] + [torch.fft.rfftfreq(size[-1], device=device)]
    grids = torch.meshgrid(*axes, indexing="ij")
    r = torch.sqrt(sum(gr**2 for gr in grids)) / (0.5 * math.sqrt(len(size)))  # in [0, 1]
    if bands == 1:
        return torch.ones(1, *r.shape, device=device)
    centers = torch.linspace(0, 1, bands, device=device).reshape(-1, *([1] * r.ndim))
    return torch.clamp(1 - (r[None] - centers).abs() * (bands - 1), min=0.0)


class NBPFilter(nn.Module):
    """Neural band-pass filter (V2 sec. 3.3): learnable per-channel gain of each frequency band.

    ``y = irfftn(rfftn(x) * sum_b g[c, b] * P_b(|f|))`` in float32; ``g`` starts at 1 (identity).
    Works for any spatial size (the bands are computed from the input size).

    Shapes: ``(B, C, *S) -> (B, C, *S)``.
    """

    def __init__(self, channels: int, bands: int) -> None:
        super().__init__()
        self.bands = bands
        self.gain = nn.Parameter(torch.ones(channels, bands))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        with torch.autocast(device_type=x.device.type, enabled=False):
            parts = _band_partition(size, self.bands, x.device)
            mask = torch.einsum("cb,b...->c...", self.gain.float(), parts)
            xf = torch.view_as_real(fft_spatial(x)) * mask[None, ..., None]
            y = ifft_spatial(torch.view_as_complex(xf), size)
        return y.to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head cross-attention on tokens with SDPA: ``(B, N, C), (B, M, C) -> (B, N, C)``."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.q(x).reshape(b, n, h, d).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(o)


class SSFormerBlock(nn.Module):
    """One SS-Former block (V2 sec. 3.3) on mask features ``h`` and image features ``c``.

    Shapes: ``h, c (B, C, *S)`` -> updated ``(h, c)``.
    """

    def __init__(self, channels: int, heads: int, bands: int) -> None:
        super().__init__()
        self.nbp_h = NBPFilter(channels, bands)
        self.nbp_c = NBPFilter(channels, bands)
        self.norm_c1, self.norm_h1 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.norm_c2, self.norm_h2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.norm_c3, self.norm_h3 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn_c = CrossAttention(channels, heads)
        self.attn_h = CrossAttention(channels, heads)
        self.mlp_c = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.mlp_h = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = h.shape
        ht = self.nbp_h(h).flatten(2).transpose(1, 2)
        ct = self.nbp_c(c).flatten(2).transpose(1, 2)
        ct = ct + self.attn_c(self.norm_c1(ct), self.norm_h1(ht))
        ct = ct + self.mlp_c(self.norm_c2(ct))
        ht = ht + self.attn_h(self.norm_h2(ht), self.norm_c3(ct))
        ht = ht + self.mlp_h(self.norm_h3(ht))
        return ht.transpose(1, 2).reshape(shape), ct.transpose(1, 2).reshape(shape)


class MedSegDiffV2(DiffusionUNet):
    """MedSegDiff-V2 conditional UNet (see the module docstring).

    ``encode_image`` returns the image-encoder maps followed, with the anchor enabled, by the anchor
    logits; ``anchor_logits(feats)`` returns those logits ``(B, 1, *S)``;
    ``forward(..., return_anchor=True) -> (out, anchor_logits)``.

    Args:
        spec: geometry and widths.
        anchor: anchor condition with U-SA (False: ablation, ``anchor_logits`` is None).
        anchor_channels: anchor-head width (0 = ``spec.condition_channels``).
        anchor_detach: stop the diffusion gradient into the anchor head.
        usa_kernel: U-SA Gaussian kernel size (odd).
        usa_learnable: learn the U-SA Gaussian width.
        ssformer_depth: SS-Former blocks (0: the image bottleneck is added instead).
        nbp_bands: NBP-Filter bands.

    Raises:
        ConfigError: an impossible geometry or head layout.
    """

    def __init__(
        self,
        spec: NetSpec,
        *,
        anchor: bool = True,
        anchor_channels: int = 0,
        anchor_detach: bool = False,
        usa_kernel: int = 5,
        usa_learnable: bool = True,
        ssformer_depth: int = 1,
        nbp_bands: int = 4,
    ) -> None:
        super().__init__(spec)
        d = spec.dims
        self.use_anchor = anchor
        self.anchor_detach = anchor_detach
        if anchor:
            self.anchor_head = AnchorHead(spec, anchor_channels or spec.condition_channels)
            self.usa = UncertainSpatialAttention(d, usa_kernel, usa_learnable)
            self.anchor_gate = conv_nd(d, spec.base_channels, spec.base_channels, 1)
        last = spec.levels - 1
        width = spec.width(last)
        self.cond_mid_proj = conv_nd(d, spec.cond_width(last), width, 1)
        heads = _heads_for(width, spec.num_heads, spec.num_head_channels)
        self.ssformer = nn.ModuleList(SSFormerBlock(width, heads, nbp_bands) for _ in range(ssformer_depth))

    @property
    def num_image_features(self) -> int:
        return self.spec.levels + 1 + (1 if self.use_anchor else 0)

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Image-encoder maps (``levels + 1``) and, with the anchor, its logits ``(B, 1, *S)``."""
        feats = super().encode_image(image)
        if self.use_anchor:
            feats.append(self.anchor_head(feats))
        return feats

    def anchor_logits(self, image_features: Sequence[torch.Tensor]) -> torch.Tensor | None:
        return image_features[-1] if self.use_anchor else None

    def _inject_input(self, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        if not self.use_anchor:
            return h
        logits = feats[-1].detach() if self.anchor_detach else feats[-1]
        u = self.usa(torch.sigmoid(logits.float())).to(h.dtype)
        return h + self.anchor_gate(h * u)

    def _condition_bottleneck(self, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        c = self.cond_mid_proj(feats[self.spec.levels])
        if not self.ssformer:
            return h + c
        for blk in self.ssformer:
            h, c = blk(h, c)
        return h

"""MedSegDiff-V2 (Wu et al., "MedSegDiff-V2: Diffusion-Based Medical Image Segmentation with
Transformer", AAAI 2024, arXiv:2301.11798).

Two UNets (:mod:`medsegdiff.nets.unet`): a time-free **condition model** on the image (encoder,
decoder and a segmentation head) and the **diffusion model** on the noisy mask. The condition model
conditions the diffusion model in two ways (paper sec. "Method", fig. 1):

* **Anchor condition** (sec. "Anchor Condition"). The condition model's last decoded features
  ``f_c^{-1}`` (multi-channel) feed its segmentation head, whose logits are the anchor prediction
  (:meth:`MedSegDiffV2.anchor_logits`, supervised by the anchor loss), and the **uncertain spatial
  attention** (U-SA) fuses them into the first stage ``f_d^0`` of the diffusion encoder::

      f_anc = Max(f_c^{-1} * k_Gauss(sigma), f_c^{-1})
      f_d^0' = Sigmoid(conv1x1(f_anc)) . f_d^0 + f_d^0

* **Semantic condition** (sec. "Semantic Condition"). The **SS-Former** (``ssformer_depth`` blocks
  at the deepest level) lets the noise embedding ``f_d^{-1}`` and the condition bottleneck ``c^0``
  interact: each block applies a noise->condition cross-attention, then a condition->noise one,
  whose query-key affinity is taken in Fourier space, filtered by the **NBP-Filter** (a small
  network over the frequency coordinates conditioned on the diffusion step) and transformed back.

Choices where the paper is silent (each configurable in :class:`~medsegdiff.config.model.ModelConfig`):

* Condition model (sec. "Method"): a time-free :class:`~improved_diffusion.unet.UNetModel` of the
  same depth as the diffusion UNet with width ``condition_channels`` and no attention; its head is
  the core's output head (GroupNorm - SiLU - zero-initialised 3x3 convolution -> 1 logit). It is
  image-only, so everything it computes is cached once per image (``encode_image``).
* ``f_d^0`` (sec. "Anchor Condition") is the output of the diffusion UNet's first convolution.
* U-SA (sec. "Anchor Condition"): one learnable ``sigma`` (``usa_sigma`` initial value,
  ``usa_learnable``) shared by all channels, a depthwise separable Gaussian over every spatial axis
  in float32 with replicate padding; the kernel radius is ``ceil(usa_truncate * sigma)`` for the
  current ``sigma`` (so the support grows with the sigma it learns; capped by the feature size);
  ``conv1x1`` maps ``condition_channels`` to ``base_channels``. ``anchor_detach`` stops the
  diffusion gradient into the condition decoder (the anchor is then trained by its own loss only).
* Image information at every scale (issue "V2 as published": the paper names only the first and
  the deepest stage, which left the three intermediate scales of our diffusion encoder without
  spatially aligned image information): with ``scale_fusion`` (default) the condition encoder's
  features of each level are added to the end of the matching diffusion-encoder level through a
  1x1 convolution, like V1's fusion without the FF-Parser. ``scale_fusion: false`` is the paper's
  wiring.
* SS-Former block (sec. "Semantic Condition", fig. 1b): pre-LayerNorm tokens; the condition
  bottleneck is first mapped to the noise width by a 1x1 convolution; ``c <- c + XAttn(c <- h)``,
  ``c <- c + MLP(c)``, ``h <- h + XAttn(h <- c)``, ``h <- h + MLP(h)`` (MLP ratio 4, GELU);
  the output projections of the attention and MLP residuals are zero-initialised, so each block
  starts as the identity; heads from ``num_heads`` / ``num_head_channels``. With
  ``ssformer_depth: 0`` the projected bottleneck is added instead (``h + c``, V1-style).
* Positions (paper-silent; the issue found the condition to be an unordered set without them):
  fixed sinusoidal features of the normalised coordinates (``ssformer_pos_freqs`` octaves per
  axis, defined for any size), mapped by a learned linear layer and added to the query and key
  inputs (DETR-style); ``0`` disables them (an ablation).
* Fourier-space affinity (sec. "Semantic Condition"): with ``Q = FFT(q)`` and ``K = FFT(k)`` over
  the spatial grid (orthonormal), the affinity in Fourier space is ``A^ = Q K^H / sqrt(d)``
  (per head, ``(N, M)`` frequencies), it is multiplied by the NBP filter ``W(u, w, t)`` and taken
  back to positions by the inverse transform on both axes; the real part is used (equivalent to
  filtering with the Hermitian-symmetrised ``W``). With ``W = 1`` this is exactly the spatial
  affinity ``q k^T / sqrt(d)``. Then softmax over keys and multiplication with ``v``.
* NBP-Filter (sec. "Semantic Condition", fig. 1c): ``W = 1 + Linear(SiLU(FiLM_t(SiLU(Linear([u, w])))))``
  on the normalised frequencies ``u`` (query grid) and ``w`` (key grid), ``nbp_hidden`` units,
  the time embedding of the diffusion UNet as scale/shift of the hidden layer, one gain per head.
  It is defined for any feature size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from improved_diffusion.nn import conv_nd, zero_module
from medsegdiff.nets.unet import DiffusionUNet, NetSpec

__all__ = [
    "MedSegDiffV2",
    "NBPFilter",
    "PositionalEncoding",
    "SSFormerBlock",
    "SpectralCrossAttention",
    "UncertainSpatialAttention",
]


class UncertainSpatialAttention(nn.Module):
    """U-SA (V2 sec. "Anchor Condition"): ``Sigmoid(conv1x1(Max(G_sigma * f, f))) . h + h``.

    Args:
        channels: channels of the anchor features ``f`` (``f_c^{-1}``).
        out_channels: channels of the diffusion features ``h`` (``f_d^0``).
        dims: 2 or 3.
        sigma: initial Gaussian standard deviation in pixels.
        truncate: kernel radius in standard deviations (``radius = ceil(truncate * sigma)``).
        learnable: learn ``log sigma`` (else a fixed buffer).

    Shapes: ``f (B, channels, *S)``, ``h (B, out_channels, *S)`` -> ``(B, out_channels, *S)``.

    Raises:
        ValueError: ``sigma`` or ``truncate`` is not positive.
    """

    def __init__(
        self, channels: int, out_channels: int, dims: int, sigma: float = 1.0, truncate: float = 3.0,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if sigma <= 0 or truncate <= 0:
            raise ValueError(f"U-SA: sigma ({sigma}) and truncate ({truncate}) must be positive")
        self.dims, self.truncate = dims, float(truncate)
        log_sigma = torch.tensor(math.log(sigma))
        if learnable:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        self.gate = conv_nd(dims, channels, out_channels, 1)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.float().exp()

    def radius(self, limit: int | None = None) -> int:
        """Kernel radius ``ceil(truncate * sigma)`` (at least 1), at most ``limit``."""
        r = max(1, math.ceil(self.truncate * float(self.sigma.detach())))
        return min(r, limit) if limit is not None else r

    def gaussian(self, radius: int | None = None) -> torch.Tensor:
        """The normalised 1-D kernel ``(2 radius + 1,)`` for the current sigma (differentiable)."""
        r = self.radius() if radius is None else radius
        x = torch.arange(-r, r + 1, dtype=torch.float32, device=self.log_sigma.device)
        g = torch.exp(-(x**2) / (2 * self.sigma**2))
        return g / g.sum()

    def smooth(self, f: torch.Tensor) -> torch.Tensor:
        """``Max(G_sigma * f, f)`` per channel, in float32: the paper's ``f_anc``."""
        f = f.float()
        c = f.shape[1]
        r = self.radius(max(1, max(f.shape[2:]) - 1))
        g = self.gaussian(r)
        conv = F.conv2d if self.dims == 2 else F.conv3d
        y = f
        for axis in range(self.dims):
            shape = [1, 1] + [1] * self.dims
            shape[2 + axis] = 2 * r + 1
            kernel = g.reshape(shape).expand(c, *shape[1:])
            pad = [0, 0] * self.dims  # F.pad order: last axis first
            pad[2 * (self.dims - 1 - axis)] = pad[2 * (self.dims - 1 - axis) + 1] = r
            y = conv(F.pad(y, pad, mode="replicate"), kernel, groups=c)
        return torch.maximum(y, f)

    def forward(self, f: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=f.device.type, enabled=False):
            f_anc = self.smooth(f)
        gate = torch.sigmoid(self.gate(f_anc.to(h.dtype)))
        return gate * h + h


class PositionalEncoding(nn.Module):
    """Learned projection of sinusoidal features of normalised grid coordinates.

    Coordinate ``x = (i + 0.5) / n`` per axis (so the encoding is defined for any size);
    features ``sin(2^k pi x), cos(2^k pi x)`` for ``k < freqs``.

    Shapes: ``size`` -> ``(N, channels)`` with ``N = prod(size)``.
    """

    def __init__(self, channels: int, dims: int, freqs: int) -> None:
        super().__init__()
        self.freqs = freqs
        self.proj = nn.Linear(2 * freqs * dims, channels)

    def forward(self, size: Sequence[int], device: torch.device) -> torch.Tensor:
        axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in size]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(size))
        angles = coords[..., None] * (math.pi * 2.0 ** torch.arange(self.freqs, device=device))
        feats = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(coords.shape[0], -1)
        return self.proj(feats.to(self.proj.weight.dtype))


def _frequencies(size: Sequence[int], device: torch.device) -> torch.Tensor:
    """Normalised FFT frequencies of every grid point ``(N, dims)`` in ``fftn`` order."""
    axes = [torch.fft.fftfreq(n, device=device) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(size))


class NBPFilter(nn.Module):
    """Neural band-pass filter (V2 sec. "Semantic Condition"): ``W(u, w, t)`` per head.

    ``W = 1 + out(SiLU(z * (1 + scale_t) + shift_t))`` with ``z = SiLU(coord([u, w]))`` over every
    pair of normalised frequencies ``u`` (query grid) and ``w`` (key grid), and
    ``(scale_t, shift_t) = time(SiLU(emb))`` from the diffusion time embedding.

    Args:
        dims: spatial dimensions of the token grid.
        heads: attention heads (one gain each).
        emb_channels: width of the time embedding.
        hidden: hidden units.

    Shapes: ``size``, ``emb (B, emb_channels)`` -> ``(B, heads, N, N)`` with ``N = prod(size)``.
    """

    def __init__(self, dims: int, heads: int, emb_channels: int, hidden: int) -> None:
        super().__init__()
        self.coord = nn.Linear(2 * dims, hidden)
        self.time = nn.Linear(emb_channels, 2 * hidden)
        self.out = nn.Linear(hidden, heads)

    def forward(self, size: Sequence[int], emb: torch.Tensor) -> torch.Tensor:
        f = _frequencies(size, emb.device)
        n = f.shape[0]
        pairs = torch.cat([f[:, None].expand(n, n, -1), f[None].expand(n, n, -1)], dim=-1)
        z = F.silu(self.coord(pairs))  # (N, N, hidden), the same for the whole batch
        scale, shift = self.time(F.silu(emb.float())).chunk(2, dim=-1)
        z = F.silu(z[None] * (1 + scale[:, None, None]) + shift[:, None, None])
        return (1 + self.out(z)).permute(0, 3, 1, 2)


class SpectralCrossAttention(nn.Module):
    """Cross-attention whose query-key affinity is filtered in Fourier space by the NBP-Filter.

    ``A = Re(F^H (W . (FFT(q) FFT(k)^H)) F) / sqrt(d)``, ``out = proj(softmax(A) v)``; queries
    come from ``x``, keys and values from ``ctx``; both live on the same grid ``size``. ``pos`` is
    added to the query and key inputs. ``proj`` is zero-initialised.

    Shapes: ``x, ctx (B, N, C)``, ``pos (N, C)``, ``emb (B, E)`` -> ``(B, N, C)``.
    """

    def __init__(self, channels: int, heads: int, dims: int, emb_channels: int, nbp_hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.nbp = NBPFilter(dims, heads, emb_channels, nbp_hidden)
        self.proj = zero_module(nn.Linear(channels, channels))

    @staticmethod
    def affinity(q: torch.Tensor, k: torch.Tensor, size: Sequence[int], w: torch.Tensor | None) -> torch.Tensor:
        """Affinity ``(B, heads, N, N)`` of ``q, k (B, heads, N, d)`` filtered by ``w`` in Fourier space.

        ``w (B, heads, N, N)`` multiplies ``FFT(q) FFT(k)^H`` (frequencies of the grid ``size`` in
        ``fftn`` order); ``None`` is the identity filter, giving ``q k^T / sqrt(d)``.
        """
        b, h, n, d = q.shape
        dims = len(size)
        grid = (b, h, *size, d)
        axes = tuple(range(2, 2 + dims))
        with torch.autocast(device_type=q.device.type, enabled=False):
            qf = torch.fft.fftn(q.float().reshape(grid), dim=axes, norm="ortho").reshape(b, h, n, d)
            kf = torch.fft.fftn(k.float().reshape(grid), dim=axes, norm="ortho").reshape(b, h, n, d)
            a = qf @ kf.conj().transpose(-1, -2)
            if w is not None:
                a = a * w.float()
            a = a.reshape(b, h, *size, *size)
            a = torch.fft.ifftn(a, dim=axes, norm="ortho")  # query frequencies -> positions
            a = torch.fft.fftn(a, dim=tuple(range(2 + dims, 2 + 2 * dims)), norm="ortho")  # keys
            return a.real.reshape(b, h, n, n) / math.sqrt(d)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor | None, size: Sequence[int], emb: torch.Tensor
    ) -> torch.Tensor:
        b, n, c = x.shape
        xq, xk = (x, ctx) if pos is None else (x + pos, ctx + pos)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q(xq)), split(self.k(xk)), split(self.v(ctx))
        attn = torch.softmax(self.affinity(q, k, size, self.nbp(size, emb)), dim=-1).to(v.dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def _mlp(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), zero_module(nn.Linear(4 * channels, channels)))


class SSFormerBlock(nn.Module):
    """One SS-Former block (V2 sec. "Semantic Condition"): noise->condition, then condition->noise.

    Args:
        channels: width of both token sets.
        heads: attention heads.
        dims: spatial dimensions.
        emb_channels: time-embedding width (for the NBP-Filter).
        nbp_hidden: hidden units of the NBP-Filter.
        pos_freqs: octaves of the positional encoding (0 = none).

    Shapes: ``h, c (B, C, *S)``, ``emb (B, E)`` -> updated ``(h, c)``.
    """

    def __init__(
        self, channels: int, heads: int, dims: int, emb_channels: int, nbp_hidden: int, pos_freqs: int
    ) -> None:
        super().__init__()
        self.pos = PositionalEncoding(channels, dims, pos_freqs) if pos_freqs > 0 else None
        self.norm_c1, self.norm_h1 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.norm_c2, self.norm_h2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.norm_c3, self.norm_h3 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn_c = SpectralCrossAttention(channels, heads, dims, emb_channels, nbp_hidden)
        self.attn_h = SpectralCrossAttention(channels, heads, dims, emb_channels, nbp_hidden)
        self.mlp_c = _mlp(channels)
        self.mlp_h = _mlp(channels)

    def forward(self, h: torch.Tensor, c: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, size = h.shape, tuple(h.shape[2:])
        pos = self.pos(size, h.device).to(h.dtype) if self.pos is not None else None
        ht = h.flatten(2).transpose(1, 2)
        ct = c.flatten(2).transpose(1, 2)
        ct = ct + self.attn_c(self.norm_c1(ct), self.norm_h1(ht), pos, size, emb)  # noise -> condition
        ct = ct + self.mlp_c(self.norm_c2(ct))
        ht = ht + self.attn_h(self.norm_h2(ht), self.norm_c3(ct), pos, size, emb)  # condition -> noise
        ht = ht + self.mlp_h(self.norm_h3(ht))
        return ht.transpose(1, 2).reshape(shape), ct.transpose(1, 2).reshape(shape)


class MedSegDiffV2(DiffusionUNet):
    """MedSegDiff-V2 conditional UNet (see the module docstring).

    ``encode_image`` returns the condition encoder's level features and bottleneck, then, with the
    anchor, ``f_c^{-1}`` and the anchor logits; ``anchor_logits(feats)`` returns those logits
    ``(B, 1, *S)``; ``forward(..., return_anchor=True) -> (out, anchor_logits)``.

    Ablation switches: ``anchor`` (anchor condition + U-SA) and ``ssformer_depth`` (0 = no
    SS-Former, the bottleneck is added): anchor only = ``anchor=True, ssformer_depth=0``;
    SS-Former only = ``anchor=False``; both = the defaults.

    Args:
        spec: geometry and widths.
        anchor: anchor condition with U-SA (False: ``anchor_logits`` is None, no condition decoder).
        anchor_detach: stop the diffusion gradient into the condition decoder.
        usa_sigma: initial U-SA Gaussian sigma (pixels).
        usa_truncate: U-SA kernel radius in sigmas.
        usa_learnable: learn the U-SA sigma.
        ssformer_depth: SS-Former blocks (0: the image bottleneck is added instead).
        nbp_hidden: hidden units of the NBP-Filter.
        pos_freqs: positional-encoding octaves in the SS-Former (0 = none).
        scale_fusion: add the condition encoder's features at every diffusion-encoder level.

    Raises:
        ConfigError: an impossible geometry or head layout.
    """

    def __init__(
        self,
        spec: NetSpec,
        *,
        anchor: bool = True,
        anchor_detach: bool = False,
        usa_sigma: float = 1.0,
        usa_truncate: float = 3.0,
        usa_learnable: bool = True,
        ssformer_depth: int = 1,
        nbp_hidden: int = 16,
        pos_freqs: int = 4,
        scale_fusion: bool = True,
    ) -> None:
        super().__init__(spec, condition_decoder=anchor)
        d = spec.dims
        self.use_anchor = anchor
        self.anchor_detach = anchor_detach
        if anchor:
            self.usa = UncertainSpatialAttention(
                self.condition.decoder_channels, spec.base_channels, d, usa_sigma, usa_truncate, usa_learnable
            )
        self.scale_fusions = (
            nn.ModuleList(conv_nd(d, spec.cond_width(lv), spec.width(lv), 1) for lv in range(spec.levels))
            if scale_fusion else None
        )
        last = spec.levels - 1
        width = spec.width(last)
        self.cond_mid_proj = conv_nd(d, spec.cond_width(last), width, 1)
        heads = spec.heads(width)
        emb_ch = 4 * spec.base_channels
        self.ssformer = nn.ModuleList(
            SSFormerBlock(width, heads, d, emb_ch, nbp_hidden, pos_freqs) for _ in range(ssformer_depth)
        )

    @property
    def num_image_features(self) -> int:
        return self.spec.levels + 1 + (2 if self.use_anchor else 0)

    def _decode_condition(self, mid: torch.Tensor, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.use_anchor:
            return []
        f_last = self.condition.decode(mid, hs, None)  # f_c^{-1}
        return [f_last, self.condition.out(f_last)]

    def anchor_logits(self, image_features: Sequence[torch.Tensor]) -> torch.Tensor | None:
        return image_features[-1] if self.use_anchor else None

    def _inject_input(self, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        if not self.use_anchor:
            return h
        f_last = feats[-2].detach() if self.anchor_detach else feats[-2]
        return self.usa(f_last, h)

    def _fuse(self, level: int, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.scale_fusions is None:
            return h
        return h + self.scale_fusions[level](feats[level])

    def _condition_bottleneck(
        self, h: torch.Tensor, feats: list[torch.Tensor], emb: torch.Tensor
    ) -> torch.Tensor:
        c = self.cond_mid_proj(feats[self.spec.levels])
        if not self.ssformer:
            return h + c
        for blk in self.ssformer:
            h, c = blk(h, c, emb)
        return h

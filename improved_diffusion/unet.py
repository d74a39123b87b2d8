"""The ADM-style diffusion UNet with the upstream constructor and class names.

Provenance: API of ``improved_diffusion/unet.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``), with two fixes known from
``openai/guided-diffusion@22e0df8`` (same licence). Written anew from the architecture described
in Ho et al. 2020 (App. B), iDDPM (arXiv:2102.09672, Sec. 2.4/App. A) and Dhariwal & Nichol 2021.

Local changes:

* attention uses ``torch.nn.functional.scaled_dot_product_attention`` (memory-efficient / flash
  kernels; same result as the explicit softmax, with heads split before q/k/v as upstream, so
  state dicts keep their layout);
* ``Downsample(use_conv=False)`` builds a proper average pooling (upstream passed the stride where
  the dimension count was expected; guided-diffusion fix);
* the output convolution takes the channel count of the last decoder block (upstream used
  ``model_channels``, wrong when ``channel_mult[0] != 1``; guided-diffusion fix);
* ``Upsample``/``Downsample`` for ``dims=3`` act on the inner two dimensions by default as upstream;
  ``resample_depth=True`` also resamples the first spatial dimension;
* no fp16 conversion helpers (use ``torch.autocast``); no ``SuperResModel``;
* GroupNorm layers use :func:`improved_diffusion.nn.normalization` (32 groups when the width allows).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from improved_diffusion.nn import (
    SiLU,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

__all__ = [
    "AttentionBlock",
    "Downsample",
    "QKVAttention",
    "ResBlock",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
]


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """Apply the module to ``x`` given the timestep embedding ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the embedding to the children that take one.

    ``emb`` may be None for time-free stacks (e.g. an image encoder built from time-free blocks).
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def _resample_factor(dims: int, resample_depth: bool) -> int | tuple[int, int, int]:
    return (1, 2, 2) if dims == 3 and not resample_depth else 2


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    Args:
        channels: input (and output) channels.
        use_conv: add a convolution after upsampling.
        dims: 1, 2 or 3. With 3, only the inner two dimensions are upsampled unless
            ``resample_depth``.

    Raises:
        ValueError: the input does not have ``channels`` channels.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, resample_depth: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        self.factor = _resample_factor(dims, resample_depth)
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        x = F.interpolate(x, scale_factor=self.factor, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 convolution or an average pooling.

    Args:
        channels: input (and output) channels.
        use_conv: strided convolution (True) or average pooling (False).
        dims: 1, 2 or 3. With 3, only the inner two dimensions are downsampled unless
            ``resample_depth``.

    Raises:
        ValueError: the input does not have ``channels`` channels.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, resample_depth: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        stride = _resample_factor(dims, resample_depth)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (ADM).

    ``h = conv(SiLU(norm(x)))``; the embedding is added (or, with ``use_scale_shift_norm``, applied
    as ``norm(h) * (1 + scale) + shift``); then ``conv(dropout(SiLU(h)))`` with the last
    convolution zero-initialised; the skip is identity, a 3x3 (``use_conv``) or a 1x1 convolution.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.ndim - emb_out.ndim))
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Scaled dot-product attention over a packed ``(B * heads, 3 * ch, T)`` tensor.

    The packed channels are ``[q | k | v]`` per head (heads split before q/k/v, as upstream).
    Computed with ``F.scaled_dot_product_attention`` (softmax of ``q^T k / sqrt(ch)``).
    """

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """``(N, 3 * ch, T) -> (N, ch, T)``."""
        ch = qkv.shape[1] // 3
        q, k, v = torch.split(qkv, ch, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )  # (N, T, ch)
        return out.transpose(1, 2)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    Raises:
        ValueError: ``channels`` not divisible by ``num_heads``.
    """

    def __init__(self, channels: int, num_heads: int = 1, use_checkpoint: bool = False) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by {num_heads} heads")
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention()
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        qkv = qkv.reshape(b * self.num_heads, -1, qkv.shape[2])
        h = self.attention(qkv).reshape(b, -1, qkv.shape[-1])
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The iDDPM/ADM UNet with timestep embedding, residual blocks and attention.

    Args:
        in_channels: input channels.
        model_channels: base width.
        out_channels: output channels (``2 * in_channels`` with a learned variance).
        num_res_blocks: residual blocks per level.
        attention_resolutions: downsample factors (1, 2, 4, ...) that get attention.
        dropout: dropout probability in the residual blocks.
        channel_mult: width multiplier per level.
        conv_resample: learned (convolutional) up/downsampling.
        dims: 1, 2 or 3 (3: only the inner two dimensions are resampled unless ``resample_depth``).
        num_classes: class-conditional with this many classes (``y`` required in ``forward``).
        use_checkpoint: activation checkpointing (training memory for compute).
        num_heads: attention heads in the encoder and middle.
        num_heads_upsample: heads in the decoder (-1 = ``num_heads``).
        use_scale_shift_norm: FiLM-like conditioning of the residual blocks.
        resample_depth: with ``dims=3``, also resample the first spatial dimension.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resample_depth: bool = False,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, use_checkpoint=use_checkpoint))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(
                    TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims, resample_depth=resample_depth))
                )
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res(ch, ch), AttentionBlock(ch, num_heads=num_heads, use_checkpoint=use_checkpoint), res(ch, ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, use_checkpoint=use_checkpoint))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims, resample_depth=resample_depth))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), SiLU(), zero_module(conv_nd(dims, ch, out_channels, 3, padding=1))
        )

    def _embed(self, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels) if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            if y.shape != (timesteps.shape[0],):
                raise ValueError(f"y must have shape ({timesteps.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, in_channels, *S)``, ``(B,)`` timesteps (int or float) -> ``(B, out_channels, *S)``.

        Raises:
            ValueError: ``y`` given to an unconditional model or missing for a conditional one.
        """
        emb = self._embed(timesteps, y)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))

    def get_feature_vectors(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """Intermediate activations: ``{"down": [...], "middle": tensor, "up": [...]}``."""
        emb = self._embed(timesteps, y)
        hs: list[torch.Tensor] = []
        result: dict[str, list[torch.Tensor] | torch.Tensor] = {"down": [], "up": []}
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
            result["down"].append(h)  # type: ignore[union-attr]
        h = self.middle_block(h, emb)
        result["middle"] = h
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
            result["up"].append(h)  # type: ignore[union-attr]
        return result


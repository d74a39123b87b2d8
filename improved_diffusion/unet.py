"""The ADM-style diffusion UNet with the upstream constructor and class names.

Provenance: API of ``improved_diffusion/unet.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``), with fixes and argument names
known from ``openai/guided-diffusion@22e0df8`` (same licence). Written anew from the architecture
described in Ho et al. 2020 (App. B), iDDPM (arXiv:2102.09672, Sec. 2.4/App. A) and Dhariwal &
Nichol 2021. Upstream names, argument order, defaults and semantics are kept; every extension
below is off (or equal to upstream) by default.

Local changes:

* attention uses ``torch.nn.functional.scaled_dot_product_attention`` (memory-efficient / flash
  kernels; same result as the explicit softmax, with heads split before q/k/v as upstream, so
  state dicts keep their layout);
* ``Downsample(use_conv=False)`` builds a proper average pooling (upstream passed the stride where
  the dimension count was expected; guided-diffusion fix);
* the output convolution takes the channel count of the last decoder block (upstream used
  ``model_channels``, wrong when ``channel_mult[0] != 1``; guided-diffusion fix);
* ``Upsample``/``Downsample`` for ``dims=3`` act on the inner two dimensions by default as upstream;
  ``resample_depth=True`` also resamples the first spatial dimension (full 3-D);
* ``Upsample``/``Downsample`` take ``out_channels`` (guided-diffusion's name): a channel-changing
  resampling (convolutional only);
* ``ResBlock(emb_channels=None)`` is a time-free block (no ``emb_layers``; ``forward(x)``), for
  image encoders whose output must not depend on the timestep; ``UNetModel(timestep_conditioned=False)``
  builds a whole time-free UNet (no ``time_embed``; ``forward(x)``);
* ``norm_groups`` (``ResBlock``, ``AttentionBlock``, ``UNetModel``): the maximum GroupNorm group
  count (default 32 = upstream), see :func:`improved_diffusion.nn.normalization`;
* ``num_head_channels`` (``AttentionBlock``, ``UNetModel``; guided-diffusion's name): a fixed width
  per head instead of a fixed head count (-1 = use ``num_heads``, upstream);
* ``UNetModel(mid_attention=False)`` drops the middle attention; ``encoder_only=True`` builds the
  encoder and middle block only (no decoder, no output head);
* ``UNetModel.encode`` / ``decode`` expose the two halves of ``forward`` (``hooks`` may modify the
  output of chosen ``input_blocks``, ``level_ends`` names the last block of each level), so that
  conditional networks reuse this skeleton instead of copying it;
* the sinusoidal timestep embedding is cast to the time MLP's dtype;
* no fp16 conversion helpers (use ``torch.autocast``); no ``SuperResModel``;
* GroupNorm layers use :func:`improved_diffusion.nn.normalization` (32 groups when the width allows).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence

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
    "attention_heads",
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


class _Resample(nn.Module):
    """Common arguments and checks of :class:`Upsample` and :class:`Downsample`.

    Raises:
        ValueError: ``out_channels != channels`` without ``use_conv``.
    """

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, *,
        resample_depth: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        self.factor = _resample_factor(dims, resample_depth)
        if not use_conv and self.out_channels != channels:
            raise ValueError(
                f"{type(self).__name__}: {channels} -> {self.out_channels} channels needs use_conv=True"
            )
        self._build()

    def _build(self) -> None:
        """Create the layers (called at the end of ``__init__``)."""

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects {self.channels} channels, got {x.shape[1]}")


class Upsample(_Resample):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    Args:
        channels: input channels.
        use_conv: add a convolution after upsampling.
        dims: 1, 2 or 3. With 3, only the inner two dimensions are upsampled unless
            ``resample_depth``.
        out_channels: output channels (default ``channels``); a different width needs ``use_conv``.
        resample_depth: with ``dims=3``, also upsample the first spatial dimension.

    Raises:
        ValueError: ``out_channels != channels`` without ``use_conv``; at call time, the input
            does not have ``channels`` channels.
    """

    def _build(self) -> None:
        if self.use_conv:
            self.conv = conv_nd(self.dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = F.interpolate(x, scale_factor=self.factor, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(_Resample):
    """2x downsampling: a strided 3x3 convolution (``use_conv``) or an average pooling.

    The arguments and errors are those of :class:`Upsample`, with down- for upsampling (with
    ``dims=3`` the depth is downsampled only with ``resample_depth``).
    """

    def _build(self) -> None:
        if self.use_conv:
            self.op = conv_nd(self.dims, self.channels, self.out_channels, 3, stride=self.factor, padding=1)
        else:
            self.op = avg_pool_nd(self.dims, kernel_size=self.factor, stride=self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (ADM), or time-free.

    ``h = conv(SiLU(norm(x)))``; the embedding is added (or, with ``use_scale_shift_norm``, applied
    as ``norm(h) * (1 + scale) + shift``); then ``conv(dropout(SiLU(h)))`` with the last
    convolution zero-initialised; the skip is identity, a 3x3 (``use_conv``) or a 1x1 convolution.
    With ``emb_channels=None`` there is no embedding (``h = out_layers(h)``) and ``forward(x)``.

    Args:
        channels: input channels.
        emb_channels: timestep-embedding width, or None for a time-free block.
        dropout: dropout probability.
        out_channels: output channels (default ``channels``).
        use_conv: 3x3 instead of 1x1 skip convolution when the width changes.
        use_scale_shift_norm: FiLM-like conditioning (ignored without an embedding).
        dims: 1, 2 or 3.
        use_checkpoint: activation checkpointing.
        norm_groups: maximum GroupNorm groups (32 = upstream).

    Shapes: ``x (B, channels, *S)``, ``emb (B, emb_channels)`` -> ``(B, out_channels, *S)``.

    Raises:
        ValueError: at call time, a block with an embedding is called without one.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int | None,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm and emb_channels is not None

        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups),
            SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        if emb_channels is not None:
            self.emb_layers: nn.Module | None = nn.Sequential(
                SiLU(),
                linear(emb_channels, 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels),
            )
        else:
            self.emb_layers = None
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_groups),
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

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.in_layers(x)
        if self.emb_layers is None:
            h = self.out_layers(h)
        elif emb is None:
            raise ValueError("ResBlock built with a timestep embedding was called without one")
        else:
            emb_out = self.emb_layers(emb).type(h.dtype)
            emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.ndim - emb_out.ndim))
            if self.use_scale_shift_norm:
                norm, rest = self.out_layers[0], self.out_layers[1:]
                scale, shift = torch.chunk(emb_out, 2, dim=1)
                h = rest(norm(h) * (1 + scale) + shift)
            else:
                h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def attention_heads(channels: int, num_heads: int = 1, num_head_channels: int = -1) -> int:
    """Number of attention heads for ``channels`` (``num_head_channels`` wins unless it is -1).

    Raises:
        ValueError: the head count or width does not divide ``channels``.
    """
    if num_head_channels != -1:
        if num_head_channels < 1 or channels % num_head_channels:
            raise ValueError(
                f"AttentionBlock: {channels} channels are not divisible by num_head_channels {num_head_channels}"
            )
        return channels // num_head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"AttentionBlock: {channels} channels are not divisible by {num_heads} heads")
    return num_heads


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

    Args:
        channels: input (and output) channels.
        num_heads: attention heads (used when ``num_head_channels`` is -1).
        use_checkpoint: activation checkpointing.
        num_head_channels: channels per head; -1 = use ``num_heads`` (upstream).
        norm_groups: maximum GroupNorm groups (32 = upstream).

    Shapes: ``(B, channels, *S) -> (B, channels, *S)``; ``proj_out`` is zero-initialised.

    Raises:
        ValueError: the head layout does not divide ``channels`` (:func:`attention_heads`).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        use_checkpoint: bool = False,
        num_head_channels: int = -1,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.num_heads = attention_heads(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, norm_groups)
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


Hooks = Mapping[int, Callable[[torch.Tensor], torch.Tensor]]


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
        num_head_channels: channels per attention head (-1 = use the head counts).
        norm_groups: maximum GroupNorm groups (32 = upstream).
        mid_attention: attention in the middle block (upstream: always).
        timestep_conditioned: False builds time-free blocks and no ``time_embed``; then
            ``forward(x)`` takes no timesteps.
        encoder_only: build ``input_blocks`` and ``middle_block`` only (no decoder, no ``out``).

    Attributes:
        level_ends: index in ``input_blocks`` of the last block of each level (before its
            downsampling), for :meth:`encode` hooks.

    Raises:
        ValueError: a class-conditional model without timestep conditioning, or a head layout
            that does not divide a width.
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
        num_head_channels: int = -1,
        norm_groups: int = 32,
        mid_attention: bool = True,
        timestep_conditioned: bool = True,
        encoder_only: bool = False,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_classes is not None and not timestep_conditioned:
            raise ValueError("UNetModel: class conditioning needs timestep_conditioned=True")
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
        self.timestep_conditioned = timestep_conditioned

        time_embed_dim: int | None = None
        if timestep_conditioned:
            time_embed_dim = model_channels * 4
            self.time_embed = nn.Sequential(
                linear(model_channels, time_embed_dim), SiLU(), linear(time_embed_dim, time_embed_dim)
            )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)  # type: ignore[arg-type]

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                            norm_groups=norm_groups)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=heads, use_checkpoint=use_checkpoint,
                                  num_head_channels=num_head_channels, norm_groups=norm_groups)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        level_ends: list[int] = []
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            level_ends.append(len(self.input_blocks) - 1)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(
                    TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims, resample_depth=resample_depth))
                )
                input_block_chans.append(ch)
                ds *= 2
        self.level_ends = tuple(level_ends)

        middle: list[nn.Module] = [res(ch, ch)]
        if mid_attention:
            middle.append(attn(ch, num_heads))
        middle.append(res(ch, ch))
        self.middle_block = TimestepEmbedSequential(*middle)
        self.middle_channels = ch
        if encoder_only:
            return

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims, resample_depth=resample_depth))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.decoder_channels = ch

        self.out = nn.Sequential(
            normalization(ch, norm_groups), SiLU(), zero_module(conv_nd(dims, ch, out_channels, 3, padding=1))
        )

    def _embed(self, timesteps: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels) if and only if the model is class-conditional")
        if not self.timestep_conditioned:
            return None
        if timesteps is None:
            raise ValueError("this UNetModel is timestep-conditioned: pass timesteps")
        emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb)
        if y is not None:
            if y.shape != (timesteps.shape[0],):
                raise ValueError(f"y must have shape ({timesteps.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        return emb

    def encode(
        self, x: torch.Tensor, emb: torch.Tensor | None, hooks: Hooks | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``input_blocks``: ``(last output, every block's output for the skip connections)``.

        Args:
            x: ``(B, in_channels, *S)``.
            emb: the timestep embedding (None for a time-free model).
            hooks: ``{block index: fn}``; ``fn`` replaces that block's output (before it is kept
                as a skip connection), e.g. to fuse a condition at the end of a level
                (``level_ends``).
        """
        hs = []
        h = x
        for i, module in enumerate(self.input_blocks):
            h = module(h, emb)
            if hooks is not None and i in hooks:
                h = hooks[i](h)
            hs.append(h)
        return h, hs

    def decode(
        self, h: torch.Tensor, hs: Sequence[torch.Tensor], emb: torch.Tensor | None,
        collect: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run ``output_blocks`` on the middle output ``h`` with the skips ``hs`` (not modified).

        Returns the last decoder features ``(B, decoder_channels, *S)`` (the input of ``out``);
        ``collect`` receives every block's output.
        """
        skips = list(hs)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            if collect is not None:
                collect.append(h)
        return h

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, in_channels, *S)``, ``(B,)`` timesteps (int or float) -> ``(B, out_channels, *S)``.

        Raises:
            ValueError: ``y`` given to an unconditional model or missing for a conditional one;
                no timesteps for a timestep-conditioned model.
        """
        emb = self._embed(timesteps, y)
        h, hs = self.encode(x, emb)
        h = self.middle_block(h, emb)
        return self.out(self.decode(h, hs, emb).type(x.dtype))

    def get_feature_vectors(
        self, x: torch.Tensor, timesteps: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """Intermediate activations: ``{"down": [...], "middle": tensor, "up": [...]}``."""
        emb = self._embed(timesteps, y)
        h, hs = self.encode(x, emb)
        h = self.middle_block(h, emb)
        up: list[torch.Tensor] = []
        self.decode(h, hs, emb, collect=up)
        return {"down": hs, "middle": h, "up": up}

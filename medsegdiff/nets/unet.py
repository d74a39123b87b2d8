"""The conditional diffusion UNet shared by MedSegDiff-V1 and -V2.

Structure (one code path for 2-D and 3-D):

* an **image (condition) encoder** (:class:`ConditionEncoder`): time-free residual levels, so its
  output depends on the image only and is computed once per image (:meth:`DiffusionUNet.encode_image`)
  and reused at every sampling step (``forward(..., image_features=feats)``);
* a **noisy-mask encoder**: ADM levels (residual blocks with the time embedding, optional attention,
  stride-2 down-sampling) with hooks where V1/V2 inject the condition;
* a **bottleneck** (hook, then ResBlock - attention - ResBlock) and an ADM **decoder** with skip
  connections; the output is ``out_channels`` (1 = epsilon or x0, 2 = with learned variance).

Subclasses implement ``_inject_input`` (after the first convolution), ``_fuse`` (end of each encoder
level), ``_condition_bottleneck`` and may extend ``encode_image``.

Every layer is registered in ``__init__``; :class:`NetSpec` checks sizes and channel counts when the
model is built and :meth:`DiffusionUNet._check_inputs` again on every forward, with messages that
say what is wrong and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from improved_diffusion.nn import conv_nd, normalization, timestep_embedding, zero_module
from medsegdiff.errors import ConfigError
from medsegdiff.nets.blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepSequential,
    Upsample,
    _heads_for,
    check_spatial_size,
)

__all__ = ["ConditionEncoder", "DiffusionUNet", "NetSpec"]


@dataclass(frozen=True)
class NetSpec:
    """Geometry and widths of a diffusion UNet, validated on construction.

    Attributes:
        dims: 2 or 3 spatial dimensions.
        size: spatial size the model is built for, ``(H, W)`` or ``(D, H, W)``.
        in_channels: image channels ``C_in = modalities x (1 + 2 x context_slices)``.
        out_channels: 1 (epsilon or x0) or 2 (with learned variance).
        mask_channels: channels of the noisy mask ``x_t`` (1).
        base_channels: width of level 0 of the noisy-mask UNet.
        condition_channels: width of level 0 of the image encoder.
        channel_mult: width multiplier per level; ``len - 1`` down-samplings by 2.
        num_res_blocks: residual blocks per encoder level.
        attention_factors: down-sample factors (1, 2, 4, ...) whose level has self-attention.
        mid_attention: self-attention in the bottleneck.
        num_heads / num_head_channels: attention head layout (``num_head_channels`` wins if not -1).
        dropout: dropout in the residual blocks.
        norm_groups: maximum GroupNorm groups.
        use_scale_shift_norm: time embedding as GroupNorm scale/shift.
        use_checkpoint: activation checkpointing.
        name: model name used in messages.
    """

    dims: int
    size: tuple[int, ...]
    in_channels: int
    out_channels: int = 1
    mask_channels: int = 1
    base_channels: int = 32
    condition_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_factors: tuple[int, ...] = ()
    mid_attention: bool = True
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.0
    norm_groups: int = 32
    use_scale_shift_norm: bool = True
    use_checkpoint: bool = False
    name: str = "model"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_factors", tuple(int(f) for f in self.attention_factors))
        self.validate()

    @classmethod
    def from_config(
        cls, model_cfg, *, in_channels: int, size: Sequence[int], dims: int, out_channels: int
    ) -> NetSpec:
        """Spec from a :class:`~medsegdiff.config.model.ModelConfig` and the data geometry."""
        return cls(
            dims=dims,
            size=tuple(size),
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=model_cfg.base_channels,
            condition_channels=model_cfg.condition_channels or model_cfg.base_channels,
            channel_mult=tuple(model_cfg.channel_mult),
            num_res_blocks=model_cfg.num_res_blocks,
            attention_factors=tuple(model_cfg.attention_resolutions),
            mid_attention=model_cfg.mid_attention,
            num_heads=model_cfg.num_heads,
            num_head_channels=model_cfg.num_head_channels,
            dropout=model_cfg.dropout,
            norm_groups=model_cfg.norm_groups,
            use_scale_shift_norm=model_cfg.use_scale_shift_norm,
            use_checkpoint=model_cfg.use_checkpoint,
            name=model_cfg.name,
        )

    # -- derived geometry -------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def width(self, level: int) -> int:
        return self.base_channels * self.channel_mult[level]

    def cond_width(self, level: int) -> int:
        return self.condition_channels * self.channel_mult[level]

    def level_size(self, level: int, size: Sequence[int] | None = None) -> tuple[int, ...]:
        f = 2**level
        return tuple(s // f for s in (size or self.size))

    def has_attention(self, level: int) -> bool:
        return 2**level in self.attention_factors

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an impossible geometry (called on construction)."""
        n = self.name
        if self.dims not in (2, 3):
            raise ConfigError(f"{n}: data.dims {self.dims} is not supported; allowed: 2 or 3")
        if len(self.size) != self.dims:
            raise ConfigError(f"{n}: spatial size {self.size} has {len(self.size)} sides but dims = {self.dims}")
        if self.in_channels < 1:
            raise ConfigError(
                f"{n}: {self.in_channels} image channels; need >= 1 (data.modalities x (1 + 2 x context_slices))"
            )
        if self.out_channels not in (1, 2):
            raise ConfigError(f"{n}: out_channels {self.out_channels}; allowed: 1, or 2 with learned sigma")
        if self.mask_channels < 1:
            raise ConfigError(f"{n}: mask_channels {self.mask_channels}; need >= 1")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"config key 'model.channel_mult': got {list(self.channel_mult)}; allowed: positive integers")
        check_spatial_size(self.size, self.levels, f"{n}", self.channel_mult)
        allowed = [2**k for k in range(self.levels)]
        for f in self.attention_factors:
            if f not in allowed:
                raise ConfigError(
                    f"config key 'model.attention_resolutions': got {list(self.attention_factors)}; "
                    f"allowed: downsample factors from {allowed} for channel_mult {list(self.channel_mult)}"
                )
        widths = [self.width(lv) for lv in range(self.levels) if self.has_attention(lv)]
        if self.mid_attention:
            widths.append(self.width(self.levels - 1))
        for w in widths:
            _heads_for(w, self.num_heads, self.num_head_channels)


class ConditionEncoder(nn.Module):
    """Time-free image encoder (MedSegDiff's condition encoder).

    Shapes: ``image (B, C_in, *S)`` -> list of ``levels + 1`` maps: level ``l`` features
    ``(B, cond_width(l), *S / 2^l)`` (before its down-sampling) and the bottleneck
    ``(B, cond_width(L-1), *S / 2^(L-1))``.
    """

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        d, g = spec.dims, spec.norm_groups
        self.inp = conv_nd(d, spec.in_channels, spec.condition_channels, 3, padding=1)
        ch = spec.condition_channels
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        for lv in range(spec.levels):
            blocks = []
            for _ in range(spec.num_res_blocks):
                blocks.append(
                    ResBlock(ch, None, spec.dropout, spec.cond_width(lv), dims=d, norm_groups=g,
                             use_checkpoint=spec.use_checkpoint)
                )
                ch = spec.cond_width(lv)
            self.levels.append(nn.Sequential(*blocks))
            if lv < spec.levels - 1:
                self.downs.append(Downsample(ch, d))
        self.mid = ResBlock(ch, None, spec.dropout, dims=d, norm_groups=g, use_checkpoint=spec.use_checkpoint)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        h = self.inp(image)
        feats = []
        for lv, level in enumerate(self.levels):
            h = level(h)
            feats.append(h)
            if lv < len(self.downs):
                h = self.downs[lv](h)
        feats.append(self.mid(h))
        return feats


class DiffusionUNet(nn.Module):
    """Base class of the conditional diffusion UNets (see the module docstring).

    Model contract (ARCHITECTURE.md): :meth:`encode_image`, :meth:`forward`,
    :meth:`anchor_logits`, ``is_diffusion = True``.
    """

    is_diffusion = True
    #: True when a layer is sized for ``spec.size`` (FF-Parser); other multiples are then refused.
    size_locked = False

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        d, g, n = spec.dims, spec.norm_groups, spec.num_res_blocks
        ch0 = spec.base_channels
        emb_ch = 4 * ch0
        self.in_channels = spec.in_channels
        self.out_channels = spec.out_channels
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.condition_encoder = ConditionEncoder(spec)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_ch, spec.dropout, cout, dims=d, use_scale_shift_norm=spec.use_scale_shift_norm,
                            norm_groups=g, use_checkpoint=spec.use_checkpoint)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads=spec.num_heads, num_head_channels=spec.num_head_channels,
                                  norm_groups=g, use_checkpoint=spec.use_checkpoint)

        self.input_conv = conv_nd(d, spec.mask_channels, ch0, 3, padding=1)
        skip_chs = [ch0]
        ch = ch0
        self.enc_levels = nn.ModuleList()
        self.enc_downs = nn.ModuleList()
        for lv in range(spec.levels):
            blocks = nn.ModuleList()
            for _ in range(n):
                layers: list[nn.Module] = [res(ch, spec.width(lv))]
                ch = spec.width(lv)
                if spec.has_attention(lv):
                    layers.append(attn(ch))
                blocks.append(TimestepSequential(*layers))
                skip_chs.append(ch)
            self.enc_levels.append(blocks)
            if lv < spec.levels - 1:
                self.enc_downs.append(Downsample(ch, d))
                skip_chs.append(ch)
        mid: list[nn.Module] = [res(ch, ch)]
        if spec.mid_attention:
            mid.append(attn(ch))
        mid.append(res(ch, ch))
        self.mid = TimestepSequential(*mid)
        self.dec_blocks = nn.ModuleList()
        for lv in reversed(range(spec.levels)):
            for i in range(n + 1):
                layers = [res(ch + skip_chs.pop(), spec.width(lv))]
                ch = spec.width(lv)
                if spec.has_attention(lv):
                    layers.append(attn(ch))
                if lv > 0 and i == n:
                    layers.append(Upsample(ch, d))
                self.dec_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch, g), nn.SiLU(), zero_module(conv_nd(d, ch, spec.out_channels, 3, padding=1))
        )

    # -- hooks for V1 / V2 --------------------------------------------------------------------------
    def _inject_input(self, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        return h

    def _fuse(self, level: int, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        return h

    def _condition_bottleneck(self, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_image_features(self) -> int:
        """Length of the list returned by :meth:`encode_image`."""
        return self.spec.levels + 1

    # -- contract -----------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Everything that depends on the image only, computed once per image.

        Args:
            image: ``(B, C_in, *S)``.

        Returns:
            A flat list of tensors with the batch first; pass it as ``image_features``.

        Raises:
            ConfigError: wrong rank, channel count or spatial size.
        """
        self._check_tensor(image, self.spec.in_channels, "image",
                           "data.in_channels = modalities x (1 + 2 x context_slices)")
        return self.condition_encoder(image)

    def anchor_logits(self, image_features: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The anchor prediction ``(B, 1, *S)`` (logits) of V2; ``None`` for models without one."""
        return None

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        image: torch.Tensor | None = None,
        image_features: Sequence[torch.Tensor] | None = None,
        return_anchor: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Predict epsilon (or x0) and optionally the learned variance for the noisy mask.

        Args:
            x_t: noisy mask ``(B, 1, *S)`` in the diffusion's scale ([-1, 1] at t = 0).
            timesteps: ``(B,)`` original-scale timesteps.
            image: ``(B, C_in, *S)``; or
            image_features: the (possibly :func:`~medsegdiff.nets.blocks.repeat_features`-ed)
                output of :meth:`encode_image`. Exactly one of the two.
            return_anchor: also return :meth:`anchor_logits`.

        Returns:
            ``(B, out_channels, *S)``, or ``(that, anchor logits (B, 1, *S) or None)``.

        Raises:
            ConfigError: shapes or channel counts that the model was not built for.
            ValueError: both or neither of ``image`` / ``image_features``.
        """
        if (image is None) == (image_features is None):
            raise ValueError(f"{self.spec.name}: pass exactly one of image= or image_features=")
        self._check_tensor(x_t, self.spec.mask_channels, "x_t (noisy mask)", "the mask has 1 channel")
        b = x_t.shape[0]
        if timesteps.ndim != 1 or timesteps.shape[0] != b:
            raise ConfigError(f"{self.spec.name}: timesteps must have shape ({b},), got {tuple(timesteps.shape)}")
        if image is not None:
            if tuple(image.shape[2:]) != tuple(x_t.shape[2:]) or image.shape[0] != b:
                raise ConfigError(
                    f"{self.spec.name}: image {tuple(image.shape)} and x_t {tuple(x_t.shape)} differ in batch "
                    "or spatial size; they must match"
                )
            feats = self.encode_image(image)
        else:
            feats = list(image_features)  # type: ignore[arg-type]
            if len(feats) != self.num_image_features:
                raise ConfigError(
                    f"{self.spec.name}: image_features has {len(feats)} tensors, expected "
                    f"{self.num_image_features} (the output of this model's encode_image)"
                )
            if feats[0].shape[0] != b or tuple(feats[0].shape[2:]) != tuple(x_t.shape[2:]):
                raise ConfigError(
                    f"{self.spec.name}: image_features are for batch {feats[0].shape[0]} and size "
                    f"{tuple(feats[0].shape[2:])} but x_t is {tuple(x_t.shape)}; use repeat_features(feats, n) "
                    "for ensembles"
                )
        emb = timestep_embedding(timesteps, self.spec.base_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb)
        h = self._inject_input(self.input_conv(x_t), feats)
        hs = [h]
        for lv, blocks in enumerate(self.enc_levels):
            for i, blk in enumerate(blocks):
                h = blk(h, emb)
                if i == len(blocks) - 1:
                    h = self._fuse(lv, h, feats)
                hs.append(h)
            if lv < len(self.enc_downs):
                h = self.enc_downs[lv](h)
                hs.append(h)
        h = self.mid(self._condition_bottleneck(h, feats), emb)
        for blk in self.dec_blocks:
            h = blk(torch.cat([h, hs.pop()], dim=1), emb)
        out = self.out(h)
        if return_anchor:
            return out, self.anchor_logits(feats)
        return out

    def _check_tensor(self, x: torch.Tensor, channels: int, what: str, hint: str) -> None:
        spec = self.spec
        if x.ndim != spec.dims + 2:
            axes = "(B, C, H, W)" if spec.dims == 2 else "(B, C, D, H, W)"
            raise ConfigError(
                f"{spec.name}: {what} has shape {tuple(x.shape)}; the model is {spec.dims}-D and expects {axes}"
            )
        if x.shape[1] != channels:
            raise ConfigError(
                f"{spec.name}: {what} has {x.shape[1]} channels but the model was built for {channels} ({hint})"
            )
        size = tuple(x.shape[2:])
        if self.size_locked and size != spec.size:
            raise ConfigError(
                f"{spec.name}: {what} has spatial size {size} but the model (FF-Parser) was built for {spec.size}; "
                "build it for this size (data.image_size / data.patch_size)"
            )
        check_spatial_size(size, spec.levels, spec.name, spec.channel_mult)

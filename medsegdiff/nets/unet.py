"""The conditional diffusion UNet shared by MedSegDiff-V1 and -V2, built on the core's UNet.

Structure (one code path for 2-D and 3-D), both halves :class:`improved_diffusion.unet.UNetModel`:

* an **image (condition) model** ``self.condition``: a *time-free* UNet
  (``timestep_conditioned=False``), so its output depends on the image only and is computed once
  per image (:meth:`DiffusionUNet.encode_image`) and reused at every sampling step
  (``forward(..., image_features=feats)``). V1 uses its encoder (``encoder_only``), V2 also its
  decoder (the anchor, V2 sec. 3.2). No attention (as the official highway encoder);
* the **noisy-mask UNet** ``self.unet``: the ADM UNet (residual blocks with the time embedding,
  attention at ``attention_resolutions``, strided-convolution down-sampling, nearest + convolution
  up-sampling), run through ``UNetModel.encode`` / ``decode`` with hooks where V1/V2 inject the
  condition: after the first convolution (``_inject_input``), at the end of each encoder level
  (``_fuse``) and before the middle block (``_condition_bottleneck``).

3-D resampling rule (one behaviour, ``model.resample_depth``): by default every level halves
``D, H, W`` (full 3-D: ISLES24 patches are near-isotropic after preprocessing); with
``resample_depth: false`` only ``H, W`` are halved (upstream improved-diffusion's ``dims=3``
behaviour) and the depth may be any size. Both UNets and the size checks follow the same flag.

:class:`NetSpec` checks sizes and channel counts when the model is built and
:meth:`DiffusionUNet._check_tensor` again on every forward, with messages that say what is wrong
and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from improved_diffusion.unet import UNetModel, attention_heads
from medsegdiff.errors import ConfigError
from medsegdiff.nets.blocks import check_spatial_size

__all__ = ["DiffusionUNet", "NetSpec"]


@dataclass(frozen=True)
class NetSpec:
    """Geometry and widths of a diffusion UNet, validated on construction.

    Attributes:
        dims: 2 or 3 spatial dimensions.
        size: spatial size the model is built for, ``(H, W)`` or ``(D, H, W)``.
        in_channels: image channels ``C_in = modalities x (1 + 2 x context_slices)``.
        out_channels: 1 (epsilon or x0) or 2 (with learned variance).
        mask_channels: channels of the network's mask input: 1 (``x_t``), 2 with self-conditioning
            (``cat([x_t, x0_prev])``).
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
        resample_depth: 3-D only: every level halves the depth too (full 3-D, our default); False
            halves only ``H, W`` (upstream improved-diffusion's ``dims=3`` rule, for thick slices).
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
    resample_depth: bool = True
    name: str = "model"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_factors", tuple(int(f) for f in self.attention_factors))
        self.validate()

    @classmethod
    def from_config(
        cls, model_cfg, *, in_channels: int, size: Sequence[int], dims: int, out_channels: int,
        mask_channels: int = 1,
    ) -> NetSpec:
        """Spec from a :class:`~medsegdiff.config.model.ModelConfig` and the data geometry."""
        return cls(
            dims=dims,
            size=tuple(size),
            in_channels=in_channels,
            out_channels=out_channels,
            mask_channels=mask_channels,
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
            resample_depth=model_cfg.resample_depth,
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
        size = tuple(size or self.size)
        f = 2**level
        keep_depth = self.dims == 3 and not self.resample_depth
        return tuple(s if keep_depth and axis == 0 else s // f for axis, s in enumerate(size))

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
        check_spatial_size(self.size, self.levels, f"{n}", self.channel_mult, self.resample_depth)
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
            self.heads(w)

    def heads(self, width: int) -> int:
        """Attention heads for ``width`` (:func:`improved_diffusion.unet.attention_heads`).

        Raises:
            ConfigError: the head layout does not divide ``width``, naming the config key.
        """
        try:
            return attention_heads(width, self.num_heads, self.num_head_channels)
        except ValueError:
            key, value = (
                ("num_head_channels", self.num_head_channels) if self.num_head_channels != -1
                else ("num_heads", self.num_heads)
            )
            raise ConfigError(
                f"model.{key}: {value} does not divide the attention width {width}; use a divisor of {width}"
                + (" or -1 (then num_heads is used)" if key == "num_head_channels" else "")
            ) from None

    def unet_kwargs(self) -> dict:
        """The :class:`~improved_diffusion.unet.UNetModel` arguments both UNets share."""
        return dict(
            num_res_blocks=self.num_res_blocks, dropout=self.dropout, channel_mult=self.channel_mult,
            conv_resample=True, dims=self.dims, use_checkpoint=self.use_checkpoint, num_heads=self.num_heads,
            num_head_channels=self.num_head_channels, resample_depth=self.resample_depth,
            norm_groups=self.norm_groups,
        )


class DiffusionUNet(nn.Module):
    """Base class of the conditional diffusion UNets (see the module docstring).

    Model contract (ARCHITECTURE.md): :meth:`encode_image`, :meth:`forward`,
    :meth:`anchor_logits`, ``is_diffusion = True``, ``self_condition`` (False unless the registry
    builds the model for self-conditioning, with ``spec.mask_channels = 2``).

    Args:
        spec: geometry and widths.
        condition_decoder: build the image model's decoder and segmentation head (V2's anchor).
    """

    is_diffusion = True
    self_condition = False

    def __init__(self, spec: NetSpec, *, condition_decoder: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.in_channels = spec.in_channels
        self.out_channels = spec.out_channels
        self.unet = UNetModel(
            spec.mask_channels, spec.base_channels, spec.out_channels,
            attention_resolutions=spec.attention_factors, use_scale_shift_norm=spec.use_scale_shift_norm,
            mid_attention=spec.mid_attention, **spec.unet_kwargs(),
        )
        self.condition = UNetModel(
            spec.in_channels, spec.condition_channels, 1, attention_resolutions=(), mid_attention=False,
            timestep_conditioned=False, encoder_only=not condition_decoder, **spec.unet_kwargs(),
        )

    # -- hooks for V1 / V2 --------------------------------------------------------------------------
    def _inject_input(self, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        return h

    def _fuse(self, level: int, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        return h

    def _condition_bottleneck(
        self, h: torch.Tensor, feats: list[torch.Tensor], emb: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def _decode_condition(self, mid: torch.Tensor, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Extra image features from the condition decoder (V2); none by default."""
        return []

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
            A flat list of tensors with the batch first; pass it as ``image_features``. The first
            ``levels`` entries are the image encoder's features at the end of each level
            ``(B, cond_width(l), *S_l)``, then its bottleneck; subclasses append more.

        Raises:
            ConfigError: wrong rank, channel count or spatial size.
        """
        self._check_tensor(image, self.spec.in_channels, "image",
                           "data.in_channels = modalities x (1 + 2 x context_slices)")
        h, hs = self.condition.encode(image, None)
        mid = self.condition.middle_block(h)
        return [hs[i] for i in self.condition.level_ends] + [mid] + self._decode_condition(mid, hs)

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
            x_t: noisy mask ``(B, mask_channels, *S)`` in the diffusion's scale ([-1, 1] at t = 0);
                with self-conditioning ``cat([x_t, x0_prev], 1)``.
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
        hint = "the mask has 1 channel, 2 with self-conditioning (x_t and the previous x0 estimate)"
        self._check_tensor(x_t, self.spec.mask_channels, "x_t (noisy mask)", hint)
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
        unet = self.unet
        emb = unet._embed(timesteps, None)
        hooks = {0: lambda h: self._inject_input(h, feats)}
        for level, index in enumerate(unet.level_ends):
            hooks[index] = lambda h, level=level: self._fuse(level, h, feats)
        h, hs = unet.encode(x_t, emb, hooks)
        h = unet.middle_block(self._condition_bottleneck(h, feats, emb), emb)
        out = unet.out(unet.decode(h, hs, emb))
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
        check_spatial_size(tuple(x.shape[2:]), spec.levels, spec.name, spec.channel_mult, spec.resample_depth)

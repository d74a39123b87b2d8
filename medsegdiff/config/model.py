"""Model section: which network and its size (see :mod:`medsegdiff.nets`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsegdiff.config.base import bad_value, option


@dataclass
class ModelConfig:
    name: Literal["medsegdiff_v1", "medsegdiff_v2", "dynunet"] = option("medsegdiff_v1")
    preset: str = option("", doc="informational: the preset block this came from (tiny/small/base/large)")
    base_channels: int = option(32, ge=1, doc="channels of the first level of the noisy-mask UNet")
    condition_channels: int = option(0, ge=0, doc="base channels of the image (condition) encoder; 0 = base_channels")
    channel_mult: list[int] = option([1, 2, 4], doc="channel multiplier per level; levels-1 downsamplings by 2")
    num_res_blocks: int = option(1, ge=1, doc="residual blocks per level (encoder; decoder has one more)")
    attention_resolutions: list[int] = option(
        [], doc="downsample factors (1, 2, 4, ...) whose level gets self-attention (16 = 16x16 at 256 input)"
    )
    mid_attention: bool = option(True, doc="self-attention in the bottleneck")
    num_heads: int = option(4, ge=1, doc="attention heads (used when num_head_channels == -1)")
    num_head_channels: int = option(-1, doc="channels per head; -1 = use num_heads")
    dropout: float = option(0.0, ge=0.0, lt=1.0)
    norm_groups: int = option(32, ge=1, doc="max GroupNorm groups; reduced to the largest divisor of each width")
    use_scale_shift_norm: bool = option(True, doc="time embedding as GroupNorm scale and shift (else added)")
    use_checkpoint: bool = option(False, doc="activation checkpointing (training memory)")
    resample_depth: bool = option(
        True, doc="3-D only: every level halves D, H and W (full 3-D); false = only H and W "
        "(upstream improved-diffusion's dims=3 rule, for thick slices; D may then be any size)"
    )
    ff_parser: bool = option(True, doc="V1: FF-Parser (learnable Fourier filter) on the noisy-mask features")
    # V2 specifics (arXiv 2301.11798; see medsegdiff/nets/medsegdiff_v2.py and docs/models.md).
    # Ablation: anchor only = ssformer_depth 0; SS-Former only = anchor false; both = defaults.
    anchor: bool = option(
        True, doc="V2: anchor condition (condition-model decoder + segmentation head, U-SA into the first stage)"
    )
    anchor_detach: bool = option(False, doc="V2: stop diffusion-loss gradients into the condition decoder")
    usa_sigma: float = option(1.0, gt=0.0, doc="V2: initial Gaussian sigma (pixels) of the uncertain spatial attention")
    usa_truncate: float = option(
        3.0, gt=0.0, doc="V2: U-SA kernel radius in sigmas (radius = ceil(usa_truncate * sigma), grows with sigma)"
    )
    usa_learnable: bool = option(True, doc="V2: learn the Gaussian sigma of U-SA (else fixed)")
    ssformer_depth: int = option(
        1, ge=0, doc="V2: SS-Former blocks at the deepest level; 0 = add the image bottleneck instead"
    )
    nbp_hidden: int = option(16, ge=1, doc="V2: hidden units of the NBP-Filter (network over frequency pairs and t)")
    ssformer_pos_freqs: int = option(
        4, ge=0, doc="V2: octaves of the sinusoidal positions added to SS-Former queries/keys; 0 = none (ablation)"
    )
    scale_fusion: bool = option(
        True, doc="V2: add the image encoder's features at every diffusion-encoder level (not in the paper, "
        "which conditions only the first and deepest stage)"
    )
    # discriminative baseline (MONAI DynUNet)
    dynunet_filters: list[int] = option([16, 32, 64, 128], doc="DynUNet filters per level (levels = length)")
    dynunet_res_block: bool = option(False, doc="DynUNet residual blocks (nnU-Net default: plain)")
    channels_last: bool = option(False, doc="channels_last memory format (GPU speed)")
    compile: bool = option(False, doc="torch.compile the model")

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise bad_value(f"{p}channel_mult", self.channel_mult, "allowed: a non-empty list of positive integers")
        max_factor = 2 ** (len(self.channel_mult) - 1)
        for i, f in enumerate(self.attention_resolutions):
            if f < 1 or f & (f - 1) or f > max_factor:
                allowed = [2**k for k in range(len(self.channel_mult))]
                raise bad_value(
                    f"{p}attention_resolutions[{i}]", f,
                    f"allowed: downsample factors {allowed} (powers of two up to 2^(levels-1) for "
                    f"channel_mult {self.channel_mult})",
                )
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise bad_value(f"{p}num_head_channels", self.num_head_channels, "allowed: -1 or a positive integer")
        if len(self.dynunet_filters) < 2 or any(f < 1 for f in self.dynunet_filters):
            raise bad_value(f"{p}dynunet_filters", self.dynunet_filters, "allowed: two or more positive integers")

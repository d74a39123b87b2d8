"""Model section: which network and its size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsegdiff.config.base import bad_value, option


@dataclass
class ModelConfig:
    name: Literal["medsegdiff_v1", "medsegdiff_v2", "dynunet"] = option("medsegdiff_v1")
    preset: str = option("", doc="informational: the preset block this came from (tiny/small/base/large)")
    base_channels: int = option(32, ge=1)
    channel_mult: list[int] = option([1, 2, 4], doc="channel multiplier per level")
    num_res_blocks: int = option(1, ge=1)
    attention_resolutions: list[int] = option([], doc="downsample factors (1, 2, 4, ...) with attention")
    num_heads: int = option(4, ge=1)
    num_head_channels: int = option(-1, doc="channels per head; -1 = use num_heads")
    dropout: float = option(0.0, ge=0.0, lt=1.0)
    norm_groups: int = option(32, ge=1, doc="max GroupNorm groups; reduced to a divisor of each width")
    use_scale_shift_norm: bool = option(True)
    use_checkpoint: bool = option(False, doc="activation checkpointing (training memory)")
    ff_parser: bool = option(True, doc="V1/V2: FF-Parser on the noisy-mask features")
    # V2 specifics (arXiv 2301.11798)
    anchor: bool = option(True, doc="V2: anchor condition (segmentation head + uncertain spatial attention)")
    usa_kernel: int = option(5, ge=1, doc="V2: Gaussian kernel size of the uncertain spatial attention")
    ssformer_depth: int = option(1, ge=0, doc="V2: spectrum-space transformer blocks at the bottleneck")
    nbp_bands: int = option(4, ge=1, doc="V2: learnable frequency bands of the neural band-pass filter")
    # discriminative baseline (MONAI DynUNet)
    dynunet_filters: list[int] = option([16, 32, 64, 128], doc="DynUNet filters per level")
    deep_supervision: bool = option(False)
    channels_last: bool = option(False)
    compile: bool = option(False, doc="torch.compile the model")

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise bad_value(f"{p}channel_mult", self.channel_mult, "allowed: a non-empty list of positive integers")
        if self.usa_kernel % 2 == 0:
            raise bad_value(f"{p}usa_kernel", self.usa_kernel, "allowed: an odd integer")

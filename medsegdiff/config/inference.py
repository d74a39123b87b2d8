"""Inference (predict) and evaluation sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsegdiff.config.base import option
from medsegdiff.config.diffusion import as_respacing


@dataclass
class InferenceConfig:
    respacing: str | int = option(
        "", doc="override the diffusion respacing for prediction: 'ddimN' (leading), 'trailingN' (ends at "
        "t = T-1; use it for few steps), 'N' or 'a,b,c'; an integer N means 'N'; empty = diffusion.respacing")
    sampler: Literal["", "ddim", "ddpm", "dpmpp_2m", "dpmpp_3m", "x0"] = option(
        "", doc="sampler for prediction and validation: ddim (with diffusion.eta), ddpm (ancestral), dpmpp_2m / "
        "dpmpp_3m (DPM-Solver++ multistep), x0 (one network call); empty = diffusion.sampler")
    ensemble: int = option(5, ge=1, doc="ensemble members per case")
    combine: Literal["mean", "vote", "staple"] = option(
        "mean", doc="ensemble combination: mean probability, majority vote (ties = lesion), or real STAPLE (EM)")
    uncertainty: Literal["std", "entropy"] = option(
        "std", doc="per-voxel uncertainty: std of member probabilities, or binary entropy (bits) of their mean")
    threshold: float = option(0.5, gt=0.0, lt=1.0, doc="probability threshold (replaced by a calibrated one if present)")
    calibrate: bool = option(
        True, doc="`medsegdiff run`: sweep the threshold on the validation cases before predicting (calibration.json)"
    )
    use_calibrated_threshold: bool = option(
        True, doc="use <run>/calibration.json (or the checkpoint's calibration) instead of inference.threshold")
    use_ema: bool = option(True)
    batch_size: int = option(64, ge=1, doc="slices x members through the model at once (memory budget)")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", doc="auto = bf16 on GPU, fp32 on CPU")
    overlays: bool = option(True, doc="write an overlay PNG per case")
    write_members: bool = option(
        True, doc="write <case>_members.npz (member masks + brain region, bit-packed) for the uncertainty metrics")

    def validate(self, prefix: str) -> None:
        self.respacing = as_respacing(self.respacing)  # checked against diffusion.steps by ExperimentConfig


@dataclass
class EvaluationConfig:
    iou_threshold: float = option(0.5, gt=0.0, le=1.0, doc="lesion-wise F1 matching IoU (organisers' latest: 0.2)")
    hd95: bool = option(True, doc="also compute HD95 in mm (NaN when a mask is empty)")
    connectivity: Literal[0, 4, 8, 6, 18, 26] = option(
        0, doc="lesion components: 0 = official (26 in 3-D, 4 in 2-D); 4/8 in 2-D, 6/18/26 in 3-D"
    )
    tmax_threshold: float = option(9.0, doc="official simple baseline: Tmax > threshold seconds")

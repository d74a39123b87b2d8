"""The one config schema: an experiment composed of typed sections."""

from __future__ import annotations

import re
from dataclasses import dataclass

from medsegdiff.config.base import bad_value, option
from medsegdiff.config.data import DataConfig
from medsegdiff.config.diffusion import DiffusionConfig, check_respacing
from medsegdiff.config.inference import EvaluationConfig, InferenceConfig
from medsegdiff.config.model import ModelConfig
from medsegdiff.config.tracking import TrackingConfig
from medsegdiff.config.training import LossConfig, OptimConfig, TrainConfig


@dataclass
class ExperimentConfig:
    name: str = option("experiment", doc="experiment name (prefix of the run directory)")
    seed: int = option(0, doc="global seed")
    run_root: str = option("runs", doc="where run directories are created")
    run_dir: str = option("", doc="explicit run directory; empty = <run_root>/<derived unique name>")
    device: str = option("auto", doc="auto, cpu, cuda, cuda:N")
    data: DataConfig = option(default_factory=DataConfig)
    model: ModelConfig = option(default_factory=ModelConfig)
    diffusion: DiffusionConfig = option(default_factory=DiffusionConfig)
    loss: LossConfig = option(default_factory=LossConfig)
    optim: OptimConfig = option(default_factory=OptimConfig)
    train: TrainConfig = option(default_factory=TrainConfig)
    inference: InferenceConfig = option(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = option(default_factory=EvaluationConfig)
    tracking: TrackingConfig = option(default_factory=TrackingConfig)

    def validate(self, prefix: str) -> None:
        # Static check only: whether a CUDA device is present is decided when training starts.
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise bad_value(f"{prefix}.device" if prefix else "device", self.device, "allowed: auto, cpu, cuda, cuda:N")
        steps = self.diffusion.steps
        self.inference.respacing = check_respacing("inference.respacing", self.inference.respacing, steps)
        self.train.validation.respacing = check_respacing(
            "train.validation.respacing", self.train.validation.respacing, steps)
        if self.train.precision == "fp16" and self.device == "cpu":
            raise bad_value("train.precision", "fp16", "fp16 needs a CUDA device, use bf16 or fp32 on device=cpu")


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


__all__ = ["ExperimentConfig"]

"""The one config schema: an experiment composed of typed sections."""

from __future__ import annotations

from dataclasses import dataclass

from medsegdiff.config.base import option
from medsegdiff.config.data import AugmentConfig, DataConfig, SplitConfig
from medsegdiff.config.diffusion import DiffusionConfig
from medsegdiff.config.inference import EvaluationConfig, InferenceConfig
from medsegdiff.config.model import ModelConfig
from medsegdiff.config.tracking import TrackingConfig
from medsegdiff.config.training import LossConfig, OptimConfig, TrainConfig, ValidationConfig


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


__all__ = [
    "AugmentConfig",
    "DataConfig",
    "DiffusionConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "InferenceConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SplitConfig",
    "TrackingConfig",
    "TrainConfig",
    "ValidationConfig",
]

"""Typed experiment configuration (see :mod:`medsegdiff.config.base` for the rules)."""

from __future__ import annotations

from medsegdiff.config.base import bad_value, deep_merge, describe, from_dict, option, to_dict
from medsegdiff.config.data import AugmentConfig, DataConfig, SplitConfig
from medsegdiff.config.diffusion import DiffusionConfig
from medsegdiff.config.inference import EvaluationConfig, InferenceConfig
from medsegdiff.config.loader import (
    apply_overrides,
    compose,
    config_from_dict,
    configs_dir,
    dump_config,
    load_config,
    save_config,
)
from medsegdiff.config.model import ModelConfig
from medsegdiff.config.schema import ExperimentConfig
from medsegdiff.config.tracking import TrackingConfig
from medsegdiff.config.training import LossConfig, OptimConfig, TrainConfig, ValidationConfig

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
    "apply_overrides",
    "bad_value",
    "compose",
    "config_from_dict",
    "configs_dir",
    "deep_merge",
    "describe",
    "dump_config",
    "from_dict",
    "load_config",
    "option",
    "save_config",
    "to_dict",
]

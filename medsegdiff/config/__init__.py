"""Typed experiment configuration (see :mod:`medsegdiff.config.base` for the rules)."""

from __future__ import annotations

from medsegdiff.config.base import bad_value, deep_merge, describe, from_dict, option, to_dict
from medsegdiff.config.loader import (
    apply_overrides,
    compose,
    config_from_dict,
    configs_dir,
    dump_config,
    load_config,
    save_config,
)
from medsegdiff.config.schema import (
    AugmentConfig,
    DataConfig,
    DiffusionConfig,
    EvaluationConfig,
    ExperimentConfig,
    InferenceConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SplitConfig,
    TrackingConfig,
    TrainConfig,
    ValidationConfig,
)

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

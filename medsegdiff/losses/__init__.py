"""Loss terms and multi-task weighting strategies."""

from medsegdiff.losses.multitask import (
    STRATEGIES,
    TIMESTEP_WEIGHTINGS,
    LossCombiner,
    min_snr_weights,
    snr_plus_one_weights,
    timestep_weights,
)
from medsegdiff.losses.segmentation import dice_bce_terms

__all__ = ["STRATEGIES", "TIMESTEP_WEIGHTINGS", "LossCombiner", "dice_bce_terms", "min_snr_weights",
           "snr_plus_one_weights", "timestep_weights"]

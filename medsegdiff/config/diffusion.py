"""Diffusion section: noise schedule, parameterisation, and sampling respacing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsegdiff.config.base import option


@dataclass
class DiffusionConfig:
    steps: int = option(1000, ge=2, doc="training diffusion steps T (training always uses all T)")
    noise_schedule: Literal["linear", "cosine"] = option("linear")
    predict_xstart: bool = option(False, doc="model predicts x0 instead of epsilon")
    learn_sigma: bool = option(False, doc="learned-range variance (hybrid MSE + VB loss)")
    sigma_small: bool = option(False, doc="fixed-small instead of fixed-large variance")
    use_kl: bool = option(False)
    rescale_learned_sigmas: bool = option(False)
    rescale_timesteps: bool = option(False)
    schedule_sampler: Literal["uniform", "loss-second-moment"] = option("uniform")
    # sampling
    sampler: Literal["ddim", "ddpm"] = option("ddim")
    respacing: str = option("ddim250", doc="timestep respacing for sampling: 'ddimN', 'N' or 'a,b,c'")
    eta: float = option(0.0, ge=0.0, doc="DDIM eta (0 = deterministic)")
    clip_denoised: bool = option(True)

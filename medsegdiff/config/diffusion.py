"""Diffusion section: noise schedule, parameterisation, and sampling respacing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from improved_diffusion._spacing import space_timesteps
from medsegdiff.config.base import bad_value, option


def as_respacing(value: str | int) -> str:
    """A respacing option as the string the core takes: an integer N (YAML ``respacing: 10``,
    override ``...respacing=10``) means ``"N"`` (N evenly spaced steps)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def check_respacing(key: str, value: str | int, steps: int) -> str:
    """``value`` as a string respacing, checked against ``steps`` training steps (empty = unset).

    Raises:
        ConfigError: naming ``key``, the value and what is allowed (from :func:`space_timesteps`).
    """
    value = as_respacing(value)
    if value:
        try:
            space_timesteps(steps, value)
        except ValueError as err:
            raise bad_value(key, value, str(err)) from None
    return value


@dataclass
class DiffusionConfig:
    steps: int = option(1000, ge=2, doc="training diffusion steps T (training always uses all T)")
    noise_schedule: Literal["linear", "cosine"] = option(
        "linear", doc="linear (1e-4..0.02 scaled by 1000/T; needs T > 20) or cosine (iDDPM)"
    )
    predict_xstart: bool = option(False, doc="model predicts x0 instead of epsilon")
    predict_v: bool = option(
        False,
        doc="model predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, App. D); "
        "exclusive with predict_xstart",
    )
    zero_terminal_snr: bool = option(
        False,
        doc="rescale the schedule so abar_T = 0 (Lin et al. 2023, Alg. 1); needs predict_v or predict_xstart",
    )
    self_condition: bool = option(
        False,
        doc="self-conditioning (Chen et al. 2022, Alg. 1): the network also sees its own detached x0 "
        "estimate (zeros in half of the training batches); builds the model with 2 mask channels",
    )
    learn_sigma: bool = option(False, doc="learned-range variance (hybrid MSE + VB loss)")
    sigma_small: bool = option(False, doc="fixed-small instead of fixed-large variance")
    use_kl: bool = option(False, doc="train on the variational bound (rescaled KL) instead of MSE")
    rescale_learned_sigmas: bool = option(False, doc="scale the VB term of the hybrid loss by T/1000")
    rescale_timesteps: bool = option(False, doc="feed the network t * 1000 / T (floats)")
    schedule_sampler: Literal["uniform", "loss-second-moment"] = option(
        "uniform", doc="training timestep sampler (loss-second-moment = iDDPM importance sampling)"
    )
    # sampling
    sampler: Literal["ddim", "ddpm"] = option("ddim")
    respacing: str | int = option(
        "ddim250", doc="timestep respacing for sampling: 'ddimN', 'trailingN', 'N' or 'a,b,c'; an integer N means 'N'")
    eta: float = option(0.0, ge=0.0, le=1.0, doc="DDIM eta (0 = deterministic, 1 = DDPM-like noise)")
    clip_denoised: bool = option(True, doc="clamp the predicted clean mask to [-1, 1] while sampling")

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.predict_v and self.predict_xstart:
            raise bad_value(
                f"{p}predict_v", self.predict_v,
                f"allowed: true only with {p}predict_xstart=false (one parametrisation: epsilon, x0 or v)",
            )
        if self.zero_terminal_snr and not (self.predict_v or self.predict_xstart):
            raise bad_value(
                f"{p}zero_terminal_snr", self.zero_terminal_snr,
                "allowed: true only with v or x0 prediction; epsilon prediction cannot recover x0 where "
                f"abar_T = 0 (Lin et al. 2023 pair it with v): set {p}predict_v=true",
            )
        if self.noise_schedule == "linear" and self.steps <= 20:
            raise bad_value(
                f"{p}steps", self.steps,
                "allowed: more than 20 with the linear schedule (its last beta 0.02 * 1000 / T must stay "
                "below 1); or set diffusion.noise_schedule=cosine",
            )
        self.respacing = check_respacing(f"{p}respacing", self.respacing, self.steps)

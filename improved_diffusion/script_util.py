"""Build diffusion objects from flat keyword settings (upstream ``script_util`` style).

Provenance: API of ``improved_diffusion/script_util.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``). Written anew.

Local changes: only the diffusion half (``diffusion_defaults``, ``create_gaussian_diffusion``) and
the argparse helpers; networks are built by :mod:`medsegdiff.nets`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

__all__ = [
    "add_dict_to_argparser",
    "args_to_dict",
    "create_gaussian_diffusion",
    "diffusion_defaults",
    "str2bool",
]


def diffusion_defaults() -> dict[str, Any]:
    """Upstream (improved-diffusion) defaults of the diffusion settings.

    Note: guided-diffusion and MedSegDiff use ``rescale_timesteps=False`` and
    ``rescale_learned_sigmas=False``; checkpoints only interoperate when these match.
    """
    return {
        "learn_sigma": False,
        "sigma_small": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": True,
        "rescale_learned_sigmas": True,
    }


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str | list[int] = "",
) -> SpacedDiffusion:
    """A :class:`SpacedDiffusion` (all steps when ``timestep_respacing`` is empty).

    Loss: RESCALED_KL if ``use_kl``, else RESCALED_MSE if ``rescale_learned_sigmas``, else MSE.
    Mean: START_X if ``predict_xstart`` else EPSILON. Variance: LEARNED_RANGE if ``learn_sigma``,
    else FIXED_SMALL if ``sigma_small``, else FIXED_LARGE.

    Raises:
        ValueError / NotImplementedError: bad schedule or respacing (see
            :func:`~improved_diffusion.gaussian_diffusion.get_named_beta_schedule` and
            :func:`~improved_diffusion.respace.space_timesteps`).
    """
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        var_type = gd.ModelVarType.FIXED_SMALL
    else:
        var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def str2bool(v: str | bool) -> bool:
    """Parse a command-line boolean.

    Raises:
        argparse.ArgumentTypeError: not a recognised boolean.
    """
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Mapping[str, Any]) -> None:
    """Add ``--key`` options with the given defaults (booleans parsed by :func:`str2bool`)."""
    for k, v in default_dict.items():
        v_type: Any = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """Pick ``keys`` out of a parsed namespace."""
    return {k: getattr(args, k) for k in keys}

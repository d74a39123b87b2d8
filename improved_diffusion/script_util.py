"""Build diffusion objects from flat keyword settings (upstream ``script_util`` style).

Provenance: API of ``improved_diffusion/script_util.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``). Written anew.

Local changes: no super-resolution helpers; ``create_model`` raises ``ValueError`` for image sizes
without a channel-multiplier preset (upstream: 256, 64, 32) unless ``channel_mult`` is given. The
MedSegDiff networks themselves are built by :mod:`medsegdiff.nets`. Two extensions of the diffusion
settings (default off, so upstream settings build the same object): ``predict_v`` (v-prediction,
Salimans & Ho 2022, Appendix D) and ``zero_terminal_snr`` (Lin et al. 2023, Algorithm 1).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.respace import SpacedDiffusion, space_timesteps
from improved_diffusion.unet import UNetModel

__all__ = [
    "NUM_CLASSES",
    "add_dict_to_argparser",
    "args_to_dict",
    "create_gaussian_diffusion",
    "create_model",
    "create_model_and_diffusion",
    "diffusion_defaults",
    "model_and_diffusion_defaults",
    "str2bool",
]

NUM_CLASSES = 1000

_T = TypeVar("_T")

_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


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
        "predict_v": False,
        "zero_terminal_snr": False,
    }


def model_and_diffusion_defaults() -> dict[str, Any]:
    """Upstream defaults of the UNet and diffusion settings (64x64 images)."""
    return {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "attention_resolutions": "16,8",
        "dropout": 0.0,
        "class_cond": False,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        **diffusion_defaults(),
    }


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool,
    class_cond: bool,
    use_checkpoint: bool,
    attention_resolutions: str,
    num_heads: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    dropout: float,
    channel_mult: tuple[int, ...] | None = None,
    in_channels: int = 3,
) -> Any:
    """An RGB :class:`~improved_diffusion.unet.UNetModel` for ``image_size`` images.

    ``attention_resolutions`` lists feature-map sizes (``"16,8"``) that get attention.

    Raises:
        ValueError: no channel-multiplier preset for ``image_size`` and none given.
    """
    if channel_mult is None:
        if image_size not in _CHANNEL_MULT:
            raise ValueError(
                f"unsupported image size: {image_size} (presets: {sorted(_CHANNEL_MULT)}); pass channel_mult"
            )
        channel_mult = _CHANNEL_MULT[image_size]
    attention_ds = [image_size // int(res) for res in attention_resolutions.split(",") if res.strip()]
    return UNetModel(
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_ds),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )


def create_model_and_diffusion(
    image_size: int,
    class_cond: bool,
    learn_sigma: bool,
    sigma_small: bool,
    num_channels: int,
    num_res_blocks: int,
    num_heads: int,
    num_heads_upsample: int,
    attention_resolutions: str,
    dropout: float,
    diffusion_steps: int,
    noise_schedule: str,
    timestep_respacing: str,
    use_kl: bool,
    predict_xstart: bool,
    rescale_timesteps: bool,
    rescale_learned_sigmas: bool,
    use_checkpoint: bool,
    use_scale_shift_norm: bool,
    predict_v: bool = False,
    zero_terminal_snr: bool = False,
) -> tuple[Any, SpacedDiffusion]:
    """``(model, diffusion)`` from the flat settings of :func:`model_and_diffusion_defaults`."""
    model = create_model(
        image_size, num_channels, num_res_blocks, learn_sigma=learn_sigma, class_cond=class_cond,
        use_checkpoint=use_checkpoint, attention_resolutions=attention_resolutions, num_heads=num_heads,
        num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm, dropout=dropout,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps, learn_sigma=learn_sigma, sigma_small=sigma_small, noise_schedule=noise_schedule,
        use_kl=use_kl, predict_xstart=predict_xstart, rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas, timestep_respacing=timestep_respacing,
        predict_v=predict_v, zero_terminal_snr=zero_terminal_snr,
    )
    return model, diffusion


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
    predict_v: bool = False,
    zero_terminal_snr: bool = False,
) -> SpacedDiffusion:
    """A :class:`SpacedDiffusion` (all steps when ``timestep_respacing`` is empty).

    Loss: RESCALED_KL if ``use_kl``, else RESCALED_MSE if ``rescale_learned_sigmas``, else MSE.
    Mean: VELOCITY if ``predict_v``, START_X if ``predict_xstart``, else EPSILON. Variance:
    LEARNED_RANGE if ``learn_sigma``, else FIXED_SMALL if ``sigma_small``, else FIXED_LARGE.
    ``zero_terminal_snr`` rescales the named schedule with
    :func:`~improved_diffusion.gaussian_diffusion.rescale_zero_terminal_snr`.

    Raises:
        ValueError / NotImplementedError: bad schedule or respacing (see
            :func:`~improved_diffusion.gaussian_diffusion.get_named_beta_schedule` and
            :func:`~improved_diffusion.respace.space_timesteps`); both ``predict_v`` and
            ``predict_xstart``; epsilon prediction with ``zero_terminal_snr``.
    """
    if predict_v and predict_xstart:
        raise ValueError("predict_v and predict_xstart are exclusive: choose one parametrisation")
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if zero_terminal_snr:
        betas = gd.rescale_zero_terminal_snr(betas)
    loss_type = _first_set(
        [(use_kl, gd.LossType.RESCALED_KL), (rescale_learned_sigmas, gd.LossType.RESCALED_MSE)],
        default=gd.LossType.MSE,
    )
    if not timestep_respacing:
        timestep_respacing = [steps]
    var_type = _first_set(
        [(learn_sigma, gd.ModelVarType.LEARNED_RANGE), (sigma_small, gd.ModelVarType.FIXED_SMALL)],
        default=gd.ModelVarType.FIXED_LARGE,
    )
    mean_type = _first_set(
        [(predict_v, gd.ModelMeanType.VELOCITY), (predict_xstart, gd.ModelMeanType.START_X)],
        default=gd.ModelMeanType.EPSILON,
    )
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def _first_set(choices: Iterable[tuple[bool, _T]], default: _T) -> _T:
    """The value paired with the first true flag, else ``default`` (an if/elif/else chain)."""
    return next((value for flag, value in choices if flag), default)


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

"""Build the diffusion process from :class:`~medsegdiff.config.diffusion.DiffusionConfig`.

Training always uses the full schedule (``respacing=""``); sampling uses a respaced copy
(``"ddim250"``, ``"50"``, ``"10,15,20"``). Both are :class:`~improved_diffusion.respace.SpacedDiffusion`
objects, so the network sees original-scale timesteps in both (iDDPM Sec. 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from improved_diffusion.script_util import create_gaussian_diffusion
from medsegdiff.errors import ConfigError

if TYPE_CHECKING:
    from improved_diffusion.respace import SpacedDiffusion
    from medsegdiff.config.diffusion import DiffusionConfig

__all__ = ["build_diffusion"]


def build_diffusion(cfg: DiffusionConfig, respacing: str = "") -> SpacedDiffusion:
    """The diffusion process of ``cfg``, respaced by ``respacing`` (empty = all ``cfg.steps``).

    Args:
        cfg: the ``diffusion`` config section.
        respacing: ``""`` for training, or a sampling respacing such as ``cfg.respacing``.

    Returns:
        A :class:`SpacedDiffusion` (``num_timesteps`` = number of kept steps).

    Raises:
        ConfigError: a schedule or respacing that cannot be built (e.g. ``ddim37`` at T=1000).
    """
    try:
        return create_gaussian_diffusion(
            steps=cfg.steps,
            learn_sigma=cfg.learn_sigma,
            sigma_small=cfg.sigma_small,
            noise_schedule=cfg.noise_schedule,
            use_kl=cfg.use_kl,
            predict_xstart=cfg.predict_xstart,
            rescale_timesteps=cfg.rescale_timesteps,
            rescale_learned_sigmas=cfg.rescale_learned_sigmas,
            timestep_respacing=respacing,
            predict_v=cfg.predict_v,
            zero_terminal_snr=cfg.zero_terminal_snr,
        )
    except (ValueError, NotImplementedError) as err:
        what = f"respacing {respacing!r} with " if respacing else ""
        raise ConfigError(
            f"diffusion: cannot build {what}diffusion.steps={cfg.steps}, "
            f"diffusion.noise_schedule={cfg.noise_schedule!r}: {err}"
        ) from None

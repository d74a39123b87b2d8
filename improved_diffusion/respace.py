"""Timestep respacing: sample (or train) on a subset of the original diffusion steps.

Provenance: API of ``improved_diffusion/respace.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``). Written anew from iDDPM
Sec. 4 (arXiv:2102.09672) and DDIM Sec. 4.2 (arXiv:2010.02502).

Local changes: ``"ddimN"`` that cannot be made raises a ``ValueError`` naming N and the nearest
achievable counts; malformed strings raise ``ValueError`` with the accepted syntax; the
``_WrappedModel`` timestep map is built once per device and reused; models are never wrapped twice;
``space_timesteps`` lives in the torch-free :mod:`improved_diffusion._spacing` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from improved_diffusion._spacing import space_timesteps
from improved_diffusion.gaussian_diffusion import GaussianDiffusion

__all__ = ["SpacedDiffusion", "space_timesteps"]


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only ``use_timesteps`` of a base process.

    Over the kept indices ``i_0 < i_1 < ...`` the new betas are ``1 - abar_{i_k} / abar_{i_{k-1}}``,
    so the respaced ``alphas_cumprod`` equal the base ones at the kept steps. The model is always
    called with original-scale timesteps (through :class:`_WrappedModel`).

    Args:
        use_timesteps: original indices to keep.
        **kwargs: the base :class:`GaussianDiffusion` arguments (``betas`` of the full process).

    Raises:
        ValueError: no kept timestep inside ``[0, T)``.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = set(int(t) for t in use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        if not self.use_timesteps or min(self.use_timesteps) < 0 or max(self.use_timesteps) >= self.original_num_steps:
            raise ValueError(
                f"use_timesteps must be a non-empty subset of [0, {self.original_num_steps})"
            )
        base = GaussianDiffusion(**kwargs)
        self.timestep_map: list[int] = []
        new_betas = []
        last = 1.0
        for i, alpha_bar in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1.0 - alpha_bar / last)
                last = alpha_bar
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        super().__init__(**kwargs)
        self._map_cache: dict[torch.device, torch.Tensor] = {}

    def p_mean_variance(self, model: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model: Any) -> _WrappedModel:
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model, self.timestep_map, self.rescale_timesteps, self.original_num_steps, map_cache=self._map_cache
        )

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapped model does the scaling, from original-scale indices.
        return t


class _WrappedModel:
    """Calls ``model`` with respaced indices mapped back to original-scale timesteps.

    Args:
        model: the network.
        timestep_map: ``timestep_map[k]`` = original index of respaced step ``k``.
        rescale_timesteps: pass ``t * 1000 / original_num_steps`` as float.
        original_num_steps: ``T`` of the base process.
        map_cache: optional dict shared between wrappers; the map tensor is built once per device.
    """

    def __init__(
        self,
        model: Any,
        timestep_map: Sequence[int],
        rescale_timesteps: bool,
        original_num_steps: int,
        map_cache: dict[torch.device, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self._maps = map_cache if map_cache is not None else {}

    def map_tensor(self, device: torch.device) -> torch.Tensor:
        """The ``(T',)`` long map on ``device`` (cached)."""
        m = self._maps.get(device)
        if m is None:
            m = torch.as_tensor(list(self.timestep_map), dtype=torch.long, device=device)
            self._maps[device] = m
        return m

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> Any:
        new_ts = self.map_tensor(ts.device)[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)

"""Timestep respacing: sample (or train) on a subset of the original diffusion steps.

Provenance: API of ``improved_diffusion/respace.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``). Written anew from iDDPM
Sec. 4 (arXiv:2102.09672) and DDIM Sec. 4.2 (arXiv:2010.02502).

Local changes: ``"ddimN"`` that cannot be made raises a ``ValueError`` naming N and the nearest
achievable counts; malformed strings raise ``ValueError`` with the accepted syntax; the
``_WrappedModel`` timestep map is built once per device and reused; models are never wrapped twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from improved_diffusion.gaussian_diffusion import GaussianDiffusion

__all__ = ["SpacedDiffusion", "space_timesteps"]


def _ddim_counts(num_timesteps: int) -> list[int]:
    """Step counts reachable with ``range(0, T, stride)`` for ``stride = 1 .. T - 1``."""
    return sorted({len(range(0, num_timesteps, s)) for s in range(1, num_timesteps)})


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Which original steps to keep when respacing a ``num_timesteps``-step process.

    * ``"ddimN"``: ``range(0, T, stride)`` for the smallest integer stride giving exactly N steps
      (the DDIM paper's uniform spacing; the last step ``T - 1`` is usually not visited).
    * ``"N"`` or ``"a,b,c"`` (or a list of ints): split ``[0, T)`` into as many equal sections as
      counts (the first ``T % len`` sections one step longer) and take each section's count with a
      fractional stride, rounded, keeping both ends of the section. ``"10"`` at T=1000 gives
      0, 111, 222, ..., 999.

    Args:
        num_timesteps: original number of steps ``T``.
        section_counts: the spacing specification.

    Returns:
        The set of kept original indices.

    Raises:
        ValueError: malformed specification, a count larger than its section, or a ``"ddimN"``
            that no integer stride produces (the message names N and the nearest valid counts).
    """
    T = int(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(
                    f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N, "
                    "'N', or comma-separated counts like '10,15,20'"
                ) from None
            for stride in range(1, T):
                if len(range(0, T, stride)) == desired:
                    return set(range(0, T, stride))
            counts = _ddim_counts(T)
            lower = [c for c in counts if c < desired]
            higher = [c for c in counts if c > desired]
            near = ", ".join(f"ddim{c}" for c in ([lower[-1]] if lower else []) + ([higher[0]] if higher else []))
            raise ValueError(
                f"cannot make exactly {desired} DDIM steps ('ddim{desired}') from {T} diffusion steps "
                f"with an integer stride; nearest achievable: {near or 'none'}; or use '{desired}' "
                f"for {desired} evenly spaced steps (fractional stride)"
            )
        try:
            counts_list = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected 'ddimN', 'N', or comma-separated "
                "counts like '10,15,20'"
            ) from None
    else:
        counts_list = [int(x) for x in section_counts]
    if not counts_list or any(c < 1 for c in counts_list):
        raise ValueError(f"bad respacing {section_counts!r}: every section count must be a positive integer")

    n_sections = len(counts_list)
    size_per, extra = divmod(T, n_sections)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts_list):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"bad respacing {section_counts!r}: cannot take {count} steps from a section of {size} "
                f"(T={T} split into {n_sections} sections)"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


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

"""Multi-task loss weighting: per-timestep weights and strategies to combine loss terms.

MedSegDiff trains on the diffusion loss plus auxiliary segmentation terms on the predicted clean
mask (Dice, BCE) and, for V2, on the anchor head. Two questions arise:

1. **Per timestep, auxiliary terms** (:func:`timestep_weights`): at nearly pure-noise steps the
   input no longer determines the mask, so Dice/BCE on ``x0`` there train an image-to-mask regressor
   (the model predicts the mask from pure noise and its ensemble members collapse). ``"snr"`` weights
   a sample by ``min(SNR(t), cap) / cap`` with ``SNR(t) = abar_t / (1 - abar_t)`` (the clipped-SNR idea
   of Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", applied to the
   auxiliary terms; ``cap = 1`` by default); ``"alpha_bar"`` weights by ``abar_t``; ``"none"`` by 1.
   **Per timestep, diffusion MSE** (:func:`min_snr_weights`): min-SNR-gamma of Hang et al. 2023
   (Sec. 3.4), expressed for the network's target: the weight on the x0 MSE is ``min(SNR, gamma)``;
   since ``|eps - eps_hat|^2 = SNR |x0 - x0_hat|^2`` and ``|v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2``,
   the epsilon MSE gets ``min(SNR, gamma) / SNR`` and the v MSE ``min(SNR, gamma) / (SNR + 1)``.
   :func:`snr_plus_one_weights` gives any parametrisation v's implicit x0 weight ``SNR + 1``
   (Salimans & Ho 2022, Sec. 4), e.g. epsilon prediction with an x0 loss that counts at noisy steps.
2. **Across terms** (:class:`LossCombiner`): ``"fixed"`` weights, ``"warmup"`` (auxiliary terms fade
   in linearly), or ``"uncertainty"`` (learned homoscedastic uncertainty, Kendall, Gal & Cipolla,
   CVPR 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
   Semantics").
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from improved_diffusion.gaussian_diffusion import ModelMeanType

TimestepWeighting = Literal["none", "snr", "alpha_bar"]
Strategy = Literal["fixed", "warmup", "uncertainty"]

TIMESTEP_WEIGHTINGS = ("none", "snr", "alpha_bar")
STRATEGIES = ("fixed", "warmup", "uncertainty")
MAIN_TERM = "diffusion"

# diffusion object -> {device: float32 tensor of alphas_cumprod}; entries vanish with the diffusion.
_ABAR_CACHE: weakref.WeakKeyDictionary[Any, dict[torch.device, Tensor]] = weakref.WeakKeyDictionary()


def _alphas_cumprod(diffusion: Any, device: torch.device) -> Tensor:
    """``diffusion.alphas_cumprod`` (numpy float64 in improved_diffusion) as a cached tensor."""
    try:
        per_device = _ABAR_CACHE.setdefault(diffusion, {})
    except TypeError:  # not weak-referenceable: no caching
        per_device = {}
    table = per_device.get(device)
    if table is None:
        abar = getattr(diffusion, "alphas_cumprod", None)
        if abar is None:
            raise TypeError(
                f"timestep_weights: {type(diffusion).__name__} has no 'alphas_cumprod'; "
                "pass a GaussianDiffusion / SpacedDiffusion"
            )
        # SNR in float64 first: 1 - abar loses precision near t = 0 in float32.
        table = torch.as_tensor(np.asarray(abar, dtype=np.float64), device=device)
        per_device[device] = table
    return table


def _snr(diffusion: Any, t: Tensor) -> Tensor:
    """``SNR(t) = abar_t / (1 - abar_t)`` in float64 (0 where abar = 0)."""
    abar = _alphas_cumprod(diffusion, t.device)[t.long()]
    return abar / (1.0 - abar)


def timestep_weights(
    diffusion: Any, t: Tensor, mode: TimestepWeighting = "snr", *, snr_cap: float = 1.0
) -> Tensor:
    """Per-sample weights of the auxiliary loss terms for timesteps ``t``.

    Args:
        diffusion: an improved_diffusion ``GaussianDiffusion``/``SpacedDiffusion`` (uses its
            ``alphas_cumprod``; ``t`` indexes that table, as in ``training_losses``).
        t: ``(B,)`` integer timesteps.
        mode: ``"none"`` -> 1; ``"snr"`` -> ``min(SNR_t, snr_cap) / snr_cap``; ``"alpha_bar"`` ->
            ``abar_t``.
        snr_cap: SNR from which ``"snr"`` gives full weight (``loss.snr_cap``).

    Returns:
        ``(B,)`` float32 weights in ``[0, 1]`` on ``t``'s device (no gradient).

    Raises:
        ValueError: unknown ``mode`` or ``snr_cap <= 0``.
    """
    if mode == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if mode not in TIMESTEP_WEIGHTINGS:
        raise ValueError(f"timestep_weights: mode {mode!r} is unknown; allowed: {', '.join(TIMESTEP_WEIGHTINGS)}")
    if mode == "alpha_bar":
        return _alphas_cumprod(diffusion, t.device)[t.long()].float()
    if not snr_cap > 0:
        raise ValueError(f"timestep_weights: snr_cap must be > 0, got {snr_cap}")
    return (torch.clamp(_snr(diffusion, t), max=snr_cap) / snr_cap).float()


def _x0_weight_to_target(diffusion: Any, snr: Tensor, x0_weight: Tensor, name: str) -> Tensor:
    """Turn a weight on the x0 MSE into the same weight on the network's own target MSE.

    ``|eps - eps_hat|^2 = SNR |x0 - x0_hat|^2`` and ``|v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2``.
    """
    mean_type = diffusion.model_mean_type
    if mean_type == ModelMeanType.EPSILON:
        return x0_weight / snr
    if mean_type == ModelMeanType.START_X:
        return x0_weight
    if mean_type == ModelMeanType.VELOCITY:
        return x0_weight / (snr + 1.0)
    raise ValueError(f"{name}: no weighting for {mean_type}; use epsilon, x0 or v")


def min_snr_weights(diffusion: Any, t: Tensor, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma weights of the diffusion MSE for the diffusion's parametrisation.

    Hang et al. 2023 (arXiv:2303.09556, Sec. 3.4): the x0 loss is weighted by ``min(SNR, gamma)``;
    for the network's own target this is ``min(SNR, gamma) / SNR`` (epsilon), ``min(SNR, gamma)``
    (x0) and ``min(SNR, gamma) / (SNR + 1)`` (v).

    Args:
        diffusion: the training diffusion (``alphas_cumprod``, ``model_mean_type``).
        t: ``(B,)`` integer timesteps.
        gamma: the clamp (Hang et al.: 5).

    Returns:
        ``(B,)`` float32 weights on ``t``'s device (no gradient).

    Raises:
        ValueError: ``gamma <= 0``, or a mean type without a min-SNR form (``PREVIOUS_X``).
    """
    if not gamma > 0:
        raise ValueError(f"min_snr_weights: gamma must be > 0, got {gamma}")
    snr = _snr(diffusion, t)
    return _x0_weight_to_target(diffusion, snr, torch.clamp(snr, max=gamma), "min_snr_weights").float()


def snr_plus_one_weights(diffusion: Any, t: Tensor) -> Tensor:
    """Weights that give the diffusion MSE the x0 weight ``SNR + 1`` ("SNR+1" weighting).

    Salimans & Ho 2022 (arXiv:2202.00512, Sec. 4): the v loss equals the x0 loss weighted by
    ``SNR + 1``, at least 1 at every step. For the network's own target: ``(SNR + 1) / SNR``
    (epsilon: its x0 estimate is then trained at noisy steps too), ``SNR + 1`` (x0), ``1`` (v).
    At zero SNR the epsilon weight is infinite (refused there anyway, x0 being undefined).

    Returns:
        ``(B,)`` float32 weights on ``t``'s device (no gradient).

    Raises:
        ValueError: a mean type without this form (``PREVIOUS_X``).
    """
    snr = _snr(diffusion, t)
    return _x0_weight_to_target(diffusion, snr, snr + 1.0, "snr_plus_one_weights").float()


class LossCombiner(nn.Module):
    """Combine named scalar loss terms into one total with a weighting strategy.

    Strategies (``w_i`` = configured weight of term ``i``, ``L_i`` = its value):

    * ``"fixed"``: ``total = sum_i w_i * L_i``.
    * ``"warmup"``: like fixed, but every auxiliary term (all but ``"diffusion"``) is multiplied by
      ``min(step / warmup_steps, 1)``: 0 at step 0, full weight from ``warmup_steps`` on. The main
      ``"diffusion"`` term always has its full weight. ``warmup_steps = 0`` equals ``"fixed"``.
    * ``"uncertainty"``: one learned log-variance ``s_i`` (an ``nn.Parameter``, initialised to 0) per
      term with ``w_i > 0``; ``total = sum_i exp(-s_i) * w_i * L_i + s_i``. This is Kendall et al.'s
      regression form ``1/(2 sigma^2) L + log sigma`` with ``s = log sigma^2``, multiplied by 2 (same
      optimum); for fixed ``L_i`` the optimum is ``s_i = log(w_i * L_i)``, so each weighted term
      contributes about 1. The total can be negative. Add :meth:`parameters` to the optimiser.

    Terms with ``w_i = 0`` are logged but not added. Terms listed in ``names`` may be absent from a
    call (e.g. ``anchor`` for V1); a term not listed is an error.

    Logged (detached) for each present term: ``<name>`` (raw), ``w_<name>`` (weighted contribution
    ``weight * L``) and ``weight_<name>`` (effective weight).

    Example:
        >>> comb = LossCombiner("warmup", ["diffusion", "dice"], weights={"diffusion": 1, "dice": 1},
        ...                     warmup_steps=1000)
        >>> total, logged = comb({"diffusion": l_mse, "dice": l_dice}, step=500)  # dice at half weight
    """

    def __init__(
        self,
        strategy: Strategy,
        names: Sequence[str],
        *,
        weights: Mapping[str, float] | None = None,
        warmup_steps: int = 0,
        main: str = MAIN_TERM,
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"LossCombiner: strategy {strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}")
        if warmup_steps < 0:
            raise ValueError(f"LossCombiner: warmup_steps must be >= 0, got {warmup_steps}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"LossCombiner: weights given for unknown terms {unknown}; terms: {list(names)}")
        for name, w in weights.items():
            if w < 0:
                raise ValueError(f"LossCombiner: weight of {name!r} must be >= 0, got {w}")
        self.strategy = strategy
        self.names = list(names)
        self.weights = {n: float(weights.get(n, 1.0)) for n in self.names}
        self.warmup_steps = int(warmup_steps)
        self.main = main
        self.log_vars = nn.ParameterDict()
        if strategy == "uncertainty":
            for n in self.names:
                if self.weights[n] > 0:
                    self.log_vars[n] = nn.Parameter(torch.zeros(()))

    def ramp(self, step: int) -> float:
        """Warm-in factor of the auxiliary terms at ``step`` (1.0 unless strategy is ``warmup``)."""
        if self.strategy != "warmup" or self.warmup_steps == 0:
            return 1.0
        return min(max(step, 0) / self.warmup_steps, 1.0)

    def forward(self, terms: Mapping[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Combine ``terms`` (scalar tensors) at optimiser ``step``.

        Returns:
            ``(total, logged)``: the scalar total (with gradient) and detached scalars to log.

        Raises:
            ValueError: a term is not in ``names``, or no term was given.
        """
        unknown = sorted(set(terms) - set(self.names))
        if unknown:
            raise ValueError(f"LossCombiner: unknown loss terms {unknown}; configured terms: {self.names}")
        if not terms:
            raise ValueError("LossCombiner: no loss terms given")
        ramp = self.ramp(step)
        total: Tensor | None = None
        logged: dict[str, Tensor] = {}
        for name in self.names:
            if name not in terms:
                continue
            value = terms[name]
            w = self.weights[name]
            logged[name] = value.detach()
            if w == 0:
                weight = value.new_zeros(())
                contribution = None
            elif self.strategy == "uncertainty":
                s = self.log_vars[name]
                weight = w * torch.exp(-s)
                contribution = weight * value + s
            else:
                factor = w if name == self.main else w * ramp
                weight = value.new_tensor(factor)
                contribution = factor * value
            logged[f"weight_{name}"] = weight.detach()
            logged[f"w_{name}"] = (weight * value).detach()
            if contribution is not None:
                total = contribution if total is None else total + contribution
        if total is None:  # every present term has weight 0
            total = sum(v * 0.0 for v in terms.values())  # keeps the graph (and dtype/device)
        return total, logged

"""The segmentation training objective: diffusion loss + Dice/BCE on the predicted clean mask.

Only the mask is diffused: ``x0 = 2 * mask - 1`` in [-1, 1]; the network is conditioned on the
image through ``model_kwargs={"image": image}`` (Wu et al., MedSegDiff, arXiv:2211.00611). Terms:

* ``diffusion``: ``GaussianDiffusion.training_losses`` (epsilon/x0/v MSE, or the iDDPM hybrid
  MSE + VB with learned sigma, or the rescaled KL), times the schedule sampler's importance weights.
  With ``loss.diffusion_weighting=min_snr`` the per-sample MSE is weighted by min-SNR-gamma
  (Hang et al. 2023, :func:`medsegdiff.losses.multitask.min_snr_weights`), with ``snr_plus_one`` by
  the x0 weight ``SNR + 1`` (Salimans & Ho 2022, :func:`~medsegdiff.losses.multitask.snr_plus_one_weights`);
  the VB term is never re-weighted;
* ``dice`` / ``bce``: on ``p = (x0_hat + 1) / 2`` clamped to [0, 1], where ``x0_hat`` comes from the
  model output at the same ``t`` and noise through the core's
  :meth:`~improved_diffusion.gaussian_diffusion.GaussianDiffusion.predict_xstart_from_output`; each
  sample is weighted by :func:`medsegdiff.losses.multitask.timestep_weights` (``loss.timestep_weighting``,
  ``loss.snr_cap``) because at nearly pure-noise steps the input does not determine the mask. Clamping
  stops the gradient of these two terms where ``x0_hat`` leaves [-1, 1]; the diffusion term pulls it
  back (docs/objectives.md measures how often that happens for epsilon prediction);
* ``anchor`` (MedSegDiff-V2 only, when the model returns anchor logits): Dice + ``anchor_bce_weight``
  x BCE of the anchor logits against the mask, on every ``loss.anchor_every``-th optimiser step
  (MedSegDiff-V2, Wu et al. 2024: ``L = L_noise + 1[t = 0 mod alpha] (L_dice + beta L_ce)``; the anchor
  depends on the image only, so it is not timestep-weighted). ``configs/loss/v2_paper.yaml`` is that
  loss; the Dice/BCE on x0_hat of ``configs/loss/default.yaml`` is our addition, not the paper's.

Self-conditioning (``diffusion.self_condition``; Chen et al. 2022, "Analog Bits", arXiv:2208.04202,
Algorithm 1): with probability :data:`SELF_COND_PROB` per batch, a first forward pass with a zero
estimate gives ``x0_sc`` (no gradient, clipped to [-1, 1]); the trained pass then sees
``concat_self_cond(x_t, x0_sc)``, otherwise ``concat_self_cond(x_t, None)`` (zeros).

The terms are combined by :class:`medsegdiff.losses.multitask.LossCombiner` (``loss.strategy``).
The discriminative baseline (``model.is_diffusion is False``) gets Dice + BCE on its logits through
the same combiner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from improved_diffusion.resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    create_named_schedule_sampler,
)
from medsegdiff.config.schema import ExperimentConfig
from medsegdiff.diffusion.self_condition import concat_self_cond
from medsegdiff.errors import ConfigError
from medsegdiff.losses.multitask import LossCombiner, min_snr_weights, snr_plus_one_weights, timestep_weights
from medsegdiff.losses.segmentation import dice_bce_terms
from medsegdiff.nets.registry import is_diffusion_model

__all__ = [
    "DIFFUSION_TERMS",
    "DISCRIMINATIVE_TERMS",
    "SELF_COND_PROB",
    "ObjectiveOutput",
    "SegmentationObjective",
]

DIFFUSION_TERMS = ("diffusion", "dice", "bce", "anchor")
DISCRIMINATIVE_TERMS = ("dice", "bce")
# Chen et al. 2022, Algorithm 1: self-condition half of the training batches.
SELF_COND_PROB = 0.5


@dataclass
class ObjectiveOutput:
    """``loss``: scalar to back-propagate; ``terms``: detached scalars to log (raw and weighted)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class _CaptureModel:
    """Calls the network as the diffusion expects (``model(x, t, **kw) -> Tensor``) and keeps
    the first call's input, output and anchor logits (``return_anchor=True``).

    With ``self_condition`` the network input is ``concat_self_cond(x, x0_prev)``; ``x_t`` keeps the
    noisy mask alone.
    """

    def __init__(self, model: nn.Module, *, self_condition: bool = False, x0_prev: Tensor | None = None) -> None:
        self.model = model
        self.self_condition = self_condition
        self.x0_prev = x0_prev
        self.x_t: Tensor | None = None
        self.output: Tensor | None = None
        self.anchor: Tensor | None = None

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        inp = concat_self_cond(x, self.x0_prev) if self.self_condition else x
        result = self.model(inp, t, return_anchor=True, **kwargs)
        if isinstance(result, tuple):
            out, anchor = result
        else:
            out, anchor = result, None
        if self.output is None:
            self.x_t, self.output, self.anchor = x, out, anchor
        return out


class SegmentationObjective(nn.Module):
    """``objective(model, batch, step) -> ObjectiveOutput`` (ARCHITECTURE.md, training objective).

    Args:
        cfg: the experiment config (``loss``, ``diffusion.schedule_sampler``, ``model.name``).
        diffusion: the FULL-schedule diffusion (``build_diffusion(cfg.diffusion, "")``); may be
            None for the discriminative baseline.

    The module holds the loss combiner (learned log-variances with ``loss.strategy=uncertainty``:
    add :meth:`parameters` to the optimiser) and, as extra state, the history of a
    loss-aware timestep sampler.
    """

    def __init__(self, cfg: ExperimentConfig, diffusion: Any) -> None:
        super().__init__()
        self.loss_cfg = cfg.loss
        self.discriminative = not is_diffusion_model(cfg.model.name)
        self.diffusion = diffusion
        lc = cfg.loss
        if self.discriminative:
            # No auxiliary terms to warm in: Dice and BCE are the main terms of the baseline.
            strategy = "fixed" if lc.strategy == "warmup" else lc.strategy
            self.combiner = LossCombiner(
                strategy, list(DISCRIMINATIVE_TERMS), weights={"dice": lc.dice_weight, "bce": lc.bce_weight}
            )
            self.schedule_sampler = None
        else:
            if diffusion is None:
                raise ConfigError(
                    f"model.name={cfg.model.name!r} is a diffusion model but no diffusion process was given; "
                    "build one with medsegdiff.diffusion.factory.build_diffusion(cfg.diffusion)"
                )
            self.combiner = LossCombiner(
                lc.strategy,
                list(DIFFUSION_TERMS),
                weights={
                    "diffusion": lc.diffusion_weight,
                    "dice": lc.dice_weight,
                    "bce": lc.bce_weight,
                    "anchor": lc.anchor_weight,
                },
                warmup_steps=lc.warmup_steps,
            )
            self.schedule_sampler = create_named_schedule_sampler(cfg.diffusion.schedule_sampler, diffusion)
            if lc.diffusion_weighting != "none" and diffusion.loss_type.is_vb():
                raise ConfigError(
                    f"config key 'loss.diffusion_weighting': got {lc.diffusion_weighting!r}; it weights the "
                    "diffusion MSE, but "
                    "diffusion.use_kl=true trains the variational bound: set diffusion.use_kl=false or "
                    "loss.diffusion_weighting=none"
                )
        self.self_condition = bool(cfg.diffusion.self_condition) and not self.discriminative

    # -- extra state: the loss-aware sampler's history travels with the objective's state_dict
    def get_extra_state(self) -> dict[str, Any]:
        sampler = self.schedule_sampler
        if isinstance(sampler, LossSecondMomentResampler):
            return {"schedule_sampler": sampler.state_dict()}
        return {}

    def set_extra_state(self, state: Any) -> None:
        sampler = self.schedule_sampler
        if state and "schedule_sampler" in state and isinstance(sampler, LossSecondMomentResampler):
            sampler.load_state_dict(state["schedule_sampler"])

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        step: int,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        self_cond: bool | None = None,
    ) -> ObjectiveOutput:
        """Loss for one (micro-)batch.

        Args:
            model: a diffusion model (model contract) or the baseline (``is_diffusion = False``).
            batch: ``image`` ``(B, C_in, *S)`` and ``mask`` ``(B, 1, *S)`` in {0, 1}.
            step: optimiser step (for warm-in strategies and ``loss.anchor_every``).
            t: optional ``(B,)`` timesteps (default: drawn by the schedule sampler).
            noise: optional ``(B, 1, *S)`` noise (default: standard normal).
            self_cond: with ``diffusion.self_condition``, force (True) or skip (False) the
                self-conditioning pass of this batch; default: drawn with probability
                :data:`SELF_COND_PROB` from torch's global generator.

        Returns:
            :class:`ObjectiveOutput`.

        Raises:
            ConfigError: the model kind does not match ``model.name`` of the config.
            ValueError: mask/image shapes inconsistent.
        """
        is_diffusion = bool(model.is_diffusion)
        if is_diffusion == self.discriminative:
            kind = "diffusion" if is_diffusion else "discriminative"
            raise ConfigError(
                f"the objective was built for {'the baseline' if self.discriminative else 'a diffusion model'} "
                f"but got a {kind} model; build the objective from the same config as the model"
            )
        image, mask = batch["image"], batch["mask"].float()
        if mask.ndim != image.ndim or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"batch['mask'] {tuple(mask.shape)} must be (B, 1, *S) matching batch['image'] {tuple(image.shape)}"
            )
        if self.discriminative:
            return self._discriminative(model, image, mask, step)
        return self._diffusion(model, image, mask, step, t=t, noise=noise, self_cond=self_cond)

    def _discriminative(self, model: nn.Module, image: Tensor, mask: Tensor, step: int) -> ObjectiveOutput:
        logits = model(image)
        if isinstance(logits, (list, tuple)):  # deep supervision: the full-resolution head first
            logits = logits[0]
        elif logits.ndim == mask.ndim + 1:  # MONAI DynUNet deep supervision: (B, heads, C, *S)
            logits = logits[:, 0]
        raw = dice_bce_terms(logits, mask, logits=True)
        total, logged = self.combiner(raw, step)
        return ObjectiveOutput(loss=total, terms=logged)

    def _diffusion(
        self,
        model: nn.Module,
        image: Tensor,
        mask: Tensor,
        step: int,
        *,
        t: Tensor | None,
        noise: Tensor | None,
        self_cond: bool | None,
    ) -> ObjectiveOutput:
        diffusion = self.diffusion
        lc = self.loss_cfg
        x0 = 2.0 * mask - 1.0
        B = x0.shape[0]
        sampled = t is None
        if t is None:
            assert self.schedule_sampler is not None
            t, importance = self.schedule_sampler.sample(B, x0.device)
        else:
            t = t.to(device=x0.device, dtype=torch.long)
            importance = torch.ones(B, device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        model_kwargs = {"image": image}
        extra: dict[str, Tensor] = {}

        x0_sc = None
        if self.self_condition:
            if self_cond is None:
                self_cond = bool(torch.rand(()) < SELF_COND_PROB)
            if self_cond:
                x0_sc = self._self_condition_estimate(model, x0, t, noise, model_kwargs)
            extra["self_cond"] = torch.tensor(float(self_cond), device=x0.device)

        capture = _CaptureModel(model, self_condition=self.self_condition, x0_prev=x0_sc)
        losses = diffusion.training_losses(capture, x0, t, model_kwargs=model_kwargs, noise=noise)
        if isinstance(self.schedule_sampler, LossAwareSampler) and sampled:
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        per_sample = losses["loss"]
        if lc.diffusion_weighting != "none":
            if lc.diffusion_weighting == "min_snr":
                w_mse = min_snr_weights(diffusion, t, lc.min_snr_gamma)
            else:
                w_mse = snr_plus_one_weights(diffusion, t)
            per_sample = w_mse * losses["mse"] + losses["vb"] if "vb" in losses else w_mse * losses["mse"]
            extra["mse_weight"] = w_mse.mean()
        raw: dict[str, Tensor] = {"diffusion": (per_sample * importance).mean()}
        for key in ("mse", "vb"):
            if key in losses:
                extra[f"diffusion_{key}"] = losses[key].detach().mean()

        x0_hat = self._predict_x0(capture, t)
        prob = ((x0_hat + 1.0) / 2.0).clamp(0.0, 1.0)
        weights = timestep_weights(diffusion, t, lc.timestep_weighting, snr_cap=lc.snr_cap)
        raw.update(dice_bce_terms(prob, mask, logits=False, weights=weights))
        extra["timestep_weight"] = weights.mean()

        if capture.anchor is not None:
            anchor_terms = dice_bce_terms(capture.anchor, mask, logits=True)
            extra["anchor_dice"] = anchor_terms["dice"].detach()
            extra["anchor_bce"] = anchor_terms["bce"].detach()
            applied = step % lc.anchor_every == 0
            if applied:
                raw["anchor"] = anchor_terms["dice"] + lc.anchor_bce_weight * anchor_terms["bce"]
            extra["anchor_applied"] = torch.tensor(float(applied), device=x0.device)

        total, logged = self.combiner(raw, step)
        logged.update({k: v.detach() for k, v in extra.items()})
        return ObjectiveOutput(loss=total, terms=logged)

    def _self_condition_estimate(
        self, model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, model_kwargs: dict[str, Any]
    ) -> Tensor:
        """First pass of Chen et al.'s Algorithm 1: ``x0`` from ``net(x_t, zeros, t)``, no gradient.

        ``x_t`` is built from the same ``x0``, ``t`` and noise as the trained pass; the estimate goes
        through the core (``p_mean_variance``, clipped to [-1, 1]) for any parametrisation.
        """
        diffusion = self.diffusion

        def first_pass(x: Tensor, ts: Tensor, **kwargs: Any) -> Tensor:
            return model(concat_self_cond(x, None), ts, **kwargs)

        with torch.no_grad():
            x_t = diffusion.q_sample(x0, t, noise=noise)
            out = diffusion.p_mean_variance(first_pass, x_t, t, clip_denoised=True, model_kwargs=model_kwargs)
        return out["pred_xstart"].detach()

    def _predict_x0(self, capture: _CaptureModel, t: Tensor) -> Tensor:
        """The clean mask implied by the captured model output (same ``t`` and noise), unclipped."""
        out, x_t = capture.output, capture.x_t
        if out is None or x_t is None:  # pragma: no cover - training_losses always calls the model
            raise RuntimeError("the diffusion did not call the model")
        return self.diffusion.predict_xstart_from_output(x_t, t, out)

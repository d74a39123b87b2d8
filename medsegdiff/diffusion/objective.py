"""The segmentation training objective: diffusion loss + Dice/BCE on the predicted clean mask.

Only the mask is diffused: ``x0 = 2 * mask - 1`` in [-1, 1]; the network is conditioned on the
image through ``model_kwargs={"image": image}`` (Wu et al., MedSegDiff, arXiv:2211.00611). Terms:

* ``diffusion``: ``GaussianDiffusion.training_losses`` (epsilon/x0 MSE, or the iDDPM hybrid
  MSE + VB with learned sigma, or the rescaled KL), times the schedule sampler's importance weights;
* ``dice`` / ``bce``: on ``p = (x0_hat + 1) / 2`` clamped to [0, 1], where ``x0_hat`` comes from the
  model output at the same ``t`` and noise through the diffusion's own predict-x0 functions; each
  sample is weighted by :func:`medsegdiff.losses.multitask.timestep_weights` (``loss.timestep_weighting``)
  because ``x0_hat`` is a blurry guess at nearly pure-noise steps. Clamping stops the gradient of
  these two terms where ``x0_hat`` leaves [-1, 1]; the diffusion term pulls it back;
* ``anchor`` (MedSegDiff-V2 only, when the model returns anchor logits): Dice + BCE of the anchor
  logits against the mask (the anchor depends on the image only, so it is not timestep-weighted).

The terms are combined by :class:`medsegdiff.losses.multitask.LossCombiner` (``loss.strategy``).
The discriminative baseline (``model.is_diffusion is False``) gets Dice + BCE on its logits through
the same combiner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from improved_diffusion.gaussian_diffusion import ModelMeanType, ModelVarType
from improved_diffusion.resample import LossAwareSampler, create_named_schedule_sampler
from medsegdiff.config.schema import ExperimentConfig
from medsegdiff.errors import ConfigError
from medsegdiff.losses.multitask import LossCombiner, timestep_weights
from medsegdiff.losses.segmentation import dice_bce_terms

__all__ = ["DIFFUSION_TERMS", "DISCRIMINATIVE_TERMS", "ObjectiveOutput", "SegmentationObjective"]

DIFFUSION_TERMS = ("diffusion", "dice", "bce", "anchor")
DISCRIMINATIVE_TERMS = ("dice", "bce")


@dataclass
class ObjectiveOutput:
    """``loss``: scalar to back-propagate; ``terms``: detached scalars to log (raw and weighted)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class _CaptureModel:
    """Calls the network as the diffusion expects (``model(x, t, **kw) -> Tensor``) and keeps
    the first call's input, output and anchor logits (``return_anchor=True``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.x_t: Tensor | None = None
        self.output: Tensor | None = None
        self.anchor: Tensor | None = None

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        result = self.model(x, t, return_anchor=True, **kwargs)
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
        self.discriminative = cfg.model.name == "dynunet"
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

    # -- extra state: the loss-aware sampler's history travels with the objective's state_dict
    def get_extra_state(self) -> dict[str, Any]:
        sampler = self.schedule_sampler
        if isinstance(sampler, LossAwareSampler) and hasattr(sampler, "state_dict"):
            return {"schedule_sampler": sampler.state_dict()}
        return {}

    def set_extra_state(self, state: Any) -> None:
        sampler = self.schedule_sampler
        if state and "schedule_sampler" in state and hasattr(sampler, "load_state_dict"):
            sampler.load_state_dict(state["schedule_sampler"])

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        step: int,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> ObjectiveOutput:
        """Loss for one (micro-)batch.

        Args:
            model: a diffusion model (model contract) or the baseline (``is_diffusion = False``).
            batch: ``image`` ``(B, C_in, *S)`` and ``mask`` ``(B, 1, *S)`` in {0, 1}.
            step: optimiser step (for warm-in strategies).
            t: optional ``(B,)`` timesteps (default: drawn by the schedule sampler).
            noise: optional ``(B, 1, *S)`` noise (default: standard normal).

        Returns:
            :class:`ObjectiveOutput`.

        Raises:
            ConfigError: the model kind does not match ``model.name`` of the config.
            ValueError: mask/image shapes inconsistent.
        """
        is_diffusion = bool(getattr(model, "is_diffusion", True))
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
        return self._diffusion(model, image, mask, step, t=t, noise=noise)

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
        self, model: nn.Module, image: Tensor, mask: Tensor, step: int, *, t: Tensor | None, noise: Tensor | None
    ) -> ObjectiveOutput:
        diffusion = self.diffusion
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

        capture = _CaptureModel(model)
        losses = diffusion.training_losses(capture, x0, t, model_kwargs={"image": image}, noise=noise)
        if isinstance(self.schedule_sampler, LossAwareSampler) and sampled:
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        raw: dict[str, Tensor] = {"diffusion": (losses["loss"] * importance).mean()}
        extra: dict[str, Tensor] = {}
        for key in ("mse", "vb"):
            if key in losses:
                extra[f"diffusion_{key}"] = losses[key].detach().mean()

        x0_hat = self._predict_x0(capture, t)
        prob = ((x0_hat + 1.0) / 2.0).clamp(0.0, 1.0)
        weights = timestep_weights(diffusion, t, self.loss_cfg.timestep_weighting)
        raw.update(dice_bce_terms(prob, mask, logits=False, weights=weights))
        extra["timestep_weight"] = weights.mean()

        if capture.anchor is not None:
            anchor_terms = dice_bce_terms(capture.anchor, mask, logits=True)
            raw["anchor"] = anchor_terms["dice"] + anchor_terms["bce"]
            extra["anchor_dice"] = anchor_terms["dice"].detach()
            extra["anchor_bce"] = anchor_terms["bce"].detach()

        total, logged = self.combiner(raw, step)
        logged.update({k: v.detach() for k, v in extra.items()})
        return ObjectiveOutput(loss=total, terms=logged)

    def _predict_x0(self, capture: _CaptureModel, t: Tensor) -> Tensor:
        """The clean mask implied by the captured model output (same ``t`` and noise)."""
        diffusion = self.diffusion
        out, x_t = capture.output, capture.x_t
        if out is None or x_t is None:  # pragma: no cover - training_losses always calls the model
            raise RuntimeError("the diffusion did not call the model")
        C = x_t.shape[1]
        if diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            out = out[:, :C]
        if diffusion.model_mean_type == ModelMeanType.START_X:
            return out
        if diffusion.model_mean_type == ModelMeanType.EPSILON:
            return diffusion._predict_xstart_from_eps(x_t, t, out)
        return diffusion._predict_xstart_from_xprev(x_t, t, out)

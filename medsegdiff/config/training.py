"""Loss, optimiser and trainer sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsegdiff.config.base import bad_value, option


@dataclass
class LossConfig:
    """Multi-task loss: diffusion term + Dice/BCE on the predicted clean mask (+ V2 anchor).

    ``configs/loss/v2_paper.yaml`` is MedSegDiff-V2's published loss (noise MSE every step, anchor
    Dice + CE every ``anchor_every`` steps); ``configs/loss/default.yaml`` is our mix with Dice/BCE
    on x0-hat, which is not the paper's.
    """

    dice_weight: float = option(1.0, ge=0.0)
    bce_weight: float = option(1.0, ge=0.0)
    anchor_weight: float = option(1.0, ge=0.0, doc="V2 anchor head (Dice + BCE against the mask)")
    diffusion_weight: float = option(1.0, ge=0.0)
    timestep_weighting: Literal["none", "snr", "alpha_bar"] = option(
        "snr",
        doc="weight of the x0-hat Dice/BCE per timestep: none = 1, snr = min(SNR, snr_cap) / snr_cap, "
        "alpha_bar = abar_t",
    )
    snr_cap: float = option(
        1.0, gt=0.0,
        doc="SNR at and above which the x0-hat Dice/BCE get full weight with timestep_weighting=snr "
        "(below it the weight falls linearly with SNR, towards 0 at pure noise)",
    )
    diffusion_weighting: Literal["none", "min_snr", "snr_plus_one"] = option(
        "none",
        doc="per-timestep weight of the diffusion MSE: none; min_snr = min-SNR-gamma (Hang et al. 2023; "
        "x0 weight min(SNR, gamma)); snr_plus_one = x0 weight SNR + 1, v's implicit weight (Salimans & Ho "
        "2022, Sec. 4; for epsilon (SNR + 1) / SNR)",
    )
    min_snr_gamma: float = option(5.0, gt=0.0, doc="gamma of diffusion_weighting=min_snr (Hang et al. 2023: 5)")
    anchor_every: int = option(
        1, ge=1,
        doc="apply the V2 anchor term on every N-th optimiser step only (the alpha of MedSegDiff-V2's "
        "loss, Wu et al. 2024); 1 = every step",
    )
    anchor_bce_weight: float = option(
        1.0, ge=0.0, doc="weight of the BCE inside the anchor term: Dice + w * BCE (the beta of MedSegDiff-V2)"
    )
    strategy: Literal["fixed", "warmup", "uncertainty"] = option(
        "fixed", doc="fixed weights, linear warm-in of aux terms, or learned uncertainty (Kendall 2018)"
    )
    warmup_steps: int = option(0, ge=0, doc="steps for the linear warm-in of auxiliary terms")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = option("adamw", doc="optimiser (the learned loss weights are optimised too)")
    lr: float = option(1e-4, gt=0.0, doc="peak learning rate (after warm-up)")
    weight_decay: float = option(0.0, ge=0.0)
    betas: list[float] = option([0.9, 0.999], doc="Adam/AdamW betas")
    momentum: float = option(0.9, ge=0.0, doc="sgd only")
    schedule: Literal["constant", "cosine"] = option("cosine", doc="after warm-up: constant or cosine decay to min_lr_ratio")
    warmup_steps: int = option(0, ge=0, doc="linear warm-up steps (from lr / warmup_steps to lr)")
    min_lr_ratio: float = option(0.0, ge=0.0, le=1.0, doc="cosine floor as a fraction of lr")
    grad_clip: float = option(1.0, ge=0.0, doc="max gradient norm; 0 = off")

    def validate(self, prefix: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad_value(f"{prefix}.betas", self.betas, "allowed: two numbers in [0, 1)")


@dataclass
class ValidationConfig:
    every: int = option(0, ge=0, doc="validate every N steps; 0 = only at the end")
    respacing: str | int = option(
        "ddim250", doc="respacing used for validation sampling (as diffusion.respacing; an integer N means 'N')")
    ensemble: int = option(1, ge=1, doc="ensemble members averaged per validation case")
    max_cases: int = option(0, ge=0, doc="validate on at most N cases; 0 = all")
    threshold: float = option(0.5, gt=0.0, lt=1.0, doc="probability threshold for the validation masks")
    use_ema: bool = option(True, doc="validate (and pick best.pt) with the EMA weights")


@dataclass
class TrainConfig:
    steps: int = option(1000, ge=1, doc="optimizer steps")
    time_budget_s: float = option(0.0, ge=0.0, doc="stop after this many seconds (0 = none)")
    batch_size: int = option(8, ge=1, doc="global batch size per optimizer step")
    grad_accum: int = option(1, ge=1, doc="micro-batches per step (batch_size must divide evenly)")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", doc="bf16 = autocast (CPU or GPU); fp16 = autocast + GradScaler (CUDA only)"
    )
    ema_rate: float = option(0.999, ge=0.0, lt=1.0, doc="EMA decay of the weights used for validation and inference")
    log_every: int = option(10, ge=1, doc="log training scalars every N steps")
    checkpoint_every: int = option(200, ge=1, doc="write checkpoints/step_N.pt every N steps (and at the end)")
    keep_last: int = option(2, ge=1, doc="step checkpoints kept (best.pt is kept separately)")
    max_bad_steps: int = option(5, ge=1, doc="stop after this many non-finite steps in a row")
    deterministic: bool = option(True, doc="deterministic algorithms on CPU (bit-exact resume)")
    validation: ValidationConfig = option(default_factory=ValidationConfig)

    def validate(self, prefix: str) -> None:
        if self.batch_size % self.grad_accum:
            raise bad_value(
                f"{prefix}.grad_accum", self.grad_accum,
                f"allowed: a divisor of batch_size ({self.batch_size})",
            )
